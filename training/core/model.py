"""The GRM model: a causal LM that keeps its LM head, plus a reward head on the same hidden state.

One definition serves training and serving. The reward is read from the final hidden state at
the last real token (the last position whose attention mask is 1, so left and right padding
both work). `forward` also returns the summed log-probabilities of the response tokens that
GRM's text-generation regularisers need; `score` skips the LM head entirely. Reading and writing
checkpoints is checkpoint.py's work.

    >>> import torch
    >>> from grmserve.training.core.assets import tiny_llama_config
    >>> model = init_grm(tiny_llama_config(), HeadConfig(type="linear"), seed=0)
    >>> ids = torch.tensor([[5, 6, 7, 0]]); mask = torch.tensor([[1, 1, 1, 0]])
    >>> model.eval().score(ids, mask).shape
    torch.Size([1])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from . import env  # noqa: F401  (offline mode before transformers is imported)

FORMAT_VERSION = 1
"""Version of the `grm` block in config.json (checkpoint.py refuses others)."""
HeadType = Literal["mlp", "linear"]
HEAD_TYPES: tuple[str, ...] = get_args(HeadType)


@dataclass(kw_only=True)
class HeadConfig:
    """Shape of the reward head."""

    type: HeadType = "mlp"
    """`mlp`: dropout, Linear(h, hidden), ReLU, Linear(hidden, 1). `linear`: dropout, Linear(h, 1)."""
    hidden: int = 1024
    """Width of the mlp head's hidden layer."""
    dropout: float = 0.1
    """Dropout on the pooled hidden state (training only)."""
    bias: bool = True
    """Whether the linear head has a bias (sequence-classification `score` layers do not)."""

    def __post_init__(self) -> None:
        if self.type not in HEAD_TYPES:
            raise ValueError(f"unknown reward head type {self.type!r}; expected one of {HEAD_TYPES}")


@dataclass(kw_only=True)
class GRMConfig:
    """The `grm` block of config.json: everything beyond the causal LM needed to reproduce a score."""

    format_version: int = FORMAT_VERSION
    head: HeadConfig = field(default_factory=HeadConfig)
    pooling: str = "last_token"
    """The reward is read at the last token whose attention mask is 1."""
    chat_template: bool = True
    """Render chat-message prompts with the tokenizer's chat template (as training did)."""
    max_tokens: int = 2048
    """Longest prompt + response, in tokens, the model was trained or is served for."""
    model_name: str = "grm"
    model_version: str = "0"
    quantization: dict[str, Any] | None = None
    """FP8 export: float8 layers + scales (training/core/fp8/DESIGN.md); None (and omitted) for full precision."""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["quantization"] is None:
            del data["quantization"]
        return data


class RewardHead(nn.Module):
    """dropout → Linear(h, hidden) → ReLU → Linear(hidden, 1) (mlp), or dropout → Linear(h, 1).

    Parameter names (`summary.0.weight`, … or `summary.weight`) match the official GRM code's
    `v_head`, so its tensors load by stripping the `v_head.` prefix.
    """

    def __init__(self, hidden_size: int, config: HeadConfig):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout)
        if config.type == "mlp":
            self.summary = nn.Sequential(nn.Linear(hidden_size, config.hidden), nn.ReLU(), nn.Linear(config.hidden, 1))
        else:
            self.summary = nn.Linear(hidden_size, 1, bias=config.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B,)
        dtype = next(self.parameters()).dtype
        return self.summary(self.dropout(pooled.to(dtype))).squeeze(-1)


@dataclass
class GRMOutput:
    rewards: torch.Tensor  # (B,) float32
    logps: torch.Tensor | None = None  # (B,) summed response-token log-probs, when asked
    hidden: torch.Tensor | None = None  # (B, T, H) final hidden states


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position whose mask is 1, per row: right, left or no padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * positions).argmax(-1)  # (B,)


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    idx = last_token_index(attention_mask)  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (B, H)


class GRMModel(nn.Module):
    """Causal LM (backbone + LM head) with a reward head reading the last real token.

    Built by `init_grm` (fresh head on a causal LM) or `load_grm` (any supported checkpoint).
    """

    def __init__(self, lm: nn.Module, head: RewardHead, config: GRMConfig):
        super().__init__()
        self.lm = lm
        self.reward_head = head
        self.grm_config = config

    @property
    def backbone(self) -> nn.Module:
        """The decoder without its LM head (e.g. `LlamaModel`)."""
        return self.lm.get_decoder()

    @property
    def hf_config(self):
        return self.lm.config

    def hidden_states(self, input_ids, attention_mask, **backbone_kwargs) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **backbone_kwargs)
        return out.last_hidden_state  # (B, T, H)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) in float32, skipping the LM head."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.reward_head(pool_last(hidden, attention_mask)).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> GRMOutput:
        """Rewards, and with `response_mask` (1 on response tokens) the summed log π(y_t | x, y_<t).

        `inputs_embeds` (B, T, H) replaces the token embeddings (e.g. hidden states of frozen lower
        layers, computed once: training/experiment.py); `input_ids` still give the log-prob targets.
        """
        if inputs_embeds is not None:
            hidden = self.hidden_states(None, attention_mask, inputs_embeds=inputs_embeds)  # (B, T, H)
        else:
            hidden = self.hidden_states(input_ids, attention_mask)  # (B, T, H)
        rewards = self.reward_head(pool_last(hidden, attention_mask)).float()
        logps = None
        if response_mask is not None:
            logps = response_logps(self.lm.get_output_embeddings(), hidden, input_ids, response_mask * attention_mask)
        return GRMOutput(rewards=rewards, logps=logps, hidden=hidden)


def response_logps(lm_head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                   response_mask: torch.Tensor) -> torch.Tensor:
    """sum_t log π(y_t | x, y_<t) over positions where `response_mask` is 1, per row.

    Only the positions that predict a response token go through the LM head, which keeps the
    (tokens × vocab) logits small when prompts are long.
    """
    target_mask = response_mask[:, 1:].bool()  # (B, T-1): token t+1 is predicted from position t
    rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    pred_hidden = hidden[:, :-1][target_mask]  # (N, H)
    targets = input_ids[:, 1:][target_mask]  # (N,)
    logits = lm_head(pred_hidden).float()  # (N, V)
    token_logps = -F.cross_entropy(logits, targets, reduction="none")  # (N,)
    return torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add_(0, rows, token_logps)


# ---------------------------------------------------------------------------------------------
# Building


def init_grm(lm_or_config, head: HeadConfig | None = None, *, seed: int | None = None, grm: GRMConfig | None = None,
             dtype: torch.dtype = torch.float32) -> GRMModel:
    """A GRM model with a freshly initialised reward head on a causal LM (an instance or a config)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if seed is not None:
        torch.manual_seed(seed)
    lm = (AutoModelForCausalLM.from_config(lm_or_config, dtype=dtype) if isinstance(lm_or_config, PretrainedConfig)
          else lm_or_config)
    grm = grm or GRMConfig(head=head or HeadConfig())
    if head is not None:
        grm.head = head
    reward_head = RewardHead(lm.config.hidden_size, grm.head)
    return GRMModel(lm, reward_head, grm)
