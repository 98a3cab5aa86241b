"""The container image: built from Dockerfile.amd64, run, probed, and asked for one answer.

Slow (a minute or two; part of ``make test``). Built with
deployment/build-image.sh, which uses docker when a daemon answers and buildah
otherwise; here no registry is reachable, so the base image is made locally
with deployment/local-base.sh (debootstrap) and the dependencies come from a
local wheel folder (the WHEELS build argument). The container runs with
``buildah run`` (chroot isolation shares the host's network, so the test's
broker and billing simulator are reachable on 127.0.0.1) with the image's own
ENTRYPOINT and CMD.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulator.billing import BillingSimulator
from simulator.datasets import digits_split
from tests.support import API_KEY, Broker, Collector, digit_png, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
BASE = "docker.io/library/python:3.11-slim-bookworm"
STORAGE = ["--storage-driver", os.environ.get("STORAGE_DRIVER", "vfs")]
HINT = ("needs buildah and debootstrap (no docker daemon here); fix: make install (it runs "
        "apt-get install buildah debootstrap) or install them with your package manager")

pytestmark = pytest.mark.slow


def buildah(*args: str, check: bool = True, timeout: float = 600) -> str:
    done = subprocess.run(["buildah", *STORAGE, *args], capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip()


@pytest.fixture(scope="module")
def image() -> Iterator[dict[str, Any]]:
    for tool in ("buildah", "debootstrap"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.fail(f"the image test {HINT} ({tool} is missing)")
    if subprocess.run(["buildah", *STORAGE, "inspect", "--type", "image", BASE],
                      capture_output=True).returncode != 0:
        subprocess.run([str(ROOT / "deployment/local-base.sh")], check=True, timeout=900)
    wheels = ROOT / ".cache" / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "-r",
                    str(ROOT / "requirements.lock"), "-w", str(wheels)], check=True,
                   timeout=900)
    tag = f"localhost/edge-module:test-{uuid.uuid4().hex[:8]}"
    build = subprocess.run([str(ROOT / "deployment/build-image.sh"), "--tag", tag,
                            "--wheels", ".cache/wheels"], capture_output=True, text=True,
                           timeout=1200, env={**os.environ, "BUILDER": "buildah"})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    config = json.loads(buildah("inspect", "--type", "image", tag))["Docker"]["config"]
    yield {"tag": tag, "config": config}
    buildah("rmi", "--force", tag, check=False)


def test_the_image_is_built_as_documented(image: dict[str, Any]) -> None:
    config = image["config"]
    assert config["User"] == "10001"  # not root
    assert set(config["Volumes"]) == {"/data", "/license", "/output"}
    assert "5000/tcp" in config["ExposedPorts"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert config["Entrypoint"] == ["python3", "-m", "edge_module"]
    assert config["Cmd"] == ["run"]
    assert "Data__Path=/data" in config["Env"]


def _container_process(marker: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"python3") and marker.encode() in cmdline:
            return int(entry.name)
    return None


def test_the_container_runs_passes_its_healthcheck_and_answers(
    image: dict[str, Any], tmp_path: Path, broker: Broker, billing: BillingSimulator,
    collector: Collector,
) -> None:
    data = tmp_path / "container-data"
    data.mkdir()
    os.chown(data, 10001, 10001)
    port = free_port()
    ctr = buildah("from", image["tag"])
    env = {"Eula": "accept", "Billing": billing.url, "ApiKey": API_KEY,
           "Billing__PublicKey": billing.public_key_b64, "Http__Port": str(port),
           "Mqtt__Port": str(broker.port), "Mqtt__InputTopic": "em/in/#",
           "Mqtt__ResultTopic": "em/results", "Mqtt__ErrorTopic": "em/errors",
           "Mqtt__AvailabilityTopic": "em/status",
           # buildah mounts the image's anonymous /data volume and a bind on /data in random
           # order; binding elsewhere keeps the test deterministic (docker has no such issue).
           "Data__Path": "/mnt/edge-data"}
    marker = f"Http:Port={port}"  # the image's own command, plus one setting to find it by
    command = [*image["config"]["Entrypoint"], *image["config"]["Cmd"], marker]
    env_args = [arg for k, v in env.items() for arg in ("--env", f"{k}={v}")]
    log_path = tmp_path / "container.log"
    with open(log_path, "wb") as log:
        run = subprocess.Popen(["buildah", *STORAGE, "run", "--isolation", "chroot",
                                "--volume", f"{data}:/mnt/edge-data", *env_args, ctr, "--",
                                *command], stdout=log, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert run.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        wait_until(healthy, 90, "the container ready")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            assert response.status == 200

        # The image's HEALTHCHECK command, run inside the container, passes.
        probe = image["config"]["Healthcheck"]["Test"][1:]
        check = subprocess.run(["buildah", *STORAGE, "run", "--isolation", "chroot", "--env",
                                f"Http__Port={port}", ctr, "--", *probe], capture_output=True,
                               timeout=60)
        assert check.returncode == 0, check.stderr

        _, x_test, _, y_test = digits_split()
        body = {"id": "from-image", "image": base64.b64encode(digit_png(x_test[0])).decode()}
        collector.publish("em/in/cam", json.dumps(body).encode())
        (result,) = collector.wait("em/results", 1)
        assert result["id"] == "from-image"
        assert result["results"][0]["label"] == str(y_test[0])
        assert (data / "ledger.db").exists()  # Data:Path is the bound host folder

        pid = _container_process(marker)
        assert pid is not None
        os.kill(pid, signal.SIGTERM)  # what `docker stop` sends
        deadline = time.monotonic() + 30
        while run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.returncode == 0, log_path.read_text(errors="replace")[-3000:]
        assert "module_stopped" in log_path.read_text(errors="replace")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
        buildah("rm", ctr, check=False)
