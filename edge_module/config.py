"""Settings: declared once, typed, validated, documented.

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

import difflib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from paho.mqtt.client import topic_matches_sub
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from edge_module.exceptions import ConfigError

DOCS_URL = "docs/configuration.md"
# Billing keys are issued as 32 characters; a key shorter than this is a typo or a test
# value, and scrubbing so short a value from logs would mangle ordinary words (logs.py).
MIN_API_KEY_LENGTH = 16
BUILTIN_MODELS = Path(__file__).resolve().parent / "models"


def descriptor_path(model: Path) -> Path:
    """``m.onnx`` and ``m.onnx.enc`` both have their descriptor in ``m.json``."""
    name = model.name.removesuffix(".enc")
    return model.with_name(name).with_suffix(".json")


def builtin_models() -> list[str]:
    """Names of the models shipped inside the package."""
    return sorted(p.stem for p in BUILTIN_MODELS.glob("*.onnx"))


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
                raise ValueError(f"{key}: file {path} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("CertFile and KeyFile go together: set both or neither")
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
                raise ValueError(f"{key}: {topic!r} must be a plain topic without wildcards")
            if "{topic}" in topic:
                continue  # checked per message: a derived topic that loops is refused then
            for sub in subscriptions:
                if topic_matches_sub(sub, topic):
                    raise ValueError(
                        f"{key}: {topic!r} matches InputTopic {sub!r}, so the module would consume "
                        f"its own output; choose a topic outside the input filters"
                    )
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
        description="Most megabytes the ledger may use; the same refusal applies at the cap.",
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
        description="The vendor's Ed25519 public key that signs leases and licence files: "
        "base64 of the raw 32 bytes, or the path of a PEM file. Without it no lease can be "
        "verified, so the module has no offline grace.",
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


class HttpSettings(Section):
    host: str = Field("0.0.0.0", alias="Host", description="Address the HTTP API listens on.")
    port: int = Field(
        5000,
        alias="Port",
        ge=0,
        le=65535,
        description="HTTP port (health, readiness, metrics). 0 picks a free port.",
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

    _split = field_validator("inputs", mode="before")(_split_list)


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
        "subscriptions, each with its own `Data:Path/replica-<i>` and `Http:Port + i` "
        "(docs/architecture.md).",
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
    mounts: MountsSettings = Field(default_factory=MountsSettings, alias="Mounts")
    http: HttpSettings = Field(default_factory=HttpSettings, alias="Http")
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
            raise ValueError("Replicas: splits MQTT input with shared subscriptions and does "
                             "not work with Transport=edgehub; fix: use Replicas=1 (edgeHub "
                             "feeds one module instance; route to a second module for more)")
        if self.download_license:
            if self.mounts.license is None:
                raise ValueError("Mounts:License: is required with DownloadLicense=True; fix: "
                                 "pass Mounts:License=<folder> to write the licence file to")
            if self.billing.url is None or self.api_key is None:
                raise ValueError(f"{'Billing' if self.billing.url is None else 'ApiKey'}: is "
                                 "required to download a licence; fix: pass Billing=<url> "
                                 "ApiKey=<key>")
        elif not self.disconnected:
            if self.billing.url is None:
                raise ValueError(f"Billing: is required; fix: {FIXES['Billing']}, or run "
                                 "disconnected with Mounts:License=<folder>")
            if self.api_key is None:
                raise ValueError(f"ApiKey: is required; fix: {FIXES['ApiKey']}")
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


# ---------------------------------------------------------------------------
# Name resolution: flat, case-insensitive keys -> the nested alias structure.


def _sections(model: type[BaseModel]) -> dict[str, tuple[str, type[BaseModel] | None]]:
    """Lower-case alias -> (alias, nested section model or None)."""
    out: dict[str, tuple[str, type[BaseModel] | None]] = {}
    for name, field in model.model_fields.items():
        alias = field.alias or name
        annotation = field.annotation
        nested = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
        out[alias.lower()] = (alias, nested)
    return out


def all_keys(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    """Every setting name, in declaration order, e.g. ``Mqtt:Tls:CaFile``."""
    keys: list[str] = []
    for alias, nested in _sections(model).values():
        full = f"{prefix}{alias}"
        if nested is None:
            keys.append(full)
        else:
            keys.extend(all_keys(nested, f"{full}:"))
    return keys


def resolve_key(raw: str) -> list[str]:
    """Map ``mqtt:HOST`` (or ``Mqtt__Host``) to its canonical path ``["Mqtt", "Host"]``."""
    parts = [p for p in raw.replace("__", ":").split(":")]
    model: type[BaseModel] | None = Settings
    path: list[str] = []
    for i, part in enumerate(parts):
        if model is None:
            raise ConfigError(raw, _unknown_hint(raw))
        entry = _sections(model).get(part.lower())
        if entry is None:
            raise ConfigError(raw, _unknown_hint(raw))
        alias, nested = entry
        path.append(alias)
        model = nested
        if nested is not None and i == len(parts) - 1:
            value_key = getattr(nested, "value_key", None)
            if value_key is not None:
                return [*path, value_key]
            raise ConfigError(raw, f"is a section; set one of its keys, e.g. "
                              f"{':'.join(path)}:{next(iter(_sections(nested).values()))[0]}")
    return path


def _unknown_hint(raw: str) -> str:
    canonical = raw.replace("__", ":")
    keys = all_keys()
    lowered = {k.lower(): k for k in keys}
    close = difflib.get_close_matches(canonical.lower(), list(lowered), n=1, cutoff=0.6)
    hint = f"did you mean {lowered[close[0]]}? " if close else ""
    return f"unknown setting; {hint}every setting is listed in {DOCS_URL}"


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _flatten(data: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{full}:")
        else:
            yield full, value


def parse_assignments(args: Iterable[str]) -> list[tuple[str, str]]:
    """``["Mqtt:Port=1883"]`` -> ``[("Mqtt:Port", "1883")]``."""
    pairs = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise ConfigError(arg, "expected Key=Value, e.g. Mqtt:Host=127.0.0.1")
        pairs.append((key.strip(), value))
    return pairs


def _env_assignments(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Environment variables that name a known setting (``Mqtt__Host``, ``APIKEY``, ...).

    Variables that name no setting are somebody else's and are ignored; a
    variable whose first part names one of our sections but whose rest is
    unknown (``Mqtt__Hots``) is an error, because it is almost surely a typo.
    """
    top = _sections(Settings)
    pairs = []
    for name, value in environ.items():
        parts = name.split("__")
        entry = top.get(parts[0].lower())
        if entry is None:
            continue
        if entry[1] is None and len(parts) > 1:
            continue
        if entry[1] is not None and len(parts) == 1 and \
                getattr(entry[1], "value_key", None) is None:
            continue  # e.g. a variable called MODEL: not ours
        pairs.append((name, value))
    return pairs


def _read_file(path: Path) -> list[tuple[str, Any]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("--config", f"{path} is not valid {path.suffix[1:] or 'JSON'}: "
                          f"{exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold an object of settings")
    return list(_flatten(data))


def load_settings(
    args: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build validated settings from the three sources; raise ConfigError on any problem."""
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    layers: list[list[tuple[str, Any]]] = []
    if config_file is not None:
        layers.append(_read_file(config_file))
    layers.append(_env_assignments(environ))
    layers.append(parse_assignments(args))
    for layer in layers:  # lowest precedence first; later layers overwrite
        for raw, value in layer:
            _set(tree, resolve_key(raw), value)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise _translate(exc) from None


def _translate(exc: ValidationError) -> ConfigError:
    """Turn pydantic's report into one line naming the key and the fix."""
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"] if not isinstance(p, int)]
    key = ":".join(loc) if loc else "settings"
    key = ALIASES.get(key, key)
    if error["type"] == "missing":
        return ConfigError(key, f"is required; fix: {FIXES.get(key, f'set {key}')}")
    message = str(error["msg"]).removeprefix("Value error, ")
    head, sep, rest = message.partition(": ")
    if sep and head.replace(":", "").isidentifier() and head[0].isupper():
        # A section-level check names the field first, e.g. "ResultTopic: ...".
        key, message = f"{key}:{head}" if loc else head, rest
        if "; fix: " in message:
            return ConfigError(key, message)
    if error["type"] == "literal_error" and key == "Eula":
        return ConfigError(key, f"the licence terms are not accepted; fix: {FIXES['Eula']}")
    shown = "" if key in SECRET_KEYS or "input" not in error else _shown(error["input"])
    fix = FIXES.get(key, f"see {key} in {DOCS_URL}")
    return ConfigError(key, f"{message}{shown}; fix: {fix}")


def _shown(value: Any) -> str:
    if isinstance(value, dict | list):
        return ""
    text = str(value)
    return f" (got {text[:80]!r})"


def reference_markdown() -> str:
    """The configuration reference page, generated from the fields above."""
    lines = [
        "# Configuration reference",
        "",
        "Generated by `edge-module config-reference` from `edge_module/config.py`; a test "
        "fails when this page and the code disagree.",
        "",
        "Set a key on the command line (`Mqtt:Port=1883`), in the environment "
        "(`Mqtt__Port=1883`) or in a JSON/TOML file given with `--config` (nested objects). "
        "Names are case-insensitive. Precedence, highest first: command line, environment, "
        "config file, default. A bad value stops the module with one line naming the key "
        "and the fix, and exit code 2.",
        "",
        "| Key | Type | Default | Meaning |",
        "| --- | --- | --- | --- |",
    ]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            alias = field.alias or name
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{alias}:")
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = "" if value is None else f"`{_doc_value(value)}`"
            kind = _type_name(annotation)
            lines.append(f"| `{prefix}{alias}` | {kind} | {default} | {field.description} |")

    walk(Settings, "")
    return "\n".join(lines) + "\n"


def _doc_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("pathlib.", "")
    text = text.replace("pydantic.types.", "").replace("pydantic.networks.", "")
    text = text.replace("<class '", "").replace("'>", "")
    return text.replace("|", "or")
