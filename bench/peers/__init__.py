"""The peer benchmark (issue 14, "Benchmark"): edge-module's OIP v2 endpoint against
stock Triton, KServe and MLServer, driven by Triton's ``perf_analyzer``.

Run by ``make bench-peers`` (or ``python -m bench.peers [--quick]``); ``bench.run``
can call :func:`bench.peers.run.peers_bench`. Everything runs on the main thread of
the harness process; every peer is a child process on 127.0.0.1, and every load is
bounded in time. The peers and the load generator are installed into
``.cache/peers/`` by ``bench/peers/install.sh`` (outside git and outside the
module's venv and locks).

Modules:
    data       the input tensors (real images through the module's own codec), the
               ``--input-data`` JSON and the bare ``session.run`` loop (the limit)
    perf       runs ``perf_analyzer`` for one point and parses its CSV
    servers    start/stop of every peer and the edge-module slot
    run        the sweep, the table (markdown + JSON under bench/results/)
    triton_model.py, kserve_launcher.py, mlserver_launcher.py
               run inside the peers' own venvs, never imported here
"""
