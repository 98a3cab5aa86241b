"""``Replicas=N``: N copies of the module on one box, splitting one input stream.

Python runs one pipeline per process, so on a machine with more cores than a
single module can use, run several. Each replica is a full module with:

* its own ``Data:Path/replica-<i>`` (its own ledger and installation id: one
  ledger each, no shared-writer contention; each record still has its own id,
  so billing stays exactly once);
* its own HTTP port (``Http:Port + i``) and gRPC port (``Grpc:Port + i``);
* the input filters rewritten as MQTT shared subscriptions
  (``$share/edge-module/<filter>``), so the broker hands each message to
  exactly one replica.

The supervisor forwards SIGTERM/SIGINT, restarts a replica that crashes (at
most 5 times a minute), and stops everything on a configuration error.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from edge_module.config import Settings
from edge_module.logs import get_logger

log = get_logger("replicas")
SHARE_GROUP = "edge-module"


def shared(topic_filter: str) -> str:
    return topic_filter if topic_filter.startswith("$share/") else \
        f"$share/{SHARE_GROUP}/{topic_filter}"


def replica_args(settings: Settings, index: int) -> list[str]:
    port = settings.http.port + index if settings.http.port else 0
    grpc_port = settings.grpc.port + index if settings.grpc.port else 0
    args = ["Replicas=1", f"Data:Path={settings.data.path / f'replica-{index}'}",
            f"Http:Port={port}", f"Grpc:Port={grpc_port}",
            f"Mqtt:InputTopic={','.join(shared(f) for f in settings.mqtt.input_topic)}"]
    if settings.mqtt.client_id:
        args.append(f"Mqtt:ClientId={settings.mqtt.client_id}-r{index}")
    return args


def supervise(settings: Settings, assignments: list[str], config_file: Path | None) -> int:
    count = settings.replicas
    base = [sys.executable, "-m", "edge_module", "run", *assignments]
    if config_file is not None:
        base += ["--config", str(config_file)]
    stopping = False

    def stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    restarts: dict[int, list[float]] = {i: [] for i in range(count)}
    for i in range(count):
        procs[i] = subprocess.Popen([*base, *replica_args(settings, i)])
    log.info("replicas_started", replicas=count, pids=[p.pid for p in procs.values()])
    code = 0
    while not stopping:
        time.sleep(0.2)
        for i, proc in list(procs.items()):
            status = proc.poll()
            if status is None:
                continue
            if status == 2:
                log.error("replica_configuration_error", replica=i,
                          effect="stopping every replica")
                stopping, code = True, 2
                break
            recent = [t for t in restarts[i] if time.monotonic() - t < 60]
            if len(recent) >= 5:
                log.error("replica_crash_loop", replica=i, exit_code=status,
                          effect="stopping every replica")
                stopping, code = True, 1
                break
            restarts[i] = [*recent, time.monotonic()]
            log.warning("replica_restarted", replica=i, exit_code=status)
            procs[i] = subprocess.Popen([*base, *replica_args(settings, i)])
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.pipeline.shutdown_seconds + 5
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    log.info("replicas_stopped", exit_code=code)
    return code
