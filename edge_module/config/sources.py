"""Where settings come from, and how a refused value becomes one line with the fix.

Three sources, highest precedence first: the command line (``Mqtt:Port=1883``),
the environment (``Mqtt__Port=1883``), a JSON or TOML file (nested objects).
Names are case-insensitive and resolve to the declarations in
``config/settings.py``. ``load_settings`` raises ``ConfigError`` naming the key
and the fix; ``translate`` is also used for live (twin) updates. Any thread.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from edge_module.config.settings import ALIASES, FIXES, SECRET_KEYS, SettingError, Settings
from edge_module.exceptions import ConfigError

DOCS_URL = "docs/configuration.md"


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


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
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
            set_path(tree, resolve_key(raw), value)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise translate(exc) from None


def translate(exc: ValidationError) -> ConfigError:
    """Turn pydantic's report into one line naming the key and the fix."""
    error = exc.errors()[0]
    loc = [str(p) for p in error["loc"] if not isinstance(p, int)]
    key = ":".join(loc) if loc else "settings"
    key = ALIASES.get(key, key)
    if error["type"] == "missing":
        return ConfigError(key, f"is required; fix: {FIXES.get(key, f'set {key}')}")
    refused = error.get("ctx", {}).get("error")
    if isinstance(refused, SettingError):
        if refused.key:
            key = f"{key}:{refused.key}" if loc else refused.key
        fix = refused.fix or FIXES.get(key, f"see {key} in {DOCS_URL}")
        return ConfigError(key, f"{refused.problem}; fix: {fix}")
    message = str(error["msg"]).removeprefix("Value error, ")
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
