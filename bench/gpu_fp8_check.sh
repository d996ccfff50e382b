#!/usr/bin/env bash
# FP8 training checks on a CUDA GPU (compute capability >= 8.9), run with the machine's own Python and
# torch, nothing installed, in order of importance, each stage under its own time limit:
#   1. the GPU tests of tests/fp8 (`-m gpu`);
#   2. bench/fp8_train.py on SmolLM2-135M's architecture (random weights: no model files needed) with
#      the FP8 passes compiled (precision.fp8_fuse auto = on for CUDA), one extra profiled step per mode;
#   3. the same with the eager FP8 passes (fp8_fuse off), fp32 again as the baseline of that run;
#   4. the FP8 training linear against bf16 and fp32 nn.Linear at three shapes.
# Results: $OUT (default /tmp/gpu-fp8): the two step-time JSONs, the pytest log, and gpu_fp8.tgz with
# everything (profiles, linear benches, logs). A short table is printed last. On an H100 (2026-11-26)
# the stages took about 45 s, 200 s (five modes), over 150 s (three modes: the eager O2 did not finish)
# and 60 s: with a 15-minute device budget, run a subset (second example) and give the machine back.
#
#   bash bench/gpu_fp8_check.sh            # PY=python3 by default
#   STEPS=8 TESTS="fused or o2" FUSED_MODES=fp32,fp8-o1 EAGER_MODES=fp32,fp8-o1 LINEAR=0 bash bench/gpu_fp8_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu-fp8}"
PY="${PY:-python3}"
STEPS="${STEPS:-8}"
TESTS="${TESTS:-}"  # a pytest -k filter for the GPU tests
FUSED_MODES="${FUSED_MODES:-fp32,bf16,fp8-o1,fp8-o2,fp8-o2-fp16}"
EAGER_MODES="${EAGER_MODES:-fp32,fp8-o1,fp8-o2}"
LINEAR="${LINEAR:-1}"
mkdir -p "$OUT"
work="$(mktemp -d)"
ns="$(mktemp -d)"  # the four top-level folders as the `grmserve` namespace, without pip
mkdir -p "$ns/grmserve"
for d in server protos training clients; do ln -s "$PWD/$d" "$ns/grmserve/$d"; done
export PYTHONPATH="$ns:$PWD/bench" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$work/gpu.txt"
"$PY" -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'capability', torch.cuda.get_device_capability())" | tee -a "$work/gpu.txt"

echo "== 1. GPU tests"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" -m gpu ${TESTS:+-k "$TESTS"} tests/fp8 > "$work/pytest_gpu.txt" 2>&1
tail -12 "$work/pytest_gpu.txt"; cp "$work/pytest_gpu.txt" "$OUT/"

train() {  # name, timeout, extra args
  local name="$1" limit="$2"; shift 2
  timeout "$limit" "$PY" bench/fp8_train.py --device cuda --random_init --steps "$STEPS" --pairs 16 --tokens 512 \
    "$@" > "$work/$name.json" 2> "$work/$name.err"
  tail -3 "$work/$name.err"; cp "$work/$name.json" "$OUT/" 2>/dev/null
}
echo "== 2. SmolLM2-135M steps, FP8 passes compiled"
train fp8_train_cuda 220 --modes "$FUSED_MODES" --fp8_fuse auto --profile "$work/profiles"
echo "== 3. SmolLM2-135M steps, FP8 passes eager (not profiled: tracing ~50k launches outlasts the stage)"
train fp8_train_cuda_unfused 150 --modes "$EAGER_MODES" --fp8_fuse off

echo "== 4. one linear layer"
[ "$LINEAR" = 1 ] && for shape in "8192 4096 4096" "8192 4096 14336" "16384 576 1536"; do  # tokens, in, out
  set -- $shape
  timeout 30 "$PY" bench/fp8_train_linear.py --device cuda --tokens "$1" --in-features "$2" --out-features "$3" --runs 30 \
    --recipes delayed > "$work/linear_$1_$2_$3.json" 2> "$work/linear_$1_$2_$3.err" || tail -3 "$work/linear_$1_$2_$3.err"
done

tar czf "$OUT/gpu_fp8.tgz" -C "$work" .
"$PY" - "$work" <<'PYEOF'
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
    name = path.rsplit("/", 1)[-1][:-5]
    try:
        d = json.load(open(path))
    except Exception as e:
        print(name, "unreadable:", e); continue
    if "results" in d:
        for r in d["results"]:
            print(name, r["mode"], r.get("error") or (r["step_s_median"], r.get("step_time_vs_fp32"),
                  r.get("memory_vs_bf16_amp"), r.get("peak_mib"), r.get("kernels_per_step")))
    else:
        print(name, json.dumps({k: v for k, v in d.items() if k in ("step_ms", "ratio_vs_bf16")}))
PYEOF
