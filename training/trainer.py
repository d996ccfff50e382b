"""`grm-train`: the GRM training loop (one process, or torchrun with FSDP2 -- the same loop).

    $ grm-train --preset tiny                                  # CPU, seconds
    $ grm-train --preset smollm2-lora --data.train prefs.jsonl --data.eval heldout.jsonl
    $ torchrun --nproc_per_node 2 -m grmserve.training.trainer --preset tiny --model.head.dropout 0
    $ grm-train --preset tiny --resume                         # continue the newest checkpoint

Each optimizer step takes `optim.batch_size` pairs from a seeded per-epoch permutation of the
training set (the last incomplete batch of an epoch is dropped), splits them into `grad_accum`
micro-batches per process, and minimises `alpha * L_reg + (1 - alpha) * L_R` (losses.py). The data
position is a function of the step, so a resumed run sees exactly the batches an uninterrupted
run would; with the optimizer, scheduler and RNG states restored it computes the same parameters.

Run folder:

    config.json                 resolved TrainConfig
    data/                       generated synthetic data (with --data.synthetic)
    data_report.json            rows read / kept / dropped per reason
    metrics.jsonl               one line per logged step (and per evaluation)
    checkpoints/step-NNNNNNN/   model/ (grm format, loadable by the server and grm-eval),
                                trainer_state.pt (optimizer, scheduler, RNG, step, data position),
                                trainable.safetensors (LoRA runs: adapters + reward head)

    >>> from grmserve.training.presets import tiny
    >>> cfg = tiny(); cfg.run_dir = "/tmp/grm-doctest"; cfg.optim.max_steps = 2   # doctest: +SKIP
    >>> Trainer(cfg).fit()["step"]                                                 # doctest: +SKIP
    2
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from .components import (
    MetricsLog,
    TrainStep,
    adamw_factory,
    add_lora,
    build_reference,
    build_scheduler,
    compute_loss,
    is_lora,
    load_backbone,
    progress,
)
from .config import FP8_MODES, TrainConfig
from .core import assets
from .core.checkpoint import (
    CheckpointError,
    detect_format,
    load_grm,
    read_config,
    save_grm,
)
from .core.configtools import INTERRUPTED, fail, interrupted, resume_hint, start_command, to_dict
from .core.devices import resolve_device
from .core.fp8.comm import fp8_all_reduce_
from .core.fp8.fp16_master import dequantize_fp16_masters
from .core.fp8.fsdp import all_gather_bytes, reduce_scatter_bytes
from .core.fp8.optim import ScaledGrad, gradient
from .core.fp8.scaling import get_training_recipe
from .core.fp8.training_linear import FP8TrainingLinear, convert_to_fp8_training, export_trained_fp8
from .core.fsutil import staged_dir
from .core.model import GRMConfig, GRMModel, init_grm
from .core.prompts import PromptRenderer
from .data import (
    PairBatch,
    PreferenceDataset,
    collate_pairs,
    load_preferences,
    synthetic_rows,
    write_jsonl,
)
from .evaluate import reward_stats, score_pairs
from .precision import MODE_OPTIONS, apply_precision
from .presets import parse_args

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class DistInfo:
    """Where this process runs: rank, world size, device; `owns_group` when we started the group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on GPU)."""
    want_cuda = resolve_device(cfg.device).type == "cuda"
    owns = False
    if dist.is_torchelastic_launched() and not dist.is_initialized():
        backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if want_cuda else "gloo")
        dist.init_process_group(backend=backend)
        owns = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if want_cuda:
        local = rank % torch.cuda.device_count()
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, device=device, owns_group=owns)


def all_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average scalar stats over processes."""
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return {k: v / info.world_size for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------------------------------------
# Model and sharding


def build_model(cfg: TrainConfig) -> tuple[GRMModel, Any]:
    """The GRM model to train and its tokenizer, from `cfg.model` (deterministic given cfg.seed)."""
    m = cfg.model
    grm = GRMConfig(head=copy.deepcopy(m.head), chat_template=m.chat_template, max_tokens=cfg.data.max_tokens,
                    model_name=m.name)
    reward_model = _reward_model_folder(m.backbone)
    if reward_model is not None:  # keep training a reward model: it brings its own head
        loaded = load_grm(reward_model)
        model, tok = loaded.model, loaded.tokenizer
        model.grm_config.max_tokens = cfg.data.max_tokens
        model.grm_config.model_name = m.name
    else:  # a causal LM: put a fresh head on it
        lm, tok = load_backbone(m.backbone, seed=cfg.seed, tiny_hidden_size=m.tiny_hidden_size,
                                tiny_layers=m.tiny_layers)
        model = init_grm(lm, grm=grm)
    if model.grm_config.chat_template and not getattr(tok, "chat_template", None):
        model.grm_config.chat_template = False
    if m.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train(), tok


def _reward_model_folder(backbone: str) -> Path | None:
    """`backbone` as a folder when it holds a reward-model checkpoint (any format load_grm reads)."""
    if backbone in ("tiny", "smollm2"):
        return None
    path = Path(backbone)
    try:
        detect_format(path, read_config(path))
    except CheckpointError:
        return None
    return path


def apply_lora(model: GRMModel, cfg: TrainConfig) -> GRMModel:
    """Wrap the LM in peft LoRA adapters; the reward head stays fully trainable."""
    model.lm = add_lora(model.lm, cfg.model.lora)
    for p in model.reward_head.parameters():
        p.requires_grad_(True)
    return model


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    layers = getattr(lm.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


def build_sharder(info: DistInfo, cfg: TrainConfig) -> Callable[[nn.Module], nn.Module]:
    """FSDP2 (`fully_shard`) per decoder layer and at the root when several processes run."""
    if not info.distributed or not cfg.dist.fsdp:
        return lambda module: module
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns when a module returns a view; the losses never modify model outputs in place.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    mesh = init_device_mesh(info.device.type, (info.world_size,))

    def shard(module: nn.Module) -> nn.Module:
        lm = module.lm
        for layer in decoder_layers(lm):
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
        return module

    return shard


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Builds everything from a `TrainConfig` (`build_*` helpers) and runs `fit()`.

    >>> from grmserve.training.presets import tiny
    >>> Trainer(tiny()).fit()          # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.info = init_distributed(cfg)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_from = latest_checkpoint(self.ckpt_dir)
        if resume_from is not None and not cfg.resume:
            raise ValueError(f"{self.run_dir} already holds checkpoints (newest {resume_from.name}); pass --resume "
                             "to continue that run, or choose another --run_dir")
        if resume_from is not None:  # before anything is built from or loaded out of the checkpoint
            check_resume_precision(cfg, resume_from)

        # Model, tokenizer, data (model init is seeded, so every process builds the same weights).
        model, self.tokenizer = build_model(cfg)
        self.renderer = PromptRenderer(self.tokenizer, use_chat_template=model.grm_config.chat_template)
        self.pad_id = self.tokenizer.pad_token_id
        self.train_data, self.eval_data = self.build_data()
        frozen_reference = cfg.loss.regulariser == "dpo" and not cfg.model.lora.enabled
        self.reference_lm = copy.deepcopy(model.lm) if frozen_reference else None
        self.hf_config, self.grm_config = model.hf_config, copy.deepcopy(model.grm_config)
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg)
        fp8 = cfg.precision.fp8
        if resume_from is not None and not fp8:  # fp8: the trainer state holds the weights, loaded after conversion
            load_weights(model, resume_from)

        # Precision, sharding, optimizer, schedule.
        o3 = cfg.precision.mode == "fp8-o3"
        if o3 and not (self.info.distributed and cfg.dist.fsdp):
            raise ValueError("precision.mode=fp8-o3 shards with FSDP2 across processes: start it with torchrun "
                             "--nproc_per_node 2 (or more) and --dist.fsdp true, or use fp8-o2 in one process")
        if fp8 and not o3 and self.info.distributed and cfg.dist.fsdp:
            raise ValueError(f"precision.mode={cfg.precision.mode} with FSDP2 sharding is FP8-LM O3: pass "
                             "--precision.mode fp8-o3, or --dist.fsdp false "
                             "(data parallelism with FP8 gradient reduction)")
        shard = build_sharder(self.info, cfg)
        plan = apply_precision(model, adamw_factory(cfg.optim), cfg.precision, device=self.info.device, shard=shard)
        self.model, self.optimizer, self.autocast = plan.model, plan.optimizer, plan.autocast
        self.reference = None
        if cfg.loss.regulariser == "dpo":
            self.reference = build_reference(self.model, self.reference_lm, self.autocast,
                                             place=lambda ref: shard(ref.to(self.info.device)))
        self.steps_per_epoch = len(self.train_data) // cfg.optim.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_data)} training pairs is fewer than "
                             f"optim.batch_size={cfg.optim.batch_size}")
        per = self.info.world_size * cfg.optim.grad_accum
        if cfg.optim.batch_size % per:
            raise ValueError(f"optim.batch_size={cfg.optim.batch_size} must be divisible by "
                             f"processes x grad_accum = {per}")
        self.micro_size = cfg.optim.batch_size // per
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps=self.total_steps)
        self.train_step = self.build_step()
        self.step = 0
        self.saved_step: int | None = None
        torch.manual_seed(cfg.seed + self.info.rank)  # dropout; restored exactly on resume
        random.seed(cfg.seed + self.info.rank)
        seed_numpy(cfg.seed + self.info.rank)  # for libraries that draw from it; checkpointed like the others
        if resume_from is not None:
            self.step = self.saved_step = load_trainer_state(self, resume_from, weights=fp8)
            if self.info.is_main:
                log.info("resumed from %s at step %d", resume_from, self.step)
        if self.info.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
            trim_metrics(self.run_dir / "metrics.jsonl", self.step)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.info.is_main)

    # -- builders -----------------------------------------------------------------------------
    def build_data(self) -> tuple[PreferenceDataset, PreferenceDataset | None]:
        d, info = self.cfg.data, self.info
        train_path, eval_path = d.train, d.eval
        if d.synthetic:
            folder = self.run_dir / "data"
            train_path, eval_path = str(folder / "train.jsonl"), str(folder / "eval.jsonl")
            if info.is_main:
                write_jsonl(synthetic_rows(d.synthetic, seed=self.cfg.seed), train_path)
                write_jsonl(synthetic_rows(max(8, d.synthetic // 4), seed=self.cfg.seed + 1), eval_path)
            info.barrier()
        common = dict(max_tokens=d.max_tokens, truncate=d.truncate, limit=d.limit or None)
        train = load_preferences(train_path, self.renderer, flip_fraction=d.flip_fraction, seed=self.cfg.seed,
                                 split=d.split, **common)
        evald = load_preferences(eval_path, self.renderer, split=d.eval_split, **common) if eval_path else None
        if info.is_main:
            reports = {"train": train.report.to_json(), "eval": evald.report.to_json() if evald else None}
            (self.run_dir / "data_report.json").write_text(json.dumps(reports, indent=2) + "\n")
            log.info("train data: %s", train.report.summary())
            if evald:
                log.info("eval data: %s", evald.report.summary())
        return train, evald

    # -- data position ------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_data), generator=g)

    def micro_batches(self, step: int) -> list[PairBatch]:
        """This process's micro-batches for optimizer step `step` (a pure function of the step)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        g = self.cfg.optim.batch_size
        chosen = self.epoch_order(epoch)[index * g:(index + 1) * g].tolist()  # the global batch
        w, r, mb = self.info.world_size, self.info.rank, self.micro_size
        out = []
        for m in range(self.cfg.optim.grad_accum):
            start = (m * w + r) * mb
            out.append(collate_pairs([self.train_data[i] for i in chosen[start:start + mb]], self.pad_id)
                       .to(self.info.device))
        return out

    # -- one optimizer step -------------------------------------------------------------------
    def build_step(self) -> TrainStep:
        info, fsdp = self.info, self.cfg.dist.fsdp
        return TrainStep(self.model, self.optimizer, self.scheduler, autocast=self.autocast,
                         loss_fn=lambda model, batch: compute_loss(model, batch, self.cfg, self.reference),
                         grad_clip=self.cfg.optim.grad_clip, grad_sync=set_grad_sync,
                         reduce_grads=(lambda: all_reduce_grads(self.model, info))
                         if info.distributed and not fsdp else None,
                         reduce_stats=lambda stats: all_mean(stats, info))

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to `total_steps` (or `stop_at_step`); returns the last logged metrics."""
        cfg, info = self.cfg, self.info
        bar = progress(self.total_steps, initial=self.step, enabled=info.is_main and cfg.log.progress, desc="grm-train")
        last: dict[str, Any] = {"step": self.step}
        stop = min(self.total_steps, cfg.stop_at_step or self.total_steps)
        t0 = time.perf_counter()
        with bar:  # closed on Ctrl-C too, so what follows starts on a line of its own
            while self.step < stop:
                # 1. this step's micro-batches, a pure function of the step (exact resume)
                batches = self.micro_batches(self.step)
                # 2. forward + backward per micro-batch, clip, optimizer and schedule step
                stats = self.train_step(batches)
                self.step += 1
                bar.update(1)
                # 3. log
                if self.step % cfg.log.every == 0 or self.step == stop:
                    last = self.log_step(stats, time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.2f}")
                # 4. evaluate
                if self.eval_data is not None and cfg.eval.every and self.step % cfg.eval.every == 0 \
                        and self.step < stop:
                    self.metrics.write(self.evaluate())
                # 5. checkpoint
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < stop:
                    self.save_checkpoint()
        # 6. the end (or an early stop): final evaluation and checkpoint
        if self.eval_data is not None and self.step == self.total_steps:
            evaluation = self.evaluate()
            self.metrics.write(evaluation)
            last.update({k: v for k, v in evaluation.items() if k.startswith("eval_")})
        if (cfg.checkpoint.final or self.step < self.total_steps) and self.saved_step != self.step:
            self.save_checkpoint()
        return last

    def log_step(self, stats: dict[str, Any], elapsed: float) -> dict[str, Any]:
        """Write this step's line of metrics.jsonl (the step's statistics, and under fp8-o3 this
        process's E4M3 payloads since it started, not the run's); returns it."""
        line = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch, **stats,
                "time_s": round(elapsed, 3)}
        if self.cfg.precision.mode == "fp8-o3":
            sent, reduced = all_gather_bytes(), reduce_scatter_bytes()
            line["fp8_all_gather_mib"] = round((sent["fp8_linears"] + sent["e4m3_embeddings"]) / 2**20, 3)
            line["fp8_reduce_scatter_mib"] = round(reduced["e4m3_gradients"] / 2**20, 3)
        self.metrics.write(line)
        return line

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        """Accuracy and reward statistics on the eval set, each process scoring a slice."""
        pairs = self.eval_data.pairs
        if not pairs:
            return {"step": self.step, "split": "eval", "eval_pairs": 0}
        w, r = self.info.world_size, self.info.rank
        per = math.ceil(len(pairs) / w)
        mine = list(pairs[r * per:(r + 1) * per])
        n_real = len(mine)
        mine += [pairs[0]] * (per - n_real)  # equal work on every process (FSDP collectives)
        self.model.eval()
        r_c, r_r = score_pairs(self.model, mine, pad_id=self.pad_id, batch_size=self.cfg.eval.batch_size,
                               device=self.info.device, autocast=self.autocast)
        self.model.train()
        if self.info.distributed:
            gathered = [None] * w
            dist.all_gather_object(gathered, (r_c[:n_real], r_r[:n_real]))
            r_c = torch.cat([g[0] for g in gathered])
            r_r = torch.cat([g[1] for g in gathered])
        stats = reward_stats(r_c, r_r)
        return {"step": self.step, "split": "eval", **{f"eval_{k}": v for k, v in stats.items()}}

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write `checkpoints/step-N/` atomically (temporary folder, then rename); rank 0 writes."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)  # collective under FSDP
        if self.cfg.precision.mode == "fp8-o3":  # FP8AdamW state lives on each process's shard: keep one per rank
            optim_sd = {"shards": [torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)
                                   for b in gather_to_main(state_bytes(self.optimizer.state_dict()), self.info)]}
        else:  # torch.distributed.checkpoint's optimizer state drops FP8AdamW's "fp8" entry: kept beside it
            optim_sd = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
            if hasattr(self.optimizer, "fp8_meta"):
                optim_sd = {**optim_sd, "fp8": self.optimizer.fp8_meta()}
        all_rng = gather_to_main(rng_state(), self.info)
        final = self.ckpt_dir / checkpoint_name(self.step)
        if self.info.is_main:
            with staged_dir(final) as tmp:
                lora = is_lora(self.model)  # FSDP2 keeps the module, its class hierarchy and its names
                export = export_model(self.hf_config, self.grm_config, model_sd, lora, self.cfg)
                with quiet_hf_progress():
                    save_grm(export, self.tokenizer, tmp / "model")
                if lora:
                    from safetensors.torch import save_file
                    names = {n for n, p in self.model.named_parameters() if p.requires_grad}
                    save_file({k: v.contiguous() for k, v in model_sd.items() if k in names}, str(tmp / TRAINABLE_FILE))
                state = {"version": STATE_VERSION, "step": self.step, "skipped_steps": self.train_step.skipped_steps,
                         "epoch": self.step // self.steps_per_epoch, "batch_in_epoch": self.step % self.steps_per_epoch,
                         "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(), "rng": all_rng,
                         "world_size": self.info.world_size, "config": to_dict(self.cfg)}
                if self.cfg.precision.fp8:  # master weights + FP8 scaling state (model/ is FP8)
                    state["model"] = model_sd
                torch.save(state, tmp / STATE_FILE)
            prune_checkpoints(self.ckpt_dir, self.cfg.checkpoint.keep)
            log.info("saved %s", final)
        self.saved_step = self.step
        self.info.barrier()
        return final if self.info.is_main else None

    def close(self) -> None:
        if self.info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def state_bytes(state: dict[str, Any]) -> bytes:
    """`state` as `torch.save` bytes, its tensors on the CPU (bytes, because pickling FP8 storages for
    `all_gather_object` fails; on the CPU, so that rank 0 loads every rank's state without its GPU)."""
    from torch.utils._pytree import tree_map_only

    buf = io.BytesIO()
    torch.save(tree_map_only(torch.Tensor, lambda t: t.cpu(), state), buf)
    return buf.getvalue()


def gather_to_main(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's `obj`, in rank order (one process: ``[obj]``)."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def set_grad_sync(model: nn.Module, sync: bool) -> None:
    """Skip FSDP2's gradient reduce-scatter on all but the last micro-batch of a step."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)


def all_reduce_grads(model: nn.Module, info: DistInfo) -> None:
    """Average gradients over processes (multi-process runs without FSDP). The weight gradients of
    FP8 training linears travel as FP8 (FP8-LM: one shared, world-size pre-divided scale per tensor,
    so the sum cannot overflow; training/core/fp8/comm.py); the FP16 gradients of FP16-master embeddings
    in float32; every other gradient in its own dtype. Scaled gradients are stored again as they were."""
    fp8 = {id(m.weight) for m in model.modules() if isinstance(m, FP8TrainingLinear)}
    grads = [p.grad for p in model.parameters() if p.grad is not None and id(p) in fp8]
    # O2 keeps scaled gradients only (`scaled_grad`): reduce their values, store the result as before.
    stored = [p for p in model.parameters() if p.grad is None and getattr(p, "scaled_grad", None) is not None]
    values = [gradient(p) for p in stored]
    in_fp8 = [v for p, v in zip(stored, values) if p.scaled_grad.q.element_size() == 1]
    if grads or in_fp8:
        fp8_all_reduce_(grads + in_fp8, op="avg")
    for p, v in zip(stored, values):
        if p.scaled_grad.q.element_size() > 1:  # FP16-master embeddings: reduced in float32
            dist.all_reduce(v)
            v.div_(info.world_size)
        p.scaled_grad = ScaledGrad.quantize(v, p.scaled_grad.q.dtype)
    for p in model.parameters():
        if p.grad is not None and id(p) not in fp8:
            dist.all_reduce(p.grad)
            p.grad.div_(info.world_size)


# ---------------------------------------------------------------------------------------------
# Checkpoint files


def rng_state() -> dict[str, Any]:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_numpy(seed: int) -> None:
    import numpy as np

    np.random.seed(seed % 2**32)


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_model(hf_config, grm_config: GRMConfig, state_dict: dict[str, torch.Tensor], lora: bool,
                 cfg: TrainConfig) -> GRMModel:
    """A plain CPU `GRMModel` holding `state_dict` (the training model's full state), LoRA merged.

    Built on the meta device, so it neither costs an initialisation nor touches the RNG."""
    with torch.device("meta"):
        skeleton = init_grm(copy.deepcopy(hf_config), grm=copy.deepcopy(grm_config))
        if lora:
            skeleton = apply_lora(skeleton, cfg)
        fp8 = cfg.precision.fp8
        if fp8:  # the same FP8 layers (and their scaling state) as the training model
            # rank 0 exports alone: no amax reduction across processes here
            recipe = get_training_recipe(cfg.precision.fp8_recipe, reduce_amax=False)
            convert_to_fp8_training(skeleton, recipe, "emulated")
    skeleton = skeleton.to_empty(device="cpu")
    missing, unexpected = skeleton.load_state_dict(dequantize_fp16_masters(state_dict), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export: state dict mismatch (missing {missing[:4]}, unexpected {unexpected[:4]})")
    # Leaving the meta device gave tied parameters (embeddings / LM head) separate storage: re-tie.
    (skeleton.lm.get_base_model() if lora else skeleton.lm).tie_weights()
    if lora:
        skeleton.lm = skeleton.lm.merge_and_unload()
    if fp8:  # the E4M3 bytes the next training step would compute with, served as they are
        export_trained_fp8(skeleton)
    return skeleton.eval()


def load_weights(model: GRMModel, ckpt: Path) -> None:
    """Put a checkpoint's trained weights into a freshly built (unsharded) model."""
    if is_lora(model):
        from safetensors.torch import load_file

        state = load_file(str(ckpt / TRAINABLE_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if unexpected or trainable - set(state):
            raise CheckpointError(f"{ckpt / TRAINABLE_FILE}: does not match this LoRA config "
                                  f"(unexpected {unexpected[:4]}, missing {sorted(trainable - set(state))[:4]})")
        return
    loaded = load_grm(ckpt / "model", load_tokenizer=False).model
    model.load_state_dict(loaded.state_dict())


def read_trainer_state(ckpt: Path, *, mmap: bool = False) -> dict[str, Any]:
    """`ckpt`'s trainer state (`mmap`: tensors read only when used); a file that cannot be read (missing,
    no permission) or is damaged (truncated, corrupt) is a `CheckpointError` naming it, not torch's
    traceback; only a damaged one is worth deleting."""
    path = ckpt / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as exc:  # missing, unreadable: the file may be fine
        raise CheckpointError(f"{path}: cannot be read ({exc})") from exc
    except Exception as exc:  # torch.load raises several types for a damaged file
        cause = str(exc).split(". ")[0].splitlines()[0]
        raise CheckpointError(f"{path}: damaged ({type(exc).__name__}: {cause}); resume from an earlier checkpoint "
                              "(delete this one) or start a new --run_dir") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a trainer state")
    return state


def load_trainer_state(trainer: Trainer, ckpt: Path, *, weights: bool = False) -> int:
    """Restore optimizer, scheduler and RNG from `ckpt` (with `weights`, the model's full training
    state first: FP8 runs keep master weights and scaling state there); returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = read_trainer_state(ckpt)
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{ckpt / STATE_FILE}: trainer-state version {state.get('version')!r}, "
                              f"expected {STATE_VERSION}")
    if weights:
        if "model" not in state:
            raise CheckpointError(f"{ckpt / STATE_FILE}: no model state; it was not written by an fp8 run")
        set_model_state_dict(trainer.model, state["model"], options=StateDictOptions(full_state_dict=True))
    if "shards" in state["optimizer"]:  # fp8-o3: one FP8AdamW state per process's shard
        shards = state["optimizer"]["shards"]
        if len(shards) != trainer.info.world_size:
            raise CheckpointError(f"{ckpt / STATE_FILE}: fp8-o3 optimizer state is sharded over {len(shards)} "
                                  f"processes; resume with torchrun --nproc_per_node {len(shards)}")
        trainer.optimizer.load_state_dict(shards[trainer.info.rank])
    else:
        optim_sd = dict(state["optimizer"])
        meta = optim_sd.pop("fp8", None)  # FP8AdamW's layout and skipped steps, saved beside the state
        if meta is not None and hasattr(trainer.optimizer, "load_fp8_meta"):
            trainer.optimizer.load_fp8_meta(meta)
        set_optimizer_state_dict(trainer.model, trainer.optimizer, optim_sd,
                                 options=StateDictOptions(full_state_dict=True))
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.train_step.skipped_steps = int(state.get("skipped_steps", 0))
    rngs = state["rng"]
    if state["world_size"] != trainer.info.world_size:
        log.warning("resuming with %d processes from a %d-process checkpoint: dropout randomness will differ",
                    trainer.info.world_size, state["world_size"])
    set_rng_state(rngs[min(trainer.info.rank, len(rngs) - 1)])
    saved_cfg = state.get("config", {})
    now = to_dict(trainer.cfg)
    changed = sorted(k for k in _flatten(now) if _flatten(saved_cfg).get(k) != _flatten(now)[k]
                     and k not in ("resume", "stop_at_step"))
    if changed:
        log.warning("resuming with config changes: %s", ", ".join(changed))
    return int(state["step"])


LAYOUT_OPTIONS = ("fp8_recipe", "fp8_master")
"""The precision options, besides the mode, that decide what a checkpoint's trainer state holds (under the
modes that read them): the FP8 scaling state's recipe, and the FP8 linears' and embeddings' FP16 masters.
The others (fp8_backend, fp8_fuse, and fp8-o3's gather and reduce-scatter dtypes) change how a step
computes or communicates, not the saved layout, and may change on resume."""


def _layout_mode(mode: str | None) -> str:
    """fp32, bf16 and auto (which resolves to one of them) all keep fp32 weights and torch's AdamW state;
    each fp8 mode has a layout of its own."""
    return mode if mode in FP8_MODES else "fp32/bf16"


def check_resume_precision(cfg: TrainConfig, ckpt: Path) -> None:
    """Refuse to resume `ckpt` with precision flags that change the checkpoint's layout (the mode and
    `LAYOUT_OPTIONS`, against the config saved in its trainer state), naming each flag to pass: the model
    and optimizer state would not load, or would load into another model. Runs before anything is loaded
    (the weights of a non-fp8 run load first, from model/)."""
    saved = read_trainer_state(ckpt, mmap=True).get("config")
    if not saved or not isinstance(saved.get("precision"), dict):
        return  # a state without its config: nothing to compare against
    defaults = to_dict(type(cfg.precision)())
    was, now = {**defaults, **saved["precision"]}, to_dict(cfg)["precision"]
    differ = ["mode"] if _layout_mode(was["mode"]) != _layout_mode(now["mode"]) else []
    differ += [k for k in LAYOUT_OPTIONS if was[k] != now[k]  # an option only counts under a mode that reads it
               and (was["mode"] in MODE_OPTIONS[k][0] or now["mode"] in MODE_OPTIONS[k][0])]
    if differ:
        flags = " ".join(f"--precision.{k} {was[k]}" for k in differ)
        raise CheckpointError(f"{ckpt} was trained with {flags} (this run: {', '.join(str(now[k]) for k in differ)}); "
                              f"resume with {flags}, or start a new --run_dir")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


@contextlib.contextmanager
def quiet_hf_progress():
    """No "Writing model shards" bar from transformers while a checkpoint is written."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with a dot and are skipped)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint in `ckpt_dir`, or None."""
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    for stale in ckpt_dir.glob(".step-*"):  # leftovers of a killed save
        shutil.rmtree(stale, ignore_errors=True)
    if keep:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past `step` (written by a run that was killed after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    cfg, ns = parse_args(argv)
    if not start_command(cfg, ns):
        return 0
    try:
        trainer = Trainer(cfg)  # validates the config first
    # bad config, data, checkpoint: say what to change
    except (ValueError, NotImplementedError, assets.AssetError) as exc:
        return fail("grm-train", exc)
    except KeyboardInterrupt:  # Ctrl-C while loading the model and data
        return interrupted("grm-train", "before the first step; nothing was trained")
    try:
        result = trainer.fit()
        if trainer.info.is_main:
            print(json.dumps(result))
    except KeyboardInterrupt:  # Ctrl-C: say where the run stands and how to go on, not a traceback
        where = resume_hint(trainer.step, trainer.saved_step, trainer.ckpt_dir)
        return interrupted("grm-train", where) if trainer.info.is_main else INTERRUPTED
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
