"""Sizes read from payload headers before anything is decoded or allocated.

The codec (``codecs.py``, run by the pipeline's decode threads) asks this module
how big an input *claims* to be, so that it can refuse a decompression bomb
before OpenCV or numpy allocate a single pixel or element:

* ``image_dimensions``: width and height from a PNG's IHDR chunk or a JPEG's
  frame header (SOFn marker), the only image formats the codec accepts;
* ``npy_header``: dtype, shape and data offset of ``.npy`` bytes (numpy's own
  header reader, which parses the header text without touching the data);
* ``json_depth``: how deeply a JSON text nests, counted without recursion, so
  that 100,000 nested brackets cannot exhaust the Python stack.

Nothing here allocates more than a small multiple of the payload. A header
that cannot be read raises ``MalformedHeader`` with a sentence saying why.
"""

from __future__ import annotations

import io
import math
import re
import struct
from dataclasses import dataclass

import numpy as np

PNG_IHDR = b"\x00\x00\x00\x0dIHDR"
# Start-of-frame markers: baseline, extended, progressive, lossless, hierarchical, arithmetic.
# 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range but are not frame headers.
JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7,
                      0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers that stand alone (no length field): TEM, RST0..7, SOI.
JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
JPEG_SOS, JPEG_EOI = 0xDA, 0xD9
NPY_MAX_HEADER = 10_000
# An escape pair inside a JSON string (\" or \\ among them).
_JSON_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class MalformedHeader(ValueError):
    """The header cannot be read; the message says what is wrong with it."""


@dataclass(frozen=True)
class NpyHeader:
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def image_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) that a PNG or JPEG declares, read from its header only."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_dimensions(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_dimensions(data)
    raise MalformedHeader("the image is not a JPEG or PNG")


def _png_dimensions(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[8:16] != PNG_IHDR:
        raise MalformedHeader("the PNG does not start with an IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0:
        raise MalformedHeader(f"the PNG declares an empty image ({width}x{height})")
    return width, height


def _jpeg_dimensions(data: bytes) -> tuple[int, int]:
    pos, end = 2, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            raise MalformedHeader(f"the JPEG has no marker at byte {pos} before its frame "
                                  "header")
        while pos < end and data[pos] == 0xFF:  # fill bytes may pad a marker
            pos += 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if marker in JPEG_STANDALONE:
            continue
        if marker in (JPEG_SOS, JPEG_EOI):
            raise MalformedHeader("the JPEG has no frame header (SOF) before its image data")
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2:
            raise MalformedHeader(f"the JPEG has a segment of length {length}")
        if marker in JPEG_SOF:
            if length < 8 or pos + 7 > end:
                break
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            if width == 0 or height == 0:
                raise MalformedHeader(f"the JPEG declares a {width}x{height} frame (a height "
                                      "given later by a DNL marker is not supported)")
            return width, height
        pos += length
    raise MalformedHeader("the JPEG ends before its frame header (SOF)")


def npy_header(data: bytes) -> NpyHeader:
    """The dtype, shape and data offset of ``.npy`` bytes; the data is not read."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(
                stream, max_header_size=NPY_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(
                stream, max_header_size=NPY_MAX_HEADER)
        else:
            raise MalformedHeader(f".npy format version {version[0]}.{version[1]} is not "
                                  "supported; numpy.save writes 1.0")
    except MalformedHeader:
        raise
    except (ValueError, TypeError, EOFError, OSError, SyntaxError, RecursionError,
            MemoryError) as exc:
        raise MalformedHeader(f"the .npy header cannot be read: {exc}") from None
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise MalformedHeader(f"the .npy header declares an invalid shape {shape!r}")
    return NpyHeader(dtype, tuple(shape), bool(fortran), stream.tell())


def json_depth(payload: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (strings are skipped).

    Linear in the payload and iterative: a text of 100,000 ``[`` costs a few C
    passes and one cumulative sum, never a recursion. Once escape pairs are gone,
    every quote delimits a string, so the text outside strings is every other
    piece between quotes (in invalid JSON the count may be off, and the text is
    refused as invalid anyway).
    """
    if b"\\" in payload:
        payload = _JSON_ESCAPE.sub(b"", payload)
    outside = b"".join(payload.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps, dtype=np.int32).max())
