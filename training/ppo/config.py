"""The `grm-ppo` config tree. Every leaf is a `--dotted.name` flag (training/core/configtools.py);
precedence is CLI > preset (`--preset tiny`, presets.py) > dataclass default.

    >>> cfg = PPOConfig()
    >>> cfg.policy.backbone, cfg.ppo.epochs, cfg.kl.mode
    ('smollm2', 2, 'adaptive')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .. import config as train_config
from ..config import LoraConfig, PrecisionConfig
from ..core.configtools import check_literals

KLEstimator = Literal["k1", "k2", "k3"]


@dataclass(kw_only=True)
class PolicyConfig:
    """The policy to train (a causal LM) and the value head put on its final hidden state."""

    backbone: str = "smollm2"
    """`tiny` (random tiny Llama with SmolLM2's tokenizer), `smollm2` (SmolLM2-135M-Instruct) or a
    local Hugging Face causal-LM folder."""
    tiny_hidden_size: int = 64
    """Hidden size of the `tiny` policy."""
    tiny_layers: int = 2
    """Decoder layers of the `tiny` policy."""
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True, r=32, alpha=64, dropout=0.0))
    """LoRA adapters (the reference is then the same model with its adapters off); off: full fine-tuning
    with a frozen copy of the initial policy as the reference."""
    value_head_init_std: float = 0.0
    """Standard deviation of the value head's initial weights (0: zeros, so the first values are 0)."""


@dataclass(kw_only=True)
class RewardConfig:
    """The remote reward service (grm-serve) that scores rollouts in chat form."""

    address: str = "localhost:50051"
    """The reward server: host:port, several comma-separated, or a dns:/// target of replicas."""
    timeout_s: float = 120.0
    """Deadline of one scoring call (retries included)."""
    patience_s: float = 120.0
    """How long the reward service may stay unreachable before the run ends (its last checkpoint kept)."""
    wait_ready_s: float = 60.0
    """How long to wait for the server to report SERVING at start-up."""
    token: str = ""
    """Bearer token for a server started with auth (empty: none)."""
    chat: bool = True
    """Send prompts as chat messages (the server renders the template as training did); off: send the
    rendered prompt text."""
    truncate: bool = True
    """Let the server truncate pairs longer than its max_tokens instead of refusing them."""
    whiten: bool = True
    """Whiten the scores over the batch (mean 0, std 1) before the KL penalty is added."""
    clip: float = 5.0
    """Clip (whitened) scores to [-clip, clip] (0: no clipping)."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response cut off at max_new_tokens (0: none)."""


@dataclass(kw_only=True)
class RolloutConfig:
    """Sampling rollouts from the current policy (transformers generate)."""

    batch_size: int = 16
    """Prompts (one response each) per PPO step."""
    chunk_size: int = 8
    """Prompts generated together; each chunk is sent for scoring as soon as it is generated."""
    overlap: bool = True
    """Score chunk k while chunk k+1 is generated and the log-probs are computed; off: wait for each chunk's scores."""
    max_new_tokens: int = 48
    """Longest response in tokens."""
    max_prompt_tokens: int = 256
    """Longest prompt in tokens (longer prompts are dropped when loaded)."""
    temperature: float = 1.0
    """Sampling temperature (the PPO log-probs use the same temperature)."""
    top_k: int = 0
    """Top-k sampling (0: off; anything else makes the sampling distribution differ from the policy's)."""


@dataclass(kw_only=True)
class DataConfig:
    """Where prompts come from."""

    prompts: str = "benchmark"
    """`benchmark` (the bundled instruction-following prompts) or a JSONL file of
    {"messages": [...]} or {"prompt": "..."} rows."""
    split: str = "train"
    """Benchmark split for training prompts."""
    limit: int = 0
    """Use at most this many training prompts (0: all)."""


@dataclass(kw_only=True)
class KLConfig:
    """The KL penalty to the reference policy, added to the per-token reward."""

    mode: Literal["fixed", "adaptive"] = "adaptive"
    """fixed coefficient, or adaptive (Ziegler et al. 2019: steer the KL towards `target`)."""
    coef: float = 0.05
    """(Initial) KL coefficient."""
    target: float = 6.0
    """Adaptive mode: the KL (nats per response) to steer towards."""
    horizon: int = 10000
    """Adaptive mode: how fast the coefficient moves (in rollouts)."""
    estimator: KLEstimator = "k1"
    """Per-token KL estimator in the reward: k1 = log p - log q, k2 = (log p - log q)^2 / 2, k3 = r - 1 - log r."""


@dataclass(kw_only=True)
class PPOAlgoConfig:
    """PPO's update: GAE, clipped objectives, minibatches and epochs."""

    epochs: int = 2
    """Passes over each rollout batch."""
    minibatch_size: int = 8
    """Rollouts per optimizer step."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    clip: float = 0.2
    """Policy ratio clip range."""
    value_clip: float = 0.2
    """Value clip range around the rollout's values."""
    value_coef: float = 0.1
    """Weight of the value loss."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch."""


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW over the trainable parameters (LoRA adapters or the whole policy, and the value head)."""

    lr: float = 1e-4
    """Learning rate of the policy."""
    value_lr: float = 0.0
    """Learning rate of the value head (0: the same as `lr`)."""
    warmup_steps: int = 0
    """Linear warm-up (optimizer steps)."""
    min_lr_ratio: float = 1.0
    """Learning rate at the last step as a fraction of `lr`, reached by cosine decay (1: constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""

    def to_train_optim(self) -> train_config.OptimConfig:
        """The same settings as grm-train's OptimConfig (the value head in the `head_lr` group)."""
        return train_config.OptimConfig(lr=self.lr, head_lr=self.value_lr, warmup_steps=self.warmup_steps,
                                        min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay,
                                        betas=tuple(self.betas), eps=self.eps, grad_clip=self.grad_clip)


@dataclass(kw_only=True)
class EvalConfig:
    """Gold reward (the benchmark's rule-based checker) on held-out benchmark prompts."""

    every: int = 10
    """Evaluate every this many steps, before the first and after the last (0: never)."""
    split: str = "test_id"
    """Benchmark split of the held-out prompts."""
    prompts: int = 32
    """Held-out prompts evaluated."""
    samples: int = 1
    """Sampled responses per prompt (besides the greedy one)."""
    batch_size: int = 16
    """Prompts generated together."""
    seed: int = 1234
    """Seed of the sampled responses (the same at every evaluation)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints under `<run_dir>/checkpoints/step-NNNNNNN/` (trainable weights + trainer state)."""

    every: int = 5
    """Save every this many steps (0: only at the end)."""
    keep: int = 2
    """Keep the newest this many checkpoints (0: all)."""
    export_policy: bool = True
    """At the end, write the trained policy (LoRA merged) as a Hugging Face folder `<run_dir>/policy`."""


@dataclass(kw_only=True)
class LogConfig:
    """Progress bar and metrics."""

    progress: bool = True
    """Show a tqdm progress bar."""


@dataclass(kw_only=True)
class PPOConfig:
    """Everything `grm-ppo` needs."""

    run_dir: str = "runs/ppo"
    """Folder for checkpoints, metrics.jsonl and the resolved config."""
    seed: int = 0
    """Seed for initialisation, prompt order, sampling and minibatch order."""
    device: str = "auto"
    """cpu, cuda, or auto (cuda when available)."""
    threads: int = 0
    """torch intra-op threads on CPU (0: torch's default)."""
    steps: int = 30
    """PPO steps (rollout batch + update) to run."""
    resume: bool = False
    """Resume from the newest complete checkpoint in run_dir (start fresh when there is none)."""
    stop_at_step: int = 0
    """Stop after this step (checkpointing first), as an interrupted job would (0: run to the end)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "PPOConfig":
        """Check cross-field constraints; raise ValueError saying what to change."""
        check_literals(self)
        r, p = self.rollout, self.ppo
        if r.batch_size < 1 or r.chunk_size < 1:
            raise ValueError("rollout.batch_size and rollout.chunk_size must be >= 1")
        if p.minibatch_size < 1 or r.batch_size % p.minibatch_size:
            raise ValueError(f"rollout.batch_size={r.batch_size} must be a multiple of "
                             f"ppo.minibatch_size={p.minibatch_size}")
        if p.grad_accum < 1 or p.minibatch_size % p.grad_accum:
            raise ValueError(f"ppo.minibatch_size={p.minibatch_size} must be a multiple of "
                             f"ppo.grad_accum={p.grad_accum}")
        if r.temperature <= 0:
            raise ValueError("rollout.temperature must be > 0 (PPO needs a sampling policy)")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.precision.fp8 and self.policy.lora.enabled:
            raise ValueError(f"precision.mode={self.precision.mode} trains the linear layers' own weights in FP8; "
                             "LoRA adapters are not supported with it: use --policy.lora.enabled false or "
                             "--precision.mode bf16")
        return self
