"""Codecs: turn one input message into model-ready float32 items, or a PayloadError.

Accepted payloads (docs/mqtt-topics.md has the full reference):

* raw JPEG or PNG bytes, recognised by their magic bytes;
* raw ``.npy`` bytes holding a tensor;
* a JSON object ``{"id", "image": "<base64>"}``, ``{"id", "tensor": [...]}`` or
  ``{"id", "items": [{"image"|"tensor": ...}, ...]}``;
* for a model of named inputs (descriptor ``inputs``): a JSON object
  ``{"id", "inputs": {"<name>": {"shape", "dtype", "data"}, ...}}``, raw ``.npz``
  bytes (``numpy.savez``, one member per input), or, when the model has one
  input, the forms above for a tensor. Every input carries one item (its item
  shape) or the same number k of items (batch first); an item is a dict of
  arrays by input name, and the items of one message share their shapes
  (``Decoded.shape_key``: only items of equal shapes are batched together).
  Dtypes must cast safely to the input's (int32 to int64, not float to int).
  Each dynamic size lies within the input's ``minShape`` and ``maxShape``
  (``NamedInput.bounds``), checked from the shape a header or the JSON declares
  before any data is read, inflated or cast: over ``maxShape`` is ``TensorTooLarge``,
  under ``minShape`` (a zero-length size, by default) ``TensorShapeMismatch``.

``"output": "npy"`` in a JSON request asks a tensor model for base64 ``.npy``
outputs instead of nested lists (``Decoded.tensors``).

Every way a payload can be wrong maps to one stable error code (``ErrorCode``),
so that clients can branch on it. Images are decoded and normalised with
OpenCV (``imdecode`` + ``resize`` + ``blobFromImage``), which is faster than
numpy arithmetic and releases the GIL while it works.

Bounded decoding (``bounds.py`` reads the headers): an image's declared size is
checked against ``Pipeline:MaxImagePixels`` before OpenCV sees it
(``ImageTooLarge``), a ``.npy``'s declared shape against the model and
``Pipeline:MaxTensorElements`` before numpy allocates (``TensorShapeMismatch``,
``TensorTooLarge``), and JSON nesting and size against ``MAX_JSON_DEPTH`` and
``MAX_JSON_NODES`` before it is parsed (``InvalidJson``). In a batch every image
header is checked before the first image is decoded, and the images together
may declare at most ``MESSAGE_PIXELS_PER_IMAGE_LIMIT`` (4) times the per-image
limit; a JPEG may hold at most ``MAX_JPEG_SCANS`` scans. OpenCV's own limit
(2^30 pixels, ``OPENCV_IO_MAX_IMAGE_PIXELS``) stays behind ours as a backstop;
its errors map to ``ImageDecodeFailed``. NaN and infinite values are refused
with ``TensorValueInvalid``: no model here gives a meaningful answer to them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from edge_module.errors import ErrorCode
from edge_module.exceptions import PayloadError
from edge_module.inference.bounds import (
    NPZ_MAGIC,
    MalformedHeader,
    image_dimensions,
    jpeg_scans,
    json_refusal,
    npy_header,
    npz_array,
    open_npz,
)
from edge_module.inference.descriptor import TENSOR_TYPES
from edge_module.inference.heads import Frame
from edge_module.inference.models import ImageInput, Item, Model

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
MAX_ID_LENGTH = 256
# Deepest JSON nesting accepted: a batch of 5-D tensors needs 8; anything deeper is an attack
# or a bug, refused before parsing (Python's parser would hit its recursion limit).
MAX_JSON_DEPTH = 32
# Most arrays, objects and strings in one JSON message. Each costs Python 50-70 bytes, so 4 MiB
# of "[]," would take ~140 MB and seconds to parse; a batch of 64 items of tensors or images
# needs a few thousand.
MAX_JSON_NODES = 65_536
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# The images of one message together may declare this many times Pipeline:MaxImagePixels.
# Decoding costs time per pixel: 64 valid 4096x4096 PNGs fit in 1.5 MB and would hold a
# decode worker for seconds; 4 MiB of real photos (~10 pixels per byte) stays far below.
MESSAGE_PIXELS_PER_IMAGE_LIMIT = 4
# Most scans in one JPEG. libjpeg's progressive scripts use at most 10; every further scan
# (even a repeated one, which libjpeg only warns about) costs a pass over the whole image.
MAX_JPEG_SCANS = 64
DEFAULT_MAX_TENSOR_ELEMENTS = 16 * 1024 * 1024
REQUEST_FIELDS = {"id", "model", "version", "image", "tensor", "items", "inputs", "output"}
ITEM_FIELDS = {"image", "tensor"}
NAMED_FIELDS = {"shape", "dtype", "data"}


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int
    max_batch_items: int
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_tensor_elements: int = DEFAULT_MAX_TENSOR_ELEMENTS


@dataclass
class Decoded:
    """A decoded request: its id (if the payload named one), its items, and for each
    item the ``Frame`` it was fitted from (None for a tensor). ``shape_key``: the
    items' shapes when the model has dynamic sizes (only equal keys share a batch);
    ``tensors``: how a tensor model answers (``"output"`` field)."""

    request_id: str | None
    items: Sequence[Item]
    frames: list[Frame | None] = field(default_factory=list)
    shape_key: tuple[tuple[int, ...], ...] | None = None
    tensors: Literal["json", "npy"] = "json"

    def __post_init__(self) -> None:
        if not self.frames:
            self.frames = [None] * len(self.items)


class RequestError(PayloadError):
    """A PayloadError that remembers the request id, when the payload had one."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(code, message)
        self.request_id = request_id


class Codec:
    """Decodes payloads for one model."""

    def __init__(self, model: Model, limits: Limits) -> None:
        self.model = model
        self.limits = limits
        self.spec = model.descriptor.input
        self.item_shape = model.item_shape
        self.named = {spec.name: spec for spec in model.named_inputs}

    def decode(self, payload: bytes, body: dict[str, Any] | None = None) -> Decoded:
        """Decode one message; ``body`` is its JSON object when ``parse_json`` already
        parsed it (to read the model it names) so it is not parsed twice."""
        if body is not None:
            return self._body(body)
        if not payload:
            raise RequestError(ErrorCode.EMPTY_PAYLOAD, "the message is empty; send a JPEG/PNG "
                               "image, .npy bytes or a JSON request")
        if len(payload) > self.limits.max_payload_bytes:
            raise RequestError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the message has {len(payload)} bytes; the limit is "
                f"{self.limits.max_payload_bytes} (Pipeline:MaxPayloadBytes)",
            )
        if payload.startswith(JPEG_MAGIC) or payload.startswith(PNG_MAGIC):
            self._check_image(payload, "the message")
            blob, frame = self._image(payload)
            return Decoded(None, [blob], [frame])
        if payload.startswith(NPY_MAGIC):
            if self.named:
                return self._named(None, {self._sole_input(): self._npy_sent(payload)})
            return Decoded(None, self._tensor(self._load_npy(payload)))
        if payload.startswith(NPZ_MAGIC):
            return self._named(None, self._npz_sent(payload))
        if payload.lstrip()[:1] == b"{":
            return self._json(payload)
        raise RequestError(
            ErrorCode.UNSUPPORTED_PAYLOAD,
            "the message is neither a JPEG/PNG image, .npy bytes nor a JSON object",
        )

    # -- JSON -------------------------------------------------------------

    def _json(self, payload: bytes) -> Decoded:
        return self._body(parse_json(payload))

    def _body(self, body: dict[str, Any]) -> Decoded:
        request_id = _request_id(body)
        try:
            unknown = sorted(set(body) - REQUEST_FIELDS)
            if unknown:
                raise RequestError(
                    ErrorCode.UNKNOWN_FIELD,
                    f"unknown field(s) {_listed(unknown)}; allowed: id, model, version, image, "
                    "tensor, items, inputs, output",
                )
            tensors = self._output_format(body.get("output", "json"))
            present = [f for f in ("image", "tensor", "items", "inputs") if f in body]
            if len(present) != 1:
                raise RequestError(
                    ErrorCode.INVALID_REQUEST,
                    "a request carries exactly one of image, tensor, items or inputs"
                    + (f" (found {', '.join(present)})" if present else ""),
                )
            if self.named or present[0] == "inputs":
                decoded = self._named_body(body, present[0])
            elif present[0] == "items":
                decoded = Decoded(None, *self._items(body["items"]))
            else:
                decoded = Decoded(None, *self._decode_parts([self._item(body, present[0])]))
            decoded.request_id, decoded.tensors = request_id, tensors
            return decoded
        except RequestError as exc:
            exc.request_id = request_id
            raise

    def _items(self, items: Any) -> tuple[list[np.ndarray], list[Frame | None]]:
        if not isinstance(items, list) or not items:
            raise RequestError(ErrorCode.INVALID_REQUEST, "items must be a non-empty list")
        if len(items) > self.limits.max_batch_items:
            raise RequestError(
                ErrorCode.BATCH_TOO_LARGE,
                f"{len(items)} items; at most {self.limits.max_batch_items} per message "
                "(Pipeline:MaxBatchItems)",
            )
        parts: list[bytes | list[np.ndarray]] = []
        for index, item in enumerate(items):
            where = f"items[{index}]"
            if not isinstance(item, dict):
                raise RequestError(ErrorCode.INVALID_REQUEST, f"{where} must be an object")
            unknown = sorted(set(item) - ITEM_FIELDS)
            if unknown:
                raise RequestError(ErrorCode.UNKNOWN_FIELD,
                                   f"{where}: unknown field(s) {_listed(unknown)}; "
                                   "an item has image or tensor")
            if len(item) != 1:
                raise RequestError(ErrorCode.INVALID_REQUEST,
                                   f"{where} must carry exactly one of image or tensor")
            parts.append(self._item(item, where))
        count = sum(1 if isinstance(part, bytes) else len(part) for part in parts)
        if count > self.limits.max_batch_items:
            raise RequestError(
                ErrorCode.BATCH_TOO_LARGE,
                f"{count} items; at most {self.limits.max_batch_items} per message",
            )
        pixels = sum(math.prod(image_dimensions(part)) for part in parts
                     if isinstance(part, bytes))
        budget = MESSAGE_PIXELS_PER_IMAGE_LIMIT * self.limits.max_image_pixels
        if pixels > budget:
            raise RequestError(
                ErrorCode.IMAGE_TOO_LARGE,
                f"the message's images declare {pixels:,} pixels in all; one message may "
                f"carry at most {budget:,} ({MESSAGE_PIXELS_PER_IMAGE_LIMIT} x "
                "Pipeline:MaxImagePixels): send fewer or smaller images per message",
            )
        return self._decode_parts(parts)

    def _item(self, body: dict[str, Any], where: str) -> bytes | list[np.ndarray]:
        """One item, checked but not decoded yet: image bytes whose header passed the
        limits, or the tensor rows."""
        if "image" in body:
            data = _b64(body["image"], where)
            self._check_image(data, where)
            return data
        return self._tensor(_json_tensor(body["tensor"], where), where)

    def _decode_parts(self, parts: list[bytes | list[np.ndarray]]
                      ) -> tuple[list[np.ndarray], list[Frame | None]]:
        """Decode images only once every item of the message passed its checks."""
        decoded: list[np.ndarray] = []
        frames: list[Frame | None] = []
        for part in parts:
            if isinstance(part, bytes):
                blob, frame = self._image(part)
                decoded.append(blob)
                frames.append(frame)
            else:
                decoded.extend(part)
                frames.extend([None] * len(part))
        return decoded, frames

    def _output_format(self, value: Any) -> Literal["json", "npy"]:
        if value not in ("json", "npy"):
            raise RequestError(ErrorCode.INVALID_REQUEST,
                               f"output {value!r}: json (lists) or npy (base64 .npy)")
        if value == "npy" and self.model.head.name != "tensor":
            raise RequestError(ErrorCode.INVALID_REQUEST,
                               f"output npy is for tensor models; model "
                               f"{self.model.descriptor.name} answers with its "
                               f"{self.model.head.name} head")
        return "npy" if value == "npy" else "json"

    # -- named tensor inputs ---------------------------------------------

    def _sole_input(self) -> str:
        """The input a bare tensor feeds: the model's only one."""
        if len(self.named) != 1:
            raise RequestError(
                ErrorCode.TENSOR_NAME_MISMATCH,
                f"model {self.model.descriptor.name} takes {len(self.named)} named inputs "
                f"({', '.join(self.named)}): send them by name (JSON inputs, or .npz)")
        return next(iter(self.named))

    def _named_body(self, body: dict[str, Any], present: str) -> Decoded:
        if not self.named:
            raise RequestError(ErrorCode.INVALID_REQUEST,
                               f"model {self.model.descriptor.name} takes one input; send "
                               "image, tensor or items, not inputs")
        if present == "tensor":  # the sole input's data, read as in inputs (its dtype)
            name = self._sole_input()
            return self._named(None, {name: self._json_sent(name, {"data": body["tensor"]})})
        if present != "inputs":
            if present == "image":
                raise RequestError(ErrorCode.INPUT_KIND_MISMATCH,
                                   f"model {self.model.descriptor.name} takes named tensors "
                                   f"({', '.join(self.named)}), not images")
            raise RequestError(ErrorCode.INVALID_REQUEST,
                               "a model of named inputs takes one inputs object per message "
                               "(one item, or k items batch first), not items")
        inputs = body["inputs"]
        if not isinstance(inputs, dict) or not inputs:
            raise RequestError(ErrorCode.INVALID_REQUEST,
                               "inputs must be an object: {\"<input name>\": {\"shape\", "
                               "\"dtype\", \"data\"}, ...}")
        if len(inputs) > len(self.named):  # refused before each is parsed into an array
            raise RequestError(ErrorCode.TENSOR_NAME_MISMATCH,
                               f"{len(inputs)} inputs sent; model {self.model.descriptor.name} "
                               f"takes {len(self.named)} ({', '.join(self.named)})")
        return self._named(None, {str(name): self._json_sent(str(name), entry)
                                  for name, entry in inputs.items()})

    def _json_sent(self, name: str, entry: Any) -> _Sent:
        where = f"inputs.{_listed([name])}"
        if not isinstance(entry, dict):
            raise RequestError(ErrorCode.INVALID_REQUEST,
                               f"{where} must be an object with shape, dtype and data")
        unknown = sorted(set(entry) - NAMED_FIELDS)
        if unknown:
            raise RequestError(ErrorCode.UNKNOWN_FIELD, f"{where}: unknown field(s) "
                               f"{_listed(unknown)}; a tensor has shape, dtype and data")
        if "data" not in entry:
            raise RequestError(ErrorCode.INVALID_REQUEST, f"{where} has no data")
        spec = self.named.get(name)
        declared = entry.get("dtype", spec.dtype if spec is not None else "float32")
        if not isinstance(declared, str) or declared not in TENSOR_TYPES:
            raise RequestError(ErrorCode.TENSOR_DTYPE_INVALID,
                               f"{where}: dtype {_listed([repr(declared)])} is not one of "
                               f"{', '.join(sorted(TENSOR_TYPES))}")
        dtype = np.dtype(declared)
        array = _json_tensor(entry["data"], where, booleans=True)
        if array.size == 0:  # [] parses as float64: empty data is of any dtype
            array = array.astype(dtype)
        if not fits_dtype(array, dtype):  # the cast to the input's dtype must not wrap
            raise RequestError(ErrorCode.TENSOR_DTYPE_INVALID,
                               f"{where}: the data holds values that are not {declared}")
        if "shape" in entry:
            shape = entry["shape"]
            if not isinstance(shape, list) or len(shape) > 9 or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise RequestError(ErrorCode.TENSOR_SHAPE_MISMATCH,
                                   f"{where}: shape must be a list of at most 9 sizes >= 0")
            if math.prod(shape) != array.size or (array.size == 0 and any(
                    d > self.limits.max_tensor_elements for d in shape)):
                raise RequestError(ErrorCode.TENSOR_SHAPE_MISMATCH,
                                   f"{where}: data holds {array.size} values; shape {shape} "
                                   f"needs {math.prod(shape)} (each size at most "
                                   f"{self.limits.max_tensor_elements:,})")
            array = array.reshape(shape)
        return _Sent(dtype, tuple(array.shape), lambda: array)

    def _npy_sent(self, payload: bytes) -> _Sent:
        try:
            header = npy_header(payload)
        except MalformedHeader as exc:
            raise RequestError(ErrorCode.UNSUPPORTED_PAYLOAD, f"the .npy is corrupt: {exc}") \
                from None
        needed = header.elements * header.dtype.itemsize
        if len(payload) - header.data_offset != needed:
            raise RequestError(ErrorCode.UNSUPPORTED_PAYLOAD,
                               f"the .npy is corrupt: its header declares shape "
                               f"{list(header.shape)} ({needed:,} bytes of data) but the "
                               f"message carries {len(payload) - header.data_offset:,}")

        def load() -> np.ndarray:
            array = np.frombuffer(payload, dtype=header.dtype, count=header.elements,
                                  offset=header.data_offset)
            return array.reshape(header.shape, order="F" if header.fortran_order else "C")
        return _Sent(header.dtype, header.shape, load)

    def _npz_sent(self, payload: bytes) -> dict[str, _Sent]:
        if not self.named:
            raise RequestError(ErrorCode.UNSUPPORTED_PAYLOAD,
                               f"model {self.model.descriptor.name} takes one input: send "
                               ".npy, not .npz (which is for models of named inputs)")
        try:
            archive, members = open_npz(payload, len(self.named))
        except MalformedHeader as exc:
            raise RequestError(ErrorCode.UNSUPPORTED_PAYLOAD, str(exc)) from None

        def loader(member: Any) -> Callable[[], np.ndarray]:
            def load() -> np.ndarray:
                try:
                    return npz_array(archive, member)
                except MalformedHeader as exc:
                    raise RequestError(ErrorCode.UNSUPPORTED_PAYLOAD, str(exc)) from None
            return load
        return {name: _Sent(m.header.dtype, m.header.shape, loader(m), m.info.file_size)
                for name, m in members.items()}

    def _named(self, request_id: str | None, sent: dict[str, _Sent]) -> Decoded:
        """Items of named tensors, checked by name, dtype and shape before any data is
        read or cast."""
        name = self.model.descriptor.name
        unknown = [n for n in sent if n not in self.named]
        missing = [n for n in self.named if n not in sent]
        if unknown or missing:
            raise RequestError(
                ErrorCode.TENSOR_NAME_MISMATCH,
                f"model {name} takes inputs {', '.join(self.named)}"
                + (f"; {_listed(unknown)} is not one of them" if unknown else "")
                + (f"; {', '.join(missing)} is missing" if missing else ""))
        counts: set[int] = set()
        elements = 0
        for key, spec in self.named.items():
            tensor = sent[key]
            if tensor.dtype.hasobject or tensor.dtype.kind not in "biuf" or \
                    not np.can_cast(tensor.dtype, np.dtype(spec.dtype), "safe"):
                raise RequestError(ErrorCode.TENSOR_DTYPE_INVALID,
                                   f"input {key} is {spec.dtype}; {tensor.dtype} does not "
                                   "convert to it safely")
            rank = len(spec.shape)
            if len(tensor.shape) not in (rank, rank + 1) or any(
                    d != -1 and d != got
                    for d, got in zip(spec.shape, tensor.shape[-rank:] if rank else (),
                                      strict=True)):
                raise RequestError(
                    ErrorCode.TENSOR_SHAPE_MISMATCH,
                    f"input {key} got shape {list(tensor.shape)}; it takes items of shape "
                    f"{spec.shape} (-1: any size), or k of them batch first")
            # Each dynamic size within the descriptor's minShape and maxShape (or their
            # defaults): a conv model's activations grow with every size, whatever the total.
            refusal = spec.size_refusal(tensor.shape[len(tensor.shape) - rank:])
            if refusal is not None:
                large, message = refusal
                raise RequestError(ErrorCode.TENSOR_TOO_LARGE if large
                                   else ErrorCode.TENSOR_SHAPE_MISMATCH, message)
            counts.add(tensor.shape[0] if len(tensor.shape) == rank + 1 else 1)
            elements += math.prod(tensor.shape)
        tied: dict[str, tuple[str, int]] = {}  # a size the graph names: its first holder
        for key, spec in self.named.items():
            item = sent[key].shape[len(sent[key].shape) - len(spec.shape):]
            for dim, size in zip(self.model.dim_names.get(key, ()), item, strict=False):
                holder, first = tied.setdefault(dim, (key, size)) if dim else (key, size)
                if size != first:
                    raise RequestError(
                        ErrorCode.TENSOR_SHAPE_MISMATCH,
                        f"input {key} has size {size} for {dim!r}, input {holder} has "
                        f"{first}: the graph ties these sizes, so send them equal")
        if len(counts) != 1 or 0 in counts:
            raise RequestError(ErrorCode.TENSOR_SHAPE_MISMATCH,
                               "the inputs carry different numbers of items (or none): "
                               "give each input the same k, batch first")
        limit = self.limits.max_tensor_elements
        if elements > limit:
            raise RequestError(ErrorCode.TENSOR_TOO_LARGE,
                               f"the inputs hold {elements:,} elements; the limit is "
                               f"{limit:,} (Pipeline:MaxTensorElements)")
        # Deflate must not carry more than the same .npz stored could: 40 KB of deflated
        # zeros declaring 16 M elements would cost ~250 MB to inflate, cast and batch.
        inflated = sum(tensor.inflated for tensor in sent.values())
        if inflated > self.limits.max_payload_bytes:
            raise RequestError(ErrorCode.PAYLOAD_TOO_LARGE,
                               f"the .npz inflates to {inflated:,} bytes; the limit is "
                               f"{self.limits.max_payload_bytes:,} (Pipeline:MaxPayloadBytes), "
                               "deflated or not")
        rows = counts.pop()
        if rows > self.limits.max_batch_items:
            raise RequestError(ErrorCode.BATCH_TOO_LARGE,
                               f"{rows} items; at most {self.limits.max_batch_items} per "
                               "message (Pipeline:MaxBatchItems)")
        arrays: dict[str, np.ndarray] = {}
        for key, spec in self.named.items():
            array = np.ascontiguousarray(sent[key].load(), dtype=spec.dtype)
            if array.dtype.kind == "b":  # bytes as sent: 2 is no bool (Cast answers 2.0)
                array = array.view(np.uint8).astype(np.bool_)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise RequestError(ErrorCode.TENSOR_VALUE_INVALID,
                                   f"input {key} holds NaN or infinite values")
            arrays[key] = array if array.ndim == len(spec.shape) + 1 else array[None]
        items: list[Item] = [{key: arrays[key][i] for key in self.named} for i in range(rows)]
        dynamic = any(spec.dynamic for spec in self.named.values())
        shape_key = tuple(arrays[key].shape[1:] for key in self.named) if dynamic else None
        return Decoded(request_id, items, shape_key=shape_key)

    # -- images and tensors -----------------------------------------------

    def _check_image(self, data: bytes, where: str) -> None:
        """Refuse an image before decoding: wrong model, corrupt header, too many pixels."""
        if not isinstance(self.spec, ImageInput):
            raise RequestError(
                ErrorCode.INPUT_KIND_MISMATCH,
                f"model {self.model.descriptor.name} takes tensors of shape "
                f"{list(self.item_shape)}, not images",
            )
        if data.startswith(JPEG_MAGIC) and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
            raise RequestError(ErrorCode.IMAGE_DECODE_FAILED,
                               f"{where}: the JPEG is truncated (no end-of-image marker)")
        if not (data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC)):
            raise RequestError(ErrorCode.IMAGE_DECODE_FAILED,
                               f"{where}: the image is not a JPEG or PNG")
        try:
            width, height = image_dimensions(data)
        except MalformedHeader as exc:
            raise RequestError(ErrorCode.IMAGE_DECODE_FAILED, f"{where}: {exc}") from None
        scans = jpeg_scans(data) if data.startswith(JPEG_MAGIC) else 0
        if scans > MAX_JPEG_SCANS:
            raise RequestError(ErrorCode.IMAGE_DECODE_FAILED,
                               f"{where}: the JPEG has {scans} scans; at most {MAX_JPEG_SCANS} "
                               "are accepted (a progressive JPEG needs about 10): re-encode it")
        limit = self.limits.max_image_pixels
        if width * height > limit:
            raise RequestError(
                ErrorCode.IMAGE_TOO_LARGE,
                f"{where}: the image is {width}x{height} ({width * height:,} pixels); the "
                f"limit is {limit:,} (Pipeline:MaxImagePixels): send a smaller image",
            )

    def _image(self, data: bytes) -> tuple[np.ndarray, Frame]:
        """Decode an image that passed ``_check_image``."""
        spec = self.spec
        assert isinstance(spec, ImageInput)
        flag = cv2.IMREAD_GRAYSCALE if spec.channels == 1 else cv2.IMREAD_COLOR
        try:
            image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
        except cv2.error as exc:  # OpenCV's own limits and decoder failures
            raise RequestError(ErrorCode.IMAGE_DECODE_FAILED,
                               f"OpenCV cannot decode the image: {str(exc).strip()}") from None
        if image is None or image.size == 0:
            raise RequestError(ErrorCode.IMAGE_DECODE_FAILED,
                               "the image is corrupt and cannot be decoded")
        return preprocess(image, spec)

    def _check_tensor(self, dtype: np.dtype[Any], shape: tuple[int, ...], where: str) -> None:
        """Refuse a tensor by its dtype and shape alone, before its data is allocated."""
        if dtype.kind not in "fiu":
            raise RequestError(ErrorCode.TENSOR_DTYPE_INVALID,
                               f"{where}: tensor dtype {dtype} is not numeric; send numbers")
        elements = math.prod(shape)
        limit = self.limits.max_tensor_elements
        if elements > limit:
            raise RequestError(
                ErrorCode.TENSOR_TOO_LARGE,
                f"{where}: tensor shape {list(shape)} has {elements:,} elements; the limit is "
                f"{limit:,} (Pipeline:MaxTensorElements): send fewer rows per message",
            )
        expected = self.item_shape
        if shape != expected and not (shape[1:] == expected and shape[0] >= 1):
            raise RequestError(
                ErrorCode.TENSOR_SHAPE_MISMATCH,
                f"tensor shape {list(shape)} does not fit model {self.model.descriptor.name}: "
                f"expected {list(expected)} or [k, {', '.join(map(str, expected))}]",
            )
        rows = 1 if shape == expected else shape[0]
        if rows > self.limits.max_batch_items:
            raise RequestError(ErrorCode.BATCH_TOO_LARGE,
                               f"{rows} rows; at most {self.limits.max_batch_items} "
                               "per message (Pipeline:MaxBatchItems)")

    def _tensor(self, array: np.ndarray, where: str = "the message") -> list[np.ndarray]:
        self._check_tensor(array.dtype, tuple(array.shape), where)
        items = [array] if tuple(array.shape) == self.item_shape else list(array)
        out = [np.ascontiguousarray(item, dtype=np.float32) for item in items]
        if not all(np.isfinite(item).all() for item in out):
            raise RequestError(ErrorCode.TENSOR_VALUE_INVALID,
                               "tensor holds NaN or infinite values")
        return out

    def _load_npy(self, payload: bytes) -> np.ndarray:
        """The array of ``.npy`` bytes, checked from its header before any allocation."""
        try:
            header = npy_header(payload)
        except MalformedHeader as exc:
            raise RequestError(ErrorCode.UNSUPPORTED_PAYLOAD, f"the .npy is corrupt: {exc}") \
                from None
        if header.dtype.hasobject:
            raise RequestError(ErrorCode.TENSOR_DTYPE_INVALID,
                               "the .npy holds Python objects; send a numeric array")
        self._check_tensor(header.dtype, header.shape, "the .npy")
        needed = header.elements * header.dtype.itemsize
        carried = len(payload) - header.data_offset
        if carried != needed:
            raise RequestError(
                ErrorCode.UNSUPPORTED_PAYLOAD,
                f"the .npy is corrupt: its header declares shape {list(header.shape)} "
                f"({needed:,} bytes of data) but the message carries {carried:,}",
            )
        array = np.frombuffer(payload, dtype=header.dtype, count=header.elements,
                              offset=header.data_offset)
        return array.reshape(header.shape, order="F" if header.fortran_order else "C")


@dataclass(frozen=True)
class _Sent:
    """One named tensor as sent: its dtype and shape (from a header or the JSON), and
    how to read its data once they passed the checks."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    inflated: int = 0  # a .npz member's size once inflated (0: not from a .npz)


INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR,
                 "nearest": cv2.INTER_NEAREST, "cubic": cv2.INTER_CUBIC}


def fit(image: np.ndarray, spec: ImageInput) -> tuple[np.ndarray, Frame]:
    """Resize one decoded image to the model's size (stretched, or letterboxed: scaled to
    fit with its aspect ratio kept, centred, the rest filled with ``padValue``), and the
    ``Frame`` that maps the model's pixels back to the original's."""
    height, width = image.shape[:2]
    interpolation = INTERPOLATION[spec.interpolation]
    if spec.resize == "stretch":
        if height != spec.height or width != spec.width:
            image = cv2.resize(image, (spec.width, spec.height), interpolation=interpolation)
        return image, Frame(width, height, spec.width / width, spec.height / height)
    ratio = min(spec.width / width, spec.height / height)
    fitted_w = min(spec.width, max(1, round(width * ratio)))
    fitted_h = min(spec.height, max(1, round(height * ratio)))
    if (fitted_w, fitted_h) != (width, height):
        image = cv2.resize(image, (fitted_w, fitted_h), interpolation=interpolation)
    left = (spec.width - fitted_w) // 2
    top = (spec.height - fitted_h) // 2
    image = cv2.copyMakeBorder(image, top, spec.height - fitted_h - top, left,
                               spec.width - fitted_w - left, cv2.BORDER_CONSTANT,
                               value=(spec.padValue,) * 3)
    return image, Frame(width, height, fitted_w / width, fitted_h / height, left, top)


def preprocess(image: np.ndarray, spec: ImageInput) -> tuple[np.ndarray, Frame]:
    """Resize and normalise one decoded image into the model's per-item layout.

    Order: resize (``fit``), colour order (``swapRB``: BGR -> RGB), then per value
    ``(pixel * scale - mean) / std`` with one mean and std per channel in the model's
    channel order (a single value applies to every channel), then the layout.
    """
    image, frame = fit(image, spec)
    mean = [m / spec.scale for m in spec.channel_values("mean")] if spec.scale else \
        spec.channel_values("mean")
    blob: np.ndarray = cv2.dnn.blobFromImage(
        image, scalefactor=spec.scale, mean=tuple(mean) if len(mean) > 1 else mean[0],
        swapRB=spec.swapRB, crop=False,
    )[0]
    if any(s != 1.0 for s in spec.std):
        blob /= np.asarray(spec.channel_values("std"), dtype=np.float32).reshape(-1, 1, 1)
    if spec.layout == "NHWC":
        blob = np.ascontiguousarray(blob.transpose(1, 2, 0))
    return blob, frame


def _request_id(body: dict[str, Any]) -> str | None:
    if "id" not in body:
        return None
    value = body["id"]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RequestError(ErrorCode.INVALID_REQUEST, "id must be a string")
    text = str(value)
    if not text or len(text) > MAX_ID_LENGTH:
        raise RequestError(ErrorCode.INVALID_REQUEST,
                           f"id must have 1 to {MAX_ID_LENGTH} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate written as a \ud800 escape
        raise RequestError(ErrorCode.INVALID_REQUEST,
                           "id must be valid Unicode text (no lone surrogates)") from None
    return text


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise RequestError(ErrorCode.INVALID_BASE64, f"{where}: image must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(ErrorCode.INVALID_BASE64,
                           f"{where}: image is not valid base64: {exc}") from exc


def _json_tensor(value: Any, where: str, booleans: bool = False) -> np.ndarray:
    if not isinstance(value, list):
        raise RequestError(ErrorCode.TENSOR_SHAPE_MISMATCH,
                           f"{where}: tensor must be a (nested) list of numbers")
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise RequestError(ErrorCode.TENSOR_SHAPE_MISMATCH,
                           f"{where}: tensor is ragged (rows of different lengths)") from exc
    if array.dtype == object:  # ragged, or null, objects or integers past 64 bits inside
        raise RequestError(ErrorCode.TENSOR_SHAPE_MISMATCH,
                           f"{where}: tensor is ragged (rows of different lengths) or holds "
                           "values that are not numbers (null, objects, integers past 64 bits)")
    if array.dtype.kind not in ("fiub" if booleans else "fiu"):
        raise RequestError(ErrorCode.TENSOR_DTYPE_INVALID,
                           f"{where}: tensor holds {array.dtype.kind!r}-kind values; send numbers")
    return array


def _listed(names: Sequence[str], most: int = 5, length: int = 64) -> str:
    """Names a client sent, for a message: the first few, each cut short, so that a
    refusal never echoes (on the error topic and in the log) megabytes of its payload."""
    shown = [n if len(n) <= length else n[:length] + "..." for n in names[:most]]
    return ", ".join(shown) + (f" and {len(names) - most} more" if len(names) > most else "")


def fits_dtype(array: np.ndarray, dtype: np.dtype[Any]) -> bool:
    """Whether numbers parsed from JSON (bool, int64, uint64 or float64) are values of
    ``dtype``: no float for an integer or bool, no integer out of its range (0 or 1 for
    bool). Casting them then changes no value, where numpy would wrap or truncate."""
    kind = array.dtype.kind
    if kind in "b" or array.size == 0:
        return True
    if kind == "f":
        return dtype.kind == "f"
    if dtype.kind == "f":
        return True
    low, high = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min),
                                                   int(np.iinfo(dtype).max))
    return low <= int(array.min()) and int(array.max()) <= high


def is_json(payload: bytes) -> bool:
    """Whether ``decode`` reads this message as a JSON request."""
    return payload.lstrip()[:1] == b"{" and not payload.startswith(JPEG_MAGIC) \
        and not payload.startswith(PNG_MAGIC) and not payload.startswith(NPY_MAGIC)


def parse_json(payload: bytes) -> dict[str, Any]:
    """A JSON request's object, within the depth and size limits; RequestError otherwise."""
    # Counting brackets and quotes is a fast C scan; only a text with enough of them
    # to break a limit pays for the exact shape (brackets inside strings skipped).
    opening = payload.count(b"[") + payload.count(b"{")
    if opening > MAX_JSON_DEPTH or opening + payload.count(b'"') // 2 > MAX_JSON_NODES:
        refusal = json_refusal(payload, MAX_JSON_DEPTH, MAX_JSON_NODES)
        if refusal is not None:
            raise RequestError(ErrorCode.INVALID_JSON,
                               f"{refusal}: flatten the request, send large tensors as "
                               ".npy, or send fewer items per message")
    try:
        # Strict UTF-8 first: json.loads(bytes) would let lone surrogates through.
        body = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(ErrorCode.INVALID_JSON,
                           f"the message is not valid UTF-8: {exc}") from None
    except ValueError as exc:
        raise RequestError(ErrorCode.INVALID_JSON,
                           f"the message is not valid JSON: {exc}") from None
    except RecursionError:  # unreachable past the depth check; kept as a backstop
        raise RequestError(ErrorCode.INVALID_JSON,
                           "the JSON nests too deeply: flatten the request") from None
    if not isinstance(body, dict):
        raise RequestError(ErrorCode.INVALID_JSON, "the JSON message must be an object")
    return body


def requested_model(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """The ``model`` and ``version`` a JSON request names (None where it names none)."""
    named: list[str | None] = []
    for key in ("model", "version"):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 128):
            try:
                request_id = _request_id(body)
            except RequestError:
                request_id = None
            raise RequestError(ErrorCode.INVALID_REQUEST,
                               f"{key} must be a string of 1 to 128 characters", request_id)
        named.append(value)
    return named[0], named[1]
