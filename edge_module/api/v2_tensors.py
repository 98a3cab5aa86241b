"""OIP v2 tensors: request bodies (JSON and Triton's binary extension) to pipeline payloads,
pipeline answers to v2 outputs, and a model's v2 metadata.

An OIP v2 input becomes a payload the module's codec already reads, so the HTTP path
decodes, checks and bounds inputs exactly like MQTT: a numeric tensor becomes ``.npy``
bytes (its shape checked against the model's item shape by the codec), a ``BYTES``
tensor of JPEG/PNG files becomes the image itself (one) or a JSON ``items`` request
(several), decoded and preprocessed by the module. A model of named inputs (descriptor
``inputs``) takes one tensor per input, by name, in any order; they travel to the codec
as one ``.npz`` (``numpy.savez``), which checks names, dtypes and shapes; a tensor
whose declared shape lies outside its input's ``minShape``/``maxShape`` is refused
before its data is read. Answers come back as the pipeline's result envelope and are
turned into outputs per the model's head:

* ``classification``: ``label`` (BYTES [N]), ``score`` (FP32 [N]), ``result`` (BYTES [N],
  each the item's JSON result with ``topK``);
* ``detection``: ``result`` (BYTES [N], each ``{"detections": [...]}`` as JSON);
* ``tensor``: each graph output the head returns, as a tensor of its dtype, batch first.

Pure functions, no state; run on the HTTP event loop thread.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_module.api.router import HttpError
from edge_module.errors import ErrorCode, info
from edge_module.inference.bounds import json_refusal
from edge_module.inference.codecs import (
    JPEG_MAGIC,
    MAX_JSON_DEPTH,
    MAX_JSON_NODES,
    PNG_MAGIC,
    fits_dtype,
)
from edge_module.inference.descriptor import ImageInput, NamedInput
from edge_module.inference.models import Model

HEADER_LENGTH = "inference-header-content-length"
# The largest size an empty tensor may name (a 0 elsewhere in its shape): numpy refuses
# to shape nothing into sizes past its address space.
MAX_EMPTY_SIZE = 1 << 31
BINARY_CONTENT_TYPE = "application/octet-stream"

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
V2_OF = {dtype.str: name for name, dtype in DTYPES.items()}
ORT_TYPES = {"float": "FP32", "double": "FP64", "float16": "FP16", "int64": "INT64",
             "int32": "INT32", "int16": "INT16", "int8": "INT8", "uint8": "UINT8",
             "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "bool": "BOOL"}


def bad(message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST,
        fix: str = "see docs/oip-v2.md for the request shape") -> HttpError:
    return HttpError(400, code, message, fix)


@dataclass(frozen=True)
class InferRequest:
    """A parsed v2 infer request: the payload for the pipeline and what to answer."""

    id: str | None
    payload: bytes
    outputs: list[str] | None  # None: every output of the head
    binary: set[str]  # outputs to answer as binary data
    binary_all: bool


def parse_infer(body: bytes, headers: Mapping[str, str], model: Model) -> InferRequest:
    """The v2 request in ``body`` (JSON, or JSON + binary tensors) for ``model``."""
    raw = headers.get(HEADER_LENGTH)
    blobs = b""
    if raw is not None:
        if not raw.isascii() or not raw.isdigit() or int(raw) > len(body):
            raise bad(f"Inference-Header-Content-Length {raw!r} is not a length within the "
                      f"body ({len(body)} bytes)")
        blobs, body = body[int(raw):], body[:int(raw)]
    # The codec's JSON limits: 8 MiB of "[]," would cost ~200 MB of Python lists.
    opening = body.count(b"[") + body.count(b"{")
    if opening > MAX_JSON_DEPTH or opening + body.count(b'"') // 2 > MAX_JSON_NODES:
        refusal = json_refusal(body, MAX_JSON_DEPTH, MAX_JSON_NODES)
        if refusal is not None:
            raise bad(f"the request header: {refusal}; send tensor data as flat lists or "
                      "binary", ErrorCode.INVALID_JSON)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise bad(f"the request header is not JSON ({exc})", ErrorCode.INVALID_JSON) from None
    if not isinstance(doc, dict):
        raise bad("the request is not a JSON object", ErrorCode.INVALID_JSON)
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 256):
        raise bad("id must be a string of at most 256 characters")
    inputs = doc.get("inputs")
    if model.named_inputs:
        if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
            raise bad("inputs must be a list of tensors")
        if len(inputs) > len(model.named_inputs):  # each would cost a pass over the blobs
            raise bad(f"{len(inputs)} input tensors; the model takes "
                      f"{len(model.named_inputs)} ({', '.join(model.descriptor.input_names())})",
                      ErrorCode.TENSOR_NAME_MISMATCH)
        named: list[tuple[dict[str, Any], Any]] = []
        used = 0
        for tensor in inputs:
            data, size = _input_data(tensor, blobs, used)
            used += size
            named.append((tensor, data))
        if used != len(blobs):
            raise bad(f"the binary part has {len(blobs)} bytes; the inputs declare {used}")
        payload = named_payload(named, model)
    else:
        names = model.descriptor.input_names()
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
            raise bad(f"send exactly one input, {names[0]!r} (the model takes one)")
        tensor = inputs[0]
        if tensor.get("name") != names[0]:
            raise bad(f"unknown input {_short(tensor.get('name'))}; the model's input is "
                      f"{names[0]!r}", ErrorCode.TENSOR_NAME_MISMATCH)
        data, used = _input_data(tensor, blobs, 0)
        if used != len(blobs):
            raise bad(f"the binary part has {len(blobs)} bytes; the inputs declare {used}")
        payload = _payload(tensor, data, model)
    params = doc.get("parameters") or {}
    binary_all = bool(isinstance(params, dict) and params.get("binary_data_output"))
    wanted: list[str] | None = None
    binary: set[str] = set()
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise bad("outputs must be a list of objects with a name")
        names = output_names(model)
        wanted = []
        for out in outputs:
            name = out.get("name")
            if name not in names:
                raise bad(f"unknown output {_short(name)}; the model answers {', '.join(names)}")
            wanted.append(name)
            out_params = out.get("parameters") or {}
            if isinstance(out_params, dict) and out_params.get("binary_data"):
                binary.add(name)
    return InferRequest(request_id, payload, wanted, binary, binary_all)


def tensor_payload(name: str, datatype: str, shape: list[int], data: Any,
                   model: Model) -> bytes:
    """The pipeline payload of one input tensor (gRPC: ``data`` is the raw bytes or the
    typed contents as a list; BYTES contents as a list of bytes)."""
    if model.named_inputs:
        return named_payload([({"name": name, "datatype": datatype, "shape": shape}, data)],
                             model)
    expected = model.descriptor.input_names()[0]
    if name != expected:
        raise bad(f"unknown input {_short(name)}; the model's input is {expected!r}",
                  ErrorCode.TENSOR_NAME_MISMATCH)
    return _payload({"name": name, "datatype": datatype, "shape": shape}, data, model)


def named_payload(tensors: list[tuple[dict[str, Any], Any]], model: Model) -> bytes:
    """The ``.npz`` payload of a model of named inputs: one member per tensor, by name
    (the codec checks names, dtypes and shapes against the model's inputs)."""
    known = [spec.name for spec in model.named_inputs]
    if not tensors:  # an empty .npz would reach the codec as no known format at all
        raise bad(f"no input tensors; the model takes {', '.join(known)}",
                  ErrorCode.TENSOR_NAME_MISMATCH)
    specs = {spec.name: spec for spec in model.named_inputs}
    arrays: dict[str, np.ndarray] = {}
    for tensor, data in tensors:
        name = tensor.get("name")
        if not isinstance(name, str) or name not in known or name in arrays:
            raise bad(f"input {_short(name)} is not one of the model's inputs "
                      f"({', '.join(known)}) or is sent twice", ErrorCode.TENSOR_NAME_MISMATCH)
        if tensor.get("datatype") == "BYTES":
            raise bad(f"input {name!r} takes numbers, not BYTES",
                      ErrorCode.INPUT_KIND_MISMATCH, "send the datatype the model's "
                      "metadata gives")
        _check_sizes(specs[name], _shape(tensor))
        arrays[name] = _array(tensor, data)
    out = io.BytesIO()
    np.savez(out, allow_pickle=False, **arrays)
    return out.getvalue()


def _check_sizes(spec: NamedInput, shape: list[int]) -> None:
    """Refuse a tensor whose dynamic sizes lie outside the input's ``minShape`` and
    ``maxShape`` by its declared shape, before its data is read (the codec checks again,
    with every other rule, once the ``.npz`` is built)."""
    rank = len(spec.shape)
    if len(shape) not in (rank, rank + 1):
        return  # the codec names the shape it takes
    item = tuple(shape[len(shape) - rank:])
    if any(d != -1 and d != got for d, got in zip(spec.shape, item, strict=True)):
        return
    refusal = spec.size_refusal(item)
    if refusal is not None:
        large, message = refusal
        code = ErrorCode.TENSOR_TOO_LARGE if large else ErrorCode.TENSOR_SHAPE_MISMATCH
        raise HttpError(info(code).http_status, code, message, info(code).fix)


def result_tensors(envelope: dict[str, Any], model: Model) -> dict[str, np.ndarray]:
    """The output tensors of a result envelope, by name, per the model's head."""
    return _tensors(model.head.name, envelope["results"])


def to_bytes(value: np.ndarray) -> bytes:
    """A tensor as OIP v2 raw bytes (little-endian; BYTES length-prefixed)."""
    return _binary(value)


def datatype_of(value: np.ndarray) -> str:
    return "BYTES" if value.dtype == object else V2_OF.get(
        value.dtype.newbyteorder("<").str, "FP32")


def _short(value: Any) -> str:
    """A value the client sent, for a message: its repr cut short, so that a refusal never
    echoes (in the answer and the log) megabytes of the request."""
    text = repr(value)
    return text if len(text) <= 64 else text[:64] + "..."


def _input_data(tensor: dict[str, Any], blobs: bytes, offset: int) -> tuple[Any, int]:
    """The tensor's ``data`` (JSON) or its bytes from the binary part at ``offset``, and
    bytes used."""
    params = tensor.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is None:
        if "data" not in tensor:
            raise bad(f"input {_short(tensor.get('name'))} has neither data nor binary_data_size")
        return tensor["data"], 0
    left = len(blobs) - offset
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= left:
        raise bad(f"binary_data_size {_short(size)} does not fit the {left} binary bytes left")
    return blobs[offset:offset + size], size


def _shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {_short(shape)} must be a list of 1 to 8 sizes >= 0",
                  ErrorCode.TENSOR_SHAPE_MISMATCH)
    return shape


def _payload(tensor: dict[str, Any], data: Any, model: Model) -> bytes:
    if tensor.get("datatype") == "BYTES":
        shape = _shape(tensor)
        items = _bytes_elements(data, math.prod(shape))
        return _images(items, model)
    out = io.BytesIO()
    np.save(out, _array(tensor, data), allow_pickle=False)
    return out.getvalue()


def _array(tensor: dict[str, Any], data: Any) -> np.ndarray:
    """A numeric input tensor: its data (JSON list or raw bytes) in its shape."""
    shape = _shape(tensor)
    count = math.prod(shape)
    datatype = tensor.get("datatype")
    dtype = DTYPES.get(str(datatype))
    if dtype is None:
        raise bad(f"datatype {_short(datatype)} is not supported; use FP32 (or another numeric "
                  "type) for tensors, BYTES for JPEG/PNG images", ErrorCode.TENSOR_DTYPE_INVALID)
    if count == 0 and max(shape) > MAX_EMPTY_SIZE:  # numpy cannot even shape such nothing
        raise bad(f"shape {shape} holds no values but has a size over {MAX_EMPTY_SIZE:,}",
                  ErrorCode.TENSOR_SHAPE_MISMATCH)
    if isinstance(data, bytes):
        if len(data) != count * dtype.itemsize:
            raise bad(f"binary data has {len(data)} bytes; shape {shape} of {datatype} needs "
                      f"{count * dtype.itemsize}", ErrorCode.TENSOR_SHAPE_MISMATCH)
        array = np.frombuffer(data, dtype=dtype.newbyteorder("<"))
    else:
        try:  # as parsed first: a float or a string is no INT64, whatever numpy would cast
            parsed = np.asarray(data)
        except (ValueError, TypeError, OverflowError):
            parsed = np.asarray(None)
        if parsed.size == 0:
            parsed = parsed.astype(dtype)
        if parsed.dtype.kind not in "biuf" or not fits_dtype(parsed, dtype):
            raise bad(f"data of input {_short(tensor.get('name'))} is not a list of {datatype} "
                      "numbers", ErrorCode.TENSOR_DTYPE_INVALID)
        array = parsed.astype(dtype)
        if array.size != count:
            raise bad(f"data holds {array.size} values; shape {shape} needs {count}",
                      ErrorCode.TENSOR_SHAPE_MISMATCH)
    return array.reshape(shape)


def _bytes_elements(data: Any, count: int) -> list[bytes]:
    if isinstance(data, bytes):  # Triton's binary BYTES: 4-byte little-endian length + bytes
        items: list[bytes] = []
        offset = 0
        while offset < len(data):
            if offset + 4 > len(data):
                raise bad("binary BYTES data ends inside a length prefix")
            (size,) = struct.unpack_from("<I", data, offset)
            offset += 4
            if offset + size > len(data):
                raise bad("binary BYTES data ends inside an element")
            items.append(data[offset:offset + size])
            offset += size
    else:
        flat = data if isinstance(data, list) else [data]
        while flat and isinstance(flat[0], list) and len(flat) == 1:
            flat = flat[0]
        if all(isinstance(x, bytes) for x in flat):  # gRPC bytes_contents
            items = list(flat)
        elif all(isinstance(x, str) for x in flat):
            items = [_json_bytes(x) for x in flat]
        else:
            raise bad("BYTES data must be strings (base64 JPEG/PNG in JSON)",
                      ErrorCode.TENSOR_DTYPE_INVALID)
    if len(items) != count:
        raise bad(f"BYTES data holds {len(items)} elements; the shape needs {count}",
                  ErrorCode.TENSOR_SHAPE_MISMATCH)
    return items


def _json_bytes(text: str) -> bytes:
    """A JSON BYTES element: the raw bytes (latin-1) when it is a file, else base64."""
    raw = text.encode("latin-1", "replace")
    if raw.startswith((JPEG_MAGIC, PNG_MAGIC)):
        return raw
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise bad("a BYTES element is neither JPEG/PNG bytes nor base64",
                  ErrorCode.INVALID_BASE64) from None


def _images(items: list[bytes], model: Model) -> bytes:
    if not isinstance(model.descriptor.input, ImageInput):
        raise bad("this model takes a numeric tensor, not images (BYTES)",
                  ErrorCode.INPUT_KIND_MISMATCH, "send FP32 data of the shape in the "
                  "model's metadata")
    if not items:
        raise bad("BYTES input holds no image", ErrorCode.EMPTY_PAYLOAD)
    for item in items:
        if not item.startswith((JPEG_MAGIC, PNG_MAGIC)):
            raise bad("a BYTES element is not a JPEG or PNG file",
                      ErrorCode.UNSUPPORTED_PAYLOAD, "send the image file's bytes")
    if len(items) == 1:
        return items[0]
    return json.dumps({"items": [{"image": base64.b64encode(item).decode()}
                                 for item in items]}).encode()


# -- answers ----------------------------------------------------------------


def output_names(model: Model) -> list[str]:
    head = model.head
    if head.name == "classification":
        return ["label", "score", "result"]
    if head.name == "tensor":
        return list(head.outputs)
    return ["result"]


def metadata(model: Model, versions: list[str]) -> dict[str, Any]:
    """The v2 model metadata: inputs from the descriptor, outputs from the head."""
    spec = model.descriptor.input
    batch_shape = [-1, *model.item_shape]
    inputs: list[dict[str, Any]] = [
        {"name": named.name, "datatype": V2_OF[np.dtype(named.dtype).newbyteorder("<").str],
         "shape": [-1, *named.shape]} for named in model.named_inputs]
    if spec is not None:
        inputs = [{"name": spec.name, "datatype": "FP32", "shape": batch_shape}]
    if isinstance(spec, ImageInput):  # JPEG/PNG files, or the preprocessed tensor
        inputs = [{"name": spec.name, "datatype": "BYTES", "shape": [-1],
                   "parameters": {"alternative": {"datatype": "FP32", "shape": batch_shape}}}]
    if model.head.name == "tensor":
        graph = {o.name: o for o in model.session.get_outputs()}
        outputs = []
        for name in model.head.outputs:
            out = graph.get(name)
            shape = [d if isinstance(d, int) and d > 0 else -1 for d in out.shape] \
                if out is not None else [-1]
            kind = str(out.type)[7:-1] if out is not None else "float"  # "tensor(float)"
            outputs.append({"name": name, "datatype": ORT_TYPES.get(kind, "FP32"),
                            "shape": [-1, *shape[1:]]})
    elif model.head.name == "classification":
        outputs = [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                   {"name": "score", "datatype": "FP32", "shape": [-1]},
                   {"name": "result", "datatype": "BYTES", "shape": [-1]}]
    else:
        outputs = [{"name": "result", "datatype": "BYTES", "shape": [-1]}]
    return {"name": model.provenance.name, "versions": versions, "platform": "onnxruntime_onnx",
            "inputs": inputs, "outputs": outputs}


TRITON_TYPES = {"BOOL": 1, "UINT8": 2, "UINT16": 3, "UINT32": 4, "UINT64": 5, "INT8": 6,
                "INT16": 7, "INT32": 8, "INT64": 9, "FP16": 10, "FP32": 11, "FP64": 12,
                "BYTES": 13}  # Triton's inference.DataType


def model_config(model: Model, max_batch: int) -> dict[str, Any]:
    """Triton's model configuration (``/v2/models/{m}/config``), which ``perf_analyzer``
    reads: the batch limit the module batches up to, inputs and outputs without the batch
    dimension."""
    doc = metadata(model, [model.provenance.version])

    def tensors(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"name": t["name"],
                 "data_type": "TYPE_" + t["datatype"].replace("BYTES", "STRING"),
                 "dims": list(t["shape"][1:]) or [1]} for t in items]
    return {"name": model.provenance.name, "platform": "onnxruntime_onnx",
            "backend": "onnxruntime", "max_batch_size": max_batch,
            "input": tensors(doc["inputs"]), "output": tensors(doc["outputs"])}


def _tensors(head: str, results: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    if head == "classification":
        return {"label": np.array([str(r.get("label") or "") for r in results], dtype=object),
                "score": np.array([r["score"] for r in results], dtype=np.float32),
                "result": np.array([json.dumps(r) for r in results], dtype=object)}
    if head == "tensor":
        by_name: dict[str, list[np.ndarray]] = {}
        for result in results:
            for out in result["outputs"]:
                by_name.setdefault(out["name"], []).append(
                    np.asarray(out["data"], dtype=out["dtype"]))
        return {name: np.stack(values) for name, values in by_name.items()}
    return {"result": np.array([json.dumps(r) for r in results], dtype=object)}


def answer(envelope: dict[str, Any], model: Model,
           request: InferRequest) -> tuple[bytes, dict[str, str], str]:
    """The v2 response (body, extra headers, content type) for a result envelope."""
    tensors = _tensors(model.head.name, envelope["results"])
    names = request.outputs if request.outputs is not None else list(tensors)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        value = tensors[name]
        datatype = datatype_of(value)
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if request.binary_all or name in request.binary:
            blob = _binary(value)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif value.dtype == object:
            out["data"] = [str(v) for v in value.reshape(-1)]
        else:
            out["data"] = value.reshape(-1).tolist()
        outputs.append(out)
    provenance = envelope.get("model") or {}
    doc = {"model_name": provenance.get("name", model.provenance.name),
           "model_version": provenance.get("version", model.provenance.version),
           "id": request.id or envelope.get("id", ""), "outputs": outputs}
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, {}, "application/json"
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}, \
        BINARY_CONTENT_TYPE


def _binary(value: np.ndarray) -> bytes:
    if value.dtype == object:
        parts = []
        for item in value.reshape(-1):
            raw = str(item).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")).tobytes()
