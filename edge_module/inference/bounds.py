"""Sizes read from payload headers before anything is decoded or allocated.

The codec (``codecs.py``, run by the pipeline's decode threads) asks this module
how big an input *claims* to be, so that it can refuse a decompression bomb
before OpenCV or numpy allocate a single pixel or element:

* ``image_dimensions``: width and height from a PNG's IHDR chunk or a JPEG's
  frame header (SOFn marker), the only image formats the codec accepts;
* ``jpeg_scans``: how many scans a JPEG holds; each costs a pass over all its
  coefficients, so 1,000 repeated 33-byte scans make a 4096x4096 JPEG take 15 s;
* ``npy_header``: dtype, shape and data offset of ``.npy`` bytes (numpy's own
  header reader, which parses the header text without touching the data);
* ``open_npz``: the members of ``.npz`` bytes (``numpy.savez``), their count
  read from the zip's end record and its directory's entry signatures (the count
  field can lie) before the directory is parsed, with each
  member's ``.npy`` header, read from at most ~10 KB of the member; a member's
  data is read later, only as many bytes as its zip entry declares (so a
  deflated member cannot expand past the size its checked header implies);
* ``json_refusal``: whether a JSON text nests too deeply or holds too many
  arrays, objects and strings, counted without recursion or parsing, so that
  100,000 nested brackets cannot exhaust the Python stack and 4 MiB of ``[],``
  cannot cost 140 MB of Python objects.

Nothing here allocates more than a small multiple of the payload. A header
that cannot be read raises ``MalformedHeader`` with a sentence saying why.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zipfile
import zlib
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


@dataclass(frozen=True)
class NpzMember:
    """One array of a ``.npz``: its ``.npy`` header and its zip entry."""

    header: NpyHeader
    info: zipfile.ZipInfo


NPZ_MAGIC = b"PK\x03\x04"
# The zip errors a corrupt or hostile archive raises while it is read.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
              NotImplementedError, RuntimeError)


def open_npz(data: bytes, max_members: int) -> tuple[zipfile.ZipFile, dict[str, NpzMember]]:
    """The archive and its arrays by name (``a.npy`` is ``a``), headers checked: at
    most ``max_members`` members, stored or deflated, unencrypted, each entry's size
    exactly its header plus the data its dtype and shape declare."""
    # The entry count from the end-of-central-directory record first: parsing the
    # directory costs ~500 bytes of Python per entry, and 4 MiB hold 90,000 entries.
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 65_535))
    if end < 0 or end + 22 > len(data):
        raise MalformedHeader("the .npz has no end-of-central-directory record")
    entries, directory_size = struct.unpack_from("<HI", data, end + 10)
    if entries > max_members:
        raise MalformedHeader(f"the .npz declares {entries} members; at most {max_members} "
                              "(one per model input) are accepted")
    # zipfile parses every entry of the directory whatever the count says, so the
    # directory (the bytes before the end record) is checked too: each entry starts with
    # its signature. A zip64 end record could place it elsewhere; no .npz within the
    # payload limit needs one.
    if end >= 20 and data[end - 20:end - 16] == b"PK\x06\x07":
        raise MalformedHeader("the .npz is a zip64 archive; numpy.savez writes a plain zip")
    signatures = data.count(b"PK\x01\x02", max(0, end - directory_size), end)
    if signatures > max_members:
        raise MalformedHeader(f"the .npz directory holds {signatures} entries; at most "
                              f"{max_members} (one per model input) are accepted")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
        if len(infos) > max_members:
            raise MalformedHeader(f"the .npz holds {len(infos)} members; at most "
                                  f"{max_members} (one per model input) are accepted")
        members: dict[str, NpzMember] = {}
        for info in infos:
            if not info.filename.endswith(".npy") or info.filename[:-4] in members:
                raise MalformedHeader(f"the .npz member {info.filename!r} is not a uniquely "
                                      "named .npy (numpy.savez writes <input name>.npy)")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or \
                    info.flag_bits & 0x1:
                raise MalformedHeader(f"the .npz member {info.filename!r} is encrypted or "
                                      "compressed other than by deflate (numpy.savez or "
                                      "savez_compressed)")
            with archive.open(info) as stream:
                head = stream.read(min(info.file_size, NPY_MAX_HEADER + 16))
            header = npy_header(head)
            declared = header.data_offset + header.elements * header.dtype.itemsize
            if info.file_size != declared:
                raise MalformedHeader(
                    f"the .npz member {info.filename!r} declares shape {list(header.shape)} "
                    f"({declared:,} bytes with its header) but holds {info.file_size:,}")
            members[info.filename[:-4]] = NpzMember(header, info)
    except MalformedHeader:
        raise
    except ZIP_ERRORS as exc:
        raise MalformedHeader(f"the .npz cannot be read: {exc}") from None
    return archive, members


def npz_array(archive: zipfile.ZipFile, member: NpzMember) -> np.ndarray:
    """A member's array, read once its header passed the caller's limits."""
    header = member.header
    try:
        with archive.open(member.info) as stream:
            raw = stream.read(member.info.file_size)
    except ZIP_ERRORS as exc:
        raise MalformedHeader(f"the .npz member {member.info.filename!r} cannot be read: "
                              f"{exc}") from None
    if len(raw) != member.info.file_size:
        raise MalformedHeader(f"the .npz member {member.info.filename!r} is truncated")
    array = np.frombuffer(raw, dtype=header.dtype, count=header.elements,
                          offset=header.data_offset)
    return array.reshape(header.shape, order="F" if header.fortran_order else "C")


def image_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) that a PNG or JPEG declares, read from its header only."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_dimensions(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_dimensions(data)
    raise MalformedHeader("the image is not a JPEG or PNG")


def jpeg_scans(data: bytes) -> int:
    """How many scans (SOS markers) a JPEG holds. Entropy-coded data stuffs every 0xFF
    with 0x00, so 0xFFDA occurs only as a marker (or inside an embedded thumbnail)."""
    return data.count(b"\xff\xda")


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


def json_refusal(payload: bytes, max_depth: int, max_nodes: int) -> str | None:
    """Why a JSON text nests too deeply or holds too many values to parse; None if fine.

    ``max_nodes`` bounds arrays, objects and strings (keys included) together: each
    costs Python 50-70 bytes when parsed. Linear in the payload, iterative (100,000
    nested ``[`` cost no recursion) and bounded in memory: escape pairs are dropped,
    after which every quote delimits a string, so the text outside strings is every
    other piece between quotes, split only once the string count is known to be
    small. In invalid JSON the counts may be off; such a text is refused anyway.
    """
    if b"\\" in payload:
        payload = _JSON_ESCAPE.sub(b"", payload)
    strings = payload.count(b'"') // 2
    if strings > max_nodes:
        return (f"the JSON holds {strings:,} strings; at most {max_nodes:,} arrays, objects "
                "and strings in all are accepted")
    brackets = b"".join(payload.split(b'"')[::2]).translate(None, _NOT_BRACKETS)
    depth = _deepest(brackets)
    if depth > max_depth:
        return f"the JSON nests {depth:,} levels deep; at most {max_depth} are accepted"
    containers = brackets.count(b"[") + brackets.count(b"{")
    if containers + strings > max_nodes:
        return (f"the JSON holds {containers:,} arrays and objects and {strings:,} strings; "
                f"at most {max_nodes:,} in all are accepted")
    return None


def json_depth(payload: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (strings are skipped)."""
    if b"\\" in payload:
        payload = _JSON_ESCAPE.sub(b"", payload)
    return _deepest(b"".join(payload.split(b'"')[::2]).translate(None, _NOT_BRACKETS))


def _deepest(brackets: bytes, chunk: int = 65_536) -> int:
    """The deepest nesting of a string of brackets, summed a chunk at a time."""
    depth = deepest = 0
    for start in range(0, len(brackets), chunk):
        codes = np.frombuffer(brackets, dtype=np.uint8, offset=start,
                              count=min(chunk, len(brackets) - start))
        running = np.cumsum(np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)) + depth
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
    return deepest
