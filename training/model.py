"""The GRM model: a causal LM that keeps its LM head, plus a reward head on the same hidden state.

One definition serves training and serving. The reward is read from the final hidden state at
the last real token (the last position whose attention mask is 1, so left and right padding
both work). `forward` also returns the summed log-probabilities of the response tokens that
GRM's text-generation regularisers need; `score` skips the LM head entirely.

Checkpoint formats that `load_grm` reads (see docs/checkpoints.md):

- ``grm``: our own. A Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer) that
  transformers and vLLM load as a plain LM, plus ``reward_head.safetensors`` and a ``"grm"``
  block in config.json describing the head, pooling and prompt rendering.
- ``grm-research``: the layout of the official GRM code (YangRui2015/Generalizable-Reward-Model):
  causal-LM weights with ``v_head.summary.*`` tensors beside them and ``vhead_*`` keys in config.json.
- ``sequence-classification``: a ``*ForSequenceClassification`` model with one label (how GRM's
  released "-ft" models and most public reward models ship); its ``score.weight`` becomes a
  linear head without bias.

    >>> import torch
    >>> from grmserve.training.assets import tiny_llama_config
    >>> model = init_grm(tiny_llama_config(), HeadConfig(type="linear"), seed=0)
    >>> ids = torch.tensor([[5, 6, 7, 0]]); mask = torch.tensor([[1, 1, 1, 0]])
    >>> model.eval().score(ids, mask).shape
    torch.Size([1])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import env  # noqa: F401  (offline mode before transformers is imported)
from .fsutil import replace_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEAD_FILE = "reward_head.safetensors"
HEAD_TYPES = ("mlp", "linear")
FORMATS = ("grm", "grm-research", "sequence-classification")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded; the message names the file and what is wrong."""


@dataclass(kw_only=True)
class HeadConfig:
    """Shape of the reward head."""

    type: str = "mlp"
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
    """FP8 export: float8 layers + scales (training/fp8/DESIGN.md); None (and omitted) for full precision."""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["quantization"] is None:
            del data["quantization"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], *, source: str = "config.json") -> "GRMConfig":
        data = dict(data)
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{source}: grm.format_version is {version!r}; this grm-serve reads {FORMAT_VERSION}")
        try:
            head = HeadConfig(**data.pop("head", {}))
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise CheckpointError(f"{source}: unknown keys in the grm block: {unknown}")
            return cls(head=head, **data)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{source}: bad grm block: {exc}") from exc


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


def response_logps(lm_head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
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
# Building, saving, loading


def init_grm(lm_or_config, head: HeadConfig | None = None, *, seed: int | None = None, grm: GRMConfig | None = None,
             dtype: torch.dtype = torch.float32) -> GRMModel:
    """A GRM model with a freshly initialised reward head on a causal LM (an instance or a config)."""
    from transformers import AutoModelForCausalLM, PretrainedConfig

    if seed is not None:
        torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(lm_or_config, dtype=dtype) if isinstance(lm_or_config, PretrainedConfig) else lm_or_config
    grm = grm or GRMConfig(head=head or HeadConfig())
    if head is not None:
        grm.head = head
    reward_head = RewardHead(lm.config.hidden_size, grm.head)
    return GRMModel(lm, reward_head, grm)


def save_grm(model: GRMModel, tokenizer, out_dir: str | Path) -> Path:
    """Write `model` in the `grm` format, atomically: into a temporary sibling, then renamed."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.lm.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        head_state = {k: v.detach().contiguous().cpu() for k, v in model.reward_head.state_dict().items()}
        save_file(head_state, str(tmp / HEAD_FILE), metadata={"format": "pt", "grm_head": model.reward_head.config.type})
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["grm"] = model.grm_config.to_json()
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class LoadedCheckpoint:
    model: GRMModel
    tokenizer: Any
    format: str
    path: Path


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (it does not exist or is not a directory)")
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: not found; a checkpoint folder needs a Hugging Face config.json")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({exc})") from exc


def weight_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.glob("*.safetensors") if p.name != HEAD_FILE)
    if not files:
        files = sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"{path}: no weight files (*.safetensors or pytorch_model*.bin)")
    return files


def read_tensors(files: list[Path], prefix: str) -> dict[str, tuple[torch.Tensor, Path]]:
    """Tensors whose names start with `prefix` (prefix stripped), with the file each came from."""
    from safetensors import SafetensorError, safe_open

    found: dict[str, tuple[torch.Tensor, Path]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as fh:
                    for key in fh.keys():
                        if key.startswith(prefix):
                            found[key[len(prefix):]] = (fh.get_tensor(key), f)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{f}: unreadable safetensors file ({exc})") from exc
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad pickle
                raise CheckpointError(f"{f}: unreadable weight file ({exc})") from exc
            found.update({k[len(prefix):]: (v, f) for k, v in state.items() if k.startswith(prefix)})
    return found


def detect_format(path: Path, cfg: dict[str, Any]) -> str:
    if "grm" in cfg:
        return "grm"
    if any(str(a).endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        return "sequence-classification"
    if "vhead_layer_type" in cfg or read_tensors(weight_files(path), "v_head."):
        return "grm-research"
    raise CheckpointError(
        f"{path / 'config.json'}: no reward head found. This looks like a plain causal LM "
        "(no `grm` block, no `v_head.*` tensors, not *ForSequenceClassification); train a reward "
        "model on it with `grm-train`, or pass a reward-model checkpoint"
    )


def _head_from_tensors(tensors: dict[str, tuple[torch.Tensor, Path]], head: HeadConfig, hidden_size: int,
                       where: str, dtype: torch.dtype) -> RewardHead:
    module = RewardHead(hidden_size, head)
    expected = module.state_dict()
    for name, ref in expected.items():
        if name not in tensors:
            raise CheckpointError(f"{where}: missing reward-head tensor `{name}` for a {head.type} head "
                                  f"(found {sorted(tensors) or 'none'})")
        tensor, src = tensors[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(f"{src}: reward-head tensor `{name}` has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(ref.shape)} (hidden size {hidden_size}, {head.type} head)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: unexpected reward-head tensors {extra} for a {head.type} head")
    module.load_state_dict({k: v for k, (v, _) in tensors.items()})
    return module.to(dtype)


def _load_lm(path: Path, cfg: dict[str, Any], dtype: torch.dtype, allowed_missing: set[str]):
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    # A truncated or corrupt file must name itself (transformers raises a bare SafetensorError).
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt"):
                    pass
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{f}: unreadable safetensors file ({exc})") from exc
    try:
        hf_config = AutoConfig.from_pretrained(path)
        # Mismatched shapes are reported below (naming the tensors) instead of as transformers' bare error.
        lm, info = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype, output_loading_info=True,
                                                        ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: the causal-LM weights do not load: {exc}") from exc
    tied = getattr(lm.config, "tie_word_embeddings", False)
    missing = [k for k in info.get("missing_keys", []) if k not in allowed_missing and not (tied and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"{weight_files(path)[0]}: missing tensors {sorted(missing)[:8]}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        shown = sorted(f"{k[0]} {tuple(k[1])}, expected {tuple(k[2])}" if isinstance(k, tuple) else str(k) for k in mismatched)
        raise CheckpointError(f"{weight_files(path)[0]}: tensors with the wrong shape: {shown[:8]}")
    return lm


def load_grm(path: str | Path, *, dtype: torch.dtype = torch.float32, head_dtype: torch.dtype = torch.float32,
             load_tokenizer: bool = True) -> LoadedCheckpoint:
    """Load a reward model in any supported format (see the module docstring). Returns it in eval mode.

    Raises `CheckpointError` naming the file and the problem when the folder is broken.
    """
    path = Path(path)
    cfg = read_config(path)
    fmt = detect_format(path, cfg)
    hidden_size = cfg.get("hidden_size") or cfg.get("text_config", {}).get("hidden_size")
    if not hidden_size:
        raise CheckpointError(f"{path / 'config.json'}: no hidden_size")

    if fmt == "grm":
        grm = GRMConfig.from_json(cfg["grm"], source=str(path / "config.json"))
        head_file = path / HEAD_FILE
        if not head_file.is_file():
            raise CheckpointError(f"{head_file}: not found; a grm checkpoint keeps its reward head there")
        tensors = read_tensors([head_file], "")
        if grm.quantization:  # FP8 export: built straight from float8 weights + scales
            from .fp8.convert import load_fp8_lm

            lm = load_fp8_lm(path, grm.quantization, dtype)
        else:
            lm = _load_lm(path, cfg, dtype, set())
        where = str(head_file)
    elif fmt == "grm-research":
        layer_type = cfg.get("vhead_layer_type", "mlp")
        if layer_type not in HEAD_TYPES:
            raise CheckpointError(f"{path / 'config.json'}: unknown head type vhead_layer_type={layer_type!r}; "
                                  f"expected one of {HEAD_TYPES}")
        if int(cfg.get("vhead_num_layers", 1)) != 1 and layer_type == "mlp":
            raise CheckpointError(f"{path / 'config.json'}: vhead_num_layers={cfg['vhead_num_layers']} is not "
                                  "supported (GRM's released heads have one hidden layer)")
        head = HeadConfig(type=layer_type, hidden=int(cfg.get("vhead_num_neurons", 1024)))
        grm = GRMConfig(head=head, model_name=Path(path).name)
        tensors = read_tensors(weight_files(path), "v_head.")
        lm = _load_lm(path, cfg, dtype, set())
        where = f"{weight_files(path)[0]}"
    else:
        # transformers omits id2label from config.json when it is its default of two labels.
        num_labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
        if num_labels != 1:
            raise CheckpointError(f"{path / 'config.json'}: a reward model needs one label, this "
                                  f"sequence classifier has {num_labels}")
        # `score.weight` (and `score.bias`, if any) become the linear head's `summary.*`.
        tensors = {f"summary.{k}": v for k, v in read_tensors(weight_files(path), "score.").items()}
        bias = "summary.bias" in tensors
        head = HeadConfig(type="linear", dropout=0.0, bias=bias)
        grm = GRMConfig(head=head, model_name=Path(path).name)
        # The causal LM loads the backbone; its LM head is tied to the embeddings or left untrained.
        lm = _load_lm(path, cfg, dtype, {"lm_head.weight"})
        where = f"{weight_files(path)[0]}"
    grm.max_tokens = min(grm.max_tokens, int(cfg.get("max_position_embeddings", grm.max_tokens)))
    head_module = _head_from_tensors(tensors, grm.head, int(hidden_size), where, head_dtype)
    model = GRMModel(lm, head_module, grm).eval()

    tokenizer = None
    if load_tokenizer:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path}: no usable tokenizer files ({exc})") from exc
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if grm.chat_template and not getattr(tokenizer, "chat_template", None):
            grm.chat_template = False
    return LoadedCheckpoint(model=model, tokenizer=tokenizer, format=fmt, path=path)


def export_sequence_classification(model: GRMModel, tokenizer, out_dir: str | Path) -> Path:
    """Write a GRM model with a linear, bias-free head as a plain `*ForSequenceClassification`
    checkpoint (one label), which transformers and vLLM's pooling runner load without custom code.

    An mlp head has no such form: export refuses it rather than silently changing the scores.
    The tokenizer's pad token must differ from the token the reward is read at (transformers finds
    the last real token by searching for the pad id).
    """
    from transformers import AutoModelForSequenceClassification

    head = model.reward_head.config
    if head.type != "linear" or head.bias:
        raise ValueError(f"only a linear head without bias maps onto `score.weight`; this head is {head.type}"
                         f"{' with bias' if head.bias else ''}. Serve it with grm-serve instead")
    cfg = model.lm.config.__class__.from_dict(model.lm.config.to_dict())
    cfg.num_labels = 1
    cfg.id2label, cfg.label2id = {0: "reward"}, {"reward": 0}
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.architectures = None
    seq = AutoModelForSequenceClassification.from_config(cfg, dtype=next(model.lm.parameters()).dtype)
    missing, unexpected = seq.base_model.load_state_dict(model.backbone.state_dict(), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"backbone does not fit {type(seq).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        seq.score.weight.copy_(model.reward_head.summary.weight.to(seq.score.weight.dtype))
    out = Path(out_dir)
    seq.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
