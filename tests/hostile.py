"""Hostile payloads built in the test, in milliseconds: decompression bombs and lying headers.

Shared by the codec tests (tests/test_bounded_decoding.py) and the suite over
real MQTT (tests/test_hostile_payloads.py).
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import cv2
import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def zeros_zlib(block: int, repeats: int) -> bytes:
    """A zlib stream of ``block * repeats`` zero bytes, compressed once and repeated."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    total = block * repeats
    return (b"\x78\xda" + deflated * repeats + b"\x03\x00"
            + struct.pack(">I", ((total % 65521) << 16) | 1))


def png_ihdr(width: int, height: int) -> bytes:
    return _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))


def png_bomb(width: int, height: int) -> bytes:
    """A real, valid grey PNG of ``width`` x ``height`` black pixels (30000x30000: ~880 KB).

    Deflating 900 MB of zeros takes seconds, so one fully flushed block of rows is
    compressed once and repeated: after Z_FULL_FLUSH a block refers to nothing before
    it, so the copies form one valid zlib stream; its Adler-32 over n zero bytes is
    ((n mod 65521) << 16) | 1.
    """
    rows = 100
    while height % rows:
        rows -= 1
    # Every row starts with its filter byte (0), so the data is all zeros.
    stream = zeros_zlib((width + 1) * rows, height // rows)
    return (b"\x89PNG\r\n\x1a\n" + png_ihdr(width, height) + _chunk(b"IDAT", stream)
            + _chunk(b"IEND", b""))


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose IHDR claims ``width`` x ``height`` (65000x65000 would not fit 4 MB
    as a real bomb)."""
    real = png_bomb(8, 8)
    return real[:8] + png_ihdr(width, height) + real[8 + 25:]


def apng_with_frame(width: int, height: int) -> bytes:
    """An animated PNG with an 8x8 canvas whose second frame claims ``width`` x ``height``."""
    def frame_control(sequence: int, w: int, h: int) -> bytes:
        return _chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, w, h, 0, 0, 1, 10, 0, 0))

    small = zlib.compress(bytes(9 * 8), 9)
    big = zlib.compress(bytes((width + 1) * height), 9)
    return (b"\x89PNG\r\n\x1a\n" + png_ihdr(8, 8)
            + _chunk(b"acTL", struct.pack(">II", 2, 0)) + frame_control(0, 8, 8)
            + _chunk(b"IDAT", small) + frame_control(1, width, height)
            + _chunk(b"fdAT", struct.pack(">I", 2) + big) + _chunk(b"IEND", b""))


def png_with_chunk_bomb(kind: bytes) -> bytes:
    """An 8x8 PNG carrying a zTXt or iCCP chunk that inflates to 400 MB (400 KB on the wire)."""
    bomb = zeros_zlib(1 << 20, 400)
    prefix = b"Comment\x00\x00" if kind == b"zTXt" else b"icc\x00\x00"
    real = png_bomb(8, 8)
    return real[:33] + _chunk(kind, prefix + bomb) + real[33:]


def png_lying_small(width: int, height: int, data_rows: int, data_width: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but whose data holds far more."""
    compressor = zlib.compressobj(9)
    stream = b"".join(compressor.compress(bytes(data_width + 1)) for _ in range(data_rows))
    stream += compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + png_ihdr(width, height) + _chunk(b"IDAT", stream)
            + _chunk(b"IEND", b""))


def jpeg(width: int = 8, height: int = 8, value: int = 128) -> bytes:
    ok, data = cv2.imencode(".jpg", np.full((height, width), value, np.uint8))
    assert ok
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 frame header is patched to claim ``width`` x ``height``."""
    data = bytearray(jpeg())
    sof = data.find(b"\xff\xc0")
    assert sof > 0, "OpenCV wrote no baseline SOF0 marker"
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def jpeg_scan_bomb(width: int, height: int, repeats: int) -> bytes:
    """A real progressive JPEG whose last scan is repeated: libjpeg only warns about the
    repeats and makes a pass over every coefficient for each (~15 ms at 4096x4096)."""
    ok, data = cv2.imencode(".jpg", np.full((height, width), 100, np.uint8),
                            [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    body = bytes(data)[:-2]  # without EOI
    last = body.rfind(b"\xff\xda")
    return body + body[last:] * repeats + b"\xff\xd9"


def npy_lying(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    """A .npy header declaring ``shape`` followed by only 64 bytes of data."""
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        stream, {"descr": dtype, "fortran_order": False, "shape": shape})
    return stream.getvalue() + bytes(64)


def npy(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def json_nested(depth: int) -> bytes:
    return b'{"id": "deep", "tensor": ' + b"[" * depth + b"]" * depth + b"}"


def json_tensor(values: object, request_id: str) -> bytes:
    return json.dumps({"id": request_id, "tensor": values}).encode()
