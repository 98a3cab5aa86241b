"""Deployment manifests: render the templates under deployment/ and check them.

``python -m tools.manifest`` (``make manifest``) writes the ready-to-apply
``deployment/config/manifest.json`` from ``deployment/deployment.template.json``
and the fleet (layered) deployments into ``deployment/generated/``, the way
iotedgedev does. Both folders are ignored by git: they hold the real API key and
registry password.

* ``${NAME}`` and ``$NAME`` take their value from the environment, else
  ``deployment/.env`` (not in git, for real keys), else ``deployment/manifest.env``;
* ``${MODULES.edge-module}`` becomes ``<repository>:<version>-amd64`` from
  ``deployment/module.json``;
* ``createOptions`` objects become JSON strings cut into ``createOptions``,
  ``createOptions01``, ... of at most 512 characters (IoT Hub's limit per value);
* empty environment values and registry credentials without a user are left out.

``check`` adds what the JSON schemas cannot say: schema versions, leftover
placeholders, createOptions chunks, and routes naming outputs and inputs that
the module really has. ``validate`` runs the module's own settings validation
on the environment each manifest gives the module (a bad URL, an empty or short
key is an error naming the variable), and a value left as a placeholder
(``replace-with-...``, an ``example.com`` address) is an error too.

``--allow-placeholders`` renders the example ``manifest.json`` kept in git, from
``deployment/manifest.env`` alone (the environment and ``deployment/.env`` are
not read, and a secret variable there must be a placeholder or empty), so no
real key can reach a tracked file.
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
MANIFEST = ROOT / "manifest.json"  # the example in git: placeholders, no secrets
RENDERED = DEPLOYMENT / "config" / "manifest.json"  # real values; ignored by git
SECRET_VARIABLES = ("API_KEY", "CONTAINER_REGISTRY_PASSWORD")
PLACEHOLDER_VALUE = re.compile(r"replace-with|(?:^|[./@])example\.(?:com|org|net)\b",
                               re.IGNORECASE)
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


def variables(environ: Mapping[str, str] | None = None, example: bool = False
              ) -> dict[str, str]:
    """Values for placeholders: environment > deployment/.env > deployment/manifest.env.

    ``example``: deployment/manifest.env alone (the example manifest kept in git).
    """
    environ = os.environ if environ is None else environ
    values = read_env_file(DEPLOYMENT / "manifest.env")
    if not example:
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


def templates() -> dict[Path, Path]:
    """{template: where its rendering goes}; the base manifest under the RENDERED name."""
    out = {TEMPLATE: RENDERED}
    for path in sorted(LAYERED.glob("*.json")):
        out[path] = GENERATED / path.name
    return out


def render_all(values: Mapping[str, str], example: bool = False
               ) -> dict[Path, dict[str, Any]]:
    """Every manifest this repository ships, rendered: {output path: manifest}.

    ``example``: the base manifest goes to MANIFEST (the example in git), not RENDERED.
    """
    out = {}
    for template, target in templates().items():
        path = MANIFEST if example and target == RENDERED else target
        out[path] = render(json.loads(template.read_text()), values)
    return out


def _module_env(manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The edge-module entry's env of a manifest or layered deployment (and its parent)."""
    content = manifest["content"]["modulesContent"] if "content" in manifest \
        else manifest["modulesContent"]
    agent = content.get("$edgeAgent", {})
    module = agent.get(f"properties.desired.modules.{MODULE}") or \
        agent.get("properties.desired", {}).get("modules", {}).get(MODULE)
    if not isinstance(module, dict) or not isinstance(module.get("env"), dict):
        return None
    return module["env"], module


def setting_variables(template: dict[str, Any]) -> dict[str, str]:
    """Module setting (``ApiKey``, ``Billing:PublicKey``) -> the variable that fills it."""
    found = _module_env(template)
    out: dict[str, str] = {}
    if found is None:
        return out
    for name, entry in found[0].items():
        match = PLACEHOLDER.fullmatch(str(entry.get("value", ""))) \
            if isinstance(entry, dict) else None
        if match:
            out[name.replace("__", ":").lower()] = match.group(1) or match.group(2)
    return out


def validate(manifest: dict[str, Any], template: dict[str, Any]) -> list[str]:
    """The module's own settings validation on the env this manifest gives it."""
    from edge_module.config import load_settings
    from edge_module.exceptions import ConfigError

    found = _module_env(manifest)
    if found is None:
        return []
    env = {name: str(entry.get("value", "")) for name, entry in found[0].items()
           if isinstance(entry, dict)}
    try:
        load_settings([], environ=env)
    except ConfigError as exc:
        variable = setting_variables(template).get(exc.key.lower())
        reason = exc.message.split("; fix:")[0]
        if variable is None:
            return [f"module setting {exc.key}: {exc.message}"]
        return [f"{variable} (the module's {exc.key}): {reason}; fix: set {variable}=<value> "
                "in deployment/.env (ignored by git) or in the environment"]
    return []


def placeholders(values: Mapping[str, str], used: set[str]) -> list[str]:
    """Variables a template uses whose value is still an example."""
    return sorted(name for name in used if PLACEHOLDER_VALUE.search(values.get(name, "")))


def used_variables(text: str) -> set[str]:
    return {m.group(1) or m.group(2) for m in PLACEHOLDER.finditer(text)} - KEEP


def secrets_in_example(values: Mapping[str, str]) -> list[str]:
    """Secret variables of deployment/manifest.env that hold something real."""
    return [f"{name} in deployment/manifest.env (tracked by git) holds a value that is not "
            f"a placeholder; fix: move it to deployment/.env (ignored by git) and put "
            f"{name}=replace-with-... or nothing in manifest.env"
            for name in SECRET_VARIABLES
            if values.get(name) and not PLACEHOLDER_VALUE.search(values[name])]


def dumps(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-placeholders", action="store_true",
                        help="render the example manifest.json kept in git from "
                        "deployment/manifest.env alone, placeholders allowed")
    args = parser.parse_args(argv)
    example = bool(args.allow_placeholders)
    values = variables(example=example)
    problems: list[str] = secrets_in_example(values) if example else []
    if values.get("CONTAINER_REGISTRY_USERNAME") and not values.get(
            "CONTAINER_REGISTRY_PASSWORD") and not example:
        problems.append("CONTAINER_REGISTRY_USERNAME is set but CONTAINER_REGISTRY_PASSWORD "
                        "is empty; fix: set CONTAINER_REGISTRY_PASSWORD in deployment/.env "
                        "(ignored by git), or empty both for a registry without login")
    try:
        rendered = render_all(values, example=example)
    except ManifestError as exc:
        print(f"manifest: {exc}", file=sys.stderr)
        return 2
    sources = {target: template for template, target in templates().items()}
    left: set[str] = set()
    for path, manifest in rendered.items():
        template_text = sources[RENDERED if path == MANIFEST else path].read_text()
        where = _shown(path)
        problems += [f"{where}: {p}" for p in check(manifest, layered=path.parent == GENERATED)]
        # The same variable feeds several manifests: name it once, not once per file.
        problems += validate(manifest, json.loads(template_text))
        left |= set(placeholders(values, used_variables(template_text)))
    if example and left:
        print(f"note: left as placeholders, as asked: {', '.join(sorted(left))}",
              file=sys.stderr)
    elif left:
        problems += [f"{name} is still the example value {values[name]!r}; fix: set "
                     f"{name}=<your value> in deployment/.env (ignored by git) or in the "
                     "environment (--allow-placeholders renders the example in git)"
                     for name in sorted(left)]
    if problems:
        for problem in dict.fromkeys(problems):
            print(f"manifest: {problem}", file=sys.stderr)
        print("manifest: nothing written", file=sys.stderr)
        return 2
    for path, manifest in rendered.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(manifest))
        print(f"wrote {_shown(path)}")
    if not example:
        print(f"apply {_shown(RENDERED)} (it holds your keys; git ignores it): "
              f"az iot edge set-modules --hub-name <hub> --device-id <device> --content "
              f"{_shown(RENDERED)}")
    return 0


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    raise SystemExit(main())
