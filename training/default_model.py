"""The embedded default reward model that `grm-serve` serves when given no checkpoint.

Interim recipe (until the GRM experiment of the training work picks its best checkpoint):
SmolLM2-135M-Instruct as the backbone, frozen, with an mlp reward head trained by Bradley-Terry
on the bundled instruction-following preferences (training/synthetic_prefs.py). The hidden states
are computed once, so building it takes a few minutes on 2 CPU cores, on first use only; the test
split uses topics held out of training. The result is a normal `grm` checkpoint in the cache.

    $ python -m grmserve.training.default_model      # build (if needed) and print the folder
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import assets
from .model import GRMConfig, GRMModel, HeadConfig, RewardHead, pool_last, save_grm
from .synthetic_prefs import TOPICS, make_pairs
from .templates import PromptRenderer

log = logging.getLogger(__name__)

NAME = "grm-smollm2-135m-default"
VERSION = "synthetic-v1"
FOLDER = f"{NAME}-{VERSION}"
HELD_OUT_TOPICS = ["penguins", "trains", "chess"]
TRAIN_PAIRS = 360
TEST_PAIRS = 120


@torch.inference_mode()
def _features(lm, renderer: PromptRenderer, rows: list[dict], desc: str, batch_tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-token hidden states (N, H) for chosen and rejected responses."""
    seqs = []
    for row in rows:
        g = renderer.encode(row["prompt"], [row["chosen"], row["rejected"]], max_tokens=2048)
        seqs += [g.prompt_ids + r for r in g.response_ids]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), lm.config.hidden_size)
    backbone = lm.get_decoder()
    i = 0
    with tqdm(total=len(seqs), desc=desc, unit="seq") as bar:
        while i < len(order):
            n = max(1, batch_tokens // len(seqs[order[min(i + 31, len(order) - 1)]]))
            idx = order[i:i + min(n, 32)]
            longest = max(len(seqs[j]) for j in idx)
            ids = torch.zeros(len(idx), longest, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for k, j in enumerate(idx):
                ids[k, :len(seqs[j])] = torch.tensor(seqs[j])
                mask[k, :len(seqs[j])] = 1
            hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, H)
            out[idx] = pool_last(hidden, mask).float()
            i += len(idx)
            bar.update(len(idx))
    return out[0::2], out[1::2]  # chosen (N, H), rejected (N, H)


def _train_head(head: RewardHead, chosen: torch.Tensor, rejected: torch.Tensor, steps: int = 400, seed: int = 0) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    n = chosen.shape[0]
    head.train()
    for _ in range(steps):
        idx = torch.randint(0, n, (min(128, n),))
        margin = head(chosen[idx]) - head(rejected[idx])  # (B,)
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()


def _accuracy(head: RewardHead, chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(chosen) > head(rejected)).float().mean())


def build_default_model(out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    base = assets.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(base)
    # Stored in bf16 (half the disk); features come from the same bf16-rounded weights, computed in
    # fp32 (bf16 matmuls are ~100x slower than fp32 on CPUs without native bf16).
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    renderer = PromptRenderer(tok)
    train_topics = [t for t in sorted(TOPICS) if t not in HELD_OUT_TOPICS]
    train = make_pairs(TRAIN_PAIRS, seed=1, topics=train_topics)
    test = make_pairs(TEST_PAIRS, seed=2, topics=HELD_OUT_TOPICS)
    tr_c, tr_r = _features(lm, renderer, train, "default model: train features")
    te_c, te_r = _features(lm, renderer, test, "default model: test features")
    random.seed(0)
    head = RewardHead(lm.config.hidden_size, HeadConfig(type="mlp"))
    _train_head(head, tr_c, tr_r)
    stats = {"train_accuracy": _accuracy(head, tr_c, tr_r), "heldout_topic_accuracy": _accuracy(head, te_c, te_r),
             "train_pairs": len(train), "test_pairs": len(test), "build_seconds": round(time.perf_counter() - start, 1)}
    grm = GRMConfig(head=HeadConfig(type="mlp"), model_name=NAME, model_version=VERSION, max_tokens=2048)
    save_grm(GRMModel(lm.to(torch.bfloat16), head, grm), tok, out)
    (out / "default-model.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("default reward model: %s", stats)
    return stats


def ensure_default_model() -> Path:
    """The default model's folder, built on first use (a few minutes on 2 cores)."""
    with assets._locked("default-model") as root:
        final = root / FOLDER
        if (final / "default-model.json").is_file():
            return final
        log.info("building the default reward model in %s (first run only; a few minutes)", final)
        build_default_model(final)
        return final


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = ensure_default_model()
    print(path)
    print((path / "default-model.json").read_text())
