"""Codecs: turn one input message into model-ready float32 items, or a PayloadError.

Accepted payloads (docs/mqtt-topics.md has the full reference):

* raw JPEG or PNG bytes, recognised by their magic bytes;
* raw ``.npy`` bytes holding a tensor;
* a JSON object ``{"id", "image": "<base64>"}``, ``{"id", "tensor": [...]}`` or
  ``{"id", "items": [{"image"|"tensor": ...}, ...]}``.

Every way a payload can be wrong maps to one stable error code (``ErrorCode``),
so that clients can branch on it. Images are decoded and normalised with
OpenCV (``imdecode`` + ``resize`` + ``blobFromImage``), which is faster than
numpy arithmetic and releases the GIL while it works.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import cv2
import numpy as np

from edge_module.exceptions import PayloadError
from edge_module.inference.models import ImageInput, Model

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
MAX_ID_LENGTH = 256
REQUEST_FIELDS = {"id", "image", "tensor", "items"}
ITEM_FIELDS = {"image", "tensor"}


class ErrorCode(StrEnum):
    """Stable error codes of error envelopes. Never renamed; new ones may be added."""

    EMPTY_PAYLOAD = "EmptyPayload"
    PAYLOAD_TOO_LARGE = "PayloadTooLarge"
    UNSUPPORTED_PAYLOAD = "UnsupportedPayload"
    INVALID_JSON = "InvalidJson"
    UNKNOWN_FIELD = "UnknownField"
    INVALID_REQUEST = "InvalidRequest"
    NOT_FOUND = "NotFound"
    METHOD_NOT_ALLOWED = "MethodNotAllowed"
    REQUEST_TIMEOUT = "RequestTimeout"
    INVALID_BASE64 = "InvalidBase64"
    IMAGE_DECODE_FAILED = "ImageDecodeFailed"
    INPUT_KIND_MISMATCH = "InputKindMismatch"
    TENSOR_SHAPE_MISMATCH = "TensorShapeMismatch"
    TENSOR_DTYPE_INVALID = "TensorDtypeInvalid"
    TENSOR_VALUE_INVALID = "TensorValueInvalid"
    BATCH_TOO_LARGE = "BatchTooLarge"
    INFERENCE_FAILED = "InferenceFailed"
    OUTPUT_TOPIC_LOOP = "OutputTopicLoop"
    OVERLOADED = "Overloaded"
    UNKNOWN_INPUT = "UnknownInput"
    SHUTTING_DOWN = "ShuttingDown"
    INTERNAL = "InternalError"


@dataclass(frozen=True)
class Limits:
    max_payload_bytes: int
    max_batch_items: int


@dataclass
class Decoded:
    """A decoded request: its id (if the payload named one) and its items."""

    request_id: str | None
    items: list[np.ndarray]


class RequestError(PayloadError):
    """A PayloadError that remembers the request id, when the payload had one."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(code.value, message)
        self.request_id = request_id


class Codec:
    """Decodes payloads for one model."""

    def __init__(self, model: Model, limits: Limits) -> None:
        self.model = model
        self.limits = limits
        self.spec = model.descriptor.input
        self.item_shape = model.item_shape

    def decode(self, payload: bytes) -> Decoded:
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
            return Decoded(None, [self._image(payload)])
        if payload.startswith(NPY_MAGIC):
            return Decoded(None, self._tensor(_load_npy(payload)))
        if payload.lstrip()[:1] == b"{":
            return self._json(payload)
        raise RequestError(
            ErrorCode.UNSUPPORTED_PAYLOAD,
            "the message is neither a JPEG/PNG image, .npy bytes nor a JSON object",
        )

    # -- JSON -------------------------------------------------------------

    def _json(self, payload: bytes) -> Decoded:
        try:
            body = json.loads(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError(ErrorCode.INVALID_JSON,
                               f"the message is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError(ErrorCode.INVALID_JSON, "the JSON message must be an object")
        request_id = _request_id(body)
        try:
            unknown = sorted(set(body) - REQUEST_FIELDS)
            if unknown:
                raise RequestError(
                    ErrorCode.UNKNOWN_FIELD,
                    f"unknown field(s) {', '.join(unknown)}; allowed: id, image, tensor, items",
                )
            present = [f for f in ("image", "tensor", "items") if f in body]
            if len(present) != 1:
                raise RequestError(
                    ErrorCode.INVALID_REQUEST,
                    "a request carries exactly one of image, tensor or items"
                    + (f" (found {', '.join(present)})" if present else ""),
                )
            if present[0] == "items":
                return Decoded(request_id, self._items(body["items"]))
            return Decoded(request_id, self._item(body, "request"))
        except RequestError as exc:
            exc.request_id = request_id
            raise

    def _items(self, items: Any) -> list[np.ndarray]:
        if not isinstance(items, list) or not items:
            raise RequestError(ErrorCode.INVALID_REQUEST, "items must be a non-empty list")
        if len(items) > self.limits.max_batch_items:
            raise RequestError(
                ErrorCode.BATCH_TOO_LARGE,
                f"{len(items)} items; at most {self.limits.max_batch_items} per message "
                "(Pipeline:MaxBatchItems)",
            )
        decoded: list[np.ndarray] = []
        for index, item in enumerate(items):
            where = f"items[{index}]"
            if not isinstance(item, dict):
                raise RequestError(ErrorCode.INVALID_REQUEST, f"{where} must be an object")
            unknown = sorted(set(item) - ITEM_FIELDS)
            if unknown:
                raise RequestError(ErrorCode.UNKNOWN_FIELD,
                                   f"{where}: unknown field(s) {', '.join(unknown)}; "
                                   "an item has image or tensor")
            if len(item) != 1:
                raise RequestError(ErrorCode.INVALID_REQUEST,
                                   f"{where} must carry exactly one of image or tensor")
            decoded.extend(self._item(item, where))
        if len(decoded) > self.limits.max_batch_items:
            raise RequestError(
                ErrorCode.BATCH_TOO_LARGE,
                f"{len(decoded)} items; at most {self.limits.max_batch_items} per message",
            )
        return decoded

    def _item(self, body: dict[str, Any], where: str) -> list[np.ndarray]:
        if "image" in body:
            return [self._image(_b64(body["image"], where))]
        return self._tensor(_json_tensor(body["tensor"], where))

    # -- images and tensors -----------------------------------------------

    def _image(self, data: bytes) -> np.ndarray:
        spec = self.spec
        if not isinstance(spec, ImageInput):
            raise RequestError(
                ErrorCode.INPUT_KIND_MISMATCH,
                f"model {self.model.descriptor.name} takes tensors of shape "
                f"{list(self.item_shape)}, not images",
            )
        if data.startswith(JPEG_MAGIC) and not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
            raise RequestError(ErrorCode.IMAGE_DECODE_FAILED,
                               "the JPEG is truncated (no end-of-image marker)")
        if not (data.startswith(JPEG_MAGIC) or data.startswith(PNG_MAGIC)):
            raise RequestError(ErrorCode.IMAGE_DECODE_FAILED, "the image is not a JPEG or PNG")
        flag = cv2.IMREAD_GRAYSCALE if spec.channels == 1 else cv2.IMREAD_COLOR
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
        if image is None or image.size == 0:
            raise RequestError(ErrorCode.IMAGE_DECODE_FAILED,
                               "the image is corrupt and cannot be decoded")
        return preprocess(image, spec)

    def _tensor(self, array: np.ndarray) -> list[np.ndarray]:
        if array.dtype.kind not in "fiu":
            raise RequestError(ErrorCode.TENSOR_DTYPE_INVALID,
                               f"tensor dtype {array.dtype} is not numeric; send numbers")
        shape = tuple(array.shape)
        expected = self.item_shape
        if shape == expected:
            items = [array]
        elif shape[1:] == expected and shape[0] >= 1:
            items = list(array)
        else:
            raise RequestError(
                ErrorCode.TENSOR_SHAPE_MISMATCH,
                f"tensor shape {list(shape)} does not fit model {self.model.descriptor.name}: "
                f"expected {list(expected)} or [k, {', '.join(map(str, expected))}]",
            )
        if len(items) > self.limits.max_batch_items:
            raise RequestError(ErrorCode.BATCH_TOO_LARGE,
                               f"{len(items)} rows; at most {self.limits.max_batch_items} "
                               "per message (Pipeline:MaxBatchItems)")
        out = [np.ascontiguousarray(item, dtype=np.float32) for item in items]
        if not all(np.isfinite(item).all() for item in out):
            raise RequestError(ErrorCode.TENSOR_VALUE_INVALID,
                               "tensor holds NaN or infinite values")
        return out


def preprocess(image: np.ndarray, spec: ImageInput) -> np.ndarray:
    """Resize and normalise one decoded image into the model's per-item layout."""
    if image.shape[0] != spec.height or image.shape[1] != spec.width:
        image = cv2.resize(image, (spec.width, spec.height), interpolation=cv2.INTER_AREA)
    mean = [m / spec.scale for m in spec.mean] if spec.scale else spec.mean
    blob: np.ndarray = cv2.dnn.blobFromImage(
        image, scalefactor=spec.scale, mean=tuple(mean) if len(mean) > 1 else mean[0],
        swapRB=spec.swapRB, crop=False,
    )[0]
    if any(s != 1.0 for s in spec.std):
        blob /= np.asarray(spec.std, dtype=np.float32).reshape(-1, 1, 1)
    if spec.layout == "NHWC":
        blob = np.ascontiguousarray(blob.transpose(1, 2, 0))
    return blob


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


def _json_tensor(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list):
        raise RequestError(ErrorCode.TENSOR_SHAPE_MISMATCH,
                           f"{where}: tensor must be a (nested) list of numbers")
    try:
        array = np.asarray(value)
    except ValueError as exc:
        raise RequestError(ErrorCode.TENSOR_SHAPE_MISMATCH,
                           f"{where}: tensor is ragged (rows of different lengths)") from exc
    if array.dtype == object:
        raise RequestError(ErrorCode.TENSOR_SHAPE_MISMATCH,
                           f"{where}: tensor is ragged (rows of different lengths)")
    if array.dtype.kind not in "fiu":
        raise RequestError(ErrorCode.TENSOR_DTYPE_INVALID,
                           f"{where}: tensor holds {array.dtype.kind!r}-kind values; send numbers")
    return array


def _load_npy(payload: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise RequestError(ErrorCode.TENSOR_DTYPE_INVALID,
                               "the .npy holds Python objects; send a numeric array") from exc
        raise RequestError(ErrorCode.UNSUPPORTED_PAYLOAD, f"the .npy is corrupt: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise RequestError(ErrorCode.UNSUPPORTED_PAYLOAD, f"the .npy is corrupt: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise RequestError(ErrorCode.UNSUPPORTED_PAYLOAD, "the .npy holds no array")
    return array
