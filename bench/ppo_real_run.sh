#!/usr/bin/env bash
# The measured grm-ppo run (README "PPO"): SmolLM2-135M-Instruct + LoRA, scored by the default GRM
# served by grm-serve with no model flags. Resumable: run it again and it continues from the newest
# checkpoint in its run folder. ~35-45 min on 2 CPU cores for 36 steps.
#
#   nohup bash bench/ppo_real_run.sh > runs/ppo-real.log 2>&1 &
#   SEED=1 STEPS=24 RUN_DIR=runs/ppo-real-seed1 PORT=50774 bash bench/ppo_real_run.sh   # another seed
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-50773}"
SEED="${SEED:-0}"
STEPS="${STEPS:-36}"
RUN_DIR="${RUN_DIR:-runs/ppo-real}"
mkdir -p "$(dirname "$RUN_DIR")"
.venv/bin/grm-serve --server.port "$PORT" --server.metrics_port -1 --server.host 127.0.0.1 > "$RUN_DIR-serve.log" 2>&1 &
SP=$!
trap 'kill $SP' EXIT
.venv/bin/grm-ppo --preset smollm2 --reward.address "127.0.0.1:$PORT" --run_dir "$RUN_DIR" --seed "$SEED" \
  --steps "$STEPS" --rollout.batch_size 16 --rollout.chunk_size 8 --rollout.max_new_tokens 48 \
  --optim.lr 2e-4 --kl.coef 0.05 --eval.every 12 --eval.prompts 64 --eval.samples 1 \
  --checkpoint.every 4 --log.progress false --resume
