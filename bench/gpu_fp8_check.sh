#!/usr/bin/env bash
# FP8 training checks on a CUDA GPU (compute capability >= 8.9), run with the machine's own Python and
# torch, nothing installed: the GPU tests of tests/fp8 (`-m gpu`), the FP8 training linear against
# bf16 and fp32 nn.Linear at three shapes, and bench/fp8_train.py on SmolLM2-135M's
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
# The GPU tests only: the CPU-side ones need the model files and this project's torch pin.
"$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" -m gpu tests/fp8 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -8
for shape in "8192 4096 4096" "8192 4096 14336" "4096 576 1536"; do  # tokens, in, out
  set -- $shape
  "$PY" bench/fp8_train_linear.py --device cuda --tokens "$1" --in-features "$2" --out-features "$3" --runs 30 \
    --recipes delayed block > "$OUT/linear_$1_$2_$3.json" 2> "$OUT/linear_$1_$2_$3.err" || tail -3 "$OUT/linear_$1_$2_$3.err"
done
"$PY" bench/fp8_train.py --device cuda --random_init --steps 12 --pairs 16 --tokens 512 \
  --modes fp32,bf16,fp8-o1,fp8-o2,fp8-o2-fp16 > "$OUT/fp8_train_cuda.json" \
  2> "$OUT/fp8_train_cuda.err"; tail -3 "$OUT/fp8_train_cuda.err"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
import glob
for path in sorted(glob.glob(f"{out}/*.json")):
    name = path.rsplit("/", 1)[-1][:-5]
    try:
        d = json.load(open(path))
    except Exception as e:
        print(name, "unreadable:", e); continue
    if "results" in d:
        for r in d["results"]:
            print(name, r["mode"], r["step_s_median"], r.get("step_time_vs_fp32"), r.get("memory_vs_bf16_amp"), r.get("peak_mib"))
    else:
        print(name, json.dumps({k: v for k, v in d.items() if k in ("step_ms", "ratio_vs_bf16")}))
PYEOF
