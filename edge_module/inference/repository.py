"""The model repository (``Model:Repository``): several models and versions served at once.

Layout (docs/models.md, "Model repository"), after Triton's::

    <repository>/<model>/config.json            optional: version policy, threads
    <repository>/<model>/<version>/model.onnx   (or model.onnx.enc)
    <repository>/<model>/<version>/model.json   the descriptor of this version

A version is a directory named by a positive integer. Each model version gets its
own onnxruntime session with its model's thread settings. The version policy picks
the versions served: ``{"latest": {"numVersions": N}}`` (the default, N = 1),
``{"specific": {"versions": [..]}}`` or ``{"all": {}}``.

Loading never disturbs what serves: a new or changed version is loaded and warmed
beside the versions serving, then swapped in under the lock; the versions the
policy no longer wants are dropped from the table, and batches already holding
them finish on them (the pipeline keeps its own reference). A version that fails
to load is ``failed`` with the reason and the others keep serving; when no wanted
version of a model is ready, the ready ones it had keep serving.

Memory: each load's RSS growth is measured (``/proc/self/statm`` before and after)
and kept as the version's estimate; with ``Model:MemoryBudgetMb`` a load whose file
alone, or whose measured growth, would take the sum past the budget is refused.

Threads: ``scan`` runs on the poll thread (``poll_loop``, every
``Model:RepositoryPollSeconds``) or on the caller's (``load``/``unload`` from the
control thread or the HTTP API); loads are serialised by one lock, the table by
another, so ``resolve`` (inference path) never waits for a load.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_module.exceptions import EdgeModuleError
from edge_module.inference.catalog import CatalogEvents, ModelState, VersionInfo
from edge_module.inference.models import Model, Provenance
from edge_module.logs import get_logger

log = get_logger("repository")

CONFIG_FILE = "config.json"
MODEL_FILES = ("model.onnx", "model.onnx.enc")
VERSION_DIR = re.compile(r"^[1-9][0-9]{0,8}$")
# Model names: letters, digits, "_" and "-" (no ".": a twin property name cannot hold one).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True)
class ModelConfig:
    """``<model>/config.json``: which versions serve and with how many threads."""

    policy: str = "latest"  # latest | specific | all
    latest: int = 1
    specific: tuple[int, ...] = ()
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None

    def wanted(self, on_disk: list[int]) -> list[int]:
        """The versions this policy serves out of those on disk, newest first."""
        newest_first = sorted(on_disk, reverse=True)
        if self.policy == "all":
            return newest_first
        if self.policy == "specific":
            return [v for v in newest_first if v in self.specific]
        return newest_first[:self.latest]


def read_config(path: Path) -> ModelConfig:
    """Parse a model's config.json; raise ValueError naming what is wrong."""
    if not path.is_file():
        return ModelConfig()
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ValueError(f"{path} must hold a JSON object")
    unknown = sorted(set(body) - {"versionPolicy", "intraOpThreads", "interOpThreads"})
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; allowed: "
                         "versionPolicy, intraOpThreads, interOpThreads")
    threads: dict[str, int | None] = {}
    for key in ("intraOpThreads", "interOpThreads"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 0 <= value <= 64):
            raise ValueError(f"{path}: {key} must be an integer from 0 to 64")
        threads[key] = value
    policy = body.get("versionPolicy", {"latest": {"numVersions": 1}})
    if not isinstance(policy, dict) or len(policy) != 1:
        raise ValueError(f"{path}: versionPolicy must be one of {{\"latest\": {{\"numVersions\""
                         ": N}}}}, {{\"specific\": {{\"versions\": [..]}}}} or {{\"all\": {{}}}}")
    kind, options = next(iter(policy.items()))
    if not isinstance(options, dict):
        raise ValueError(f"{path}: versionPolicy.{kind} must be an object")
    config = ModelConfig(intra_op_threads=threads["intraOpThreads"],
                         inter_op_threads=threads["interOpThreads"])
    if kind == "latest":
        n = options.get("numVersions", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
            raise ValueError(f"{path}: versionPolicy.latest.numVersions must be 1 to 64")
        return replace(config, policy="latest", latest=n)
    if kind == "specific":
        versions = options.get("versions")
        if not isinstance(versions, list) or not versions or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in versions):
            raise ValueError(f"{path}: versionPolicy.specific.versions must be a non-empty "
                             "list of positive integers")
        return replace(config, policy="specific", specific=tuple(versions))
    if kind == "all":
        return replace(config, policy="all")
    raise ValueError(f"{path}: unknown versionPolicy {kind!r}; use latest, specific or all")


@dataclass
class _Version:
    info: VersionInfo
    model: Model | None = None
    signature: tuple[int, ...] = ()  # (mtime_ns, size) of the model file and descriptor
    rss: int = 0  # bytes the load added to the process's RSS


@dataclass
class _Entry:
    versions: dict[int, _Version] = field(default_factory=dict)
    unloaded: bool = False  # by ``unload``: the poll leaves it alone until ``load``
    error: str | None = None  # the model's config.json is wrong


LoadModel = Callable[[Path, int, int], Model]


class ModelRepository:
    """A ``Catalog`` over a folder of models and versions (see the module docstring)."""

    def __init__(self, root: Path, load: LoadModel, default: str | None = None,
                 intra_op_threads: int = 1, inter_op_threads: int = 1,
                 memory_budget_mb: int | None = None) -> None:
        self.root = root
        self._load_model = load
        self._default_name, self._default_version = split_default(default)
        self._threads = (intra_op_threads, inter_op_threads)
        self._budget = memory_budget_mb * 1024 * 1024 if memory_budget_mb else None
        self._table: dict[str, _Entry] = {}
        self._lock = threading.Lock()  # the table
        self._loading = threading.Lock()  # one load at a time
        self.events = CatalogEvents()
        self._ignored: list[str] = []  # folders whose names are not model names (logged)

    # -- Catalog ----------------------------------------------------------

    def resolve(self, name: str | None, version: str | None) -> Model | None:
        if name is None:
            name = self.default_name
            if version is None and name == self._default_name:
                version = self._default_version  # Model:Default=<model>:<version>
        if name is None:
            return None
        with self._lock:
            entry = self._table.get(name)
            if entry is None or entry.unloaded:
                return None
            ready = {v: item for v, item in entry.versions.items()
                     if item.model is not None and item.info.state is ModelState.READY}
        if version is None:
            return ready[max(ready)].model if ready else None
        if not VERSION_DIR.match(version):
            return None
        item = ready.get(int(version))
        return item.model if item is not None else None

    def versions(self) -> list[VersionInfo]:
        with self._lock:
            return [item.info for name in sorted(self._table)
                    for _, item in sorted(self._table[name].versions.items())]

    @property
    def default(self) -> Model:
        model = self.resolve(None, None)
        if model is None:
            raise LookupError(f"no ready version of the default model {self.default_name!r}")
        return model

    @property
    def default_name(self) -> str | None:
        """``Model:Default``, else the only model in the repository."""
        if self._default_name is not None:
            return self._default_name
        with self._lock:
            names = list(self._table)
        return names[0] if len(names) == 1 else None

    def set_default(self, default: str | None) -> None:
        """Answer inputs naming no model with ``default`` (``model`` or ``model:version``;
        None: the only model)."""
        self._default_name, self._default_version = split_default(default)
        self._changed()

    # -- the repository API (OIP v2 repository extension) ------------------

    def index(self) -> list[VersionInfo]:
        """Every model version known, with its state (``/v2/repository/index``)."""
        return self.versions()

    def load(self, name: str) -> list[VersionInfo]:
        """Load (or reload) one model's wanted versions now; its versions afterwards.
        Raise KeyError when the repository has no such model folder."""
        if not NAME.match(name) or not (self.root / name).is_dir():
            raise KeyError(name)
        with self._lock:
            self._table.setdefault(name, _Entry()).unloaded = False
        self._scan_model(name, force=True)
        return [info for info in self.versions() if info.name == name]

    def unload(self, name: str) -> list[VersionInfo]:
        """Stop serving a model (inputs naming it get UnknownModel) until ``load``; batches
        in flight finish. Raise KeyError for a model the repository does not know."""
        with self._loading, self._lock:
            entry = self._table.get(name)
            if entry is None:
                raise KeyError(name)
            entry.unloaded = True
            for item in entry.versions.values():
                item.model = None
                item.rss = 0
                item.info = replace(item.info, state=ModelState.UNLOADED,
                                    reason="unloaded on request")
            infos = [item.info for item in entry.versions.values()]
        log.info("model_unloaded", model=name, effect="inputs naming it get UnknownModel",
                 fix="load it again (ReloadModel with its name, or the repository API)")
        self._changed()
        return infos

    # -- scanning ---------------------------------------------------------

    def scan(self) -> None:
        """Bring the table in step with the folder: load what is new or changed, drop
        what the policy no longer wants or what was removed."""
        try:
            folders = [p.name for p in self.root.iterdir() if p.is_dir()]
        except OSError as exc:
            log.error("repository_unreadable", path=str(self.root), error=str(exc),
                      effect="the models loaded keep serving",
                      fix="check that Model:Repository exists and is readable")
            return
        names = sorted(n for n in folders if NAME.match(n))
        odd = sorted(n for n in folders if not NAME.match(n) and not n.startswith("."))
        if odd and odd != self._ignored:
            log.warning("repository_folders_ignored", folders=odd,
                        fix="name model folders with letters, digits, _ and - only")
        self._ignored = odd
        with self._lock:
            gone = [n for n in self._table if n not in names]
            for n in gone:
                del self._table[n]
        if gone:
            log.info("models_removed", models=gone, effect="inputs naming them get "
                     "UnknownModel; batches in flight finish")
            self._changed()
        for name in names:
            self._scan_model(name)

    def poll_loop(self, stopping: threading.Event, seconds: float) -> None:
        """The poll thread: ``scan`` every ``seconds`` until ``stopping`` is set."""
        while not stopping.wait(seconds):
            self.scan()

    def _scan_model(self, name: str, force: bool = False) -> None:
        folder = self.root / name
        with self._lock:
            entry = self._table.setdefault(name, _Entry())
            if entry.unloaded:
                return
        try:
            config = read_config(folder / CONFIG_FILE)
        except ValueError as exc:
            if entry.error != str(exc):
                log.error("model_config_invalid", model=name, error=str(exc),
                          effect="the versions loaded keep serving; nothing new is loaded",
                          fix="correct the model's config.json (docs/models.md)")
                entry.error = str(exc)
            return
        entry.error = None
        on_disk: dict[int, Path] = {}
        for sub in _subdirs(folder):
            if VERSION_DIR.match(sub.name):
                on_disk[int(sub.name)] = sub
        wanted = config.wanted(list(on_disk))
        for version in sorted(wanted):
            self._consider(name, version, on_disk[version], config, force)
        self._retire(name, set(wanted))

    def _consider(self, name: str, version: int, folder: Path, config: ModelConfig,
                  force: bool) -> None:
        path = next((folder / f for f in MODEL_FILES if (folder / f).is_file()), None)
        signature = _signature(path) if path is not None else ()
        with self._lock:
            current = self._table[name].versions.get(version)
        if current is not None and current.signature == signature and not force:
            return  # unchanged (loaded, or failed for a reason the files still have)
        if path is None:
            self._set(name, version, _Version(VersionInfo(
                name, str(version), ModelState.FAILED,
                f"no model.onnx (or model.onnx.enc) in {folder}")))
            return
        self._load(name, version, path, signature, config)

    def _load(self, name: str, version: int, path: Path, signature: tuple[int, ...],
              config: ModelConfig) -> None:
        with self._loading:
            with self._lock:
                entry = self._table.get(name)
                if entry is None or entry.unloaded:
                    return
                serving = entry.versions.get(version)
                used = sum(item.rss for e in self._table.values()
                           for item in e.versions.values() if item.model is not None)
            if serving is None or serving.model is None:  # a replaced version keeps serving
                self._set(name, version, _Version(
                    VersionInfo(name, str(version), ModelState.LOADING), signature=signature))
            if self._budget is not None:
                size = path.stat().st_size
                if used + size > self._budget:
                    self._fail(name, version, signature, serving,
                               f"the file alone ({size / 2**20:.1f} MB) would take the models' "
                               f"memory to {(used + size) / 2**20:.1f} MB, past "
                               f"Model:MemoryBudgetMb ({self._budget / 2**20:.0f} MB)")
                    return
            intra = config.intra_op_threads if config.intra_op_threads is not None \
                else self._threads[0]
            inter = config.inter_op_threads if config.inter_op_threads is not None \
                else self._threads[1]
            before = rss_bytes()
            try:
                model = self._load_model(path, intra, inter)
            except (EdgeModuleError, OSError, ValueError) as exc:
                self._fail(name, version, signature, serving, str(exc))
                return
            grown = max(0, rss_bytes() - before)
            if self._budget is not None and used + grown > self._budget:
                del model
                self._fail(name, version, signature, serving,
                           f"loading it added {grown / 2**20:.1f} MB, taking the models' "
                           f"memory to {(used + grown) / 2**20:.1f} MB, past "
                           f"Model:MemoryBudgetMb ({self._budget / 2**20:.0f} MB)")
                return
            model.provenance = Provenance(name, str(version), model.provenance.sha256)
            self._set(name, version, _Version(
                VersionInfo(name, str(version), ModelState.READY,
                            sha256=model.provenance.sha256),
                model=model, signature=signature, rss=grown))
        log.info("model_version_ready", model=name, version=version, path=str(path),
                 rss_mb=round(grown / 2**20, 1), sha256=model.provenance.sha256)

    def _fail(self, name: str, version: int, signature: tuple[int, ...],
              serving: _Version | None, reason: str) -> None:
        log.error("model_version_failed", model=name, version=version, reason=reason,
                  effect="the versions serving keep serving" if serving and serving.model
                  else "inputs naming this version get UnknownModel",
                  fix="correct the files in the repository (docs/models.md); they are "
                  "loaded again when they change")
        if serving is not None and serving.model is not None:
            # a changed file that does not load: the version loaded before keeps serving
            kept = replace(serving, signature=signature, info=replace(
                serving.info, reason=f"kept serving the earlier files; the new ones fail: "
                f"{reason}"))
            self._set(name, version, kept)
            return
        self._set(name, version, _Version(
            VersionInfo(name, str(version), ModelState.FAILED, reason), signature=signature))

    def _retire(self, name: str, wanted: set[int]) -> None:
        """Drop the versions the policy no longer wants, once a wanted one is ready."""
        with self._lock:
            entry = self._table.get(name)
            if entry is None:
                return
            ready_wanted = any(v in wanted and item.model is not None
                               for v, item in entry.versions.items())
            dropped = []
            for v in list(entry.versions):
                if v in wanted:
                    continue
                if entry.versions[v].model is not None and not ready_wanted:
                    continue  # nothing newer serves yet: keep this one serving
                del entry.versions[v]
                dropped.append(v)
        if dropped:
            log.info("model_versions_retired", model=name, versions=dropped,
                     effect="batches in flight finish on them")
            self._changed()

    def _set(self, name: str, version: int, item: _Version) -> None:
        with self._lock:
            entry = self._table.get(name)
            if entry is None:
                return
            entry.versions[version] = item
        self._changed()

    def _changed(self) -> None:
        for callback in self.events.changed:
            try:
                callback()
            except Exception as exc:  # a metrics or twin bug must not stop a load
                log.error("catalog_callback_failed", error=f"{type(exc).__name__}: {exc}",
                          fix="report it")

    def memory(self) -> dict[tuple[str, str], int]:
        """The RSS estimate (bytes) of each loaded version."""
        with self._lock:
            return {(n, str(v)): item.rss for n, e in self._table.items()
                    for v, item in e.versions.items() if item.model is not None}

    def status(self) -> list[dict[str, Any]]:
        """The ``models`` list of /status and the twin."""
        rss = self.memory()
        return [{"name": i.name, "version": i.version, "state": i.state.value,
                 "reason": i.reason, "sha256": i.sha256,
                 "rssMb": round(rss.get((i.name, i.version), 0) / 2**20, 1)}
                for i in self.versions()]


def split_default(default: str | None) -> tuple[str | None, str | None]:
    """``Model:Default`` as (model, version): ``digits`` or ``digits:2``."""
    if default is None:
        return None, None
    name, _, version = default.partition(":")
    return name, version or None


def _subdirs(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.is_dir()]
    except OSError:
        return []


def _signature(path: Path) -> tuple[int, ...]:
    parts: list[int] = []
    for p in (path, path.parent / "model.json"):
        try:
            st = p.stat()
            parts += [st.st_mtime_ns, st.st_size]
        except OSError:
            parts += [0, 0]
    return tuple(parts)
