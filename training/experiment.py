"""`grm-experiment`: the GRM paper's comparison on the bundled benchmark, sized for a CPU.

Baseline Bradley-Terry vs GRM with the SFT regulariser vs GRM with the DPO-without-reference
regulariser (and GRM-DPO with a frozen reference, if asked), each with clean labels and with a
fraction of the training labels flipped; in-distribution and out-of-distribution pairwise accuracy.

How it fits on two CPU cores: the backbone is cut at layer L-K. The lower L-K layers stay frozen,
so their output for every distinct prompt + response is computed once and cached on disk (each
prompt runs once and its KV cache serves all its responses, as in the server's ScoreCandidates).
Every configuration then trains only the top K layers (LoRA adapters by default, or all their
weights) and the reward head on the cached states; the final norm and the LM head (tied to the
embeddings in SmolLM2) stay frozen, so the regulariser's gradient reaches the hidden state the
reward head reads through the top layers, as in full GRM training. The top-K model is an ordinary
`GRMModel` fed `inputs_embeds`, trained with the trainer's own loss (`components.compute_loss`).

    $ grm-experiment --out runs/grm-experiment                # all configurations; resumable
    $ grm-experiment --out runs/grm-experiment --methods bt,grm-sft --noise 0.25
    $ grm-experiment --out runs/grm-experiment --export grm-sft-noise0.00 --export_to DIR

Each finished configuration writes `results/<name>.json` and its trained parameters; a re-run skips
what is done, so a killed run loses at most the configuration in progress. `results.md` holds the
table. `--export NAME` writes the small artifact (LoRA factors + reward head) that
`training/core/default_model.py` turns into the default checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import components
from .components import (
    MetricsLog,
    TrainStep,
    adamw_factory,
    add_lora,
    build_reference,
    build_scheduler,
    compute_loss,
    progress,
)
from .config import FP8_MODES, LoraConfig, PrecisionMode, TrainConfig
from .core.batching import pad_right, plan_batches
from .core.configtools import fail, interrupted, parse_command
from .core.default_model import ARTIFACT_FORMAT
from .core.fp8.convert import install_fp8_weights
from .core.fp8.scaling import TrainingRecipeName, get_training_recipe
from .core.fp8.training_linear import FP8TrainingLinear, export_fp8_weights
from .core.model import GRMConfig, GRMModel, HeadConfig, RewardHead
from .core.prompts import PromptRenderer
from .data import EncodedPair, PairBatch, collate_pairs, encode_pairs, read_pairs
from .losses import DEFAULT_ALPHA
from .precision import apply_precision

log = logging.getLogger(__name__)

METHODS = {"bt": "none", "grm-sft": "sft", "grm-sft-nll": "sft-nll", "grm-dpo-noref": "dpo-noref", "grm-dpo": "dpo"}
"""Experiment method -> the trainer's `loss.regulariser`."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(kw_only=True)
class ExperimentConfig:
    """Everything `grm-experiment` needs; the defaults are the run reported in docs/experiment.md."""

    out: str = "runs/grm-experiment"
    """Run folder: cached features, logs, per-configuration results and parameters, results.md."""
    backbone: str = "smollm2"
    """`smollm2` (SmolLM2-135M-Instruct), `tiny` (random tiny Llama, for tests), or a local HF causal-LM folder."""
    tiny_layers: int = 3
    """Decoder layers of the `tiny` backbone."""
    data_dir: str = ""
    """Benchmark folder with train/test_id/test_ood files (empty: the bundled benchmark)."""
    top_layers: int = 3
    """K: decoder layers trained on top of the frozen, cached lower layers."""
    lora_r: int = 32
    """LoRA rank on every linear layer of the top K layers (0: train all their weights)."""
    lora_alpha: int = 64
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    head: HeadConfig = field(default_factory=lambda: HeadConfig(type="mlp"))
    """Reward head."""
    train_prompts: int = 256
    """Train-split prompts whose pairs are used (about 6 pairs each; 0: all 1500)."""
    test_prompts: int = 0
    """Prompts per test split (0: all 300, i.e. 1200 pairs each)."""
    max_tokens: int = 256
    """Longest prompt + response in tokens (longer pairs are truncated by the templates' policy)."""
    methods: list[str] = field(default_factory=lambda: ["bt", "grm-sft", "grm-dpo-noref"])
    """Methods to run: bt, grm-sft, grm-sft-nll, grm-dpo-noref, grm-dpo."""
    noise: list[float] = field(default_factory=lambda: [0.0, 0.25])
    """Fractions of training labels flipped; one configuration per method and fraction."""
    epochs: int = 1
    """Passes over the training pairs."""
    batch_size: int = 16
    """Pairs per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate of the top layers (LoRA factors or weights)."""
    head_lr: float = 1e-3
    """Peak learning rate of the reward head."""
    warmup_ratio: float = 0.1
    """Fraction of the steps spent warming up linearly; cosine decay to 10 % after."""
    clip: float = 1.0
    """Gradient-norm clipping."""
    alpha: float = DEFAULT_ALPHA
    """GRM mix: alpha * regulariser + (1 - alpha) * BT."""
    beta: float = 0.1
    """Temperature of the regularisers."""
    seed: int = 0
    """Seed of the prompt sample, label flips, head init and batch order."""
    precision: PrecisionMode = "fp32"
    """Training precision of the top layers (the precision plan of grm-train): fp32, bf16, fp8-o1, fp8-o2.
    FP8 trains the top layers' own weights: use it with --lora_r 0."""
    fp8_recipe: TrainingRecipeName = "delayed"
    """FP8 scaling recipe for the fp8 precisions: delayed, current or block."""
    feature_tokens: int = 4096
    """Token budget of one frozen-layer pass while caching features."""
    export: str = ""
    """Instead of running: write the artifact of this finished configuration (e.g. grm-sft-noise0.00)."""
    export_to: str = ""
    """Folder for `export` (default: <out>/export/<name>)."""


# ---------------------------------------------------------------------------------------------
# Splitting a causal LM at layer L-K


def split_lm(lm: nn.Module, top_layers: int) -> tuple[nn.Module, nn.Module]:
    """(lower, upper): `lower` is the decoder with its first L-K layers and no final norm (it
    returns the residual stream entering layer L-K); `upper` is a causal LM of the last K layers,
    the final norm and the LM head, to be fed `inputs_embeds`. Both share nothing with `lm`."""
    layers = lm.get_decoder().layers
    n = len(layers)
    if not 1 <= top_layers < n:
        raise ValueError(f"top_layers must be in [1, {n - 1}] for a {n}-layer backbone, got {top_layers}")
    upper = copy.deepcopy(lm)
    lower = copy.deepcopy(lm.get_decoder())
    upper.get_decoder().layers = nn.ModuleList(list(upper.get_decoder().layers)[n - top_layers:])
    lower.layers = nn.ModuleList(list(lower.layers)[: n - top_layers])
    lower.norm = nn.Identity()
    for part, count in ((upper, top_layers), (lower, n - top_layers)):
        cfg = copy.deepcopy(part.config)
        cfg.num_hidden_layers = count
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[n - top_layers:] if part is upper else cfg.layer_types[: n - top_layers]
        part.config = cfg
        if part is upper:
            upper.get_decoder().config = cfg
    for i, layer in enumerate(upper.get_decoder().layers):
        layer.self_attn.layer_idx = i
    lower.embed_tokens.requires_grad_(False)
    return lower.eval().requires_grad_(False), upper


# ---------------------------------------------------------------------------------------------
# Cached features


@dataclass
class SplitFeatures:
    """Distinct prompts and responses of one split, with the frozen layers' output for each."""

    prompts: list[list[int]]
    responses: list[tuple[int, list[int]]]  # (prompt index, response ids)
    prompt_hidden: list[torch.Tensor] = field(default_factory=list)  # (P_i, H) each
    response_hidden: list[torch.Tensor] = field(default_factory=list)  # (R_j, H) each

    @classmethod
    def from_pairs(cls, pairs: list[EncodedPair]) -> tuple["SplitFeatures", "PairIndex"]:
        feats = cls([], [])
        index = PairIndex(feats, [])
        index.add(pairs)
        return feats, index

    def response_index(self) -> dict[tuple[int, tuple[int, ...]], int]:
        return {(p, tuple(r)): j for j, (p, r) in enumerate(self.responses)}

    def tokens(self) -> int:
        return sum(len(p) for p in self.prompts) + sum(len(r) for _, r in self.responses)


@dataclass
class PairIndex:
    """Pairs as (chosen response index, rejected response index, subset) into a `SplitFeatures`."""

    feats: SplitFeatures
    pairs: list[tuple[int, int, str | None]]

    def add(self, encoded: list[EncodedPair]) -> None:
        f = self.feats
        p_index = {tuple(p): i for i, p in enumerate(f.prompts)}
        r_index = f.response_index()
        for e in encoded:
            key = tuple(e.prompt_ids)
            if key not in p_index:
                p_index[key] = len(f.prompts)
                f.prompts.append(list(e.prompt_ids))
            pi = p_index[key]
            ids = []
            for resp in (e.chosen_ids, e.rejected_ids):
                rk = (pi, tuple(resp))
                if rk not in r_index:
                    r_index[rk] = len(f.responses)
                    f.responses.append((pi, list(resp)))
                ids.append(r_index[rk])
            self.pairs.append((ids[0], ids[1], e.subset))

    def remap(self, encoded: list[EncodedPair]) -> "PairIndex":
        """The same split's pairs encoded differently (e.g. with flipped labels), on the same features."""
        p_index = {tuple(p): i for i, p in enumerate(self.feats.prompts)}
        r_index = self.feats.response_index()
        out = []
        for e in encoded:
            pi = p_index[tuple(e.prompt_ids)]
            out.append((r_index[(pi, tuple(e.chosen_ids))], r_index[(pi, tuple(e.rejected_ids))], e.subset))
        return PairIndex(self.feats, out)


@torch.inference_mode()
def compute_features(lower: nn.Module, feats: SplitFeatures, *, pad_id: int, batch_tokens: int, desc: str,
                     part_dir: Path | None = None) -> None:
    """Fill `feats.prompt_hidden` / `response_hidden` with the frozen layers' output, float32.

    Prompts go in groups within `batch_tokens` (prompt tokens + their responses' tokens): the
    prompts run right-padded in one pass, then every response continues its own prompt's KV cache
    (prompt padding masked, positions continuing at the prompt's length). With `part_dir`, each
    group is saved as it finishes and reused by a later call (a killed run resumes).
    """
    by_prompt: list[list[int]] = [[] for _ in feats.prompts]
    for j, (p, _) in enumerate(feats.responses):
        by_prompt[p].append(j)
    groups, cur, cur_tokens = [], [], 0
    for i, prompt in enumerate(feats.prompts):
        cost = len(prompt) + sum(len(feats.responses[j][1]) for j in by_prompt[i])
        if cur and cur_tokens + cost > batch_tokens:
            groups.append(cur)
            cur, cur_tokens = [], 0
        cur.append(i)
        cur_tokens += cost
    if cur:
        groups.append(cur)
    prompt_hidden: list[torch.Tensor | None] = [None] * len(feats.prompts)
    response_hidden: list[torch.Tensor | None] = [None] * len(feats.responses)
    with tqdm(total=feats.tokens(), desc=desc, unit="tok", unit_scale=True) as bar:
        for g, group in enumerate(groups):
            part = part_dir / f"part-{g:05d}.pt" if part_dir is not None else None
            if part is not None and part.is_file():
                saved = torch.load(part, weights_only=True)
            else:
                saved = _features_of_group(lower, feats, group, by_prompt, pad_id)
                if part is not None:
                    tmp = part.with_suffix(".tmp")
                    torch.save(saved, tmp)
                    tmp.replace(part)
            for i, h in zip(group, saved["prompts"]):
                prompt_hidden[i] = h
            for j, h in zip([j for i in group for j in by_prompt[i]], saved["responses"]):
                response_hidden[j] = h
            bar.update(sum(len(feats.prompts[i]) + sum(len(feats.responses[j][1]) for j in by_prompt[i])
                           for i in group))
    feats.prompt_hidden = prompt_hidden  # type: ignore[assignment]
    feats.response_hidden = response_hidden  # type: ignore[assignment]


def _features_of_group(lower: nn.Module, feats: SplitFeatures, group: list[int], by_prompt: list[list[int]],
                       pad_id: int, chunk_tokens: int = 1536) -> dict[str, list[torch.Tensor]]:
    pids, pmask = pad_right([feats.prompts[i] for i in group], pad_id)  # (U, P)
    out = lower(input_ids=pids, attention_mask=pmask, use_cache=True)
    p_hidden, cache = out.last_hidden_state, out.past_key_values  # (U, P, H)
    items = [(u, j) for u, i in enumerate(group) for j in by_prompt[i]]
    responses: list[torch.Tensor | None] = [None] * len(items)
    # Responses sorted by length, in chunks padded to their own longest: far less padding than one pass.
    order = sorted(range(len(items)), key=lambda b: len(feats.responses[items[b][1]][1]))
    chunks, cur = [], []
    for b in order:
        if cur and (len(cur) + 1) * len(feats.responses[items[b][1]][1]) > chunk_tokens:
            chunks.append(cur)
            cur = []
        cur.append(b)
    chunks.append(cur)
    for chunk in chunks:
        which = torch.tensor([items[b][0] for b in chunk], dtype=torch.long)  # (B,)
        part_cache = copy.deepcopy(cache) if len(chunks) > 1 else cache
        part_cache.batch_select_indices(which)
        rids, rmask = pad_right([feats.responses[items[b][1]][1] for b in chunk], pad_id)  # (B, R)
        plen = pmask.sum(1)[which]  # (B,)
        positions = plen.unsqueeze(1) + torch.arange(rids.shape[1]).unsqueeze(0)  # (B, R)
        r_hidden = lower(input_ids=rids, attention_mask=torch.cat([pmask[which], rmask], 1), past_key_values=part_cache,
                         position_ids=positions, use_cache=True).last_hidden_state  # (B, R, H)
        for k, b in enumerate(chunk):
            responses[b] = r_hidden[k, : int(rmask[k].sum())].float().clone()
    return {"prompts": [p_hidden[u, : int(pmask[u].sum())].float().clone() for u in range(len(group))],
            "responses": responses}


def pair_batch(index: PairIndex, rows: list[int], pad_id: int) -> PairBatch:
    """A `PairBatch` of the given pairs, with the cached states as `inputs_embeds`."""
    f = index.feats
    encoded = []
    for k in rows:
        c, r, subset = index.pairs[k]
        p = f.responses[c][0]
        encoded.append(EncodedPair(f.prompts[p], f.responses[c][1], f.responses[r][1], subset=subset))
    batch = collate_pairs(encoded, pad_id)
    seqs = [index.pairs[k][0] for k in rows] + [index.pairs[k][1] for k in rows]
    return dataclasses.replace(batch, inputs_embeds=_embeds(f, seqs, batch.input_ids.shape[1]))


def _embeds(f: SplitFeatures, responses: list[int], width: int) -> torch.Tensor:
    hidden = f.prompt_hidden[0].shape[-1]
    out = torch.zeros(len(responses), width, hidden)  # (N, T, H)
    for row, j in enumerate(responses):
        p = f.responses[j][0]
        ph, rh = f.prompt_hidden[p], f.response_hidden[j]
        out[row, : ph.shape[0]] = ph
        out[row, ph.shape[0]: ph.shape[0] + rh.shape[0]] = rh
    return out


@torch.no_grad()
def score_responses(model: GRMModel, f: SplitFeatures, *, pad_id: int, batch_tokens: int = 4096) -> torch.Tensor:
    """Reward of every distinct response of a split (float32, in `f.responses` order)."""
    lengths = [len(f.prompts[p]) + len(r) for p, r in f.responses]
    scores = torch.zeros(len(lengths))
    for idx in plan_batches(lengths, batch_tokens, max_rows=64):
        ids, mask = pad_right([f.prompts[f.responses[j][0]] + f.responses[j][1] for j in idx], pad_id)
        scores[idx] = model(ids, mask, inputs_embeds=_embeds(f, idx, ids.shape[1])).rewards.float()
    return scores


def accuracy_report(scores: torch.Tensor, index: PairIndex) -> dict[str, Any]:
    """Pairwise accuracy overall and per subset, and how often the longer response wins."""
    f = index.feats
    c = torch.tensor([p[0] for p in index.pairs])
    r = torch.tensor([p[1] for p in index.pairs])
    win = (scores[c] > scores[r]).float()
    longer_c = torch.tensor([len(f.responses[a][1]) > len(f.responses[b][1]) for a, b, _ in index.pairs])
    prefers_longer = torch.where(longer_c, win, 1 - win)
    out: dict[str, Any] = {"pairs": len(index.pairs), "accuracy": float(win.mean()),
                           "prefers_longer_tokens": float(prefers_longer.mean()), "subsets": {}}
    for name in sorted({s for *_, s in index.pairs if s}):
        sel = torch.tensor([s == name for *_, s in index.pairs])
        out["subsets"][name] = {"pairs": int(sel.sum()), "accuracy": float(win[sel].mean())}
    return out


# ---------------------------------------------------------------------------------------------
# One configuration


def config_name(method: str, noise: float, alpha: float = DEFAULT_ALPHA, precision: str = "fp32") -> str:
    """`grm-sft-noise0.25`; a non-default regulariser weight (`...-alpha0.1`) and a precision other
    than fp32 (`...-fp8-o2`) are part of the name."""
    name = f"{method}-noise{noise:.2f}"
    if alpha != DEFAULT_ALPHA and method != "bt":
        name += f"-alpha{alpha:g}"
    return name if precision == "fp32" else f"{name}-{precision}"


def build_top_model(upper: nn.Module, cfg: ExperimentConfig, seed: int) -> GRMModel:
    """A fresh trainable top: LoRA adapters (or all weights) of the top layers plus a new reward head."""
    torch.manual_seed(seed)
    lm = copy.deepcopy(upper)
    lm.requires_grad_(False)
    if cfg.lora_r > 0:
        lm = add_lora(lm, LoraConfig(enabled=True, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0,
                                     target_modules=list(LORA_TARGETS)))
    else:
        lm.get_decoder().layers.requires_grad_(True)
    head = RewardHead(lm.config.hidden_size, copy.deepcopy(cfg.head))
    return GRMModel(lm, head, GRMConfig(head=copy.deepcopy(cfg.head), max_tokens=cfg.max_tokens))


def train_settings(cfg: ExperimentConfig, method: str, total_steps: int) -> TrainConfig:
    """The `TrainConfig` one configuration trains with: the GRM loss of `method`, AdamW at `lr` (top
    layers) and `head_lr` (reward head), warm-up then cosine to 10 %, clipping, `cfg.precision`."""
    tcfg = TrainConfig()
    tcfg.loss.regulariser = METHODS[method]
    tcfg.loss.alpha, tcfg.loss.beta = cfg.alpha, cfg.beta
    o = tcfg.optim
    o.lr, o.head_lr, o.weight_decay, o.grad_clip = cfg.lr, cfg.head_lr, 0.0, cfg.clip
    o.warmup_steps, o.min_lr_ratio, o.max_steps = max(1, round(cfg.warmup_ratio * total_steps)), 0.1, total_steps
    o.batch_size = cfg.batch_size
    tcfg.precision.mode = cfg.precision
    if cfg.precision in FP8_MODES:  # precision.MODE_OPTIONS: only FP8 modes read a recipe
        tcfg.precision.fp8_recipe = cfg.fp8_recipe
    return tcfg


def train_config(upper: nn.Module, train: PairIndex, tests: dict[str, PairIndex], cfg: ExperimentConfig, method: str,
                 noise: float, *, pad_id: int, log_path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Train one configuration on cached features; (result, trained parameters by name)."""
    n = len(train.pairs)
    total = cfg.epochs * math.ceil(n / cfg.batch_size)
    tcfg = train_settings(cfg, method, total)
    model = build_top_model(upper, cfg, cfg.seed)
    frozen = copy.deepcopy(upper) if tcfg.loss.regulariser == "dpo" else None
    plan = apply_precision(model, adamw_factory(tcfg.optim), tcfg.precision, device=torch.device("cpu"))
    model = plan.model
    reference = build_reference(model, frozen, plan.autocast) if frozen is not None else None
    step_fn = TrainStep(model, plan.optimizer, build_scheduler(plan.optimizer, tcfg.optim, total_steps=total),
                        loss_fn=lambda m, b: compute_loss(m, b, tcfg, reference), grad_clip=tcfg.optim.grad_clip,
                        autocast=plan.autocast)
    metrics = MetricsLog(log_path, fresh=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    start, step = time.perf_counter(), 0
    with progress(total, desc=config_name(method, noise, cfg.alpha, cfg.precision)) as bar:
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            for s in range(0, n, cfg.batch_size):
                stats = step_fn([pair_batch(train, perm[s: s + cfg.batch_size], pad_id)])
                step += 1
                metrics.write({"step": step, **stats})
                bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
                bar.update(1)
    train_seconds = time.perf_counter() - start
    model.eval()
    result: dict[str, Any] = {"name": config_name(method, noise, cfg.alpha, cfg.precision), "method": method,
                              "regulariser": METHODS[method], "alpha": cfg.alpha if method != "bt" else 0.0,
                              "noise": noise, "train_pairs": n, "steps": total,
                              "train_seconds": round(train_seconds, 1)}
    start = time.perf_counter()
    for split, index in tests.items():
        scores = score_responses(model, index.feats, pad_id=pad_id)
        result[split] = accuracy_report(scores, index)
        result[f"{split}_pair_scores"] = [[float(scores[c]), float(scores[r])] for c, r, _ in index.pairs]
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    return result, trained_tensors(model)


def trained_tensors(model: GRMModel) -> dict[str, torch.Tensor]:
    """What training changed, by name: the trainable LM parameters (LoRA factors or weights) and the
    reward head. FP8 training linears give their E4M3 weight bytes and scales (`weight`, `weight_scale`),
    exactly what the next training step would compute with, and, for delayed scaling, the static
    activation scale (`input_scale`) their evaluation used."""
    fp8 = {n: export_fp8_weights(m) for n, m in model.lm.named_modules() if isinstance(m, FP8TrainingLinear)}
    out: dict[str, torch.Tensor] = {}
    for name, value in model.lm.named_parameters():
        module, _, leaf = name.rpartition(".")
        if not value.requires_grad:
            continue
        if module in fp8 and leaf == "weight":
            out[f"lm.{name}"], out[f"lm.{module}.weight_scale"] = fp8[module].weight, fp8[module].weight_scale
            if fp8[module].input_scale is not None:  # the activation scale evaluation rounded inputs with
                out[f"lm.{module}.input_scale"] = fp8[module].input_scale
        else:
            out[f"lm.{name}"] = value.detach().clone()
    out.update({f"reward_head.{k}": v.detach().clone() for k, v in model.reward_head.state_dict().items()})
    return out


# ---------------------------------------------------------------------------------------------
# The whole run


def _select_prompts(pairs: list, count: int, seed: int) -> list:
    if not count:
        return pairs
    keys = list(dict.fromkeys(json.dumps(p.prompt, sort_keys=True) for p in pairs))
    keep = set(random.Random(seed).sample(keys, min(count, len(keys))))
    return [p for p in pairs if json.dumps(p.prompt, sort_keys=True) in keep]


def load_backbone(cfg: ExperimentConfig):
    """(causal LM in float32, eval mode, tokenizer) for `cfg.backbone`."""
    lm, tok = components.load_backbone(cfg.backbone, seed=cfg.seed, tiny_layers=cfg.tiny_layers)
    return lm.eval(), tok


def run(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Run every configuration that has no result yet; returns all results (done before or now)."""
    from .benchmark import load_split

    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    if cfg.fp8_recipe != "delayed" and cfg.precision not in FP8_MODES:  # before any loading
        raise ValueError(f"--fp8_recipe {cfg.fp8_recipe} sets the FP8 scaling recipe, which --precision "
                         f"{cfg.precision} does not use: drop it, or pass an fp8 --precision")
    out = Path(cfg.out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    (out / "params").mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    lm, tok = load_backbone(cfg)
    torch.manual_seed(cfg.seed)
    lower, upper = split_lm(lm, cfg.top_layers)
    del lm
    renderer = PromptRenderer(tok)
    data_dir = cfg.data_dir or None
    raw = {s: read_pairs(load_split(s, data_dir=data_dir))[0] for s in ("train", "test_id", "test_ood")}
    raw["train"] = _select_prompts(raw["train"], cfg.train_prompts, cfg.seed)
    for s in ("test_id", "test_ood"):
        raw[s] = _select_prompts(raw[s], cfg.test_prompts, cfg.seed)
    indexes: dict[str, PairIndex] = {}
    for split, pairs in raw.items():
        report = _report(split)
        enc = encode_pairs(pairs, renderer, report, max_tokens=cfg.max_tokens)
        feats, index = SplitFeatures.from_pairs(enc)
        key = hashlib.sha256(json.dumps([cfg.backbone, cfg.tiny_layers, cfg.top_layers, cfg.seed, feats.prompts,
                                         [r for _, r in feats.responses]]).encode()).hexdigest()[:16]
        part_dir = out / "features" / f"{split}-{key}"
        part_dir.mkdir(parents=True, exist_ok=True)
        log.info("%s: %d pairs, %d prompts, %d distinct responses, %d tokens (%s)", split, len(index.pairs),
                 len(feats.prompts), len(feats.responses), feats.tokens(), report.summary())
        compute_features(lower, feats, pad_id=tok.pad_token_id, batch_tokens=cfg.feature_tokens,
                         desc=f"frozen layers: {split}", part_dir=part_dir)
        indexes[split] = index
    del lower
    results = []
    for noise in cfg.noise:
        for method in cfg.methods:
            name = config_name(method, noise, cfg.alpha, cfg.precision)
            res_path = out / "results" / f"{name}.json"
            if res_path.is_file():
                results.append(json.loads(res_path.read_text()))
                log.info("%s: done before, skipped", name)
                continue
            report = _report("train")
            enc = encode_pairs(raw["train"], renderer, report, max_tokens=cfg.max_tokens, flip_fraction=noise,
                               seed=cfg.seed)
            train = indexes["train"].remap(enc)
            res, params = train_config(upper, train, {"test_id": indexes["test_id"], "test_ood": indexes["test_ood"]},
                                       cfg, method, noise, pad_id=tok.pad_token_id,
                                       log_path=out / "logs" / f"{name}.jsonl")
            res["flipped"] = report.flipped
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in params.items()}, str(out / "params" / f"{name}.safetensors"))
            tmp = res_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=2) + "\n")
            tmp.replace(res_path)
            log.info("%s: test_id %.3f test_ood %.3f (%.0f s)", name, res["test_id"]["accuracy"],
                     res["test_ood"]["accuracy"], res["train_seconds"])
            results.append(res)
    everything = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    everything.sort(key=lambda r: (r["noise"], list(METHODS).index(r["method"]), r.get("alpha", DEFAULT_ALPHA)))
    (out / "results.md").write_text(results_table(everything) + "\n")
    return results


def _report(split: str):
    from .data import DataReport

    return DataReport(source=split)


def results_table(results: list[dict[str, Any]]) -> str:
    """Markdown table of results (one row per configuration)."""
    lines = ["| method | α | label noise | ID acc | OOD acc | OOD, chosen longer | OOD, chosen not longer "
             "| OOD prefers longer | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ood = r["test_ood"]
        sub = ood.get("subsets", {})
        cl = sub.get("chosen_longer", {}).get("accuracy", float("nan"))
        cnl = sub.get("chosen_not_longer", {}).get("accuracy", float("nan"))
        alpha = r.get("alpha", 0.0 if r["method"] == "bt" else DEFAULT_ALPHA)
        lines.append(f"| {r['method']} | {alpha:g} | {r['noise']:.0%} | {r['test_id']['accuracy']:.3f} | "
                     f"{ood['accuracy']:.3f} | "
                     f"{cl:.3f} | {cnl:.3f} | {ood['prefers_longer_tokens']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Export: trained top layers -> artifact -> full checkpoint


def export_artifact(cfg: ExperimentConfig, name: str, dest: Path) -> Path:
    """Write `<dest>/top-layers.safetensors` + `top-layers.json` for a finished configuration:
    LoRA factors (or full weights) renamed to the full model's layer numbers, and the reward head."""
    from safetensors.torch import load_file, save_file

    out = Path(cfg.out)
    params_file, res_file = out / "params" / f"{name}.safetensors", out / "results" / f"{name}.json"
    if not params_file.is_file() or not res_file.is_file():
        raise FileNotFoundError(f"{params_file}: no finished configuration {name!r} in {out}")
    lm, tok = load_backbone(cfg)
    n = len(lm.get_decoder().layers)
    first = n - cfg.top_layers
    # Static activation scales stay out of the artifact: rounding activations to E4M3 amplifies the
    # float32 noise of different batching (measured: 2e-6 on a layer's input became up to 3 % of a
    # reward), so the default model is served W8A16, its scores stable across batches.
    params = {k: v for k, v in load_file(str(params_file)).items() if not k.endswith(".input_scale")}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in params.items():
        if key.startswith("reward_head."):
            tensors[key] = value
            continue
        tensors[_global_name(key, first)] = value
    meta = {"format": ARTIFACT_FORMAT, "backbone": cfg.backbone, "layers": n, "top_layers": cfg.top_layers,
            "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "head": dataclasses.asdict(cfg.head),
            "fp8": fp8_layout(cfg),
            "max_tokens": cfg.max_tokens,
            "result": {k: v for k, v in json.loads(res_file.read_text()).items() if not k.endswith("_pair_scores")},
            "check": _reference_scores(cfg, lm, tok, params)}
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "top-layers.safetensors"),
              metadata={"format": ARTIFACT_FORMAT})
    (dest / "top-layers.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dest


def fp8_layout(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """How an FP8-trained configuration's weights are laid out for serving (None unless cfg is fp8)."""
    if cfg.precision not in FP8_MODES:
        return None
    recipe = get_training_recipe(cfg.fp8_recipe)
    granularity, block_size = recipe.serving_layout
    return {"recipe": recipe.name, "precision": cfg.precision, "granularity": granularity, "block_size": block_size}


def _reference_scores(cfg: ExperimentConfig, lm: nn.Module, tok, params: dict[str, torch.Tensor],
                      count: int = 8) -> dict[str, Any]:
    """Scores of a few test sequences computed the way the experiment computed them (frozen lower
    layers, then the trained top model; FP8-trained layers as grm-serve runs them): whoever rebuilds
    the full model from the artifact can check that it gives the same numbers
    (tests/training/test_default_model.py does)."""
    from .benchmark import load_split

    pairs, report = read_pairs(load_split("test_id", data_dir=cfg.data_dir or None), limit=count // 2)
    enc = encode_pairs(pairs, PromptRenderer(tok), report, max_tokens=cfg.max_tokens)
    feats, _ = SplitFeatures.from_pairs(enc)
    lower, upper = split_lm(lm, cfg.top_layers)
    compute_features(lower, feats, pad_id=tok.pad_token_id, batch_tokens=cfg.feature_tokens, desc="reference scores")
    top = build_top_model(upper, cfg, cfg.seed).eval()
    lm_params = {k[3:]: v for k, v in params.items() if k.startswith("lm.")}
    layout = fp8_layout(cfg)
    if layout:  # FP8-trained: scored as grm-serve serves them, the trained bytes in FP8InferenceLinear layers
        install_fp8_weights(top.lm, lm_params, granularity=layout["granularity"], block_size=layout["block_size"])
        lm_params = {k: v for k, v in lm_params.items()
                     if not k.endswith(".weight_scale") and v.dtype != torch.float8_e4m3fn}
    missing, unexpected = top.lm.load_state_dict(lm_params, strict=False)
    if unexpected:
        raise ValueError(f"saved parameters do not fit the top model: {unexpected[:3]} (of {len(unexpected)}; "
                         f"the top model has {sorted(top.lm.state_dict())[:3]})")
    top.reward_head.load_state_dict({k[len("reward_head."):]: v for k, v in params.items()
                                     if k.startswith("reward_head.")})
    scores = score_responses(top, feats, pad_id=tok.pad_token_id)
    return {"token_ids": [feats.prompts[p] + r for p, r in feats.responses], "scores": scores.tolist()}


def _global_name(key: str, first: int) -> str:
    """`lm.base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight` ->
    `layers.{first+1}.self_attn.q_proj.lora_A`; full weights -> `layers.{i}.<...>.weight`."""
    parts = key.split(".")
    i = parts.index("layers")
    idx = first + int(parts[i + 1])
    rest = parts[i + 2:]
    if "lora_A" in rest or "lora_B" in rest:
        k = rest.index("lora_A") if "lora_A" in rest else rest.index("lora_B")
        return ".".join(["layers", str(idx), *rest[:k], rest[k]])
    return ".".join(["layers", str(idx), *rest])


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command(ExperimentConfig, argv, prog="grm-experiment", description=__doc__.split("\n\n")[0],
                        start=ExperimentConfig())
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if cfg.export:
            dest = export_artifact(cfg, cfg.export, Path(cfg.export_to or Path(cfg.out) / "export" / cfg.export))
            print(dest)
            return 0
        results = run(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        return fail("grm-experiment", exc)
    except KeyboardInterrupt:  # each finished configuration's result is on disk already
        return interrupted("grm-experiment", f"mid-run; the finished configurations are kept in "
                                             f"{Path(cfg.out) / 'results'}: rerun the same command to run the rest")
    print(results_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
