"""bench/ppo_seeds: held-out gold reward of several grm-ppo runs (one per seed), from their own
metrics.jsonl evaluations. Prints JSON.

Not a test. Every run evaluates the same held-out prompts with the same evaluation seed, so the
change from step 0 is paired per prompt. Per step, for greedy and sampled responses: each run's
paired change (mean over prompts and its standard error), then over runs the mean change, its
standard deviation across runs (the run-to-run spread) and the smallest change of any run; plus the
KL to the reference at that step.

    python bench/ppo_seeds.py runs/ppo-real runs/ppo-seeds/seed1 runs/ppo-seeds/seed2 --steps 12 24
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_metrics(run: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(evaluations by step, training steps by step) of one run."""
    evals, steps = {}, {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            m = json.loads(line)
            (evals if m.get("split") == "eval" else steps)[m["step"]] = m
    return evals, steps


def paired_change(before: list[float], after: list[float]) -> tuple[float, float]:
    """Mean per-prompt change and its standard error over prompts."""
    diffs = [b - a for a, b in zip(before, after, strict=True)]
    return statistics.fmean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5


def summarise(runs: list[Path], steps: list[int]) -> dict:
    logs = {str(r): read_metrics(r) for r in runs}
    out: dict = {"bench": "ppo_seeds", "runs": {}, "steps": {}}
    for name, (evals, train) in logs.items():
        cfg = json.loads((Path(name) / "config.json").read_text())
        out["runs"][name] = {"seed": cfg.get("seed"), "evaluated_steps": sorted(evals), "prompts": evals[0]["prompts"]}
    for step in steps:
        entry: dict = {}
        for mode in ("greedy", "sampled"):
            per_run = {}
            for name, (evals, _) in logs.items():
                if step not in evals:
                    raise SystemExit(f"{name} has no evaluation at step {step} (it has {sorted(evals)})")
                change, sem = paired_change(evals[0][f"gold_{mode}_each"], evals[step][f"gold_{mode}_each"])
                per_run[name] = {"initial": evals[0][f"gold_{mode}"], "final": evals[step][f"gold_{mode}"],
                                 "change": change, "change_sem": sem}
            changes = [r["change"] for r in per_run.values()]
            entry[mode] = {"runs": per_run, "mean_change": statistics.fmean(changes),
                           "spread_across_runs": statistics.stdev(changes) if len(changes) > 1 else 0.0,
                           "min_change": min(changes)}
        entry["kl"] = {name: train[step]["kl"] for name, (_, train) in logs.items() if step in train}
        out["steps"][str(step)] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="grm-ppo run folders (one per seed)")
    ap.add_argument("--steps", nargs="+", type=int, required=True, help="evaluated steps to compare with step 0")
    args = ap.parse_args()
    print(json.dumps(summarise(args.runs, args.steps), indent=2))


if __name__ == "__main__":
    main()
