"""`grm-eval`: pairwise accuracy and reward statistics of a reward model on a preference file.

Works with any file `data.py` reads; RewardBench-format files (`prompt`/`chosen`/`rejected`/`subset`)
also get a per-subset table and RewardBench's section scores. Pairs are encoded with the model's
own `PromptRenderer` settings, as the server would encode them. The JSON result goes to stdout (or
`--output`), the table to stderr.

    $ grm-eval --model runs/tiny/checkpoints/step-0000024/model --data prefs.jsonl --output eval.json

    >>> import torch
    >>> stats = reward_stats(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0]), ["a", "b"])
    >>> stats["accuracy"], stats["subsets"]["a"]["accuracy"]
    (0.5, 1.0)
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch

from .core.checkpoint import load_grm
from .core.configtools import fail, parse_command
from .core.devices import DTYPES, DType, resolve_device
from .core.prompts import PromptRenderer
from .data import DataError, EncodedPair, collate_pairs, encode_pairs, read_pairs
from .losses import bt_loss, pairwise_accuracy

log = logging.getLogger(__name__)

# RewardBench (v1) sections: which subsets each one averages (weighted by pairs per subset).
REWARDBENCH_SECTIONS = {
    "chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "chat-hard": ("mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"),
    "safety": ("refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"),
    "reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: Sequence[EncodedPair], *, pad_id: int, batch_size: int = 16,
                device: torch.device | str = "cpu",
                autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and rejected responses, each (N,) float32 on the CPU.

    Calls the model's forward (no LM head without a response mask), so it also works on FSDP-wrapped
    models; the caller puts the model in eval mode.

    >>> r_c, r_r = score_pairs(model, dataset.pairs, pad_id=tokenizer.pad_token_id)   # doctest: +SKIP
    """
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], pad_id).to(device)
        with autocast():
            rewards = model(batch.input_ids, batch.attention_mask).rewards.float()  # (2B,)
        b = batch.num_pairs
        chosen.append(rewards[:b].cpu())
        rejected.append(rewards[b:].cpu())
    if not chosen:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(chosen), torch.cat(rejected)


def _moments(x: torch.Tensor) -> tuple[float, float]:
    if x.numel() == 0:
        return float("nan"), float("nan")
    return x.mean().item(), (x.std(unbiased=False).item() if x.numel() > 1 else 0.0)


def reward_stats(r_c: torch.Tensor, r_r: torch.Tensor, subsets: Sequence[str | None] | None = None) -> dict[str, Any]:
    """Accuracy, BT loss and mean/std of chosen, rejected and margin rewards; per subset when given."""
    margin = r_c - r_r  # (N,)
    out: dict[str, Any] = {"pairs": int(r_c.numel())}
    if r_c.numel():
        out["accuracy"] = pairwise_accuracy(r_c, r_r).item()
        out["loss"] = bt_loss(r_c, r_r).item()
    for name, x in (("chosen", r_c), ("rejected", r_r), ("margin", margin)):
        out[f"{name}_mean"], out[f"{name}_std"] = _moments(x)
    if subsets is not None and any(s is not None for s in subsets):
        table: dict[str, dict[str, Any]] = {}
        for name in sorted({s or "(none)" for s in subsets}):
            idx = torch.tensor([i for i, s in enumerate(subsets) if (s or "(none)") == name], dtype=torch.long)
            c, r = r_c[idx], r_r[idx]
            table[name] = {"pairs": int(idx.numel()), "accuracy": pairwise_accuracy(c, r).item(),
                           "margin_mean": (c - r).mean().item()}
        out["subsets"] = table
        sections = rewardbench_sections(table)
        if sections:
            out["sections"] = sections
    return out


def rewardbench_sections(subsets: dict[str, dict[str, Any]]) -> dict[str, float]:
    """RewardBench section scores from per-subset accuracies (only sections whose subsets appear).

    Chat, chat-hard and safety average their subsets weighted by pairs; reasoning averages math-prm
    with the pair-weighted hep-* (code) accuracy, as the RewardBench leaderboard does.
    """
    def weighted(names) -> float | None:
        rows = [subsets[n] for n in names if n in subsets]
        total = sum(r["pairs"] for r in rows)
        return sum(r["accuracy"] * r["pairs"] for r in rows) / total if total else None

    out: dict[str, float] = {}
    for section, names in REWARDBENCH_SECTIONS.items():
        if section == "reasoning":
            math, code = weighted(("math-prm",)), weighted([n for n in names if n.startswith("hep-")])
            parts = [p for p in (math, code) if p is not None]
            value = sum(parts) / len(parts) if parts else None
        else:
            value = weighted(names)
        if value is not None:
            out[section] = value
    if out:
        out["score"] = sum(out.values()) / len(out)
    return out


def format_table(stats: dict[str, Any]) -> str:
    """A plain-text table of the overall and per-subset accuracy."""
    lines = [f"{'subset':<28} {'pairs':>7} {'accuracy':>9} {'margin':>9}"]
    for name, row in stats.get("subsets", {}).items():
        lines.append(f"{name:<28} {row['pairs']:>7} {row['accuracy']:>9.4f} {row['margin_mean']:>9.4f}")
    for name, value in stats.get("sections", {}).items():
        lines.append(f"{'[' + name + ']':<28} {'':>7} {value:>9.4f}")
    lines.append(f"{'overall':<28} {stats['pairs']:>7} {stats.get('accuracy', float('nan')):>9.4f} "
                 f"{stats['margin_mean']:>9.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


@dataclass(kw_only=True)
class EvalRunConfig:
    """Everything `grm-eval` needs."""

    model: str
    """Reward-model checkpoint folder (any format `load_grm` reads)."""
    data: str
    """Preference file or folder (JSONL, JSON, parquet/arrow, `save_to_disk` folder)."""
    split: str = "test"
    """Split to read from dataset folders with several splits."""
    batch_size: int = 16
    """Pairs per forward pass."""
    max_tokens: int = 0
    """Longest prompt + response (0: the checkpoint's max_tokens)."""
    truncate: bool = True
    """Truncate too-long pairs by the documented policy (off: drop them)."""
    limit: int = 0
    """Evaluate at most this many rows (0: all)."""
    device: str = "auto"
    """cpu, cuda or auto."""
    dtype: DType = "fp32"
    """Weights dtype for scoring: fp32 or bf16."""
    output: str = ""
    """Write the JSON result here instead of stdout."""


def evaluate_checkpoint(cfg: EvalRunConfig) -> dict[str, Any]:
    """Load the checkpoint, read and encode the data, score it; the result as a JSON-able dict."""
    device = resolve_device(cfg.device)
    loaded = load_grm(cfg.model, dtype=DTYPES[cfg.dtype])
    model = loaded.model.to(device).eval()
    tok = loaded.tokenizer
    renderer = PromptRenderer(tok, use_chat_template=model.grm_config.chat_template)
    max_tokens = cfg.max_tokens or model.grm_config.max_tokens
    pairs, report = read_pairs(cfg.data, split=cfg.split, limit=cfg.limit or None)
    encoded = encode_pairs(pairs, renderer, report, max_tokens=max_tokens, truncate=cfg.truncate)
    r_c, r_r = score_pairs(model, encoded, pad_id=tok.pad_token_id, batch_size=cfg.batch_size, device=device)
    stats = reward_stats(r_c, r_r, [p.subset for p in encoded])
    return {"model": str(cfg.model), "format": loaded.format, "data": str(cfg.data), "max_tokens": max_tokens,
            "report": report.to_json(), **stats}


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command(EvalRunConfig, argv, prog="grm-eval", description=__doc__.split("\n\n")[0])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        result = evaluate_checkpoint(cfg)
    except (DataError, ValueError, OSError) as exc:  # CheckpointError, DeviceError are ValueErrors
        return fail("grm-eval", exc)
    print(f"{result['report']['source']}: {result['report']['rows']} rows, {result['report']['kept']} kept, "
          f"dropped {result['report']['dropped']}", file=sys.stderr)
    print(format_table(result), file=sys.stderr)
    text = json.dumps(result, indent=2, sort_keys=True)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
