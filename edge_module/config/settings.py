"""Settings declarations: every section and key, typed, validated and documented.

This module declares; ``config/sources.py`` reads the command line, the
environment and files and translates validation errors; ``config/reference.py``
writes docs/configuration.md. A validator that refuses a value raises
``SettingError`` naming the key (relative to the section it checks) and the fix,
so the translation never has to parse a message. Immutable once built; any thread.

Settings are named the Azure AI containers way: ``Section:Key`` on the command
line (``Mqtt:Host=broker``), ``Section__Key`` in environment variables
(``Mqtt__Host=broker``), nested objects in an optional JSON or TOML file.
Names are case-insensitive. Precedence, highest first: command line,
environment, config file, built-in default.

Every field carries its documentation; ``docs/configuration.md`` is generated
from this module (``edge-module config-reference``) and a test keeps it in
step with the code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from paho.mqtt.client import topic_matches_sub
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

# Billing keys are issued as 32 characters; a key shorter than this is a typo or a test
# value, and scrubbing so short a value from logs would mangle ordinary words (logs.py).
MIN_API_KEY_LENGTH = 16
BUILTIN_MODELS = Path(__file__).resolve().parent.parent / "models"


def descriptor_path(model: Path) -> Path:
    """``m.onnx`` and ``m.onnx.enc`` both have their descriptor in ``m.json``."""
    name = model.name.removesuffix(".enc")
    return model.with_name(name).with_suffix(".json")


def builtin_models() -> list[str]:
    """Names of the models shipped inside the package."""
    return sorted(p.stem for p in BUILTIN_MODELS.glob("*.onnx"))


class SettingError(ValueError):
    """A refused value: ``key`` (relative to the section whose validator raises, or
    ``None`` for the section itself), what is wrong, and the fix when it is known."""

    def __init__(self, key: str | None, problem: str, fix: str | None = None) -> None:
        super().__init__(f"{key + ': ' if key else ''}{problem}")
        self.key = key
        self.problem = problem
        self.fix = fix


class Section(BaseModel):
    """Base of every settings block: unknown keys are errors, values are frozen.

    ``value_key`` names the field that ``Section=value`` sets, so that
    ``Billing=<url>`` means ``Billing:Url=<url>``, as Azure AI containers spell it.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)
    value_key: ClassVar[str | None] = None


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class MqttTlsSettings(Section):
    ca_file: Path | None = Field(
        None,
        alias="CaFile",
        description="PEM file of the CA that signed the broker's certificate. Setting it turns "
        "TLS on.",
    )
    cert_file: Path | None = Field(
        None, alias="CertFile", description="PEM client certificate, for brokers that want one."
    )
    key_file: Path | None = Field(
        None, alias="KeyFile", description="PEM private key of `CertFile`."
    )
    insecure: bool = Field(
        False,
        alias="Insecure",
        description="Skip the host-name check of the broker certificate. Test benches only.",
    )

    @model_validator(mode="after")
    def _files_exist(self) -> MqttTlsSettings:
        for key, path in (("CaFile", self.ca_file), ("CertFile", self.cert_file),
                          ("KeyFile", self.key_file)):
            if path is not None and not path.is_file():
                raise SettingError(key, f"file {path} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            raise SettingError("KeyFile" if self.key_file is None else "CertFile",
                               "CertFile and KeyFile go together",
                               "set both Mqtt:Tls:CertFile and Mqtt:Tls:KeyFile, or neither")
        return self


class MqttSettings(Section):
    host: str = Field("127.0.0.1", alias="Host", description="Broker host name or address.")
    port: int = Field(1883, alias="Port", ge=1, le=65535, description="Broker port.")
    input_topic: list[str] = Field(
        default_factory=lambda: ["edge-module/input/#"],
        alias="InputTopic",
        min_length=1,
        description="Topic filters to consume, comma-separated; `+` and `#` wildcards and "
        "`$share/<group>/<filter>` shared subscriptions are allowed.",
    )
    result_topic: str = Field(
        "edge-module/results",
        alias="ResultTopic",
        description="Where results go. `{topic}` is replaced by the input topic, so "
        "`{topic}/result` answers next to each input. An MQTT v5 response topic on the "
        "input wins over this.",
    )
    error_topic: str = Field(
        "edge-module/errors",
        alias="ErrorTopic",
        description="Where error envelopes go; `{topic}` works as in `ResultTopic`.",
    )
    availability_topic: str = Field(
        "edge-module/status",
        alias="AvailabilityTopic",
        description="Retained `online`/`offline`; `offline` is also the last will.",
    )
    qos: int = Field(
        1, alias="Qos", ge=0, le=1, description="QoS of subscriptions and publishes: 0 or 1."
    )
    protocol: Literal["3.1.1", "5"] = Field(
        "5", alias="Protocol", description="MQTT protocol version: `3.1.1` or `5`."
    )
    client_id: str | None = Field(
        None,
        alias="ClientId",
        description="Client id prefix (`-in` and `-out` are appended). Default: derived from "
        "the installation id, stable across restarts so the broker keeps our session.",
    )
    username: str | None = Field(None, alias="Username", description="Broker user name.")
    password: SecretStr | None = Field(
        None, alias="Password", description="Broker password. Never logged."
    )
    keepalive: int = Field(
        15, alias="KeepAlive", ge=5, le=3600, description="Keep-alive in seconds."
    )
    session_expiry: int = Field(
        86400,
        alias="SessionExpiry",
        ge=0,
        description="MQTT v5 session expiry in seconds: how long the broker queues input "
        "for us while the module is down.",
    )
    reconnect_min_delay: float = Field(
        0.5, alias="ReconnectMinDelay", gt=0, description="First reconnect delay, seconds."
    )
    reconnect_max_delay: float = Field(
        10.0, alias="ReconnectMaxDelay", gt=0, description="Reconnect back-off cap, seconds."
    )
    model_topic_level: int | None = Field(
        None, alias="ModelTopicLevel", ge=0, le=31,
        description="The input topic level (0 = the first) that names the model, e.g. 2 for "
        "`edge-module/input/<model>`; a level missing from a topic names none (the default "
        "model). A `model` field in a JSON payload wins over it.",
    )
    version_topic_level: int | None = Field(
        None, alias="VersionTopicLevel", ge=0, le=31,
        description="The input topic level that names the model version, e.g. 3 for "
        "`edge-module/input/<model>/<version>` (unset: the newest ready version). A "
        "`version` field in a JSON payload wins over it.",
    )
    tls: MqttTlsSettings = Field(default_factory=MqttTlsSettings, alias="Tls")

    _split = field_validator("input_topic", mode="before")(_split_list)

    @field_validator("input_topic")
    @classmethod
    def _valid_filters(cls, filters: list[str]) -> list[str]:
        for topic_filter in filters:
            _check_filter(topic_filter)
        return filters

    @model_validator(mode="after")
    def _no_loops(self) -> MqttSettings:
        subscriptions = [subscription_filter(f) for f in self.input_topic]
        for key, topic in (("ResultTopic", self.result_topic), ("ErrorTopic", self.error_topic),
                           ("AvailabilityTopic", self.availability_topic)):
            if not topic or "+" in topic or "#" in topic:
                raise SettingError(key, f"{topic!r} must be a plain topic without wildcards")
            if "{topic}" in topic:
                continue  # checked per message: a derived topic that loops is refused then
            for sub in subscriptions:
                if topic_matches_sub(sub, topic):
                    raise SettingError(
                        key, f"{topic!r} matches InputTopic {sub!r}, so the module would "
                        "consume its own output", "choose a topic outside the input filters")
        return self


def subscription_filter(topic_filter: str) -> str:
    """The topic filter without a `$share/<group>/` prefix."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else ""
    return topic_filter


def _check_filter(topic_filter: str) -> None:
    plain = subscription_filter(topic_filter)
    if not plain:
        raise ValueError(f"topic filter {topic_filter!r} is empty")
    levels = plain.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"topic filter {topic_filter!r}: '#' must be a whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {topic_filter!r}: '+' must be a whole level")


class ModelSettings(Section):
    name: str = Field(
        "digits",
        alias="Name",
        description="A built-in model (`digits`, `telemetry`). Ignored when `Path` is set.",
    )
    path: Path | None = Field(
        None,
        alias="Path",
        description="An `.onnx` file (or an encrypted `.onnx.enc`) with its descriptor "
        "`<same name>.json` beside it.",
    )
    top_k: int = Field(3, alias="TopK", ge=1, le=100, description="Classes listed per result.")
    score_threshold: float = Field(
        0.0, alias="ScoreThreshold", ge=0.0, le=1.0,
        description="Classes scoring below this are left out of `topK`; when the best one "
        "is below it, the result's `label` is null.",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = Field(
        "all", alias="GraphOptimization",
        description="onnxruntime graph optimisation level.",
    )
    execution_mode: Literal["sequential", "parallel"] = Field(
        "sequential", alias="ExecutionMode",
        description="onnxruntime execution mode; `parallel` helps only graphs with "
        "independent branches, together with InterOpThreads > 1.",
    )
    intra_op_threads: int = Field(
        1,
        alias="IntraOpThreads",
        ge=0,
        description="onnxruntime intra-op threads (0 = onnxruntime decides). One is best for "
        "small models at small batches on this class of machine.",
    )
    inter_op_threads: int = Field(
        1, alias="InterOpThreads", ge=0, description="onnxruntime inter-op threads."
    )
    repository: Path | None = Field(
        None, alias="Repository",
        description="A model repository folder: `<model>/<version>/model.onnx` with its "
        "`model.json` descriptor, several models and versions served at once (docs/models.md). "
        "When set, `Name` and `Path` are ignored.",
    )
    default: str | None = Field(
        None, alias="Default",
        description="With `Repository`: the model that answers inputs naming none, `model` "
        "(its newest ready version) or `model:version` (unset: the only model in the "
        "repository). Live: the twin may change it.",
    )
    repository_poll_seconds: float = Field(
        10.0, alias="RepositoryPollSeconds", ge=0.0, le=3600.0,
        description="With `Repository`: how often the folder is checked for new, changed or "
        "removed versions, loaded beside those serving and swapped in (0: never).",
    )
    memory_budget_mb: int | None = Field(
        None, alias="MemoryBudgetMb", ge=1,
        description="With `Repository`: the memory the loaded models may take together "
        "(measured as each load's RSS growth); a load that would exceed it fails with the "
        "reason (unset: no limit).",
    )

    @field_validator("path")
    @classmethod
    def _model_file(cls, path: Path | None) -> Path | None:
        if path is None:
            return None
        if not path.is_file():
            raise ValueError(f"model file {path} does not exist")
        if not descriptor_path(path).is_file():
            raise ValueError(f"descriptor {descriptor_path(path)} is missing beside the model")
        return path

    @field_validator("repository")
    @classmethod
    def _repository(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_dir():
            raise ValueError(f"model repository {path} is not a folder")
        return path

    @field_validator("name")
    @classmethod
    def _builtin(cls, name: str) -> str:
        known = builtin_models()
        if name not in known:
            raise ValueError(f"no built-in model {name!r}; built-ins: {', '.join(known)}")
        return name


class PipelineSettings(Section):
    max_payload_bytes: int = Field(
        4 * 1024 * 1024,
        alias="MaxPayloadBytes",
        ge=1024,
        description="Larger messages are refused with `PayloadTooLarge`.",
    )
    max_batch_items: int = Field(
        64,
        alias="MaxBatchItems",
        ge=1,
        description="Most items one `{\"items\": [...]}` message may carry (`BatchTooLarge`).",
    )
    max_image_pixels: int = Field(
        4096 * 4096,
        alias="MaxImagePixels",
        ge=1,
        description="Largest image (width x height, read from its header before decoding) "
        "accepted; larger ones are refused with `ImageTooLarge` before any pixel is decoded. "
        "The images of one message together may declare 4 times this. The default takes 4K "
        "frames; decoding one costs about 2 bytes per pixel of memory for grey models and 6 "
        "for colour ones, per decode worker (100 MB for a 4096x4096 colour image).",
    )
    max_tensor_elements: int = Field(
        16 * 1024 * 1024,
        alias="MaxTensorElements",
        ge=1,
        description="Most elements one tensor message (`.npy` or JSON, all rows together) may "
        "hold; a `.npy` whose header declares more is refused with `TensorTooLarge` before "
        "its data is allocated.",
    )
    intake_queue: int = Field(
        256,
        alias="IntakeQueue",
        ge=1,
        description="Messages waiting for decoding. When full, the transport stops reading "
        "and the broker holds further messages (back-pressure, nothing dropped).",
    )
    max_batch_size: int = Field(
        32, alias="MaxBatchSize", ge=1, description="Most items per `session.run`."
    )
    max_queued_mb: int = Field(
        512,
        alias="MaxQueuedMb",
        ge=1,
        description="Most memory, in MB, that decoded inputs waiting for inference may hold "
        "together (decoded tensors can be far larger than their messages: a 4 MB `uint8` "
        "`.npy` for an `int64` input is 32 MB). A decoded input that would pass it is "
        "answered `Overloaded` (retryable, not billed) instead of queued; one input alone "
        "is always taken.",
    )
    max_reruns_per_failed_batch: int = Field(
        0,
        alias="MaxRerunsPerFailedBatch",
        ge=0,
        description="When the model fails on a batch, it is split in halves (again and "
        "again) to find the inputs at fault, which alone get `InferenceFailed`: one among "
        "32 takes 10 runs. At most this many runs per failed batch; 0: twice the batch's "
        "inputs, the most a bisection can need, so an input not at fault is never refused "
        "for want of runs. Inputs not cleared within them are answered `InferenceFailed` "
        "too.",
    )
    max_failed_batches_per_minute: int = Field(
        30,
        alias="MaxFailedBatchesPerMinute",
        ge=0,
        description="Past this many failed batches of one model version in a minute, a "
        "failed batch is answered `InferenceFailed` whole, without splitting it: inputs "
        "the model fails on cannot multiply the runs everyone's inputs need (logged once "
        "when it starts and when it ends).",
    )
    repeat_window_seconds: float = Field(
        600.0, alias="RepeatWindowSeconds", ge=0,
        description="A request the client named (its `id`, or MQTT v5 correlation data) that "
        "arrives again on the same topic with the same bytes within this time is answered "
        "again but not billed again: QoS 1 lets a broker restart forward the same publish "
        "twice. A repeat the broker marks as redelivered is recognised at any age. 0 turns "
        "the name check off.",
    )
    max_queue_delay_ms: float = Field(
        2.0,
        alias="MaxQueueDelayMs",
        ge=0,
        description="How long the batcher waits for more items after the first one.",
    )
    decode_workers: int = Field(
        1, alias="DecodeWorkers", ge=1, le=64, description="Threads decoding payloads."
    )
    shutdown_seconds: float = Field(
        8.0,
        alias="ShutdownSeconds",
        gt=0,
        description="On SIGTERM, how long to finish work in flight before exiting (keep it "
        "under the container stop timeout, 10 s by default).",
    )


class MeteringSettings(Section):
    batch_size: int = Field(
        500, alias="BatchSize", ge=1, le=500,
        description="Usage records per upload to the billing endpoint (the API takes 500 at "
        "most).",
    )
    max_delay_seconds: float = Field(
        10.0, alias="MaxDelaySeconds", gt=0,
        description="Upload pending usage at the latest this long after it was recorded, "
        "even when a batch is not full.",
    )
    timeout_seconds: float = Field(
        10.0, alias="TimeoutSeconds", gt=0,
        description="Timeout of one billing call (connect and answer). A blackholed "
        "endpoint costs the uploader this long per try and never stalls inference.",
    )
    max_backoff_seconds: float = Field(
        300.0, alias="MaxBackoffSeconds", gt=0,
        description="Cap of the exponential back-off (with jitter) between failed uploads. "
        "A Retry-After from the endpoint is honoured exactly instead.",
    )
    max_pending_records: int = Field(
        1_000_000, alias="MaxPendingRecords", ge=1,
        description="Most records waiting for upload. At the cap the module refuses new "
        "work with `MeteringBufferFull` (never drops a record) until the upload frees "
        "space; a warning is logged at 80%.",
    )
    max_ledger_mb: float = Field(
        512.0, alias="MaxLedgerMb", gt=0,
        description="Most megabytes the ledger may use on disk (the database, its write-ahead "
        "log and its `-shm` file together); the same refusal applies at the cap.",
    )
    retention_hours: float = Field(
        168.0, alias="RetentionHours", ge=0,
        description="How long acknowledged records are kept (for audits) before pruning. "
        "Quarantined records are kept until removed by hand.",
    )
    usage_log_seconds: float = Field(
        60.0, alias="UsageLogSeconds", gt=0,
        description="How often the signed usage log under `Mounts:Output` gets a new entry "
        "(also at shutdown and whenever `/records/usage-logs` is read).",
    )
    synchronous: Literal["full", "normal"] = Field(
        "full", alias="Synchronous",
        description="SQLite `synchronous`: `full` survives power loss, `normal` survives "
        "process crashes only and is faster on slow storage.",
    )


class BillingSettings(Section):
    value_key: ClassVar[str | None] = "Url"

    url: AnyHttpUrl | None = Field(
        None,
        alias="Url",
        description="Base URL of the billing endpoint; `Billing=<url>` sets it. Required "
        "unless the module runs disconnected under a licence file (`Mounts:License`).",
    )
    public_key: str | None = Field(
        None,
        alias="PublicKey",
        description="Development builds only (deprecated; use "
        "`Development:TrustedKeyFile`): an extra Ed25519 key to trust, base64 of the raw 32 "
        "bytes or a PEM path. A release image trusts only the vendor keys built into it and "
        "exits with code 2 when this is set.",
    )
    ca_file: Path | None = Field(
        None,
        alias="CaFile",
        description="PEM bundle of the CA that signed the billing endpoint's certificate, "
        "when it is not in the system store.",
    )

    @field_validator("ca_file")
    @classmethod
    def _ca_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"file {path} does not exist")
        return path


class DevelopmentSettings(Section):
    trusted_key_file: Path | None = Field(
        None,
        alias="TrustedKeyFile",
        description="Development builds only: trust the key in this file (the billing "
        "simulator's `billing-public-key.b64`, or a key set) for leases, status answers, "
        "receipts and licence files. Logged as a warning at every start; a release image "
        "exits with code 2 when this is set (docs/licensing.md).",
    )


class LicensingSettings(Section):
    check_interval_seconds: float = Field(
        300.0, alias="CheckIntervalSeconds", gt=0,
        description="How often the key is checked with the billing endpoint while all is "
        "well (every upload answer counts as a check too).",
    )
    retry_seconds: float = Field(
        30.0, alias="RetrySeconds", gt=0,
        description="How often to check again while the endpoint is unreachable or the "
        "module is refusing work, so service resumes soon after the link returns.",
    )
    status_timeout_seconds: float = Field(
        5.0, alias="StatusTimeoutSeconds", gt=0,
        description="Timeout of one status check (at start, periodic, and `GET /status`).",
    )


class MountsSettings(Section):
    license: Path | None = Field(
        None,
        alias="License",
        description="Folder holding the licence file (`DownloadLicense=True` writes it there). "
        "Setting it without `Billing` runs the module disconnected.",
    )
    output: Path | None = Field(
        None,
        alias="Output",
        description="Folder for the monthly usage logs of disconnected mode.",
    )


class HttpTlsSettings(Section):
    cert_file: Path | None = Field(
        None, alias="CertFile", description="PEM server certificate (chain). Setting it (with "
        "`KeyFile`) turns TLS on for the whole HTTP API; off by default."
    )
    key_file: Path | None = Field(
        None, alias="KeyFile", description="PEM private key of `CertFile`. Never logged."
    )
    client_ca_file: Path | None = Field(
        None, alias="ClientCaFile", description="PEM CA bundle: when set, every client must "
        "present a certificate signed by it (mutual TLS); a client without one is refused "
        "during the handshake."
    )

    @model_validator(mode="after")
    def _files_exist(self) -> HttpTlsSettings:
        for key, path in (("CertFile", self.cert_file), ("KeyFile", self.key_file),
                          ("ClientCaFile", self.client_ca_file)):
            if path is not None and not path.is_file():
                raise SettingError(key, f"file {path} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            raise SettingError("KeyFile" if self.key_file is None else "CertFile",
                               "CertFile and KeyFile go together",
                               "set both Http:Tls:CertFile and Http:Tls:KeyFile, or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise SettingError("ClientCaFile", "client certificates need TLS",
                               "set Http:Tls:CertFile and Http:Tls:KeyFile too")
        return self


class HttpSettings(Section):
    host: str = Field("0.0.0.0", alias="Host", description="Address the HTTP API listens on.")
    port: int = Field(
        5000,
        alias="Port",
        ge=0,
        le=65535,
        description="HTTP port (health, readiness, metrics). 0 picks a free port.",
    )
    max_connections: int = Field(
        256,
        alias="MaxConnections",
        ge=1,
        le=10000,
        description="Open HTTP connections served at once. A connection beyond it is answered "
        "503 with `Retry-After` and closed at once; no thread is ever started per connection.",
    )
    idle_timeout_seconds: float = Field(
        30.0,
        alias="IdleTimeoutSeconds",
        gt=0,
        le=3600,
        description="A connection that sends nothing for this long (a new one before its first "
        "request, or a kept-alive one between requests) is closed.",
    )
    header_timeout_seconds: float = Field(
        10.0,
        alias="HeaderTimeoutSeconds",
        gt=0,
        le=600,
        description="Time a client has, from the first byte of a request, to send its whole "
        "request line and headers (slowloris defence); past it the answer is 408 and the "
        "connection is closed.",
    )
    body_timeout_seconds: float = Field(
        30.0,
        alias="BodyTimeoutSeconds",
        gt=0,
        le=3600,
        description="Time a client has to send a request body once its headers are in (past "
        "it the answer is 408 and the connection is closed), and to take an answer that does "
        "not fit in the socket buffers (past it the connection is dropped).",
    )
    max_body_bytes: int = Field(
        8 * 1024 * 1024,
        alias="MaxBodyBytes",
        ge=0,
        le=1024 * 1024 * 1024,
        description="Largest request body accepted; a larger one (by `Content-Length` or as it "
        "streams in) is answered 413 without reading the rest.",
    )
    max_header_bytes: int = Field(
        16 * 1024,
        alias="MaxHeaderBytes",
        ge=1024,
        le=1024 * 1024,
        description="Largest request line plus headers; a larger one is answered 400.",
    )
    handler_threads: int = Field(
        4,
        alias="HandlerThreads",
        ge=1,
        le=64,
        description="Threads that run handlers which may block (status, ledger reads, usage "
        "logs). The server itself is one event loop thread; requests beyond 8 waiting per "
        "handler thread are answered 503 with `Retry-After`.",
    )
    answer_timeout_seconds: float = Field(
        30.0,
        alias="AnswerTimeoutSeconds",
        gt=0,
        le=600,
        description="Longest an OIP v2 inference request waits for its answer from the "
        "pipeline; past it the answer is 504 `AnswerTimeout`.",
    )
    api_key: SecretStr | None = Field(
        None,
        alias="ApiKey",
        description="When set, inference, model and control routes (`/v2/...` except the "
        "health routes, `/status`, `/records/...`) need `Authorization: Bearer <key>` or "
        "`X-Api-Key: <key>` (checked in constant time); `/health`, `/ready`, `/metrics` and "
        "`/v2/health/*` stay open. Unset (the default): anyone who reaches the port may "
        "infer, and is billed to you. Never logged.",
    )
    tls: HttpTlsSettings = Field(default_factory=HttpTlsSettings, alias="Tls")


class GrpcSettings(Section):
    enabled: bool = Field(
        True,
        alias="Enabled",
        description="Serve the Open Inference Protocol v2 over gRPC "
        "(`inference.GRPCInferenceService`) on `Grpc:Port`. On by default, like Triton: "
        "an open inference port, so set `Http:ApiKey` (checked on gRPC too) and `Http:Tls` "
        "where the port is reachable from outside the device, or `Grpc:Enabled=false` "
        "when nothing speaks gRPC (README: security).",
    )
    host: str = Field("0.0.0.0", alias="Host", description="Address the gRPC server listens on.")
    port: int = Field(
        8001, alias="Port", ge=0, le=65535,
        description="gRPC port (8001, like Triton). 0 picks a free port.",
    )
    threads: int = Field(
        16, alias="Threads", ge=1, le=256,
        description="Threads serving gRPC calls; each waits for its answer from the pipeline, "
        "so at most this many gRPC requests are in it at once. About twice the batch the "
        "model runs lets one batch gather while another infers.",
    )
    max_concurrent_calls: int = Field(
        64, alias="MaxConcurrentCalls", ge=1, le=10000,
        description="Calls in progress at once; one more is refused at once with "
        "`RESOURCE_EXHAUSTED`.",
    )


class DataSettings(Section):
    path: Path = Field(
        Path("edge-module-data"),
        alias="Path",
        description="Folder for local state (installation id, metering ledger). Mount a "
        "host volume here in a container so state survives re-creation.",
    )


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", alias="Level", description="Lowest level written."
    )
    format: Literal["json", "iotedge", "console"] = Field(
        "json",
        alias="Format",
        description="`json`: one JSON object per line. `iotedge`: the same with a syslog "
        "severity prefix (`<6>`) so `iotedge logs` can filter. `console`: for people.",
    )

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class EdgeHubSettings(Section):
    """The edgeHub transport (``Transport=edgehub``), see docs/iot-edge.md."""

    inputs: list[str] = Field(
        default_factory=lambda: ["input"],
        alias="Inputs",
        min_length=1,
        description="edgeHub inputs to serve, comma-separated; `*` serves every input. "
        "Messages on other inputs are answered on `ErrorOutput` with `UnknownInput`.",
    )
    result_output: str = Field(
        "results", alias="ResultOutput", min_length=1,
        description="Output that results are sent to (route it with "
        "`FROM /messages/modules/<module>/outputs/results`).",
    )
    error_output: str = Field(
        "errors", alias="ErrorOutput", min_length=1,
        description="Output that error envelopes are sent to.",
    )
    intake_queue: int = Field(
        256, alias="IntakeQueue", ge=1, le=100_000,
        description="Messages received from edgeHub and waiting for the pipeline. When it is "
        "full, a message is answered at once on `ErrorOutput` with code `Overloaded` "
        "(retryable, not billed): never dropped silently.",
    )
    keep_alive: int = Field(
        10, alias="KeepAlive", ge=5, le=1740,
        description="MQTT keep-alive to edgeHub in seconds: a frozen edgeHub is noticed "
        "after about 1.5 times this.",
    )
    retry_interval_seconds: int = Field(
        2, alias="RetryIntervalSeconds", ge=1, le=600,
        description="Seconds between reconnection attempts after the link to edgeHub drops.",
    )
    send_timeout_seconds: float = Field(
        10.0, alias="SendTimeoutSeconds", gt=0,
        description="An answer not acknowledged by edgeHub within this is sent again.",
    )
    send_retry_seconds: float = Field(
        300.0, alias="SendRetrySeconds", gt=0,
        description="How long an answer is retried while edgeHub is unreachable (it keeps "
        "its order in line); after that it is given up, logged with its id and counted in "
        "`edge_module_results_undelivered_total`.",
    )
    reported_interval_seconds: float = Field(
        30.0, alias="ReportedIntervalSeconds", ge=0,
        description="Reported twin properties are patched when they change, at most this "
        "often (frequent patches make the SDK's memory grow). Answers to desired-property "
        "changes are sent at once.",
    )

    input_models: list[str] = Field(
        default_factory=list, alias="InputModels",
        description="With `Model:Repository`: the model each edgeHub input goes to, "
        "comma-separated `input=model` or `input=model:version` (e.g. "
        "`camera=detector,pump=telemetry:2`); a `model` field in the JSON wins; inputs not "
        "listed go to the default model.",
    )

    _split = field_validator("inputs", "input_models", mode="before")(_split_list)

    @field_validator("input_models")
    @classmethod
    def _input_models(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            source, _, target = entry.partition("=")
            name, _, version = target.partition(":")
            if not source or not name or (":" in target and not version):
                raise ValueError(f"{entry!r} is not input=model or input=model:version")
        return entries

    def model_for(self, source: str) -> tuple[str | None, str | None]:
        """The model (and version) ``EdgeHub:InputModels`` maps this input to."""
        for entry in self.input_models:
            name, _, target = entry.partition("=")
            if name == source:
                model, _, version = target.partition(":")
                return model, version or None
        return None, None


class Settings(Section):
    eula: Literal["accept"] = Field(
        alias="Eula", description="Must be `accept`: you accept the licence terms."
    )
    billing: BillingSettings = Field(default_factory=BillingSettings, alias="Billing")
    api_key: SecretStr | None = Field(
        None, alias="ApiKey",
        description="Key for the billing endpoint, at least 16 characters. Required unless "
        "the module runs disconnected. Never logged or returned.",
    )
    replicas: int = Field(
        1, alias="Replicas", ge=1, le=64,
        description="Run N copies of the module splitting the input through MQTT shared "
        "subscriptions, each with its own `Data:Path/replica-<i>`, `Http:Port + i` and "
        "`Grpc:Port + i` (docs/architecture.md).",
    )
    download_license: bool = Field(
        False, alias="DownloadLicense",
        description="Download a signed licence file into `Mounts:License` and exit.",
    )
    transport: Literal["mqtt", "edgehub"] = Field(
        "mqtt", alias="Transport", description="Where input comes from: `mqtt` or `edgehub`."
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings, alias="Mqtt")
    edge_hub: EdgeHubSettings = Field(default_factory=EdgeHubSettings, alias="EdgeHub")
    model: ModelSettings = Field(default_factory=ModelSettings, alias="Model")
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings, alias="Pipeline")
    metering: MeteringSettings = Field(default_factory=MeteringSettings, alias="Metering")
    licensing: LicensingSettings = Field(default_factory=LicensingSettings, alias="Licensing")
    development: DevelopmentSettings = Field(default_factory=DevelopmentSettings,
                                             alias="Development")
    mounts: MountsSettings = Field(default_factory=MountsSettings, alias="Mounts")
    http: HttpSettings = Field(default_factory=HttpSettings, alias="Http")
    grpc: GrpcSettings = Field(default_factory=GrpcSettings, alias="Grpc")
    data: DataSettings = Field(default_factory=DataSettings, alias="Data")
    log: LogSettings = Field(default_factory=LogSettings, alias="Log")

    @field_validator("eula", "transport", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _non_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        if value is not None and len(value.get_secret_value()) < MIN_API_KEY_LENGTH:
            raise ValueError(
                f"is {len(value.get_secret_value())} characters long; a real billing key "
                f"has at least {MIN_API_KEY_LENGTH} (this looks like a typo or a test value)")
        return value

    @model_validator(mode="after")
    def _mode(self) -> Settings:
        if self.replicas > 1 and self.transport == "edgehub":
            raise SettingError("Replicas", "splits MQTT input with shared subscriptions and "
                               "does not work with Transport=edgehub", "use Replicas=1 (edgeHub "
                               "feeds one module instance; route to a second module for more)")
        if self.download_license:
            if self.mounts.license is None:
                raise SettingError("Mounts:License", "is required with DownloadLicense=True",
                                   "pass Mounts:License=<folder> to write the licence file to")
            if self.billing.url is None or self.api_key is None:
                raise SettingError("Billing" if self.billing.url is None else "ApiKey",
                                   "is required to download a licence",
                                   "pass Billing=<url> ApiKey=<key>")
        elif not self.disconnected:
            if self.billing.url is None:
                raise SettingError("Billing", "is required", f"{FIXES['Billing']}, or run "
                                   "disconnected with Mounts:License=<folder>")
            if self.api_key is None:
                raise SettingError("ApiKey", "is required", FIXES["ApiKey"])
        return self

    @property
    def disconnected(self) -> bool:
        """Running under a licence file with no billing endpoint."""
        return self.mounts.license is not None and self.billing.url is None

    @property
    def billing_url(self) -> str:
        return str(self.billing.url) if self.billing.url is not None else ""

    @property
    def key(self) -> str:
        return self.api_key.get_secret_value() if self.api_key is not None else ""

    def secrets(self) -> list[str]:
        """Every secret value, so log redaction can scrub them wherever they appear."""
        values = [self.key]
        if self.mqtt.password is not None:
            values.append(self.mqtt.password.get_secret_value())
        return [v for v in values if v]


# Fixes shown for common errors, by setting name. Others point at the reference.
FIXES: dict[str, str] = {
    "Eula": "pass Eula=accept to accept the licence terms",
    "Billing": "pass Billing=https://<your billing endpoint>",
    "Billing:Url": "pass Billing=https://<your billing endpoint>",
    "ApiKey": "pass ApiKey=<the whole key your billing provider issued> (or set the ApiKey "
    "environment variable)",
    "Model:Path": "point Model:Path at an existing .onnx file with its .json descriptor beside it",
    "Model:Name": "use a built-in model name or set Model:Path",
}
SECRET_KEYS = {"ApiKey", "Mqtt:Password"}
ALIASES = {"Billing:Url": "Billing"}
