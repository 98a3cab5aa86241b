"""The hostile-payload suite over a real mosquitto, against one module process.

Each hostile input gets its coded error (or a result where it is legitimate),
nothing illegitimate is billed (the billing simulator's count), the next normal
input is answered afterwards, and the module's peak RSS (VmHWM) stays within
100 MB of its steady state measured before the set.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from simulator.billing import BillingSimulator
from simulator.datasets import digits_split
from tests.hostile import (
    jpeg,
    jpeg_claiming,
    jpeg_scan_bomb,
    json_nested,
    json_tensor,
    npy,
    npy_lying,
    png_bomb,
    png_claiming,
    png_lying_small,
)
from tests.support import Collector, Module, digit_png, wait_until

RESULTS, ERRORS = "em/results", "em/errors"
MB = 1024 * 1024
RESULT = "result"  # a legitimate input: answered and billed


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes
    expect: str  # an error code, or RESULT
    billed: int = 0  # records a legitimate answer costs


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hostile_cases() -> list[Case]:
    digit = digits_split()[1][0]
    zeros = np.zeros((1, 8, 8)).tolist()
    real_6000 = bytes(cv2.imencode(".jpg", np.full((6000, 6000), 200, np.uint8))[1])
    over = (b'{"id": "over", "tensor": [' + b"0," * (2 * MB))[:4 * MB + 1]
    return [
        Case("png-bomb-30000", png_bomb(30000, 30000), "ImageTooLarge"),
        Case("png-header-65000", png_claiming(65000, 65000), "ImageTooLarge"),
        Case("jpeg-bomb-30000", jpeg_claiming(30000, 30000), "ImageTooLarge"),
        Case("jpeg-header-65000", jpeg_claiming(65000, 65000), "ImageTooLarge"),
        # 1,000 repeated scans: ~15 s of decoding at 4096x4096 in 99 KB.
        Case("jpeg-scan-bomb-4096", jpeg_scan_bomb(4096, 4096, 1000), "ImageDecodeFailed"),
        Case("jpeg-real-6000", real_6000, "ImageTooLarge"),
        # 64 images claiming 6000x6000 each (2.3 G pixels in all) in one message, and as
        # many real 6000x6000 JPEGs as fit in 4 MB.
        Case("batch-64-jpeg-6000", json.dumps(
            {"id": "batch-64", "items": [{"image": b64(jpeg_claiming(6000, 6000))}] * 64}
        ).encode(), "ImageTooLarge"),
        Case("batch-6-real-jpeg-6000", json.dumps(
            {"id": "batch-6", "items": [{"image": b64(real_6000)}] * 6}).encode(),
            "ImageTooLarge"),
        # 64 valid PNGs right at the per-image limit (1.5 MB): too much decoding for one message.
        Case("batch-64-png-4096", json.dumps(
            {"id": "batch-png", "items": [{"image": b64(png_bomb(4096, 4096))}] * 64}
        ).encode(), "ImageTooLarge"),
        Case("npy-claims-1e10-float64", npy_lying((100000, 100000)), "TensorTooLarge"),
        Case("npy-claims-wrong-shape", npy_lying((1, 8, 9)), "TensorShapeMismatch"),
        Case("npy-claims-more-data", npy_lying((1, 8, 8)), "UnsupportedPayload"),
        Case("json-nested-100000", json_nested(100_000), "InvalidJson"),
        Case("json-4mb-of-empty-arrays", b'{"id": "arrays", "tensor": ['
             + b"[]," * ((4 * MB - 40) // 3) + b"[]]}", "InvalidJson"),
        Case("id-10kb", json_tensor(zeros, "i" * 10_240), "InvalidRequest"),
        Case("invalid-utf8", b'{"id": "\xff\xfe", "tensor": ' + json.dumps(zeros).encode()
             + b"}", "InvalidJson"),
        Case("payload-4mb-plus-1", over, "PayloadTooLarge"),
        Case("npy-nan", npy(np.full((1, 8, 8), np.nan, np.float32)), "TensorValueInvalid"),
        Case("json-infinity", b'{"id": "inf", "tensor": ' + json.dumps(
            [[[float("inf")] * 8] * 8]).encode() + b"}", "TensorValueInvalid"),
        # Legitimate, however odd: answered and billed once.
        Case("png-8x8-header-with-2000x2000-data", png_lying_small(8, 8, 2000, 2000),
             RESULT, 1),
        Case("png-at-the-limit-4096x4096", png_bomb(4096, 4096), RESULT, 1),
        Case("jpeg-digit", digit_png(digit, ".jpg"), RESULT, 1),
        Case("batch-2-small", json.dumps({"id": "b2", "items": [{"image": b64(jpeg())}] * 2})
             .encode(), RESULT, 2),
    ]


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def billed(billing: BillingSimulator) -> int:
    return int(billing.totals()["quantity"])


def test_hostile_payloads_get_coded_errors_bounded_memory_and_no_billing(
    start_module: Callable[..., Module], collector: Collector, billing: BillingSimulator
) -> None:
    module = start_module("Metering:MaxDelaySeconds=0.2")
    assert module.process is not None
    pid = module.process.pid
    normal = digit_png(digits_split()[1][1])
    cases = hostile_cases()

    # Steady state: the module has answered (and billed) normal inputs of every path.
    for i in range(20):
        collector.publish("em/in/warm", normal if i % 2 else json_tensor(
            np.zeros((1, 8, 8)).tolist(), f"warm-{i}"))
    collector.wait(RESULTS, 20)
    wait_until(lambda: billed(billing) == 20, 20, "warm-up billed")
    steady_kb = vm_kb(pid, "VmRSS")

    answered_after: dict[str, float] = {}
    for case in cases:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = case.name.encode()
        collector.publish(f"em/in/hostile/{case.name}", case.payload, properties=props)
        after = Properties(PacketTypes.PUBLISH)
        after.CorrelationData = f"after-{case.name}".encode()
        sent = time.monotonic()
        collector.publish("em/in/normal", normal, properties=after)
        wait_until(lambda name=case.name: any(  # type: ignore[misc]
            r["id"] == f"after-{name}" for r in collector.json(RESULTS)), 15,
            f"the normal input after {case.name} answered; log:\n{module.log_tail()}")
        answered_after[case.name] = time.monotonic() - sent

    errors = collector.json(ERRORS)
    results = collector.json(RESULTS)
    outcome: dict[str, list[str]] = {case.name: [] for case in cases}
    for error in errors:
        if _owner(error["id"]) in outcome:
            outcome[_owner(error["id"])].append(error["error"]["code"])
    for result in results:
        if _owner(result["id"]) in outcome:
            outcome[_owner(result["id"])].append(RESULT)
    wrong = {case.name: outcome[case.name] for case in cases
             if outcome[case.name] != [case.expect]}
    assert wrong == {}, f"unexpected answers (want exactly one each): {wrong}\n" + \
        "\n".join(f"{e['id'][:40]}: {e['error']}" for e in errors)
    assert all(e["error"]["message"] for e in errors)

    # Billing: the warm-up, every normal input, and the legitimate odd ones; nothing else.
    expected = 20 + len(cases) + sum(case.billed for case in cases)
    wait_until(lambda: billed(billing) >= expected, 20, f"{expected} items billed")
    time.sleep(0.5)  # a late, illegitimate record would have drained by now
    assert billed(billing) == expected
    assert module.metric("edge_module_errors_total", 'code="InternalError"') == 0
    assert module.metric("edge_module_errors_total", 'code="ImageTooLarge"') == sum(
        case.expect == "ImageTooLarge" for case in cases)

    peak_kb = vm_kb(pid, "VmHWM")
    refused_cases = [case.name for case in cases if case.expect != RESULT]
    slowest = max(refused_cases, key=answered_after.__getitem__)
    print(f"\nsteady RSS {steady_kb / 1024:.0f} MB, peak {peak_kb / 1024:.0f} MB; slowest "
          f"normal answer after a refused one: {answered_after[slowest] * 1000:.0f} ms "
          f"({slowest}; publish to answer, QoS 1)")
    assert (peak_kb - steady_kb) / 1024 < 100, \
        f"peak RSS {peak_kb / 1024:.0f} MB vs steady {steady_kb / 1024:.0f} MB"
    assert module.ready()


def _owner(answer_id: str) -> str:
    """The case an answer belongs to: its correlation data, or the payload's own id."""
    by_payload_id = {"batch-64": "batch-64-jpeg-6000", "batch-6": "batch-6-real-jpeg-6000",
                     "over": "payload-4mb-plus-1", "inf": "json-infinity",
                     "b2": "batch-2-small", "batch-png": "batch-64-png-4096",
                     "arrays": "json-4mb-of-empty-arrays"}
    return by_payload_id.get(answer_id, answer_id)
