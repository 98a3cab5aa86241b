"""Hostile named-input tensor requests against one module process.

The models of ``test_tensor_models.py``'s kind: ``pair`` (``a`` float32 and ``b``
int64, both ``[N, L]`` with the graph's named size ``L``), ``q`` (``x`` int8
``[N, 3]``), ``flag`` (``m`` bool ``[N, 3]``) and ``embed`` (token ``ids`` int64
``[N, L]`` into a 10-row table), served from one repository over a real mosquitto,
OIP v2 HTTP and gRPC.
A hostile client sends ``.npz`` archives that lie (zip directories whose entry count
lies, duplicate and path-trick member names, nested zips, members whose ``.npy``
header lies about shape or dtype, pickles, structured, unicode and sub-array dtypes,
0-d arrays, negative and huge sizes, NaN), JSON inputs of wrong types and sizes
(integers past the input's range, shapes that hold nothing in sizes past the
address space, a dtype that is a list), and v2 requests whose binary sizes, shapes,
datatypes and input counts lie, and dynamic sizes past the descriptor's ``maxShape``
or of zero length where its ``minShape`` does not allow it (on MQTT, v2 HTTP JSON and
binary, and gRPC). Each gets its documented code, nothing refused is billed, the next
normal request is answered, no ``InternalError`` is counted, and the module's peak RSS
(VmHWM) stays within 100 MB of its steady state. A bool byte 2 is fed as true, an empty
token sequence is answered (``embed`` allows it), and a token id past the table fails
its own request, not the requests batched with it.
"""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_module.api.grpc_v2 import grpc_predict_v2_pb2 as pb
from edge_module.api.grpc_v2 import grpc_predict_v2_pb2_grpc as pb_grpc
from edge_module.inference.bounds import MalformedHeader, open_npz
from tests.models import save_graph
from tests.support import (
    API_KEY,
    Module,
    ServedRepository,
    serve_repository,
    wait_until,
)
from tests.test_tensor_models import PAIR, inputs_json, npy, npz, pair_graph

RESULTS, ERRORS = "em/results", "em/errors"
RESULT = "result"  # a legitimate request: answered, one record
MB = 1024 * 1024
MAX_PAYLOAD = 4 * MB
Q = {
    "name": "q", "version": "1", "inputs": [{"name": "x", "shape": [3], "dtype": "int8"}],
    "head": "tensor", "metering": {"meterName": "q.tensor", "apiType": "q"},
}


FLAG = {
    "name": "flag", "version": "1", "inputs": [{"name": "m", "shape": [3], "dtype": "bool"}],
    "head": "tensor", "metering": {"meterName": "flag.tensor", "apiType": "flag"},
}


def flag_graph(path: Path) -> Path:
    """``y = float(m)`` for a bool ``m`` of shape ``[N, 3]``."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT)], "flag",
        [helper.make_tensor_value_info("m", TensorProto.BOOL, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    return save_graph(graph, path, opset=13)


EMBED = {  # a text model: an empty sequence is allowed (minShape 0), at most 512 tokens
    "name": "embed", "version": "1",
    "inputs": [{"name": "ids", "shape": [-1], "dtype": "int64", "minShape": [0],
                "maxShape": [512]}],
    "head": "tensor", "metering": {"meterName": "embed.tensor", "apiType": "embed"},
}


def embed_graph(path: Path) -> Path:
    """``vectors = table[ids]``: a 10-row embedding table, as a text model starts."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 2],
                               [float(v) for v in range(20)])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["vectors"], axis=0)], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "L"])],
        [helper.make_tensor_value_info("vectors", TensorProto.FLOAT, ["N", "L", 2])],
        [table])
    return save_graph(graph, path, opset=13)


def q_graph(path: Path) -> Path:
    """``y = float(x)`` for an int8 ``x`` of shape ``[N, 3]``."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "q",
        [helper.make_tensor_value_info("x", TensorProto.INT8, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    return save_graph(graph, path, opset=13)


# -- hostile archives ---------------------------------------------------------------------

A = npy(np.ones(3, np.float32))
B = npy(np.ones(3, np.int64))


def archive(*members: tuple[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as zipped, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are on purpose
        for name, data in members:
            zipped.writestr(name, data)
    return out.getvalue()


def directory_bomb(size: int) -> bytes:
    """One empty member, then as many central-directory entries as fit in ``size`` bytes,
    behind an end record whose count says 2: zipfile parses every entry regardless."""
    local = b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 20, 0, 0, 0, 0, 0, 0, 0, 1, 0) + b"a"
    entry = b"PK\x01\x02" + struct.pack("<HHHHHHIIIHHHHHII", 20, 20, 0, 0, 0, 0, 0, 0, 0,
                                        1, 0, 0, 0, 0, 0, 0) + b"a"
    directory = entry * ((size - len(local) - 22) // len(entry))
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 2, 2, len(directory), len(local), 0)
    return local + directory + end


def zip64_locator() -> bytes:
    """A valid .npz with a zip64 end-of-directory locator before its end record."""
    data = archive(("a.npy", A), ("b.npy", B))
    end = data.rfind(b"PK\x05\x06")
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, 0, 1)
    return data[:end] + locator + data[end:]


def npy_header(descr: str, shape: str) -> bytes:
    """A .npy header (format 1.0) with any descr and shape text."""
    text = f"{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}".encode()
    length = (len(text) // 64 + 1) * 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", length) + text.ljust(length - 1) + b"\n"


def pickled() -> bytes:
    out = io.BytesIO()
    np.save(out, np.array([1, "x", None], dtype=object), allow_pickle=True)
    return out.getvalue()


def streamed() -> bytes:
    """Members written to an unseekable stream: sizes in data descriptors after them."""
    class Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, chunk: Any) -> int:
            self.data += chunk
            return len(chunk)
    sink = Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_DEFLATED) as zipped:
        for name, data in (("a.npy", A), ("b.npy", B)):
            with zipped.open(name, "w") as member:
                member.write(data)
    return bytes(sink.data)


def bad_crc() -> bytes:
    data = archive(("a.npy", A), ("b.npy", B))
    return data.replace(np.ones(3, np.float32).tobytes(), np.zeros(3, np.float32).tobytes(), 1)


def deflated(**arrays: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez_compressed(out, **arrays)
    return out.getvalue()


def body(inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({**extra, "inputs": inputs}).encode()


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes
    expect: str  # an error code, or RESULT
    topic: str = "em/in/pair"


def mqtt_cases() -> list[Case]:
    ones = np.ones(3, np.float32)
    one_b = {"data": [1, 2, 3]}
    return [
        # zip structure
        Case("directory-count-lies", directory_bomb(MAX_PAYLOAD - 1024), "UnsupportedPayload"),
        Case("many-members", archive(*[(f"m{i}.npy", b"") for i in range(3000)]),
             "UnsupportedPayload"),
        Case("zip64-locator", zip64_locator(), "UnsupportedPayload"),
        Case("duplicate-names", archive(("a.npy", A), ("a.npy", A)), "UnsupportedPayload"),
        Case("path-trick", archive(("../a.npy", A), ("b.npy", B)), "TensorNameMismatch"),
        Case("absolute-path", archive(("/a.npy", A), ("b.npy", B)), "TensorNameMismatch"),
        Case("not-npy-name", archive(("a", A), ("b.npy", B)), "UnsupportedPayload"),
        Case("nested-zip", archive(("a.npy", archive(("a.npy", A))), ("b.npy", B)),
             "UnsupportedPayload"),
        Case("bzip2", archive(("a.npy", A), ("b.npy", B), method=zipfile.ZIP_BZIP2),
             "UnsupportedPayload"),
        Case("truncated-directory", archive(("a.npy", A), ("b.npy", B))[:-30],
             "UnsupportedPayload"),
        Case("bad-crc", bad_crc(), "UnsupportedPayload"),
        Case("only-magic", b"PK\x03\x04", "UnsupportedPayload"),
        # member headers that lie
        Case("header-claims-more", archive(
            ("a.npy", npy(np.ones(100, np.float32))[:128] + ones.tobytes()), ("b.npy", B)),
            "UnsupportedPayload"),
        Case("pickle", archive(("a.npy", pickled()), ("b.npy", B)), "UnsupportedPayload"),
        Case("object-header", archive(("a.npy", npy_header("'|O'", "(3,)") + b"\0" * 24),
                                      ("b.npy", B)), "TensorDtypeInvalid"),
        Case("subarray-4mb-deflated", archive(
            ("a.npy", npy_header("'(1000,1000)f4'", "(1,)") + b"\0" * 4_000_000),
            ("b.npy", B), method=zipfile.ZIP_DEFLATED), "TensorDtypeInvalid"),
        Case("negative-size", archive(("a.npy", npy_header("'<f4'", "(-1,)")), ("b.npy", B)),
             "UnsupportedPayload"),
        Case("huge-sizes", archive(("a.npy", npy_header("'<f4'", f"({1 << 62}, {1 << 62})")),
                                   ("b.npy", B)), "UnsupportedPayload"),
        Case("deflate-bomb-1e8", deflated(a=np.zeros(50_000_000, np.float32),
                                          b=np.zeros(50_000_000, np.int8)), "TensorTooLarge"),
        # 1 M elements (the limit) deflated into 12 KB, 6 MB inflated: more than a message
        Case("deflated-past-payload-limit", deflated(a=np.zeros((250, 2000), np.float32),
                                                     b=np.zeros((250, 2000), np.int64)),
             "PayloadTooLarge"),
        # dynamic sizes past maxShape (pair: 2048, embed: 512), refused by the declared
        # shape: the deflated one would inflate past the payload limit, the .npy is read
        Case("past-max-shape-json", body({"a": {"data": [0.0] * 2049},
                                          "b": {"data": [0] * 2049}}), "TensorTooLarge"),
        Case("past-max-shape-npz", npz(a=np.ones((2, 2049), np.float32),
                                       b=np.ones((2, 2049), np.int64)), "TensorTooLarge"),
        Case("past-max-shape-deflated", deflated(a=np.zeros(900_000, np.float32),
                                                 b=np.zeros(900_000, np.int8)),
             "TensorTooLarge"),
        Case("past-max-shape-npy", npy(np.ones(513, np.int64)), "TensorTooLarge", "em/in/embed"),
        # a zero-length size: refused unless the descriptor's minShape gives 0 (embed's does)
        Case("zero-length-json", body({"a": {"data": []}, "b": {"data": []}}),
             "TensorShapeMismatch"),
        Case("zero-length-npz", npz(a=np.ones((2, 0), np.float32), b=np.ones((2, 0), np.int64)),
             "TensorShapeMismatch"),
        Case("zero-length-allowed", body({"ids": {"data": []}}), RESULT, "em/in/embed"),
        # dtypes and shapes
        Case("structured", npz(a=np.zeros(3, [("x", "<f4")]), b=np.ones(3, np.int64)),
             "TensorDtypeInvalid"),
        Case("unicode", npz(a=np.array(["x", "y", "z"]), b=np.ones(3, np.int64)),
             "TensorDtypeInvalid"),
        Case("complex", npz(a=np.ones(3, np.complex64), b=np.ones(3, np.int64)),
             "TensorDtypeInvalid"),
        Case("float64-for-float32", npz(a=np.ones(3), b=np.ones(3, np.int64)),
             "TensorDtypeInvalid"),
        Case("uint64-for-int64", npz(a=ones, b=np.ones(3, np.uint64)), "TensorDtypeInvalid"),
        Case("zero-d", npz(a=np.float32(1), b=np.int64(1)), "TensorShapeMismatch"),
        Case("zero-items", npz(a=np.ones((0, 3), np.float32), b=np.ones((0, 3), np.int64)),
             "TensorShapeMismatch"),
        Case("tied-size-differs", npz(a=ones, b=np.ones(4, np.int64)), "TensorShapeMismatch"),
        Case("row-counts-differ", npz(a=np.ones((2, 3), np.float32), b=np.ones((3, 3), np.int64)),
             "TensorShapeMismatch"),
        Case("npz-nan", npz(a=np.full(3, np.nan, np.float32), b=np.ones(3, np.int64)),
             "TensorValueInvalid"),
        Case("npz-inf", npz(a=np.full(3, np.inf, np.float32), b=np.ones(3, np.int64)),
             "TensorValueInvalid"),
        Case("npy-for-two-inputs", npy(ones), "TensorNameMismatch"),
        # JSON inputs
        Case("dtype-is-a-list", body({"a": {"data": [1.0], "dtype": ["float32"]}, "b": one_b}),
             "TensorDtypeInvalid"),
        Case("dtype-is-an-object", body({"a": {"data": [1.0], "dtype": {}}, "b": one_b}),
             "TensorDtypeInvalid"),
        Case("empty-shape-past-address-space", body({
            "a": {"data": [], "shape": [0, 1 << 62, 1 << 62]},
            "b": {"data": [], "shape": [0, 1 << 62, 1 << 62]}}), "TensorShapeMismatch"),
        Case("empty-shape-100-digits", body({"a": {"data": [], "shape": [0, 10 ** 100]},
                                             "b": one_b}), "TensorShapeMismatch"),
        Case("int64-past-range", body({"a": {"data": [1.0]}, "b": {"data": [2 ** 63 + 5]}}),
             "TensorDtypeInvalid"),
        Case("int8-past-range", body({"x": {"data": [200, 0, 0]}}), "TensorDtypeInvalid",
             "em/in/q"),
        Case("int8-declared-int16", body({"x": {"data": [-129, 0, 0], "dtype": "int16"}}),
             "TensorDtypeInvalid", "em/in/q"),
        Case("integer-past-64-bits", body({"a": {"data": [1.0]}, "b": {"data": [2 ** 70]}}),
             "TensorShapeMismatch"),
        Case("null-value", body({"a": {"data": [None]}, "b": {"data": [1]}}),
             "TensorShapeMismatch"),
        Case("float-for-int", body({"a": {"data": [1.0]}, "b": {"data": [1.5]}}),
             "TensorDtypeInvalid"),
        Case("strings", body({"a": {"data": ["1.0"]}, "b": {"data": [1]}}),
             "TensorDtypeInvalid"),
        Case("nan-literal", b'{"inputs": {"a": {"data": [NaN]}, "b": {"data": [1]}}}',
             "TensorValueInvalid"),
        Case("huge-float", b'{"inputs": {"a": {"data": [1e999]}, "b": {"data": [1]}}}',
             "TensorValueInvalid"),
        Case("float32-overflow", body({"a": {"data": [1e300]}, "b": {"data": [1]}}),
             "TensorValueInvalid"),
        Case("count-vs-shape", body({"a": {"data": [1.0, 2.0], "shape": [3]}, "b": one_b}),
             "TensorShapeMismatch"),
        Case("negative-shape", body({"a": {"data": [1.0], "shape": [-1]}, "b": one_b}),
             "TensorShapeMismatch"),
        Case("bool-shape", body({"a": {"data": [1.0], "shape": [True]}, "b": one_b}),
             "TensorShapeMismatch"),
        Case("ten-levels", body({"a": {"data": [[[[[[[[[[1.0]]]]]]]]]]}, "b": {"data": [1]}}),
             "TensorShapeMismatch"),
        Case("nested-100000", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
             "InvalidJson"),
        Case("entry-not-object", body({"a": [1.0], "b": one_b}), "InvalidRequest"),
        Case("unknown-entry-field", body({"a": {"data": [1.0], "rank": 1}, "b": one_b}),
             "UnknownField"),
        Case("extra-input", body({"a": {"data": [1.0]}, "b": {"data": [1]}, "c": {"data": [1]}}),
             "TensorNameMismatch"),
        # refusals that would echo megabytes of the payload (error topic and log)
        Case("15000-inputs", body({f"{'n' * 200}{i}": {"data": []} for i in range(15_000)}),
             "TensorNameMismatch"),
        Case("megabyte-name", body({"a": {"data": [1.0]}, "n" * MB: {"data": [1]}}),
             "TensorNameMismatch"),
        Case("megabyte-dtype", body({"a": {"data": [1.0], "dtype": "f" * MB}, "b": one_b}),
             "TensorDtypeInvalid"),
        Case("output-is-a-list", body({"a": {"data": [1.0]}, "b": {"data": [1]}},
                                      output=["npy"]), "InvalidRequest"),
        # legitimate, however odd: answered and billed once
        Case("big-endian", npz(a=np.ones(3, ">f4"), b=np.ones(3, ">i8")), RESULT),
        Case("fortran-order", npz(a=np.asfortranarray(np.ones((2, 3), np.float32)),
                                  b=np.ones((2, 3), np.int64)), RESULT),
        Case("data-descriptors", streamed(), RESULT),
        Case("bool-for-int64", npz(a=ones, b=np.ones(3, np.bool_)), RESULT),
        Case("int8-edges", body({"x": {"data": [-128, 127, 0]}}), RESULT, "em/in/q"),
        Case("bool-true-false", body({"m": {"data": [True, False, True]}}), RESULT,
             "em/in/flag"),
        Case("bool-from-2", body({"m": {"data": [0, 1, 2]}}), "TensorDtypeInvalid",
             "em/in/flag"),
        # a bare tensor for a model of one named input is read in that input's dtype
        Case("bool-tensor", json.dumps({"tensor": [True, False, True]}).encode(), RESULT,
             "em/in/flag"),
        Case("int8-tensor", json.dumps({"tensor": [[1, 2, 3], [-4, 5, 6]]}).encode(), RESULT,
             "em/in/q"),
        Case("int8-tensor-past-range", json.dumps({"tensor": [1, 2, 300]}).encode(),
             "TensorDtypeInvalid", "em/in/q"),
        Case("npy-output", body({"a": {"data": [1.0]}, "b": {"data": [1]}}, output="npy"),
             RESULT),
    ]


def test_a_directory_whose_count_lies_is_refused_before_zipfile_parses_it() -> None:
    bomb = directory_bomb(MAX_PAYLOAD)
    tracemalloc.start()
    try:
        with pytest.raises(MalformedHeader) as refused:
            open_npz(bomb, 2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "at most 2 (one per model input)" in str(refused.value)
    assert peak < MB, f"{peak:,} bytes traced while refusing it"  # zipfile: ~30 MB


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


# -- one module for the file --------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedRepository]:
    root = tmp_path_factory.mktemp("hostile-tensor")
    repository = root / "repository"
    pair_graph(repository / "pair" / "1" / "model.onnx")
    (repository / "pair" / "1" / "model.json").write_text(json.dumps(PAIR))
    q_graph(repository / "q" / "1" / "model.onnx")
    (repository / "q" / "1" / "model.json").write_text(json.dumps(Q))
    flag_graph(repository / "flag" / "1" / "model.onnx")
    embed_graph(repository / "embed" / "1" / "model.onnx")
    (repository / "embed" / "1" / "model.json").write_text(json.dumps(EMBED))
    (repository / "flag" / "1" / "model.json").write_text(json.dumps(FLAG))
    with serve_repository(root, repository, f"Pipeline:MaxPayloadBytes={MAX_PAYLOAD}",
                          "Pipeline:MaxTensorElements=1000000",
                          "Pipeline:MaxQueueDelayMs=5") as served:
        yield served


def normal() -> bytes:
    return inputs_json(np.array([1.5, 2.5], np.float32), np.array([1, 2], np.int64))


def test_hostile_npz_and_json_inputs_are_refused_coded_unbilled_and_bounded(
    served: ServedRepository,
) -> None:
    module, collector = served.module, served.collector
    assert module.process is not None
    pid = module.process.pid
    cases = mqtt_cases()
    for i in range(10):  # steady state: every intake path has run
        collector.publish("em/in/pair", normal() if i % 2 else npz(
            a=np.ones(4, np.float32), b=np.ones(4, np.int64)))
    wait_until(lambda: len(collector.json(RESULTS)) >= 10, 20, "warm-up answered")
    before = served.billed()
    wait_until(lambda: served.billed() >= 10, 20, "warm-up billed")
    before = served.billed()
    steady_kb = vm_kb(pid, "VmRSS")

    for case in cases:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = case.name.encode()
        collector.publish(case.topic, case.payload, properties=props)
        after = Properties(PacketTypes.PUBLISH)
        after.CorrelationData = f"after-{case.name}".encode()
        collector.publish("em/in/pair", normal(), properties=after)
        wait_until(lambda name=case.name: any(  # type: ignore[misc]
            r["id"] == f"after-{name}" for r in collector.json(RESULTS)), 15,
            f"the normal request after {case.name} answered; log:\n{module.log_tail()}")

    outcome: dict[str, list[str]] = {case.name: [] for case in cases}
    for error in collector.json(ERRORS):
        if error["id"] in outcome:
            outcome[error["id"]].append(error["error"]["code"])
    for result in collector.json(RESULTS):
        if result["id"] in outcome:
            outcome[result["id"]].append(RESULT)
    wrong = {c.name: outcome[c.name] for c in cases if outcome[c.name] != [c.expect]}
    assert wrong == {}, f"unexpected answers (want exactly one each): {wrong}"
    longest = max(collector.json(ERRORS), key=lambda e: len(e["error"]["message"]))
    assert 0 < len(longest["error"]["message"]) < 1000, longest["id"]

    answered = len(cases) + sum(c.expect == RESULT for c in cases)  # the normal ones too
    wait_until(lambda: served.billed() >= before + answered, 20, f"{answered} records")
    time.sleep(0.5)  # a late record for a refusal would have drained by now
    assert served.billed() == before + answered
    assert module.metric("edge_module_errors_total", 'code="InternalError"') == 0
    assert "decode_crashed" not in module.log_tail()
    peak_kb = vm_kb(pid, "VmHWM")
    assert (peak_kb - steady_kb) / 1024 < 100, \
        f"peak RSS {peak_kb / 1024:.0f} MB vs steady {steady_kb / 1024:.0f} MB"
    assert module.ready()


def test_a_bool_byte_other_than_0_or_1_is_read_as_true(served: ServedRepository) -> None:
    """numpy keeps the byte 2 of a bool .npy as it is; onnxruntime's Cast made it 2.0."""
    flags = np.frombuffer(b"\x00\x01\x02", np.bool_)
    before = served.billed()
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = b"bool-byte-2"
    served.collector.publish("em/in/flag", npz(m=flags), properties=props)
    wait_until(lambda: any(r["id"] == "bool-byte-2" for r in served.collector.json(RESULTS)),
               15, "the bool answer")
    answer = next(r for r in served.collector.json(RESULTS) if r["id"] == "bool-byte-2")
    assert answer["results"][0]["outputs"][0]["data"] == [0.0, 1.0, 1.0]
    wait_until(lambda: served.billed() == before + 1, 20, "the answer billed")


def test_an_index_out_of_range_fails_its_own_request_not_its_batch(
        served: ServedRepository) -> None:
    """Token ids past the table make onnxruntime's Gather fail the whole batch: the
    requests batched with it are answered, each on its own; only it is refused."""
    before = served.billed()
    answered: list[str] = []
    for burst in range(3):
        for i in range(8):
            ids = [1, 2, 3] if i != 3 else [1, 10 ** 9, 3]
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = f"embed-{burst}-{i}".encode()
            served.collector.publish("em/in/embed", body({"ids": {"data": ids}}), qos=0,
                                     properties=props)
            if i != 3:
                answered.append(f"embed-{burst}-{i}")
    wait_until(lambda: sum(str(m["id"]).startswith("embed-") for m in
                           served.collector.json(RESULTS) + served.collector.json(ERRORS))
               == 24, 20, "24 answers")
    results = {r["id"]: r for r in served.collector.json(RESULTS)
               if str(r["id"]).startswith("embed-")}
    errors = {e["id"]: e["error"]["code"] for e in served.collector.json(ERRORS)
              if str(e["id"]).startswith("embed-")}
    assert errors == {f"embed-{burst}-3": "InferenceFailed" for burst in range(3)}
    assert sorted(results) == sorted(answered)
    assert all(r["results"][0]["outputs"][0]["data"] == [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
               for r in results.values())
    wait_until(lambda: served.billed() == before + len(answered), 20, "the answers billed")
    time.sleep(0.5)
    assert served.billed() == before + len(answered)


# -- OIP v2 over HTTP ---------------------------------------------------------------------

def post(module: Module, body: bytes, header_length: int | None = None
         ) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(header_length)}
    request = urllib.request.Request(
        f"http://127.0.0.1:{module.http_port}/v2/models/pair/infer", body, headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def tensor(name: str, datatype: str, shape: list[int], data: Any = None,
           size: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if size is None:
        out["data"] = data
    else:
        out["parameters"] = {"binary_data_size": size}
    return out


def binary(tensors: list[dict[str, Any]], blobs: bytes) -> tuple[bytes, int]:
    header = json.dumps({"inputs": tensors}).encode()
    return header + blobs, len(header)


def test_hostile_v2_http_requests_get_400s_and_no_records(served: ServedRepository) -> None:
    module = served.module
    a = tensor("a", "FP32", [1, 2], [1.0, 2.0])
    b = tensor("b", "INT64", [1, 2], [1, 2])
    fa, ib = np.ones(2, np.float32).tobytes(), np.ones(2, np.int64).tobytes()
    json_cases: dict[str, tuple[bytes, str]] = {
        "float-for-int64": (json.dumps({"inputs": [a, {**b, "data": [1.7, 2.9]}]}).encode(),
                            "TensorDtypeInvalid"),
        "int64-past-range": (json.dumps({"inputs": [a, {**b, "data": [2 ** 63, 1]}]}).encode(),
                             "TensorDtypeInvalid"),
        "strings-for-fp32": (json.dumps({"inputs": [{**a, "data": ["1", "nan"]}, b]}).encode(),
                             "TensorDtypeInvalid"),
        "null-data": (json.dumps({"inputs": [{**a, "shape": [1], "data": None},
                                             {**b, "shape": [1], "data": [1]}]}).encode(),
                      "TensorDtypeInvalid"),
        "ragged-data": (json.dumps({"inputs": [a, {**b, "data": [[1], [2, 3]]}]}).encode(),
                        "TensorDtypeInvalid"),
        "empty-shape-past-address-space": (json.dumps({"inputs": [
            {**a, "shape": [0, 1 << 62, 1 << 62], "data": []}, b]}).encode(),
            "TensorShapeMismatch"),
        "negative-shape": (json.dumps({"inputs": [{**a, "shape": [-1, 2]}, b]}).encode(),
                           "TensorShapeMismatch"),
        "bytes-for-numbers": (json.dumps({"inputs": [a, {**b, "datatype": "BYTES",
                                                          "data": ["aGk=", "aGk="]}]}).encode(),
                              "InputKindMismatch"),
        "tied-size-differs": (json.dumps({"inputs": [
            a, {**b, "shape": [1, 3], "data": [1, 2, 3]}]}).encode(), "TensorShapeMismatch"),
        "half-a-million-sizes": (json.dumps({"inputs": [{**a, "shape": [1] * 500_000},
                                                        b]}).encode(), "TensorShapeMismatch"),
        "megabyte-name": (json.dumps({"inputs": [a, {**b, "name": "n" * MB}]}).encode(),
                          "TensorNameMismatch"),
        "megabyte-datatype": (json.dumps({"inputs": [a, {**b, "datatype": "I" * MB}]}).encode(),
                              "TensorDtypeInvalid"),
        "three-inputs": (json.dumps({"inputs": [a, b, {**b, "name": "c"}]}).encode(),
                         "TensorNameMismatch"),
        "duplicate-input": (json.dumps({"inputs": [a, a]}).encode(), "TensorNameMismatch"),
        "no-inputs": (b'{"inputs": []}', "TensorNameMismatch"),
        "nested-100000": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                          "InvalidJson"),
        # 4 MB of empty lists: ~100 MB of Python objects if parsed
        "4mb-of-empty-lists": (b'{"inputs": [' + b"[]," * ((4 * MB) // 3) + b"[]]}",
                               "InvalidJson"),
    }
    # within the JSON limits (4 nodes each), each used to cost a copy of the binary part left
    many = [tensor("a", "FP32", [1], size=1)] + \
        [{"parameters": {"binary_data_size": 0}}] * 15_000
    binary_cases: dict[str, tuple[tuple[bytes, int], str]] = {
        "size-past-blobs": (binary([tensor("a", "FP32", [1, 2], size=8),
                                    tensor("b", "INT64", [1, 2], size=99)], fa + ib),
                            "InvalidRequest"),
        "sizes-short-of-blobs": (binary([tensor("a", "FP32", [1, 2], size=4),
                                         tensor("b", "INT64", [1, 2], size=16)], fa + ib),
                                 "InvalidRequest"),
        "negative-size": (binary([tensor("a", "FP32", [1, 2], size=-8),
                                  tensor("b", "INT64", [1, 2], size=16)], fa + ib),
                          "InvalidRequest"),
        "shape-vs-bytes": (binary([tensor("a", "FP32", [1, 3], size=8),
                                   tensor("b", "INT64", [1, 2], size=16)], fa + ib),
                           "TensorShapeMismatch"),
        "shape-product-overflows": (binary([tensor("a", "FP32", [1 << 62, 1 << 62, 4], size=8),
                                            tensor("b", "INT64", [1, 2], size=16)], fa + ib),
                                    "TensorShapeMismatch"),
        # 15,001 tensors over a 4 MB binary part
        "15000-inputs": (binary(many, b"\0" * (4 * MB)), "TensorNameMismatch"),
        "zero-length": (binary([tensor("a", "FP32", [1, 0], size=0),
                                tensor("b", "INT64", [1, 0], size=0)], b""),
                        "TensorShapeMismatch"),
    }
    # past maxShape (2048): 413, by the declared shape (the data is never read)
    past = np.zeros(2049, np.float32).tobytes(), np.zeros(2049, np.int64).tobytes()
    too_large: dict[str, tuple[bytes, int | None]] = {
        "past-max-shape-json": (json.dumps({"inputs": [
            tensor("a", "FP32", [1, 2049], [0.0] * 2049),
            tensor("b", "INT64", [1, 2049], [0] * 2049)]}).encode(), None),
        "past-max-shape-binary": binary([tensor("a", "FP32", [1, 2049], size=len(past[0])),
                                         tensor("b", "INT64", [1, 2049], size=len(past[1]))],
                                        past[0] + past[1]),
    }
    assert module.process is not None
    steady_kb = vm_kb(module.process.pid, "VmHWM")
    before = served.billed()
    got: dict[str, tuple[int, str]] = {}
    longest = 0
    for name, (payload, _) in json_cases.items():
        status, answer = post(module, payload)
        got[name] = (status, str(answer.get("code", "")))
        longest = max(longest, len(json.dumps(answer)))
    for name, ((payload, length), _) in binary_cases.items():
        status, answer = post(module, payload, length)
        got[name] = (status, str(answer.get("code", "")))
        longest = max(longest, len(json.dumps(answer)))
    for name, (payload, length) in too_large.items():
        status, answer = post(module, payload, length)
        got[name] = (status, str(answer.get("code", "")))
        assert "input a has size 2049" in answer["message"] and "at most 2048" in \
            answer["message"], answer
    want = {name: (400, code) for name, (_, code) in {**json_cases, **binary_cases}.items()}
    want |= {name: (413, "TensorTooLarge") for name in too_large}
    assert got == want
    assert longest < 2000  # no refusal echoes the request
    status, answer = post(module, *binary([tensor("b", "INT64", [1, 2], size=16),
                                           tensor("a", "FP32", [1, 2], size=8)], ib + fa))
    assert status == 200, answer
    assert {o["name"]: o["data"] for o in answer["outputs"]}["sum"] == [2.0, 2.0]
    wait_until(lambda: served.billed() == before + 1, 20, "the one answer billed")
    time.sleep(0.5)
    assert served.billed() == before + 1
    assert module.metric("edge_module_errors_total", 'code="InternalError"') == 0
    peak_kb = vm_kb(module.process.pid, "VmHWM")
    assert (peak_kb - steady_kb) / 1024 < 60, \
        f"peak RSS {peak_kb / 1024:.0f} MB vs {steady_kb / 1024:.0f} MB before"
    assert module.ready()


# -- OIP v2 over gRPC ---------------------------------------------------------------------

def test_hostile_v2_grpc_requests_get_coded_statuses_and_no_records(
        served: ServedRepository) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{served.grpc_port}")
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    spec = pb.ModelInferRequest.InferInputTensor
    fa, ib = np.ones(2, np.float32).tobytes(), np.ones(2, np.int64).tobytes()

    def call(inputs: list[Any], raw: list[bytes]) -> tuple[grpc.StatusCode, str]:
        request = pb.ModelInferRequest(model_name="pair", inputs=inputs,
                                       raw_input_contents=raw)
        try:
            stub.ModelInfer(request, timeout=20,
                            metadata=(("x-api-key", API_KEY),))
        except grpc.RpcError as exc:
            trailing = dict(exc.trailing_metadata() or ())  # type: ignore[attr-defined]
            return exc.code(), str(trailing.get("edge-module-code", ""))  # type: ignore[attr-defined]
        return grpc.StatusCode.OK, ""

    a = spec(name="a", datatype="FP32", shape=[1, 2])
    b = spec(name="b", datatype="INT64", shape=[1, 2])
    bad = grpc.StatusCode.INVALID_ARGUMENT
    cases = {
        "raw-count-short": ([a, b], [fa], "InvalidRequest"),
        "raw-count-long": ([a, b], [fa, ib, ib], "InvalidRequest"),
        "bytes-for-numbers": ([a, spec(name="b", datatype="BYTES", shape=[1, 2])], [fa, ib],
                              "InputKindMismatch"),
        "negative-shape": ([spec(name="a", datatype="FP32", shape=[-1, 2]), b], [fa, ib],
                           "TensorShapeMismatch"),
        "shape-product-overflows": ([spec(name="a", datatype="FP32", shape=[1 << 62, 1 << 62, 4]),
                                     b], [fa, ib], "TensorShapeMismatch"),
        "empty-shape-past-address-space": (
            [spec(name="a", datatype="FP32", shape=[0, 1 << 62, 1 << 62]), b], [b"", ib],
            "TensorShapeMismatch"),
        "raw-bytes-short": ([a, b], [fa, ib[:8]], "TensorShapeMismatch"),
        "tied-size-differs": ([a, spec(name="b", datatype="INT64", shape=[1, 1])],
                              [fa, ib[:8]], "TensorShapeMismatch"),
        "unknown-datatype": ([spec(name="a", datatype="FP8", shape=[1, 2]), b], [fa, ib],
                             "TensorDtypeInvalid"),
        "missing-input": ([a], [fa], "TensorNameMismatch"),
        "no-inputs": ([], [], "TensorNameMismatch"),
        "zero-length": ([spec(name="a", datatype="FP32", shape=[1, 0]),
                         spec(name="b", datatype="INT64", shape=[1, 0])], [b"", b""],
                        "TensorShapeMismatch"),
    }
    past = [spec(name="a", datatype="FP32", shape=[1, 4096]),
            spec(name="b", datatype="INT64", shape=[1, 4096])]
    before = served.billed()
    got = {name: call(inputs, raw) for name, (inputs, raw, _) in cases.items()}
    got["past-max-shape"] = call(past, [bytes(4 * 4096), bytes(8 * 4096)])
    assert got == {name: (bad, code) for name, (_, _, code) in cases.items()} | {
        "past-max-shape": (grpc.StatusCode.RESOURCE_EXHAUSTED, "TensorTooLarge")}
    assert call([a, b], [fa, ib]) == (grpc.StatusCode.OK, "")
    wait_until(lambda: served.billed() == before + 1, 20, "the one answer billed")
    time.sleep(0.5)
    assert served.billed() == before + 1
    assert served.module.metric("edge_module_errors_total", 'code="InternalError"') == 0
    channel.close()
