"""Run a fake edgeHub for a local session without Azure.

    python -m simulator.edgehub [--workdir DIR] [--env-file FILE] [--demo N]

Starts the TLS broker on 127.0.0.x:8883, the workload API and the responder,
writes the IoT Edge environment for the module to FILE (default
DIR/module.env), and prints every message the module sends to its outputs.
``--demo N`` routes N digit images to the module's ``input``. Then, in another
shell::

    set -a; . .run/edgehub/module.env; set +a
    edge-module run Eula=accept Billing=... ApiKey=... Transport=edgehub

Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import signal
import threading
import time
from pathlib import Path
from typing import Any

from simulator.datasets import digit_image, digits_split
from simulator.edgehub.hub import FakeEdgeHub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulator.edgehub",
                                     description="A fake edgeHub on loopback.")
    parser.add_argument("--workdir", type=Path, default=Path(".run/edgehub"))
    parser.add_argument("--env-file", type=Path, default=None)
    parser.add_argument("--demo", type=int, default=0,
                        help="route this many digit images to the module once it connects")
    args = parser.parse_args(argv)
    hub = FakeEdgeHub(args.workdir.resolve()).start()
    env_file = args.env_file or args.workdir / "module.env"
    env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in hub.module_env().items()))
    print(f"fake edgeHub on {hub.host}:8883; the module's environment is in {env_file}")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seen = 0
    sent = False
    _, x_test, _, _ = digits_split()
    while not stop.wait(0.5):
        for message in hub.outputs[seen:]:
            body: Any = message.json() if message.body.startswith(b"{") else message.body
            print(f"[{message.output}] {json.dumps(body)[:200]}")
        seen = len(hub.outputs)
        if args.demo and not sent and hub.twin_gets:  # the module is connected
            for i in range(args.demo):
                image = base64.b64encode(digit_image(x_test[i % len(x_test)])).decode()
                hub.send_input("input", json.dumps({"id": f"demo-{i}", "image": image}).encode(),
                               message_id=f"demo-{i}")
                time.sleep(0.01)
            sent = True
    hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
