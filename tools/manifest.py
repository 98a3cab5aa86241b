"""Deployment manifests: render the templates under deployment/ and check them.

``python -m tools.manifest`` (``make manifest``) writes the ready-to-apply
``manifest.json`` from ``deployment/deployment.template.json`` and the fleet
(layered) deployments into ``deployment/generated/``, the way iotedgedev does:

* ``${NAME}`` and ``$NAME`` take their value from the environment, else
  ``deployment/.env`` (not in git, for real keys), else ``deployment/manifest.env``;
* ``${MODULES.edge-module}`` becomes ``<repository>:<version>-amd64`` from
  ``deployment/module.json``;
* ``createOptions`` objects become JSON strings cut into ``createOptions``,
  ``createOptions01``, ... of at most 512 characters (IoT Hub's limit per value);
* empty environment values and registry credentials without a user are left out.

``check`` adds what the JSON schemas cannot say: schema versions, leftover
placeholders, createOptions chunks, and routes naming outputs and inputs that
the module really has.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = ROOT / "deployment"
TEMPLATE = DEPLOYMENT / "deployment.template.json"
LAYERED = DEPLOYMENT / "layered"
GENERATED = DEPLOYMENT / "generated"
MANIFEST = ROOT / "manifest.json"
MODULE = "edge-module"
CHUNK = 512
MAX_CHUNKS = 8  # createOptions plus createOptions01..07
PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_.\-]+)\}|\$([A-Z][A-Z0-9_]*)\b")
LEFTOVER = re.compile(r"\$\{[^}]*\}|%[A-Za-z0-9_]+%")
FROM_OUTPUT = re.compile(r"FROM\s+/messages/modules/([^/\s]+)/outputs/([^\s]+)")
INTO_INPUT = re.compile(r'BrokeredEndpoint\(\s*"/modules/([^/]+)/inputs/([^"]+)"\s*\)')
KEEP = {"upstream"}  # $upstream in routes is IoT Edge syntax, not a placeholder


class ManifestError(Exception):
    """A template cannot be rendered (a value is missing)."""


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip('"')
    return values


def variables(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Values for placeholders: environment > deployment/.env > deployment/manifest.env."""
    environ = os.environ if environ is None else environ
    values = read_env_file(DEPLOYMENT / "manifest.env")
    values.update(read_env_file(DEPLOYMENT / ".env"))
    values.update({k: v for k, v in environ.items() if k in values})
    module = json.loads((DEPLOYMENT / "module.json").read_text())["image"]
    repository = _substitute(module["repository"], values)
    for platform in module["tag"]["platforms"]:
        image = f"{repository}:{module['tag']['version']}-{platform}"
        values[f"MODULES.{MODULE}.{platform}"] = image
        if platform == "amd64":
            values[f"MODULES.{MODULE}"] = image
    return values


def _substitute(text: str, values: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in KEEP:
            return match.group(0)
        if name not in values:
            raise ManifestError(f"no value for {match.group(0)}; fix: add {name}=... to "
                                "deployment/manifest.env or set it in the environment")
        return values[name]

    return PLACEHOLDER.sub(replace, text)


def _resolve(node: Any, values: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return _substitute(node, values)
    if isinstance(node, list):
        return [_resolve(item, values) for item in node]
    if isinstance(node, dict):
        return {_substitute(k, values): _resolve(v, values) for k, v in node.items()}
    return node


def chunk_create_options(settings: dict[str, Any]) -> None:
    """Replace a ``createOptions`` object with strings of at most 512 characters."""
    options = settings.get("createOptions")
    if not isinstance(options, dict):
        return
    text = json.dumps(options, separators=(",", ":"))
    parts = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)] or ["{}"]
    if len(parts) > MAX_CHUNKS:
        raise ManifestError(f"createOptions is {len(text)} characters; IoT Edge takes at most "
                            f"{CHUNK * MAX_CHUNKS}")
    del settings["createOptions"]
    for i, part in enumerate(parts):
        settings["createOptions" if i == 0 else f"createOptions{i:02d}"] = part


def _tidy_module(module: dict[str, Any]) -> None:
    env = module.get("env")
    if isinstance(env, dict):
        for name in [n for n, v in env.items() if isinstance(v, dict) and v.get("value") == ""]:
            del env[name]
    if isinstance(module.get("settings"), dict):
        chunk_create_options(module["settings"])


def _modules(agent_desired: dict[str, Any]) -> list[dict[str, Any]]:
    found = list(agent_desired.get("systemModules", {}).values())
    found += list(agent_desired.get("modules", {}).values())
    return [m for m in found if isinstance(m, dict)]


def render(template: dict[str, Any], values: Mapping[str, str]) -> dict[str, Any]:
    """A deployment manifest (or layered deployment) from its template."""
    out: dict[str, Any] = _resolve(copy.deepcopy(template), values)
    out.pop("$schema-template", None)
    content = out["content"]["modulesContent"] if "content" in out else out["modulesContent"]
    agent = content.get("$edgeAgent", {})
    desired = agent.get("properties.desired")
    if isinstance(desired, dict):
        credentials = desired.get("runtime", {}).get("settings", {}).get("registryCredentials")
        if isinstance(credentials, dict):
            for name in [n for n, c in credentials.items() if not c.get("username")]:
                del credentials[name]
            if not credentials:
                del desired["runtime"]["settings"]["registryCredentials"]
        for module in _modules(desired):
            _tidy_module(module)
    for key, value in agent.items():  # layered: properties.desired.modules.<name>
        if key.startswith("properties.desired.modules.") and isinstance(value, dict):
            _tidy_module(value)
    return out


def expand(content: dict[str, Any]) -> dict[str, Any]:
    """Layered deployment content with dotted paths turned into nested objects."""
    out: dict[str, Any] = {}
    for module, twin in content.items():
        node: dict[str, Any] = out.setdefault(module, {})
        for path, value in twin.items():
            parts = path.split(".")
            if path.startswith("properties.desired"):
                parts = ["properties.desired", *parts[2:]]
            target = node
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = value
    return out


def merge(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """A layered deployment applied over a base manifest, as IoT Hub merges them."""
    out = copy.deepcopy(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check(manifest: dict[str, Any], layered: bool = False) -> list[str]:
    """What the schema does not catch; an empty list when all is well."""
    problems: list[str] = []
    text = json.dumps(manifest)
    for leftover in sorted(set(LEFTOVER.findall(text))):
        problems.append(f"placeholder {leftover} was not filled in")
    content = manifest["content"]["modulesContent"] if layered else manifest["modulesContent"]
    if layered:
        if not str(manifest.get("targetCondition", "")).strip().startswith(("tags.", "*")):
            problems.append("targetCondition must select devices by tags (e.g. tags.site='x')")
        if not isinstance(manifest.get("priority"), int) or manifest["priority"] < 0:
            problems.append("priority must be a non-negative integer")
        content = expand(content)
    agent = content.get("$edgeAgent", {}).get("properties.desired", {})
    hub = content.get("$edgeHub", {}).get("properties.desired", {})
    if not layered and agent.get("schemaVersion") != "1.1":
        problems.append(f"$edgeAgent schemaVersion is {agent.get('schemaVersion')!r}, not '1.1'")
    if not layered and hub.get("schemaVersion") != "1.2":
        problems.append(f"$edgeHub schemaVersion is {hub.get('schemaVersion')!r}, not '1.2'")
    for name, module in {**agent.get("systemModules", {}), **agent.get("modules", {})}.items():
        settings = module.get("settings", {})
        for key, value in settings.items():
            if not key.lower().startswith("createoptions"):
                continue
            if not isinstance(value, str):
                problems.append(f"{name}: {key} must be a string (JSON text), not "
                                f"{type(value).__name__}")
            elif len(value) > CHUNK:
                problems.append(f"{name}: {key} is {len(value)} characters; at most {CHUNK}")
        chunks = [settings[k] for k in sorted(settings) if k.lower().startswith("createoptions")]
        if chunks and all(isinstance(c, str) for c in chunks):
            try:
                json.loads("".join(chunks))
            except ValueError:
                problems.append(f"{name}: createOptions chunks do not join into JSON")
    module = agent.get("modules", {}).get(MODULE)
    outputs, inputs = module_endpoints(module, content.get(MODULE, {}).get("properties.desired"))
    for name, route in hub.get("routes", {}).items():
        text = route["route"] if isinstance(route, dict) else route
        for source, output in FROM_OUTPUT.findall(text):
            if source == MODULE and output != "*" and output not in outputs:
                problems.append(f"route {name}: {MODULE} has no output {output!r} "
                                f"(it has {', '.join(sorted(outputs))})")
        for target, input_name in INTO_INPUT.findall(text):
            if target == MODULE and "*" not in inputs and input_name not in inputs:
                problems.append(f"route {name}: {MODULE} does not serve input {input_name!r} "
                                f"(EdgeHub:Inputs is {', '.join(sorted(inputs))})")
    return problems


def module_endpoints(module: dict[str, Any] | None,
                     desired: dict[str, Any] | None) -> tuple[set[str], set[str]]:
    """The outputs and inputs our module uses with this env and these desired properties."""
    from edge_module.config import EdgeHubSettings

    defaults = EdgeHubSettings()
    env = {k.lower(): v.get("value") for k, v in (module or {}).get("env", {}).items()}
    outputs = {env.get("edgehub__resultoutput") or defaults.result_output,
               env.get("edgehub__erroroutput") or defaults.error_output}
    raw = env.get("edgehub__inputs") or ",".join(defaults.inputs)
    twin = {k.lower(): v for k, v in ((desired or {}).get("EdgeHub") or {}).items()}
    if "inputs" in twin:
        raw = twin["inputs"] if isinstance(twin["inputs"], str) else ",".join(twin["inputs"])
    inputs = {part.strip() for part in str(raw).split(",") if part.strip()}
    return outputs, inputs


def render_all(values: Mapping[str, str]) -> dict[Path, dict[str, Any]]:
    """Every manifest this repository ships, rendered: {output path: manifest}."""
    out = {MANIFEST: render(json.loads(TEMPLATE.read_text()), values)}
    for path in sorted(LAYERED.glob("*.json")):
        out[GENERATED / path.name] = render(json.loads(path.read_text()), values)
    return out


def dumps(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    try:
        rendered = render_all(variables())
    except ManifestError as exc:
        print(f"manifest: {exc}", file=sys.stderr)
        return 2
    status = 0
    for path, manifest in rendered.items():
        problems = check(manifest, layered=path.parent == GENERATED)
        for problem in problems:
            print(f"{path.relative_to(ROOT)}: {problem}", file=sys.stderr)
            status = 2
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(manifest))
        print(f"wrote {path.relative_to(ROOT)}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
