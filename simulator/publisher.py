"""A publisher app: sends digit images, pump telemetry or your own image files, collects
the answers, reports.

    python -m simulator.publisher --port 1883 --kind digits --format png --rate 50 --count 500
    python -m simulator.publisher --port 1883 --image photos/ --image extra.jpg --count 10

Every message carries an id (in the JSON body, or as MQTT v5 correlation data
for raw image bytes), so each answer is matched to what was sent: the report
gives throughput, latency percentiles, errors by code and accuracy against the
data set's true labels (for your own files: each file's answer). ``--count 0``
runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import json
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from simulator.datasets import (
    TELEMETRY_LABELS,
    digit_image,
    digits_split,
    telemetry_dataset,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SHOWN_FILES = 20  # answers listed per file in the report


@dataclass
class Tally:
    # id -> (time sent, true label, or the file name for the user's own images)
    sent: dict[str, tuple[float, str]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    correct: int = 0
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    files: dict[str, str] = field(default_factory=dict)  # file -> its first answer
    lock: threading.Lock = field(default_factory=threading.Lock)


def image_files(paths: list[str]) -> list[Path]:
    """The PNG and JPEG files named, folders searched (not recursively), sorted."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{name}: no such file or folder")
    return found


def encode_file(data: bytes, raw: bool, msg_id: str) -> tuple[bytes, Any]:
    if raw:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg_id.encode()
        return data, props
    return json.dumps({"id": msg_id, "image": base64.b64encode(data).decode()}).encode(), None


def samples(kind: str) -> tuple[list[np.ndarray], list[str]]:
    if kind == "digits":
        _, x_test, _, y_test = digits_split()
        return list(x_test), [str(v) for v in y_test]
    x, y = telemetry_dataset(n_per_class=100, seed=99)
    return list(x), [TELEMETRY_LABELS[v] for v in y]


def encode(kind: str, fmt: str, sample: np.ndarray, msg_id: str) -> tuple[bytes, Any]:
    """The payload and (for raw bytes) the MQTT v5 properties that carry the id."""
    if kind == "telemetry":
        return json.dumps({"id": msg_id, "tensor": [round(float(v), 4) for v in sample]}) \
            .encode(), None
    image = digit_image(sample, ".jpg" if fmt.endswith("jpeg") else ".png")
    if fmt.startswith("raw"):
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = msg_id.encode()
        return image, props
    return json.dumps({"id": msg_id, "image": base64.b64encode(image).decode()}).encode(), None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simulator.publisher", description=__doc__.split("\n\n")[0],
        epilog="Example: python -m simulator.publisher --port 1883 --image my-digits/ "
        "--count 0 (Ctrl-C stops and prints the report)")
    p.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=1883, help="broker port (default 1883)")
    p.add_argument("--kind", choices=["digits", "telemetry"], default="digits",
                   help="built-in samples: digit images (for Model:Name=digits) or pump "
                   "telemetry vectors (for Model:Name=telemetry); default digits")
    p.add_argument("--image", action="append", default=[], metavar="FILE_OR_FOLDER",
                   help="send your own PNG/JPEG files instead of the built-in samples "
                   "(repeatable; a folder means its .png/.jpg/.jpeg files); sent in turn")
    p.add_argument("--format", choices=["png", "jpeg", "raw-png", "raw-jpeg"],
                   default="png", help="png/jpeg: JSON with a base64 image; raw-*: the image "
                   "bytes themselves, the id as MQTT v5 correlation data (with --image the "
                   "file is sent as it is, so only raw or not matters); default png")
    p.add_argument("--rate", type=float, default=50,
                   help="messages per second (0: as fast as possible); default 50")
    p.add_argument("--count", type=int, default=500,
                   help="messages to send (0: until Ctrl-C); default 500")
    p.add_argument("--topic", default="edge-module/input/simulator",
                   help="topic to publish inputs on (must match the module's Mqtt:InputTopic)")
    p.add_argument("--results", default="edge-module/results",
                   help="topic the module answers on (its Mqtt:ResultTopic)")
    p.add_argument("--errors", default="edge-module/errors",
                   help="topic of the module's error envelopes (its Mqtt:ErrorTopic)")
    p.add_argument("--timeout", type=float, default=10,
                   help="seconds to wait for the last answers; default 10")
    return p


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.format.startswith("raw") and args.kind == "telemetry" and not args.image:
        cli.error("raw formats are for images; telemetry is sent as JSON")
    files: list[Path] = []
    if args.image:
        try:
            files = image_files(args.image)
        except FileNotFoundError as exc:
            cli.error(str(exc))
        if not files:
            cli.error(f"no .png, .jpg or .jpeg file in {', '.join(args.image)}")
    file_bytes = [f.read_bytes() for f in files]

    data, labels = samples(args.kind) if not files else ([], [])
    tally = Tally()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def on_message(_: mqtt.Client, __: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        with tally.lock:
            entry = tally.sent.get(str(body.get("id")))
            if entry is None:
                return
            tally.answered += 1
            tally.latencies.append(now - entry[0])
            if "error" in body:
                tally.errors[body["error"].get("code", "?")] += 1
                answer = f"error {body['error'].get('code', '?')}"
            else:
                top = body["results"][0]
                answer = f"{top['label']} ({top.get('score', 0):.2f})"
                if not files and top["label"] == entry[1]:
                    tally.correct += 1
            if files:
                tally.files.setdefault(entry[1], answer)

    connected = threading.Event()
    client = mqtt.Client(client_id=f"publisher-{time.time_ns()}", protocol=mqtt.MQTTv5)
    client.on_message = on_message

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        c.subscribe([(args.results, 1), (args.errors, 1)])
        connected.set()

    client.on_connect = on_connect
    client.max_inflight_messages_set(1000)
    try:
        client.connect(args.host, args.port, keepalive=30)
    except OSError as exc:
        print(f"cannot reach the broker at {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    if not connected.wait(10):
        print("the broker did not accept the connection", file=sys.stderr)
        return 1
    time.sleep(0.2)

    interactive = sys.stdout.isatty()
    start = time.perf_counter()
    last_report = start
    n = 0
    # Each run names its requests afresh: the module bills a name it saw with the same
    # bytes within Pipeline:RepeatWindowSeconds once (a broker restart's duplicate).
    run = uuid.uuid4().hex[:8]
    while not stop.is_set() and (args.count == 0 or n < args.count):
        msg_id = f"sim-{run}-{n}"
        if files:
            index = n % len(files)
            payload, props = encode_file(file_bytes[index], args.format.startswith("raw"),
                                         msg_id)
            label = str(files[index])
        else:
            index = n % len(data)
            payload, props = encode(args.kind, args.format, data[index], msg_id)
            label = labels[index]
        with tally.lock:
            tally.sent[msg_id] = (time.perf_counter(), label)
        client.publish(args.topic, payload, qos=1, properties=props)
        n += 1
        if args.rate > 0:
            delay = start + n / args.rate - time.perf_counter()
            if delay > 0:
                stop.wait(delay)
        now = time.perf_counter()
        if now - last_report >= (0.2 if interactive else 5):
            last_report = now
            report_line(tally, n, now - start, interactive, accuracy=not files)
    deadline = time.perf_counter() + args.timeout
    while tally.answered < n and time.perf_counter() < deadline:
        time.sleep(0.05)
    elapsed = time.perf_counter() - start
    report_line(tally, n, elapsed, interactive, accuracy=not files)
    if interactive:
        print()
    client.disconnect()
    client.loop_stop()
    summary(tally, n, elapsed, "your image files" if files else args.kind)
    return 0 if tally.answered == n else 1


def report_line(tally: Tally, sent: int, elapsed: float, interactive: bool,
                accuracy: bool = True) -> None:
    with tally.lock:
        answered, correct = tally.answered, tally.correct
        p50 = percentile(tally.latencies[-2000:], 50) * 1000
    good = answered - sum(tally.errors.values())
    shown = f"accuracy {correct / good if good else 0.0:.1%} " if accuracy else ""
    width = 30
    done = int(width * answered / sent) if sent else 0
    bar = "#" * done + "." * (width - done)
    line = (f"[{bar}] sent {sent} answered {answered} ({answered / elapsed:.0f}/s) "
            f"{shown}p50 {p50:.1f} ms")
    print(("\r" + line) if interactive else line, end="" if interactive else "\n", flush=True)


def summary(tally: Tally, sent: int, elapsed: float, kind: str) -> None:
    good = tally.answered - sum(tally.errors.values())
    print(f"model input: {kind}; sent {sent}, answered {tally.answered} in {elapsed:.1f} s "
          f"({tally.answered / elapsed:.0f} answers/s)")
    if tally.latencies:
        lat = [v * 1000 for v in tally.latencies]
        print(f"latency ms: p50 {percentile(lat, 50):.2f}  p95 {percentile(lat, 95):.2f}  "
              f"p99 {percentile(lat, 99):.2f}")
    if tally.files:
        for name, answer in list(sorted(tally.files.items()))[:SHOWN_FILES]:
            print(f"  {name}: {answer}")
        if len(tally.files) > SHOWN_FILES:
            print(f"  ... and {len(tally.files) - SHOWN_FILES} more files")
    elif good:
        print(f"accuracy against true labels: {tally.correct / good:.2%} ({tally.correct}/{good})")
    if tally.errors:
        print("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(tally.errors.items())))
    if tally.answered < sent:
        print(f"UNANSWERED: {sent - tally.answered} messages got no answer")


if __name__ == "__main__":
    raise SystemExit(main())
