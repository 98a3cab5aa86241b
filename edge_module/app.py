"""The running module: builds every part from the settings and owns their lifecycle.

Start order: logging, data folder, model (loaded and warmed up), transport,
pipeline, HTTP. Stop order on SIGTERM/SIGINT: stop intake, finish in-flight
work, announce ``offline``, disconnect, exit 0. Worker threads run under the
supervisor (``edge_module/supervisor.py``): one that dies is restarted and
``/ready`` names it while it is down; ``/ready`` is also false, with the
cause, while the ledger cannot be written (a full disk).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edge_module import CONTAINER_TYPE, __version__
from edge_module.activity import WINDOW_SECONDS
from edge_module.api.grpc_server import GrpcServer, InferenceService
from edge_module.api.http import HttpApi
from edge_module.api.page import PageSources, StatusPage
from edge_module.api.v2 import V2Api
from edge_module.billing_api import BillingClient
from edge_module.config import Settings, descriptor_path
from edge_module.control.controller import Controller
from edge_module.control.reported import Reporter
from edge_module.exceptions import ConfigError
from edge_module.identity import Identity, installation_identity
from edge_module.inference.catalog import Catalog, ModelState, SingleModel
from edge_module.inference.encryption import MAGIC
from edge_module.inference.models import Model, load_descriptor, load_model, model_path
from edge_module.inference.repository import ModelRepository, split_default
from edge_module.licensing.clock import TrustedClock
from edge_module.licensing.lease import LeaseStore
from edge_module.licensing.license_file import LicenseFileSource, load_license
from edge_module.licensing.service import Licensing
from edge_module.logs import get_logger
from edge_module.metering.drain import Drainer
from edge_module.metering.ledger import Ledger, MeteringError
from edge_module.metering.meter import LedgerMeter
from edge_module.metering.usage_log import UsageLog
from edge_module.metrics import Metrics
from edge_module.pipeline import Meter, Pipeline
from edge_module.state import ensure_data_dir, module_signing_key
from edge_module.supervisor import Supervisor
from edge_module.transport.base import Transport
from edge_module.transport.http import Transports
from edge_module.transport.mqtt import MqttTransport
from edge_module.trust.keys import DEV_SWITCH, TrustedKeys, keys_for

if TYPE_CHECKING:  # the SDK is imported only when Transport=edgehub
    from edge_module.transport.edgehub import EdgeHubTransport

log = get_logger("app")


class App:
    def __init__(self, settings: Settings, meter: Meter | None = None) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.stop_signal: int | None = None
        # First: a release build refuses development switches before touching anything.
        self.trusted_keys = keys_for(settings)
        self.data_path = ensure_data_dir(settings.data.path)
        self.identity = installation_identity(self.data_path)
        self.container_id = self.identity.container_id
        self.metrics = Metrics()
        self.supervisor = Supervisor(self.metrics)
        try:
            self.ledger = Ledger(self.data_path / "ledger.db", self.identity,
                                 settings.metering)
        except MeteringError as exc:
            raise ConfigError("Data:Path", str(exc)) from exc
        # The licence is checked before the model is loaded: a bad licence fails fast.
        self.licensing = build_licensing(settings, self.identity, self.data_path,
                                         self.ledger, self.trusted_keys)
        self.ledger.clock_ms = self.licensing.clock.now_ms  # requestTime in trusted time
        self.licensing.watch_usage(self.ledger.oldest_pending_ms)
        self.repository: ModelRepository | None = None
        self._poll_stop = threading.Event()  # set after the supervisor stops
        catalog: Catalog
        if settings.model.repository is not None:
            self.repository = catalog = self._open_repository()
        else:
            model = self._load_model()
            log.info("model_loaded", **model.provenance.as_dict(),
                     path=str(model.path), encrypted=model.encrypted)
            catalog = SingleModel(model)
        self.catalog = catalog
        self.catalog_metrics()
        self.drainer: Drainer | None = None
        self.billing: BillingClient | None = None
        if settings.billing.url is not None:
            self.billing = BillingClient.from_settings(
                settings, timeout=settings.metering.timeout_seconds)
            self.drainer = Drainer(self.ledger, self.billing, settings.metering, self.metrics,
                                   on_answer=self.licensing.observe,
                                   keys=self.trusted_keys)
            self.licensing.on_online.append(self.drainer.wake)
            self.drainer.max_delay = self._upload_within
        self.usage_log: UsageLog | None = None
        if settings.mounts.output is not None:
            self.usage_log = UsageLog(settings.mounts.output, self.ledger, self.identity,
                                      module_signing_key(self.data_path),
                                      self.licensing.clock.now_ms)
        self.meter = meter or LedgerMeter(self.ledger, self.metrics, self.drainer)
        self.reporter: Reporter | None = None
        self.edgehub: EdgeHubTransport | None = None
        self.transport = self._transport()
        # HTTP and gRPC (OIP v2) inputs join the same pipeline: answers to them go back to
        # their handler, every other answer to the main transport.
        self.transports = Transports(self.transport)
        self.pipeline = Pipeline(catalog, settings.pipeline, self.transports, self.metrics,
                                 self.meter, gate=self.licensing, top_k=settings.model.top_k)
        if self.repository is None:  # the v2 APIs follow a live reload of the one model
            self.catalog = ServedModel(self.pipeline)
        self.control = Controller(settings, self.pipeline, self.licensing, self.ledger,
                                  self.drainer, self.metrics, self._status, self.repository)
        if self.edgehub is not None:
            self._wire_twin(self.edgehub)
        try:
            self.http = HttpApi(settings.http, self._render_metrics, self.readiness)
            self.http.add("/status", self._status)
            self.http.add_prefix("/records/usage-logs", self._usage_logs)
            self.page = StatusPage(self.http, self._page_sources())
            self.v2 = V2Api(self.http, self.catalog, self.pipeline.offer, self.readiness,
                            lambda: not self.stopping.is_set(),
                            settings.http.answer_timeout_seconds,
                            lambda: self.pipeline.serving.max_batch)
            self.grpc = self._grpc() if settings.grpc.enabled else None
        except OSError as exc:
            raise ConfigError("Http:Port", f"cannot listen on {settings.http.host}:"
                              f"{settings.http.port} ({exc.strerror}); fix: choose a free port "
                              "with Http:Port=<n>") from exc

    def _grpc(self) -> GrpcServer:
        """The OIP v2 gRPC server (``Grpc:Enabled``) on the same catalog and pipeline."""
        http = self.settings.http
        key = http.api_key.get_secret_value().encode() if http.api_key is not None else None
        service = InferenceService(self.catalog, self.pipeline.offer, self.readiness,
                                   lambda: not self.stopping.is_set(),
                                   http.answer_timeout_seconds, key,
                                   lambda: self.pipeline.serving.max_batch, self.v2.stats)
        try:
            return GrpcServer(self.settings.grpc, http.tls, service, http.max_body_bytes)
        except (OSError, RuntimeError) as exc:
            grpc = self.settings.grpc
            raise ConfigError("Grpc:Port", f"cannot listen on {grpc.host}:{grpc.port} "
                              f"({exc}); fix: choose a free port with Grpc:Port=<n> or set "
                              "Grpc:Enabled=false") from exc

    def _load_model(self) -> Model:
        path = model_path(self.settings.model)
        if path.read_bytes()[:len(MAGIC)] == MAGIC and self.licensing.client is not None \
                and self.licensing.model_key(load_descriptor(descriptor_path(path)).name) \
                is None:
            self.licensing.check()  # an encrypted model: its key comes with a fresh lease
        return load_model(self.settings.model, self.licensing.model_key)

    def _open_repository(self) -> ModelRepository:
        """Every model of Model:Repository loaded now; one that fails is listed as failed
        and the module serves the others."""
        ms = self.settings.model
        assert ms.repository is not None

        def load(path: Path, intra: int, inter: int) -> Model:
            model = Model(path, intra, inter, self.licensing.model_key, ms.graph_optimization,
                          ms.execution_mode)
            model.warm_up()
            return model

        repository = ModelRepository(ms.repository, load, ms.default, ms.intra_op_threads,
                                     ms.inter_op_threads, ms.memory_budget_mb)
        repository.events.changed.append(self.catalog_metrics)
        default, _ = split_default(ms.default)
        if default is not None and not (ms.repository / default).is_dir():
            raise ConfigError("Model:Default", f"the repository {ms.repository} has no model "
                              f"folder {ms.default!r}; fix: name one of its model folders, or "
                              "unset it to use the only model")
        repository.scan()
        log.info("model_repository_loaded", path=str(ms.repository),
                 default=repository.default_name,
                 models=[f"{i.name}/{i.version}: {i.state.value}"
                         for i in repository.versions()])
        return repository

    def catalog_metrics(self) -> None:
        """The model-state gauge: one series per model, version and state."""
        catalog = getattr(self, "catalog", None)
        if catalog is None:
            return
        gauge = self.metrics.model_state
        gauge.clear()
        for info in catalog.versions():
            for state in ModelState:
                gauge.labels(model=info.name, version=info.version, state=state.value).set(
                    1 if info.state is state else 0)

    def models_status(self) -> list[dict[str, Any]]:
        """The ``models`` list of /status and the twin's reported properties."""
        if self.repository is not None:
            return self.repository.status()
        return [{"name": i.name, "version": i.version, "state": i.state.value,
                 "reason": i.reason, "sha256": i.sha256} for i in self.catalog.versions()]

    def _transport(self) -> Transport:
        if self.settings.transport == "edgehub":
            from edge_module.transport.edgehub import EdgeHubTransport

            self.edgehub = EdgeHubTransport(self.settings.edge_hub, self.metrics)
            self.edgehub.spawn = self.supervisor.spawn
            return self.edgehub
        client_id = self.settings.mqtt.client_id or f"edge-module-{self.container_id[:8]}"
        capacity = self.settings.pipeline.intake_queue * 2 + self.settings.pipeline.max_batch_size
        transport = MqttTransport(self.settings.mqtt, client_id, self.metrics,
                                  receive_maximum=capacity)
        transport.keep = self.supervisor.keep_library_loop
        return transport

    def readiness(self) -> tuple[bool, str]:
        if self.stopping.is_set():
            return False, "shutting down"
        if not self.transport.connected:
            return False, "not connected to " + \
                ("edgeHub" if self.settings.transport == "edgehub" else "the broker")
        down = self.supervisor.down()
        if down:
            return False, "worker thread down, restarting: " + "; ".join(
                f"{name}: {cause}" for name, cause in sorted(down.items()))
        ledger_error = self.ledger.probe()
        if ledger_error is not None:
            return False, f"metering unavailable: {ledger_error}"
        decision = self.licensing.decide()
        if not decision.serve:
            return False, f"unlicensed: {decision.status}: {decision.message}"
        return True, "serving" if decision.state.value == "online" else \
            f"serving within the offline grace ({decision.remaining_seconds:.0f} s left)"

    def _wire_twin(self, edgehub: EdgeHubTransport) -> None:
        """The twin and direct methods reach the controller; its state is reported."""
        control = self.control
        self.reporter = control.reporter = Reporter(
            edgehub.report, control.reported_state,
            self.settings.edge_hub.reported_interval_seconds)
        control.on_inputs = edgehub.set_inputs
        edgehub.on_desired = control.apply_desired
        edgehub.on_method = control.methods.call
        edgehub.on_connected = self.reporter.resend_all

    def _usage_logs(self, rest: str) -> tuple[int, Any]:
        """GET /records/usage-logs/ and /records/usage-logs/{month}/{year}."""
        if self.usage_log is None:
            return 404, {"error": "no usage logs: set Mounts:Output to write them"}
        self.usage_log.export()  # include everything recorded so far
        if not rest:
            return 200, {"usageLogs": self.usage_log.months()}
        parts = rest.split("/")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 4
                                      for p in parts):
            return 400, {"error": "use /records/usage-logs/{month}/{year}"}
        month, year = int(parts[0]), int(parts[1])
        body = self.usage_log.month(month, year, CONTAINER_TYPE)
        if body is None:
            return 404, {"error": f"no usage recorded in {month}/{year}"}
        return 200, body

    def _status(self) -> tuple[int, Any]:
        """GET /status: check the key now (nothing is metered) and report."""
        self.licensing.check(max_age=1.0)  # probes may call often; the endpoint sees 1/s
        return 200, self._status_body()

    def _status_body(self) -> dict[str, Any]:
        body = self.licensing.status_body(self.refresh_backlog())
        body["models"] = self.models_status()
        return body

    def _page_sources(self) -> PageSources:
        """What the status page shows (``/``): /status without a key check of its own (an
        open page must not call the billing endpoint every refresh; the licensing thread
        checks on its schedule), the pipeline's recent activity, links and ledger caps."""
        metering = self.settings.metering
        return PageSources(
            status=self._status_body,
            activity=self.pipeline.activity.models,
            recent_errors=self.pipeline.activity.recent_errors,
            transports=self._links,
            ledger_cap=lambda: {"maxPendingRecords": metering.max_pending_records,
                                "maxLedgerBytes": int(metering.max_ledger_mb * 1024 * 1024),
                                "fillRatio": round(self.ledger.fill_ratio(), 4)},
            trusted_ms=self.licensing.clock.now_ms,
            window_seconds=WINDOW_SECONDS,
        )

    def _links(self) -> list[dict[str, Any]]:
        """The transports' state for people: the main one, the HTTP and gRPC APIs."""
        s = self.settings
        connected = self.transport.connected
        if s.transport == "edgehub":
            main = {"name": "edgeHub", "detail": "module input and output routes"}
        else:
            topics = ", ".join(s.mqtt.input_topic)
            main = {"name": "MQTT broker",
                    "detail": f"{s.mqtt.host}:{s.mqtt.port}, inputs on {topics}"}
        links = [{**main, "ok": connected,
                  "state": "connected" if connected else "disconnected, reconnecting"}]
        tls = "TLS" if s.http.tls.cert_file is not None else "plain HTTP"
        key = "API key required" if s.http.api_key is not None else "no API key"
        links.append({"name": "HTTP API", "ok": True, "state": "listening",
                      "detail": f"port {self.http.port}, {tls}, {key}"})
        if self.grpc is not None:
            links.append({"name": "gRPC API", "ok": True, "state": "listening",
                          "detail": f"port {self.grpc.port}, {tls}, {key}"})
        return links

    def _render_metrics(self) -> bytes:
        ready, _ = self.readiness()
        self.metrics.ready.set(1 if ready else 0)
        self.refresh_backlog()
        return self.metrics.render()

    def _upload_within(self) -> float:
        """Usage is uploaded within MaxDelaySeconds, and well inside the licence's limit on
        the age of unbilled usage (a quarter of the lease length)."""
        delay = self.settings.metering.max_delay_seconds
        lease = self.licensing.lease_seconds()
        return delay if lease is None else max(0.05, min(delay, lease / 4))

    def refresh_backlog(self) -> dict[str, Any]:
        """Backlog figures from the ledger, also set on the metrics gauges."""
        stats = self.ledger.stats(max_age=1.0).as_dict()
        m = self.metrics
        m.ledger_pending.set(stats["pending"])
        m.ledger_oldest_age.set(stats["oldestPendingAgeSeconds"] or 0)
        m.ledger_quarantined.set(stats["quarantined"])
        m.ledger_bytes.set(stats["ledgerBytes"])
        m.ledger_fill.set(self.ledger.fill_ratio())
        decision = self.licensing.decide()
        for state in ("online", "grace", "gated"):
            m.licence_state.labels(state=state).set(1 if decision.state.value == state else 0)
        m.licence_status.clear()
        m.licence_status.labels(status=decision.status).set(1)
        m.grace_remaining.set(decision.remaining_seconds or 0)
        return stats

    def start(self) -> None:
        self.http.start(self.supervisor.spawn)
        if self.grpc is not None:
            self.grpc.start()
        answer = self.licensing.check()  # before serving, as Azure AI containers do
        decision = self.licensing.decide()
        log.info("licence_checked", status=decision.status, state=decision.state.value,
                 serving=decision.serve, http=answer.http_status if answer else None,
                 mode="disconnected" if self.licensing.disconnected else "connected")
        spawn = self.supervisor.spawn
        self.licensing.start(spawn)
        if self.drainer is not None:
            self.drainer.start(spawn)
        if self.usage_log is not None:
            spawn("usage-log", self._export_loop)
        self.pipeline.start(spawn)
        repository = self.repository
        poll = self.settings.model.repository_poll_seconds
        if repository is not None and poll > 0:
            spawn("model-repository", lambda: repository.poll_loop(self._poll_stop, poll))
        self.transport.start(self.pipeline.submit)
        if self.reporter is not None:
            self.reporter.start(spawn)
        log.info("module_started", version=__version__, container_type=CONTAINER_TYPE,
                 container_id=self.container_id, transport=self.settings.transport,
                 http_port=self.http.port,
                 grpc_port=self.grpc.port if self.grpc is not None else None)

    def _export_loop(self) -> None:
        assert self.usage_log is not None
        while not self.stopping.wait(self.settings.metering.usage_log_seconds):
            try:
                self.usage_log.export()
            except Exception as exc:  # a full disk, a ledger error: try again next round
                log.error("usage_log_export_failed", error=f"{type(exc).__name__}: {exc}",
                          fix="check that Mounts:Output is writable and has space")

    def request_stop(self, signum: int | None = None, _: FrameType | None = None) -> None:
        # Runs inside a signal handler: only set flags. Logging here could deadlock on the
        # logger's lock if the signal interrupted a log call on this thread.
        self.stop_signal = signum
        self.stopping.set()

    def shutdown(self) -> None:
        budget = self.settings.pipeline.shutdown_seconds
        self.supervisor.stop()  # workers now end for good
        self._poll_stop.set()
        self.transport.stop_intake()
        drained = self.pipeline.drain(budget * 0.6)
        if not drained:
            log.warning("shutdown_work_left", effect="inputs not answered stay unacknowledged "
                        "and are redelivered by the broker")
        self.pipeline.stop()
        if self.reporter is not None:
            self.reporter.stop()
        self.transport.close(budget * 0.4)
        if self.drainer is not None:
            self.drainer.stop()
        if self.usage_log is not None:
            self.usage_log.export()
        self.licensing.stop()
        if self.billing is not None:
            self.billing.close()
        self.ledger.close()
        if self.grpc is not None:
            self.grpc.stop()
        self.http.stop()
        log.info("module_stopped")

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        self.start()
        while not self.stopping.wait(0.5):
            pass
        name = signal.Signals(self.stop_signal).name if self.stop_signal else None
        log.info("stop_requested", signal=name)
        self.shutdown()
        return 0


class ServedModel(SingleModel):
    """The one model the pipeline serves now: a live reload (twin, ``ReloadModel``) swaps it,
    and the OIP v2 APIs see the swap at once."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    @property
    def model(self) -> Model:
        return self._pipeline.model

    @model.setter
    def model(self, value: Model) -> None:
        raise AttributeError("the served model changes through Pipeline.reconfigure")


def build_licensing(settings: Settings, identity: Identity, data_path: Path,
                    ledger: Ledger, keys: TrustedKeys) -> Licensing:
    """The licence gate for the settings: connected (leases) or disconnected (file)."""
    clock = TrustedClock(data_path / "trusted-clock.json", (ledger.newest_request_ms(),))
    source = None
    if settings.disconnected:
        if not keys:
            raise ConfigError(DEV_SWITCH, "this development build trusts no key, so the "
                              "licence file cannot be verified; fix: set "
                              f"{DEV_SWITCH}=<the vendor's or simulator's public key file>")
        assert settings.mounts.license is not None
        lic = load_license(settings.mounts.license, keys, identity, clock.now_ms())
        clock.raise_floor(lic.issued_at)
        base = ledger.quantity_since(lic.issued_at)
        source = LicenseFileSource(lic, lambda: base + ledger.quantity_added)
    client = None
    if settings.billing.url is not None:
        client = BillingClient.from_settings(
            settings, timeout=settings.licensing.status_timeout_seconds)
    licensing = Licensing(identity, settings.licensing, clock,
                          LeaseStore(data_path / "lease.json"), keys, client, source)
    if clock.rollback_detected_ms > 60_000:
        log.warning("clock_behind_trusted_time", behind_s=clock.rollback_detected_ms / 1000,
                    effect="trusted time continues from the high-water mark; a clock set "
                    "back does not extend any grace")
    return licensing
