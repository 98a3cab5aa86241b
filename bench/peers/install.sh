#!/usr/bin/env bash
# Install the peer benchmark's load generator and peer servers into .cache/peers/
# (outside git, outside the module's venv and locks). Idempotent: each part has a
# stamp file and is skipped once installed. Run by `make bench-peers`; by hand:
#   bench/peers/install.sh [PYTHON]
#
# What it installs (see bench/README.md, "Peers"):
#   perf_analyzer   from the tritonclient==2.51.0 manylinux wheel (the PyPI
#                   `perf-analyzer` is a placeholder; later wheels need a newer glibc
#                   than Debian 12's), with libcudart.so.12 from the
#                   nvidia-cuda-runtime-cu12 wheel and libb64.so.0d from apt libb64-0d
#   triton/         venv: nvidia-pytriton==0.7.0 (stock tritonserver 2.51 + python
#                   backend inside the wheel) + onnxruntime
#   kserve/         venv: kserve==0.21.0 + onnxruntime
#   mlserver/       venv: mlserver==1.7.1 + onnxruntime (uvloop<0.22: later uvloop
#                   breaks MLServer 1.7's event-loop set-up)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${1:-${PYTHON:-python3}}"
ROOT="${PEERS_CACHE:-$REPO/.cache/peers}"
DL="$ROOT/downloads"
PIP_FLAGS=(--quiet --disable-pip-version-check)
# The module's own onnxruntime, so every peer runs the same kernels as the bare loop.
ORT="$(grep -i '^onnxruntime==' "$REPO/requirements.lock" || echo onnxruntime)"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

mkdir -p "$ROOT" "$DL"
log() { echo "peers: $*"; }

# -- perf_analyzer ------------------------------------------------------------
if [ ! -f "$ROOT/perf_analyzer/.installed" ]; then
  log "perf_analyzer from tritonclient==2.51.0 (manylinux wheel)"
  rm -rf "$ROOT/perf_analyzer" "$DL/pa"; mkdir -p "$ROOT/perf_analyzer/bin" "$ROOT/perf_analyzer/lib" "$DL/pa"
  "$PY" -m pip download "${PIP_FLAGS[@]}" --no-deps --only-binary=:all: \
      --platform manylinux1_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --python-version 3.11 'tritonclient==2.51.0' nvidia-cuda-runtime-cu12 -d "$DL/pa"
  "$PY" - "$DL/pa" "$ROOT/perf_analyzer" <<'PYEOF'
import sys, zipfile, pathlib, os
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
found = {"perf_analyzer": False, "libcudart.so.12": False}
for wheel in src.glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if name.endswith("bin/perf_analyzer") and not found["perf_analyzer"]:
                (dst / "bin" / "perf_analyzer").write_bytes(z.read(name))
                os.chmod(dst / "bin" / "perf_analyzer", 0o755)
                found["perf_analyzer"] = True
            elif base == "libcudart.so.12":
                (dst / "lib" / base).write_bytes(z.read(name))
                found[base] = True
missing = [k for k, v in found.items() if not v]
if missing:
    sys.exit(f"peers: not found in the downloaded wheels: {missing}")
PYEOF
  touch "$ROOT/perf_analyzer/.installed"
fi
# (grep without -q reads all of ldconfig's output: no SIGPIPE failure under pipefail)
if ! ldconfig -p | grep 'libb64.so.0d' >/dev/null; then
  log "apt-get install libb64-0d (perf_analyzer links libb64.so.0d)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq libb64-0d >/dev/null
fi

# -- peer venvs -----------------------------------------------------------------
# Each venv is pinned by bench/peers/locks/NAME.txt (its `pip freeze` from a run
# that worked, CPython 3.11 on linux x86_64), used as constraints; to refresh one,
# delete the lock, run this script, then `.cache/peers/NAME/bin/pip freeze > lock`.
venv() {  # venv NAME PACKAGE...
  local name="$1"; shift
  local dir="$ROOT/$name" lock="$REPO/bench/peers/locks/$name.txt" stamp
  local constraints=()
  [ -f "$lock" ] && constraints=(-c "$lock")
  stamp="$dir/.installed-$( (echo "$* $PY"; cat "$lock" 2>/dev/null) | sha256sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  log "venv $name: $*"
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install "${PIP_FLAGS[@]}" "${constraints[@]}" "$@"
  touch "$stamp"
}
venv triton 'nvidia-pytriton==0.7.0' "$ORT" numpy
venv kserve 'kserve==0.21.0' "$ORT" numpy
venv mlserver 'mlserver==1.7.1' 'uvloop<0.22' "$ORT" numpy

log "ready in $ROOT"
