"""What every training driver is built from: one step, shared by `grm-train` and `grm-experiment`.

- `load_backbone`: the causal LM to start from (`tiny`, `smollm2` or a local folder) and its tokenizer.
- `add_lora`: peft LoRA adapters on a causal LM.
- `build_reference`: DPO's reference log-probs (a frozen copy, or with LoRA the base with adapters off).
- `adamw_factory`, `lr_multiplier`, `build_scheduler`: AdamW over the trainable parameters and its
  warm-up + cosine schedule.
- `compute_loss`: the GRM loss of one micro-batch.
- `TrainStep`: one optimizer step over micro-batches (forward + backward under the precision plan's
  autocast, clipping, optimizer and schedule step).
- `MetricsLog`, `progress`: the JSONL metrics log and the progress bar.

The precision plan (precision.py) decides the model's dtype, sharding and optimizer around these.

    >>> import torch
    >>> model = torch.nn.Linear(4, 1)
    >>> opt = adamw_factory(OptimConfig(lr=0.1))(model)
    >>> step = TrainStep(model, opt, build_scheduler(opt, OptimConfig(warmup_steps=1), total_steps=4),
    ...                  loss_fn=lambda m, b: (m(b).pow(2).mean(), {"loss": 0.0}), grad_clip=1.0)
    >>> sorted(step([torch.ones(2, 4)]))
    ['grad_norm', 'loss', 'lr']
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from .config import LoraConfig, OptimConfig, TrainConfig
from .core import assets
from .core.fp8.optim import clip_grad_norm_
from .core.model import GRMModel, response_logps
from .data import PairBatch
from .losses import grm_loss, needs_logps, pairwise_accuracy, regulariser_loss, reward_loss

# ---------------------------------------------------------------------------------------------
# Model pieces


def load_backbone(spec: str, *, seed: int, tiny_hidden_size: int = 64, tiny_layers: int = 2):
    """(causal LM in float32, tokenizer with a pad token) for `spec`: `tiny` (a random tiny Llama with
    SmolLM2's tokenizer, initialised from `seed`), `smollm2` (SmolLM2-135M-Instruct) or a local
    Hugging Face causal-LM folder. Either way the RNG is left seeded for what is built next (the head)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == "tiny":
        tok = AutoTokenizer.from_pretrained(assets.tokenizer_dir())
        torch.manual_seed(seed)
        config = assets.tiny_llama_config(len(tok), hidden_size=tiny_hidden_size, layers=tiny_layers)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        path = assets.smollm2_dir() if spec == "smollm2" else Path(spec)
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        torch.manual_seed(seed)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm, tok


def add_lora(lm: nn.Module, lora: LoraConfig) -> nn.Module:
    """`lm` wrapped in peft LoRA adapters (only the adapters train; peft freezes the rest)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as exc:
        raise RuntimeError("LoRA needs peft: pip install 'grm-serve[lora]'") from exc
    return get_peft_model(lm, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules), bias="none"))


def is_lora(model: GRMModel) -> bool:
    return hasattr(model.lm, "disable_adapter")


def _embeds(batch: PairBatch) -> dict[str, torch.Tensor]:
    return {} if batch.inputs_embeds is None else {"inputs_embeds": batch.inputs_embeds}


class ReferenceModel(nn.Module):
    """A frozen copy of the initial LM, giving the reference log-probs of the DPO regulariser.
    With `inputs_embeds` in the batch (grm-experiment's cached lower layers) they replace the embeddings."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)

    def forward(self, batch: PairBatch) -> torch.Tensor:  # (2B,)
        inputs = _embeds(batch) or {"input_ids": batch.input_ids}
        hidden = self.lm.get_decoder()(attention_mask=batch.attention_mask, use_cache=False, **inputs).last_hidden_state
        return response_logps(self.lm.get_output_embeddings(), hidden, batch.input_ids,
                              batch.response_mask * batch.attention_mask)


def build_reference(model: GRMModel, frozen_lm: nn.Module | None, autocast: Callable[[], ContextManager],
                    place: Callable[[nn.Module], nn.Module] = lambda m: m) -> Callable[[PairBatch], torch.Tensor]:
    """DPO's reference log-probs: `frozen_lm` (a copy of the initial LM, taken before training) run
    frozen, or, when it is None, the LoRA model itself with its adapters switched off. `place` moves
    (and shards) the frozen copy like the model."""
    if frozen_lm is None:
        if not is_lora(model):
            raise ValueError("the DPO reference needs a frozen copy of the initial LM, or a LoRA model")

        def lora_reference(batch: PairBatch) -> torch.Tensor:
            with torch.no_grad(), model.lm.disable_adapter(), autocast():
                return model(batch.input_ids, batch.attention_mask, batch.response_mask, **_embeds(batch)).logps
        return lora_reference
    ref = place(ReferenceModel(frozen_lm))

    def reference(batch: PairBatch) -> torch.Tensor:
        with torch.no_grad(), autocast():
            return ref(batch)
    return reference


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule


def adamw_factory(o: OptimConfig, head_prefix: str = "reward_head.") -> Callable[[nn.Module], torch.optim.Optimizer]:
    """AdamW over the trainable parameters: no weight decay on biases and norms (1-D tensors); the
    reward head's parameters (names starting with `head_prefix`) at `o.head_lr` when it is set."""

    def make(model: nn.Module) -> torch.optim.Optimizer:
        groups: list[dict[str, Any]] = []
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        for is_head in (False, True):
            lr = o.head_lr if is_head and o.head_lr else o.lr
            part = [p for n, p in named if n.startswith(head_prefix) == is_head]
            groups.append({"params": [p for p in part if p.ndim >= 2], "weight_decay": o.weight_decay, "lr": lr})
            groups.append({"params": [p for p in part if p.ndim < 2], "weight_decay": 0.0, "lr": lr})
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    return make


def lr_multiplier(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total`.

    >>> [round(lr_multiplier(s, warmup=2, total=6, min_ratio=0.0), 3) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.25, 0.0]
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig, *, total_steps: int):
    """Every parameter group's learning rate times `lr_multiplier` of the step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
        s, warmup=o.warmup_steps, total=total_steps, min_ratio=o.min_lr_ratio))


# ---------------------------------------------------------------------------------------------
# Loss and step


def compute_loss(model: nn.Module, batch: PairBatch, cfg: TrainConfig,
                 reference: Callable[[PairBatch], torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GRM loss of one micro-batch and its stats (loss parts, accuracy, mean margin)."""
    b = batch.num_pairs
    want_c, want_r = needs_logps(cfg.loss.regulariser)
    response_mask = None
    if want_c:
        response_mask = batch.response_mask.clone()  # (2B, T)
        if not want_r:
            response_mask[b:] = 0  # sft needs only the chosen log-probs: skip the LM head on the rest
    out = model(batch.input_ids, batch.attention_mask, response_mask, **_embeds(batch))
    r_c, r_r = out.rewards[:b], out.rewards[b:]  # (B,), (B,)
    logp_c = out.logps[:b] if want_c else None
    logp_r = out.logps[b:] if want_r else None
    ref_c = ref_r = None
    if cfg.loss.regulariser == "dpo":
        ref = reference(batch)  # (2B,)
        ref_c, ref_r = ref[:b], ref[b:]
    l_r = reward_loss(r_c, r_r, cfg.loss.reward, margin=cfg.loss.margin, label_smoothing=cfg.loss.label_smoothing)
    l_reg = regulariser_loss(cfg.loss.regulariser, logp_c, logp_r, ref_c, ref_r, beta=cfg.loss.beta)
    loss = grm_loss(l_reg, l_r, cfg.loss.alpha)
    stats = {"loss": loss.item(), "reward_loss": l_r.item(), "accuracy": pairwise_accuracy(r_c, r_r).item(),
             "margin": (r_c - r_r).mean().item()}
    if l_reg is not None:
        stats["reg_loss"] = l_reg.item()
    return loss, stats


def step_if_finite(optimizer: torch.optim.Optimizer, grad_norm: float) -> bool:
    """Step `optimizer` unless the gradient norm is inf or NaN (an overflow, say in an FP8 or bf16 run),
    so that nothing non-finite reaches the weights or the optimizer state (torch's AdamW steps with
    whatever it is given). Returns whether it stepped; the caller counts the skips."""
    if not math.isfinite(grad_norm):
        return False
    optimizer.step()
    return True


class TrainStep:
    """One optimizer step: forward + backward per micro-batch (loss scaled by 1/count, under
    `autocast`), gradient clipping, optimizer step, schedule step. Returns the micro-batches' mean
    stats plus `lr` (the first parameter group's), `grad_norm` and `skipped_steps`.

    A step whose gradient norm is inf or NaN is skipped (`step_if_finite`): the gradients are dropped,
    the schedule moves on, and `skipped_steps` counts it (the trainer checkpoints the count).

    Multi-process drivers pass `grad_sync(model, on)` (FSDP2: reduce-scatter only on the last
    micro-batch), `reduce_grads()` (plain data parallelism) and `reduce_stats(stats)` (mean over
    processes)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *,
                 loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
                 grad_clip: float = 0.0, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                 grad_sync: Callable[[nn.Module, bool], None] | None = None,
                 reduce_grads: Callable[[], None] | None = None,
                 reduce_stats: Callable[[dict[str, float]], dict[str, float]] | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loss_fn, self.grad_clip, self.autocast = loss_fn, grad_clip, autocast
        self.grad_sync, self.reduce_grads, self.reduce_stats = grad_sync, reduce_grads, reduce_stats
        self.skipped_steps = 0

    def __call__(self, batches: list) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        for i, batch in enumerate(batches):
            if self.grad_sync is not None:
                self.grad_sync(self.model, i == len(batches) - 1)
            with self.autocast():
                loss, stats = self.loss_fn(self.model, batch)
            (loss / len(batches)).backward()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v / len(batches)
        if self.reduce_grads is not None:
            self.reduce_grads()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = clip_grad_norm_(trainable, self.grad_clip or float("inf"))  # FP8 gradients too
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        sums["lr"] = self.scheduler.get_last_lr()[0]
        grad_norm = float(grad_norm)  # the same on every process (all-reduced gradients, or a full DTensor)
        if not step_if_finite(self.optimizer, grad_norm):
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        stats = self.reduce_stats(sums) if self.reduce_stats is not None else sums
        stats["grad_norm"], stats["skipped_steps"] = grad_norm, self.skipped_steps
        return stats


# ---------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """Append-only JSONL metrics, one record per line; `enabled=False` on non-main processes."""

    def __init__(self, path: str | Path, *, enabled: bool = True, fresh: bool = False):
        self.path, self.enabled = Path(path), enabled
        if enabled and fresh:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")


def progress(total: int, *, desc: str, initial: int = 0, enabled: bool = True, unit: str = "step"):
    """The progress bar of a training run (tqdm)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)

