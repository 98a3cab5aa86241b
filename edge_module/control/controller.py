"""The module twin and direct methods: what an operator changes or asks while it runs.

Owns the live settings (``LiveSettings``), applies desired properties
(``apply_desired``: a new model is loaded beside the old one and swapped in
between batches; the rest applies at once), answers the direct methods
``GetStatus``, ``DrainNow`` and ``ReloadModel``, and samples the state the twin
reports. The app builds it and hands it to the edgeHub transport.

Threads: the SDK's handler threads call ``apply_desired`` and ``methods.call``;
one lock keeps two reconfigurations from interleaving. The reporter thread
calls ``reported_state``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from edge_module import __version__, logs
from edge_module.config import Settings
from edge_module.control.live import LiveSettings, shown, value_at
from edge_module.control.methods import BadPayload, Methods, options
from edge_module.control.reported import Reporter
from edge_module.exceptions import EdgeModuleError
from edge_module.inference.catalog import VersionInfo
from edge_module.inference.models import load_model
from edge_module.inference.repository import ModelRepository, split_default
from edge_module.licensing.service import Licensing
from edge_module.logs import get_logger
from edge_module.metering.drain import Drainer
from edge_module.metering.ledger import Ledger
from edge_module.metrics import Metrics
from edge_module.pipeline import Pipeline

log = get_logger("control")

Status = Callable[[], tuple[int, Any]]


class Controller:
    def __init__(self, settings: Settings, pipeline: Pipeline, licensing: Licensing,
                 ledger: Ledger, drainer: Drainer | None, metrics: Metrics,
                 status: Status, repository: ModelRepository | None = None) -> None:
        self.live = LiveSettings(settings)
        self.pipeline = pipeline
        self.licensing = licensing
        self.ledger = ledger
        self.drainer = drainer
        self.metrics = metrics
        self.status = status
        self.repository = repository
        self._reported_models: dict[str, set[str]] = {}  # every model version reported
        self.reporter: Reporter | None = None
        # Called with the new EdgeHub:Inputs after a change (the edgeHub transport's set).
        self.on_inputs: Callable[[frozenset[str]], None] | None = None
        self._reconfiguring = threading.Lock()
        self.methods = Methods()
        self.methods.add("GetStatus", self._method_status)
        self.methods.add("DrainNow", self._method_drain)
        self.methods.add("ReloadModel", self._method_reload)
        self.methods.add("UnloadModel", self._method_unload)

    @property
    def settings(self) -> Settings:
        """The settings in force now (started-with values under the twin's changes)."""
        return self.live.current

    # -- desired properties ----------------------------------------------

    def apply_desired(self, desired: dict[str, Any], full: bool) -> None:
        """Apply desired properties: what is valid now, the rest rejected with its reason."""
        with self._reconfiguring:
            before = self.live.current
            verdict = self.live.update(desired, full)
            rejected = dict(verdict.rejected)
            new = verdict.settings
            model = None
            if self.repository is not None:
                new = self._repository_desired(self.repository, verdict.changed, before, new,
                                               rejected)
            elif "Model:Name" in verdict.changed or "Model:Path" in verdict.changed:
                try:
                    model = load_model(new.model, self.licensing.model_key)
                except (EdgeModuleError, OSError) as exc:
                    key = "Model:Path" if new.model.path is not None else "Model:Name"
                    rejected[key] = f"{exc}; the model in use stays"
                    new = new.model_copy(update={"model": new.model.model_copy(
                        update={"name": before.model.name, "path": before.model.path})})
            self.pipeline.reconfigure(model=model, top_k=new.model.top_k,
                                      score_threshold=new.model.score_threshold)
            if new.log.level != before.log.level:
                logs.configure(new.log.level, new.log.format)
            if self.drainer is not None:
                self.drainer.settings = new.metering
            if self.on_inputs is not None:
                self.on_inputs(frozenset(new.edge_hub.inputs))
            changed = [k for k in verdict.changed if value_at(new, k) != value_at(before, k)]
            self.live.current = new
            outcome = "rejected" if rejected and not changed else \
                "partly applied" if rejected else "applied"
            self.metrics.twin_updates.labels(outcome=outcome).inc()
            log.info("settings_updated", changed={k: shown(value_at(new, k)) for k in changed},
                     rejected=rejected or None, desired_version=verdict.version)
            if rejected:
                log.warning("desired_properties_rejected", rejected=rejected)
            if self.reporter is not None:
                self.reporter.push({"config": {
                    "desiredVersion": verdict.version,
                    "status": outcome,
                    "rejected": "; ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
                    or None,
                    "effective": self.live.effective(),
                }})

    @staticmethod
    def _repository_desired(repository: ModelRepository, changed: list[str], before: Settings,
                            new: Settings, rejected: dict[str, str]) -> Settings:
        """With Model:Repository the twin chooses the default model (``Model:Default``);
        ``Model:Name``/``Model:Path`` do not apply and are rejected."""
        keep: dict[str, Any] = {}
        for key, attr in (("Model:Name", "name"), ("Model:Path", "path")):
            if key in changed:
                rejected[key] = ("Model:Repository is set, so the repository's models serve; "
                                 "name one with Model:Default or in the input")
                keep[attr] = getattr(before.model, attr)
        if "Model:Default" in changed:
            wanted = new.model.default
            name, _ = split_default(wanted)
            known = {i.name for i in repository.versions()}
            if name is not None and name not in known:
                rejected["Model:Default"] = (f"no model {name!r} in the repository "
                                             f"(models: {', '.join(sorted(known)) or 'none'})")
                keep["default"] = before.model.default
            else:
                repository.set_default(wanted)
        if keep:
            new = new.model_copy(update={"model": new.model.model_copy(update=keep)})
        return new

    def reported_state(self) -> dict[str, Any]:
        """The state the twin reports (sampled every second, sent when it changes)."""
        decision = self.licensing.decide()
        stats = self.ledger.stats().as_dict()
        grace = decision.grace_dict()
        return {
            "apiStatus": decision.status,
            "serving": decision.serve,
            "grace": {"state": grace["state"], "expiresAt": grace["expiresAt"]},
            "backlog": {"pending": stats["pending"], "quarantined": stats["quarantined"]},
            **self._models(),
            "moduleVersion": __version__,
        }

    def _models(self) -> dict[str, Any]:
        """``model`` (the default one, when ready) and ``models`` (every version, state)."""
        catalog = self.pipeline.catalog
        default = catalog.resolve(None, None)
        found: dict[str, dict[str, Any]] = {}
        for i in catalog.versions():
            found.setdefault(i.name, {})[i.version] = {
                "state": i.state.value, "reason": i.reason, "sha256": i.sha256}
        # Reported properties merge: a version or model gone is sent as null to remove it.
        models: dict[str, dict[str, Any] | None] = dict(found)
        for name, versions in self._reported_models.items():
            if name not in found:
                models[name] = None
            else:
                found[name].update({v: None for v in versions - set(found[name])})
        for name, entry in found.items():
            self._reported_models.setdefault(name, set()).update(entry)
        return {
            "model": default.provenance.as_dict() if default is not None else None,
            # The twin takes objects, not lists: {name: {version: state}}.
            "models": models,
        }

    # -- direct methods ---------------------------------------------------

    def _method_status(self, payload: Any) -> tuple[int, Any]:
        options(payload, {})
        return self.status()

    def _method_drain(self, payload: Any) -> tuple[int, Any]:
        opts = options(payload, {"timeoutSeconds": (int, float)})
        timeout = float(opts.get("timeoutSeconds", 20))
        if not 0 < timeout <= 120:
            raise BadPayload("timeoutSeconds must be between 0 and 120 (the direct method "
                             "call itself times out)")
        if self.drainer is None:
            return 409, {"error": "no billing endpoint is configured (disconnected mode): "
                         "usage is exported to Mounts:Output instead"}
        outcome = self.drainer.drain_all(time.monotonic() + timeout)
        body = {"uploaded": outcome.delivered, "duplicates": outcome.duplicates,
                "quarantined": outcome.quarantined, "pending": self.ledger.pending,
                "apiStatus": str(outcome.answer.status) if outcome.answer else None}
        if outcome.ok:
            return 200, body
        answer = outcome.answer
        body["error"] = (answer.error if answer else None) or \
            f"billing endpoint answered {answer.http_status if answer else 'nothing'}"
        return 503, body

    def _method_reload(self, payload: Any) -> tuple[int, Any]:
        if self.repository is not None:
            return self._reload_from_repository(self.repository, payload)
        options(payload, {})
        with self._reconfiguring:
            try:
                model = load_model(self.settings.model, self.licensing.model_key)
            except (EdgeModuleError, OSError) as exc:
                return 500, {"error": f"{exc}; the model in use stays",
                             "model": self.pipeline.model.provenance.as_dict()}
            before = self.pipeline.model.provenance.as_dict()
            self.pipeline.reconfigure(model=model)
        log.info("model_reloaded", before=before, after=model.provenance.as_dict())
        return 200, {"model": model.provenance.as_dict(), "previous": before}

    def _reload_from_repository(self, repository: ModelRepository,
                                payload: Any) -> tuple[int, Any]:
        """ReloadModel with Model:Repository: ``{"model": name}`` loads that model's versions
        again from disk (beside those serving, then swapped in); ``"version"`` names the
        version whose state is answered; without a model, the whole folder is read."""
        opts = options(payload, {"model": str, "version": str})
        name = opts.get("model")
        if name is None:
            if "version" in opts:
                raise BadPayload("version needs a model")
            with self._reconfiguring:
                repository.scan()
            return 200, {"models": [_shown(i) for i in repository.versions()]}
        try:
            with self._reconfiguring:
                infos = repository.load(name)
        except KeyError:
            return 404, {"error": f"no model {name!r} in the repository "
                         f"({repository.root}): add <model>/<version>/model.onnx there"}
        version = opts.get("version")
        if version is not None:
            infos = [i for i in infos if i.version == version]
            if not infos:
                return 404, {"error": f"model {name!r} has no version {version!r} its version "
                             "policy serves"}
        failed = [i for i in infos if i.state.value == "failed"]
        log.info("model_reloaded", model=name, version=version,
                 states={i.version: i.state.value for i in infos})
        return (500 if failed and len(failed) == len(infos) else 200), \
            {"models": [_shown(i) for i in infos]}

    def _method_unload(self, payload: Any) -> tuple[int, Any]:
        """UnloadModel ``{"model": name}`` (Model:Repository): stop serving it until
        ReloadModel names it; batches in flight finish."""
        opts = options(payload, {"model": str})
        if self.repository is None:
            return 409, {"error": "UnloadModel needs Model:Repository; this module serves "
                         "one model"}
        if "model" not in opts:
            raise BadPayload("UnloadModel takes {\"model\": <name>}")
        try:
            with self._reconfiguring:
                infos = self.repository.unload(opts["model"])
        except KeyError:
            return 404, {"error": f"no model {opts['model']!r} in the repository"}
        return 200, {"models": [_shown(i) for i in infos]}


def _shown(info: VersionInfo) -> dict[str, Any]:
    return {"name": info.name, "version": info.version, "state": info.state.value,
            "reason": info.reason, "sha256": info.sha256}
