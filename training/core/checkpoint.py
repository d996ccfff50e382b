"""Reward-model checkpoints: the one place that reads and writes them.

Formats that `load_grm` reads (see docs/checkpoints.md):

- ``grm``: our own. A Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer) that
  transformers and vLLM load as a plain LM, plus ``reward_head.safetensors`` and a ``"grm"``
  block in config.json describing the head, pooling and prompt rendering. With a
  ``grm.quantization`` entry it is an FP8 checkpoint: float8 weights + scales (fp8/DESIGN.md).
- ``grm-research``: the layout of the official GRM code (YangRui2015/Generalizable-Reward-Model):
  causal-LM weights with ``v_head.summary.*`` tensors beside them and ``vhead_*`` keys in config.json.
- ``sequence-classification``: a ``*ForSequenceClassification`` model with one label (how GRM's
  released "-ft" models and most public reward models ship); its ``score.weight`` becomes a
  linear head without bias.

Every problem with a folder is a `CheckpointError` naming the file and what is wrong.

    >>> import tempfile
    >>> from grmserve.training.core.assets import tiny_llama_config
    >>> from grmserve.training.core.model import HeadConfig, init_grm
    >>> folder = save_grm(init_grm(tiny_llama_config(), HeadConfig(type="linear"), seed=0), None,
    ...                   tempfile.mkdtemp() + "/grm")
    >>> loaded = load_grm(folder, load_tokenizer=False)
    >>> loaded.format, loaded.model.reward_head.config.type
    ('grm', 'linear')
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .fp8.convert import (
    COMPUTE_DTYPES,
    INPUT_SCALE,
    QUANT_FORMAT_VERSION,
    RESIDUAL_TENSORS,
    SCALE_SUFFIX,
    ConversionReport,
    FP8Recipe,
    convert_to_fp8,
)
from .fp8.formats import E4M3
from .fp8.linear import GRANULARITIES, FP8InferenceLinear
from .fsutil import staged_dir
from .model import (
    FORMAT_VERSION,
    HEAD_TYPES,
    GRMConfig,
    GRMModel,
    HeadConfig,
    RewardHead,
)

HEAD_FILE = "reward_head.safetensors"
FORMATS = ("grm", "grm-research", "sequence-classification")


class CheckpointError(ValueError):
    """A checkpoint folder cannot be loaded; the message names the file and what is wrong."""


def grm_config_from_json(data: dict[str, Any], *, source: str = "config.json") -> GRMConfig:
    """The `grm` block of config.json as a `GRMConfig` (its inverse is `GRMConfig.to_json`)."""
    data = dict(data)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{source}: grm.format_version is {version!r}; this grm-serve reads {FORMAT_VERSION}")
    try:
        head = HeadConfig(**data.pop("head", {}))
        known = {f.name for f in dataclasses.fields(GRMConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown keys in the grm block: {unknown}")
        return GRMConfig(head=head, **data)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: bad grm block: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Writing


def save_grm(model: GRMModel, tokenizer, out_dir: str | Path) -> Path:
    """Write `model` in the `grm` format, atomically: into a temporary sibling, then renamed. A
    converted (FP8) model also gets config.json's compressed-tensors `quantization_config`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    with staged_dir(out) as tmp:
        model.lm.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        head_state = {k: v.detach().contiguous().cpu() for k, v in model.reward_head.state_dict().items()}
        save_file(head_state, str(tmp / HEAD_FILE),
                  metadata={"format": "pt", "grm_head": model.reward_head.config.type})
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["grm"] = model.grm_config.to_json()
        if model.grm_config.quantization:
            cfg["quantization_config"] = compressed_tensors_config(model.grm_config.quantization)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Reading


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


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """`safe_open` whose failures (truncated, corrupt, not safetensors) are a `CheckpointError` naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from exc
    with handle as fh:
        yield fh


def read_tensors(files: list[Path], prefix: str = "") -> dict[str, tuple[torch.Tensor, Path]]:
    """Tensors whose names start with `prefix` (prefix stripped), with the file each came from.

    The one reader of weight files: safetensors (float8 stays float8) and, for old checkpoints,
    `pytorch_model*.bin` (loaded with `weights_only`)."""
    from safetensors import SafetensorError

    found: dict[str, tuple[torch.Tensor, Path]] = {}
    for f in files:
        if f.suffix == ".safetensors":
            with open_safetensors(f) as fh:
                try:
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
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    # A truncated or corrupt file must name itself (transformers raises a bare SafetensorError).
    for f in weight_files(path):
        if f.suffix == ".safetensors":
            with open_safetensors(f):
                pass
    try:
        hf_config = AutoConfig.from_pretrained(path)
        # Mismatched shapes are reported below (naming the tensors) instead of as transformers' bare error.
        lm, info = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype, output_loading_info=True,
                                                        ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: the causal-LM weights do not load: {exc}") from exc
    tied = getattr(lm.config, "tie_word_embeddings", False)
    missing = [k for k in info.get("missing_keys", [])
               if k not in allowed_missing and not (tied and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"{weight_files(path)[0]}: missing tensors {sorted(missing)[:8]}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        shown = sorted(f"{k[0]} {tuple(k[1])}, expected {tuple(k[2])}" if isinstance(k, tuple) else str(k)
                       for k in mismatched)
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
        grm = grm_config_from_json(cfg["grm"], source=str(path / "config.json"))
        head_file = path / HEAD_FILE
        if not head_file.is_file():
            raise CheckpointError(f"{head_file}: not found; a grm checkpoint keeps its reward head there")
        tensors = read_tensors([head_file], "")
        if grm.quantization:  # FP8 export: built straight from float8 weights + scales
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
        raise CheckpointError(f"backbone does not fit {type(seq).__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        seq.score.weight.copy_(model.reward_head.summary.weight.to(seq.score.weight.dtype))
    out = Path(out_dir)
    seq.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# FP8 checkpoints (layout: fp8/DESIGN.md)


def compressed_tensors_config(quant: dict[str, Any]) -> dict[str, Any]:
    """The same layout described in compressed-tensors terms (config.json `quantization_config`),
    for tools that read that convention. Activations are dynamic per token, as in the W8A8 path."""
    strategy = {"tensor": "tensor", "channel": "channel", "block": "group"}[quant["granularity"]]
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": sorted(quant["modules"]),
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy,
                        "group_size": quant["block_size"]},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                  "strategy": "token"},
        }},
        "ignore": [],
    }


def save_fp8_grm(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """`save_grm` for a model that must be FP8: refuses one that `convert_to_fp8` has not converted."""
    if not isinstance(model, GRMModel) or not getattr(model.grm_config, "quantization", None):
        raise ValueError("save_fp8_grm takes a GRMModel converted with convert_to_fp8")
    return save_grm(model, tokenizer, out_dir)


def quantize_checkpoint(src_dir: str | Path, out_dir: str | Path, recipe: str | FP8Recipe | None = None, *,
                        dtype: torch.dtype = torch.float32) -> ConversionReport:
    """Load any supported reward-model checkpoint, convert it to FP8, write it in the `grm` format.

    `dtype` is the dtype of the tensors that stay unquantised (embeddings, norms, kept layers).

        >>> report = quantize_checkpoint("ckpt/grm", "ckpt/grm-fp8", "fp8-block64")   # doctest: +SKIP
        >>> print(report.summary())                                                    # doctest: +SKIP
    """
    loaded = load_grm(src_dir, dtype=dtype)
    report = convert_to_fp8(loaded.model, recipe)
    save_fp8_grm(loaded.model, loaded.tokenizer, out_dir)
    return report


def load_fp8_lm(path: str | Path, quantization: dict[str, Any], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the causal LM of an FP8 checkpoint folder straight from its tensors.

    The model skeleton is created with empty (meta) parameters, the listed linear layers become
    `FP8InferenceLinear` holding the stored float8 weights and scales, and the remaining tensors
    are assigned in `dtype`: full-precision copies of the quantised weights never exist. The
    modules get the "emulated" backend; call `set_fp8_backend` after moving to a GPU.
    Called by `load_grm` when config.json's grm block has a `quantization` entry.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    cfg_file = path / "config.json"
    if quantization.get("method") != "fp8" or quantization.get("version") != QUANT_FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: grm.quantization is method={quantization.get('method')!r} "
                              f"version={quantization.get('version')!r}; this grm-serve reads fp8 version "
                              f"{QUANT_FORMAT_VERSION}")
    granularity, block_size = quantization.get("granularity"), quantization.get("block_size")
    compute_dtype = COMPUTE_DTYPES.get(quantization.get("compute_dtype", "bfloat16"))
    if granularity not in GRANULARITIES or compute_dtype is None:
        raise CheckpointError(f"{cfg_file}: bad grm.quantization (granularity={granularity!r}, "
                              f"compute_dtype={quantization.get('compute_dtype')!r})")

    # 1. All stored tensors (float8 weights stay float8).
    for f in weight_files(path):
        if f.suffix != ".safetensors":
            raise CheckpointError(f"{f}: FP8 checkpoints are stored as safetensors only")
    tensors = {name: t for name, (t, _) in read_tensors(weight_files(path)).items()}
    where = weight_files(path)[0]

    # 2. An empty skeleton (parameters on meta; buffers such as rotary tables are real).
    hf_config = AutoConfig.from_pretrained(path)
    if hasattr(hf_config, "quantization_config"):
        del hf_config.quantization_config  # describes our layout for other tools; we build it ourselves
    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)

    # 3. FP8 layers from their stored tensors.
    for name in quantization.get("modules") or []:
        try:
            linear = lm.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{cfg_file}: grm.quantization lists `{name}`, "
                                  "which the model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{cfg_file}: grm.quantization lists `{name}`, which is not a linear layer")
        weight, scale = tensors.pop(f"{name}.weight", None), tensors.pop(f"{name}.{SCALE_SUFFIX}", None)
        bias = tensors.pop(f"{name}.bias", None)
        if weight is None or scale is None:
            raise CheckpointError(f"{where}: missing `{name}.weight` or `{name}.{SCALE_SUFFIX}` of an FP8 layer")
        if weight.dtype != E4M3.dtype:
            raise CheckpointError(f"{where}: `{name}.weight` is {weight.dtype}; FP8 layers store {E4M3.dtype}")
        if tuple(weight.shape) != (linear.out_features, linear.in_features):
            raise CheckpointError(f"{where}: `{name}.weight` has shape {tuple(weight.shape)}, expected "
                                  f"{(linear.out_features, linear.in_features)}")
        if (bias is None) != (linear.bias is None):
            raise CheckpointError(f"{where}: `{name}.bias` is {'missing' if bias is None else 'unexpected'}")
        try:
            fp8 = FP8InferenceLinear.from_quantized(weight, scale, bias.to(dtype) if bias is not None else None,
                                                    granularity=granularity, block_size=block_size,
                                                    compute_dtype=compute_dtype)
        except ValueError as exc:
            raise CheckpointError(f"{where}: `{name}`: {exc}") from exc
        input_scale = tensors.pop(f"{name}.{INPUT_SCALE}", None)
        if input_scale is not None:  # FP8-trained: activations rounded with the training's static scale
            try:
                fp8.set_input_scale(input_scale)
            except ValueError as exc:
                raise CheckpointError(f"{where}: `{name}.{INPUT_SCALE}`: {exc}") from exc
        residual = {part: tensors.pop(f"{name}.{part}", None) for part in RESIDUAL_TENSORS}
        present = [part for part, t in residual.items() if t is not None]
        if present:
            if len(present) != len(RESIDUAL_TENSORS):
                missing = [f"`{name}.{p}`" for p in RESIDUAL_TENSORS if p not in present]
                raise CheckpointError(f"{where}: residual columns of `{name}` are incomplete: "
                                      f"missing {', '.join(missing)}")
            try:
                fp8.load_residual_columns(residual["residual_index"], residual["residual"], residual["residual_scale"])
            except ValueError as exc:
                raise CheckpointError(f"{where}: `{name}`: {exc}") from exc
        lm.set_submodule(name, fp8)

    # 4. Everything else, assigned in `dtype`; tied embeddings re-tied.
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    result = lm.load_state_dict(rest, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{where}: unexpected tensors {sorted(result.unexpected_keys)[:8]}")
    tied = getattr(lm.config, "tie_word_embeddings", False)
    if tied:
        lm.tie_weights()
    missing = sorted(n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta)
    if missing:
        raise CheckpointError(f"{where}: missing tensors {missing[:8]}")
    return lm.eval()
