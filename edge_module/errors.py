"""Every error code a client can receive: the enum, each code's cause and fix, the docs table.

One home for the contract: transports, the pipeline, the ledger and the licence
gate raise or send these codes and never spell one as a string of their own (a
test reads the source to check). The table in docs/mqtt-topics.md is generated
from ``CATALOGUE`` (``make docs``) and a test keeps it in step. Codes are stable:
never renamed or removed; new ones may be added.

None of these answers is billed: a usage record exists only for a result.

A leaf module: it imports nothing from the rest of the package. Any thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable error codes of error envelopes (``{"error": {"code", "message"}}``)."""

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
    IMAGE_TOO_LARGE = "ImageTooLarge"
    INPUT_KIND_MISMATCH = "InputKindMismatch"
    TENSOR_SHAPE_MISMATCH = "TensorShapeMismatch"
    TENSOR_DTYPE_INVALID = "TensorDtypeInvalid"
    TENSOR_VALUE_INVALID = "TensorValueInvalid"
    TENSOR_TOO_LARGE = "TensorTooLarge"
    TENSOR_NAME_MISMATCH = "TensorNameMismatch"
    OUTPUT_TOO_LARGE = "OutputTooLarge"
    BATCH_TOO_LARGE = "BatchTooLarge"
    INFERENCE_FAILED = "InferenceFailed"
    OUTPUT_TOPIC_LOOP = "OutputTopicLoop"
    UNLICENSED = "Unlicensed"
    METERING_BUFFER_FULL = "MeteringBufferFull"
    METERING_UNAVAILABLE = "MeteringUnavailable"
    OVERLOADED = "Overloaded"
    UNKNOWN_INPUT = "UnknownInput"
    UNKNOWN_MODEL = "UnknownModel"
    SHUTTING_DOWN = "ShuttingDown"
    INTERNAL = "InternalError"
    REPOSITORY_UNSUPPORTED = "RepositoryUnsupported"
    MODEL_LOAD_FAILED = "ModelLoadFailed"
    ANSWER_TIMEOUT = "AnswerTimeout"
    UNAUTHORIZED = "Unauthorized"


@dataclass(frozen=True)
class ErrorInfo:
    """What a person needs to know about a code.

    ``retryable``: the same input sent again later may succeed (the envelope says
    so where the transport marks it). ``http_status``: the status an HTTP API
    answers with this code.
    """

    cause: str
    fix: str
    retryable: bool = False
    http_status: int = 400


CATALOGUE: dict[ErrorCode, ErrorInfo] = {
    ErrorCode.EMPTY_PAYLOAD: ErrorInfo(
        "zero-byte message", "send an image, `.npy` or JSON"),
    ErrorCode.PAYLOAD_TOO_LARGE: ErrorInfo(
        "larger than `Pipeline:MaxPayloadBytes`", "send smaller images or raise the limit",
        http_status=413),
    ErrorCode.UNSUPPORTED_PAYLOAD: ErrorInfo(
        "not JPEG, PNG, `.npy` or a JSON object; or a corrupt `.npy`",
        "use one of the input forms"),
    ErrorCode.INVALID_JSON: ErrorInfo(
        "JSON that does not parse (invalid UTF-8 included), is not an object, nests deeper "
        "than 32 levels, or holds more than 65,536 arrays, objects and strings in all",
        "fix the JSON"),
    ErrorCode.UNKNOWN_FIELD: ErrorInfo(
        "a field other than `id`, `model`, `version`, `image`, `tensor`, `items`, `inputs`, "
        "`output` (or, in an item, `image`, `tensor`)", "remove or rename it"),
    ErrorCode.INVALID_REQUEST: ErrorInfo(
        "none or several of `image`/`tensor`/`items`/`inputs`; bad `id`; empty `items`; "
        "`output` other than `json`/`npy`",
        "send exactly one"),
    ErrorCode.NOT_FOUND: ErrorInfo(
        "HTTP: no route at this path", "see the README's HTTP section for the routes",
        http_status=404),
    ErrorCode.METHOD_NOT_ALLOWED: ErrorInfo(
        "HTTP: the route exists but not with this method", "use the method the answer's "
        "`Allow` header names", http_status=405),
    ErrorCode.REQUEST_TIMEOUT: ErrorInfo(
        "HTTP: the request head or body did not arrive within `Http:HeaderTimeoutSeconds` "
        "or `Http:BodyTimeoutSeconds`", "send the whole request at once", retryable=True,
        http_status=408),
    ErrorCode.INVALID_BASE64: ErrorInfo(
        "`image` is not base64", "encode the bytes with standard base64"),
    ErrorCode.IMAGE_DECODE_FAILED: ErrorInfo(
        "corrupt or truncated JPEG/PNG, a header that cannot be read, or a JPEG of more "
        "than 64 scans (each costs a pass over the whole image)", "resend the whole file"),
    ErrorCode.IMAGE_TOO_LARGE: ErrorInfo(
        "the image's header declares more than `Pipeline:MaxImagePixels` pixels (width x "
        "height; 4096x4096 by default), or the images of one message together declare more "
        "than 4 times that; refused before any pixel is decoded",
        "send a smaller image or raise the limit", http_status=413),
    ErrorCode.INPUT_KIND_MISMATCH: ErrorInfo(
        "an image sent to a tensor model", "send a tensor"),
    ErrorCode.TENSOR_SHAPE_MISMATCH: ErrorInfo(
        "wrong or ragged shape (for a `.npy`, the shape its header declares); a named "
        "input's dynamic size under its descriptor `minShape` (a zero-length size, unless "
        "`minShape` gives 0 there)",
        "match the model's item shape (table above)"),
    ErrorCode.TENSOR_DTYPE_INVALID: ErrorInfo(
        "non-numeric values, or an object `.npy`", "send numbers"),
    ErrorCode.TENSOR_VALUE_INVALID: ErrorInfo(
        "NaN or infinity (also JSON `NaN`, `Infinity`, `1e999`)", "send finite numbers"),
    ErrorCode.TENSOR_TOO_LARGE: ErrorInfo(
        "a tensor (a `.npy` by its header, before its data is read) with more than "
        "`Pipeline:MaxTensorElements` elements; a named input's dynamic size over its "
        "descriptor `maxShape` (or the default bound, docs/models.md)",
        "send fewer rows per message or smaller items, or raise the limit", http_status=413),
    ErrorCode.TENSOR_NAME_MISMATCH: ErrorInfo(
        "a model of named inputs (descriptor `inputs`) got a tensor named for none of them, "
        "or lacks one of them", "send one tensor per input, named as the model's metadata "
        "names them"),
    ErrorCode.OUTPUT_TOO_LARGE: ErrorInfo(
        "a tensor model with dynamic dimensions answered more than its "
        "`headOptions.maxElements` values for one item (the answer is withheld and not billed)",
        "send smaller inputs, or raise maxElements in the descriptor", http_status=413),
    ErrorCode.BATCH_TOO_LARGE: ErrorInfo(
        "more items than `Pipeline:MaxBatchItems`", "split the batch"),
    ErrorCode.INFERENCE_FAILED: ErrorInfo(
        "onnxruntime failed on this input; or on the batch it was in, and the input was not "
        "run again on its own because `Pipeline:MaxRerunsPerFailedBatch` or "
        "`Pipeline:MaxFailedBatchesPerMinute` was reached (the message says which)",
        "check the model; the message says why (send the input again when it says it was "
        "not run on its own)", http_status=500),
    ErrorCode.OUTPUT_TOPIC_LOOP: ErrorInfo(
        "the result's topic (derived with `{topic}`, or a response topic) would match an "
        "input filter: the input is not served (nor billed) and this code goes to the error "
        "topic; an error topic that would loop as well is not published, only logged",
        "choose `Mqtt:ResultTopic`, `Mqtt:ErrorTopic` and response topics outside "
        "`Mqtt:InputTopic`", http_status=500),
    ErrorCode.UNLICENSED: ErrorInfo(
        "the licence cannot be confirmed and no offline grace is left (the envelope "
        "carries `status` and `retryAfter`)",
        "the message names the billing status and its fix; `/status` shows the grace",
        retryable=True, http_status=403),
    ErrorCode.METERING_BUFFER_FULL: ErrorInfo(
        "`Metering:MaxPendingRecords` or `Metering:MaxLedgerMb` reached while the billing "
        "endpoint is out of reach", "restore the link; service resumes as the backlog drains",
        retryable=True, http_status=503),
    ErrorCode.METERING_UNAVAILABLE: ErrorInfo(
        "the usage record could not be stored, so the result is withheld",
        "check the disk under `Data:Path`", retryable=True, http_status=503),
    ErrorCode.OVERLOADED: ErrorInfo(
        "the intake queue is full (edgeHub: `EdgeHub:IntakeQueue`), or the decoded inputs "
        "waiting for inference would pass `Pipeline:MaxQueuedMb`",
        "send again later, or raise the queue or the budget", retryable=True,
        http_status=503),
    ErrorCode.UNKNOWN_INPUT: ErrorInfo(
        "the edgeHub input is not in `EdgeHub:Inputs`", "fix the route or the setting",
        http_status=404),
    ErrorCode.UNKNOWN_MODEL: ErrorInfo(
        "the model or version the input names (topic level, `model`/`version` fields, edgeHub "
        "input) is not in the repository or not ready (loading, failed or unloaded); also an "
        "input naming none when no default model is ready",
        "name a model and version `/status` lists as ready, or set `Model:Default`",
        http_status=404),
    ErrorCode.SHUTTING_DOWN: ErrorInfo(
        "the module is stopping", "send again; the new instance answers", retryable=True,
        http_status=503),
    ErrorCode.INTERNAL: ErrorInfo(
        "a bug; the log has the trace", "report it", http_status=500),
    ErrorCode.REPOSITORY_UNSUPPORTED: ErrorInfo(
        "HTTP: a model repository route, but the module serves one fixed model "
        "(`Model:Name`/`Model:Path`)", "configure a model repository to load and unload "
        "models", http_status=501),
    ErrorCode.MODEL_LOAD_FAILED: ErrorInfo(
        "HTTP: the model repository could not load or unload the model (the message says "
        "why)", "fix the model files the message names, then load again"),
    ErrorCode.ANSWER_TIMEOUT: ErrorInfo(
        "HTTP: no answer within `Http:AnswerTimeoutSeconds` (the module is saturated)",
        "send again later or raise the timeout", retryable=True, http_status=504),
    ErrorCode.UNAUTHORIZED: ErrorInfo(
        "HTTP: `Http:ApiKey` is set and the request carries no key or a wrong one",
        "send `Authorization: Bearer <key>` or `X-Api-Key: <key>`", http_status=401),
}


def info(code: ErrorCode) -> ErrorInfo:
    return CATALOGUE[code]


DOCS_START = "<!-- error-codes:start (generated from edge_module/errors.py by `make docs`) -->"
DOCS_END = "<!-- error-codes:end -->"


def reference_markdown() -> str:
    """The error table of docs/mqtt-topics.md (between ``DOCS_START`` and ``DOCS_END``)."""
    lines = ["| Code | Cause | Fix | Retry |", "| --- | --- | --- | --- |"]
    for code in ErrorCode:
        item = CATALOGUE[code]
        retry = "yes" if item.retryable else "no"
        lines.append(f"| `{code.value}` | {item.cause} | {item.fix} | {retry} |")
    return "\n".join(lines) + "\n"
