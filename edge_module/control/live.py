"""Live settings: which settings a module twin may change while running, and checking them.

Desired properties use the settings' own names, nested as in a config file
(``{"Model": {"TopK": 5}}``; case-insensitive), over the settings the module
was started with. A null removes a desired property, which brings back the
started-with value. Each property is checked on its own: a bad one is
rejected with the reason (and its old value stays) without holding up the
good ones next to it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from edge_module.config import Settings, resolve_key, set_path, translate
from edge_module.exceptions import ConfigError

# What a twin may change without a restart, and how the module applies it.
LIVE_KEYS = (
    "Model:Name",  # loads the other model, then swaps it in between batches
    "Model:Path",
    "Model:Default",  # with Model:Repository: the model answering inputs naming none
    "Model:TopK",
    "Model:ScoreThreshold",
    "Log:Level",
    "Metering:BatchSize",
    "EdgeHub:Inputs",
)


@dataclass
class Verdict:
    """The outcome of a desired-property update."""

    settings: Settings  # what should run now
    changed: list[str]  # live keys whose value differs from what runs
    rejected: dict[str, str] = field(default_factory=dict)  # key -> reason
    version: int | None = None  # the desired properties' $version


def value_at(settings: BaseModel, key: str) -> Any:
    """The value of ``Section:Key`` in ``settings``."""
    node: Any = settings
    for part in key.split(":"):
        name = next(n for n, f in type(node).model_fields.items() if (f.alias or n) == part)
        node = getattr(node, name)
    return node


def shown(value: Any) -> Any:
    """A value as reported in twin properties (strings and numbers only)."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if key.startswith("$"):
            continue  # $version, $metadata
        if isinstance(value, Mapping):
            out.extend(_flatten(value, f"{prefix}{key}:"))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _merge(target: dict[str, Any], patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = json.loads(json.dumps(value))


class LiveSettings:
    def __init__(self, base: Settings) -> None:
        self.base = base
        self.current = base
        self.desired: dict[str, Any] = {}

    def update(self, desired: Mapping[str, Any], full: bool) -> Verdict:
        """Fold in the whole desired document (``full``) or a patch, and check it."""
        version = desired.get("$version")
        if full:
            self.desired = {}
        _merge(self.desired, desired)
        rejected: dict[str, str] = {}
        wanted: dict[str, Any] = {}
        for raw, value in _flatten(self.desired):
            try:
                key = ":".join(resolve_key(raw))
            except ConfigError as exc:
                rejected[raw] = exc.message
                continue
            if key not in LIVE_KEYS:
                rejected[key] = ("cannot change while the module runs; fix: set it in the "
                                 "deployment's createOptions Env (or Cmd) and restart the "
                                 "module")
                continue
            wanted[key] = value
        tree = self.base.model_dump(by_alias=True)
        accepted: dict[str, Any] = {}
        for key in sorted(wanted):
            trial: dict[str, Any] = {}
            for k, v in {**accepted, key: wanted[key]}.items():
                set_path(trial, k.split(":"), v)
            try:
                Settings.model_validate(_overlay(tree, trial))
            except ValidationError as exc:
                rejected[key] = translate(exc).message
                continue
            accepted[key] = wanted[key]
        overlay: dict[str, Any] = {}
        for key, value in accepted.items():
            set_path(overlay, key.split(":"), value)
        settings = Settings.model_validate(_overlay(tree, overlay))
        changed = [k for k in LIVE_KEYS if value_at(settings, k) != value_at(self.current, k)]
        return Verdict(settings, changed, rejected,
                       version if isinstance(version, int) else None)

    def effective(self) -> dict[str, Any]:
        """The live settings in force, nested as desired properties are."""
        out: dict[str, Any] = {}
        for key in LIVE_KEYS:
            set_path(out, key.split(":"), shown(value_at(self.current, key)))
        return out


def _overlay(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value)
        else:
            out[key] = value
    return out
