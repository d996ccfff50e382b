#!/usr/bin/env bash
# FP8 training checks on a CUDA GPU (compute capability >= 8.9), run with the machine's own Python and
# torch, nothing installed: the FP8 tests (the CUDA ones run here instead of skipping), the FP8
# training linear against bf16 nn.Linear at two shapes, and bench/fp8_train.py on SmolLM2-135M's
# architecture (random weights: no model files needed). Results go to $OUT (default /tmp/gpu-fp8).
#
#   bash bench/gpu_fp8_check.sh            # PY=python3 by default
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-fp8}"
PY="${PY:-python3}"
mkdir -p "$OUT"
ns="$(mktemp -d)"  # the four top-level folders as the `grmserve` namespace, without pip
mkdir -p "$ns/grmserve"
for d in server protos training clients; do ln -s "$PWD/$d" "$ns/grmserve/$d"; done
export PYTHONPATH="$ns:$PWD/bench" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'capability', torch.cuda.get_device_capability())" | tee -a "$OUT/gpu.txt"
"$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" tests/fp8 2>&1 | tee "$OUT/pytest_fp8.txt" | tail -20
"$PY" bench/fp8_train_linear.py --device cuda --tokens 8192 --in-features 4096 --out-features 4096 --runs 20 \
  --recipes delayed block > "$OUT/linear_4096.json" 2> "$OUT/linear_4096.err"; tail -3 "$OUT/linear_4096.err"
"$PY" bench/fp8_train_linear.py --device cuda --tokens 4096 --in-features 576 --out-features 1536 --runs 20 \
  --no-fused > "$OUT/linear_smollm2.json" 2> "$OUT/linear_smollm2.err"; tail -3 "$OUT/linear_smollm2.err"
"$PY" bench/fp8_train.py --device cuda --random_init --steps 12 --pairs 16 --tokens 512 > "$OUT/fp8_train_cuda.json" \
  2> "$OUT/fp8_train_cuda.err"; tail -3 "$OUT/fp8_train_cuda.err"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
for name in ("linear_4096", "linear_smollm2", "fp8_train_cuda"):
    try:
        d = json.load(open(f"{out}/{name}.json"))
    except Exception as e:
        print(name, "missing:", e); continue
    if "results" in d:
        for r in d["results"]:
            print(name, r["mode"], r["step_s_median"], r.get("step_time_vs_fp32"), r.get("memory_vs_bf16_amp"), r.get("peak_mib"))
    else:
        print(name, json.dumps({k: v for k, v in d.items() if k.startswith("ratio") or k == "sqnr_db_vs_fp32"}))
PYEOF
