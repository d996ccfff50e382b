"""bench/ppo_gold: the gold reward of a grm-ppo run's initial and final policy, with more samples
than the run's own evaluations. Prints JSON.

Not a test. Rebuilds the run's trainer from its config.json twice: once without a checkpoint (the
initial policy: LoRA adapters start at zero, so it is the base model) and once from the newest
checkpoint, and evaluates both on the same held-out prompts: greedy, and `--samples` sampled
responses per prompt from seed `--seed` (not the run's evaluation seed). The difference is paired
(same prompt, same sample index), and its standard error is over prompts.

    python bench/ppo_gold.py --run_dir runs/ppo-real --samples 4
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

from grmserve.training.core.configtools import from_dict
from grmserve.training.ppo.config import PPOConfig
from grmserve.training.ppo.trainer import PPOTrainer
from grmserve.training.trainer import latest_checkpoint


def mean_sem(xs: list[float]) -> tuple[float, float]:
    t = torch.tensor(xs, dtype=torch.float64)
    return t.mean().item(), (t.std() / math.sqrt(len(t))).item()


def per_prompt(values: list[float], prompts: int, repeats: int) -> list[float]:
    """Average the repeats of each prompt (values are ordered repeat-major)."""
    return [sum(values[r * prompts + i] for r in range(repeats)) / repeats for i in range(prompts)]


def evaluate(cfg: PPOConfig, run_dir: Path, resume: bool) -> tuple[dict, int]:
    cfg.run_dir, cfg.resume = str(run_dir), resume
    trainer = PPOTrainer(cfg)
    try:
        return trainer.evaluate(), trainer.step
    finally:
        trainer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run_dir", required=True)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=99)
    ap.add_argument("--prompts", type=int, default=0, help="held-out prompts (0: the run's eval.prompts)")
    args = ap.parse_args()
    run = Path(args.run_dir)
    if latest_checkpoint(run / "checkpoints") is None:
        raise SystemExit(f"{run} has no checkpoint")
    base = json.loads((run / "config.json").read_text())

    def config() -> PPOConfig:
        cfg = from_dict(PPOConfig, base)
        cfg.eval.samples, cfg.eval.seed = args.samples, args.seed
        cfg.eval.prompts = args.prompts or cfg.eval.prompts
        cfg.eval.every = max(1, cfg.eval.every)
        return cfg

    with tempfile.TemporaryDirectory() as tmp:
        initial, _ = evaluate(config(), Path(tmp) / "initial", resume=False)
    saved = (run / "config.json").read_text()
    try:
        final, step = evaluate(config(), run, resume=True)
    finally:
        (run / "config.json").write_text(saved)  # the trainer rewrites it with this bench's eval settings
    n = config().eval.prompts
    out = {"bench": "ppo_gold", "run_dir": str(run), "final_step": step, "prompts": n, "samples": args.samples,
           "seed": args.seed}
    for mode, repeats in (("greedy", 1), ("sampled", args.samples)):
        a, b = initial[f"gold_{mode}_each"], final[f"gold_{mode}_each"]
        n_prompts = len(a) // repeats
        pa, pb = per_prompt(a, n_prompts, repeats), per_prompt(b, n_prompts, repeats)
        ma, sa = mean_sem(pa)
        mb, sb = mean_sem(pb)
        md, sd = mean_sem([y - x for x, y in zip(pa, pb)])
        out[mode] = {"initial": ma, "initial_sem": sa, "final": mb, "final_sem": sb, "diff": md, "diff_sem": sd,
                     "initial_tokens": initial[f"response_tokens_{mode}"],
                     "final_tokens": final[f"response_tokens_{mode}"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
