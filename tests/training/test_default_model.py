"""The embedded default reward model: built from the shipped artifact (LoRA factors of the top
layers + reward head) merged into SmolLM2, it reproduces the scores the experiment computed with
frozen cached layers + the trained top model, and grm-serve serves it."""

from __future__ import annotations

import json

import pytest
import torch

from grmserve.training.core import default_model
from grmserve.training.core.checkpoint import load_grm


@pytest.fixture(scope="module")
def default_path():
    return default_model.ensure_default_model()


def test_artifact_is_small_and_describes_its_experiment():
    meta = default_model.artifact_meta()
    size = (default_model.ARTIFACT_DIR / "top-layers.safetensors").stat().st_size
    assert size < 16 * 2**20, size  # FP8-trained top layers: 3 x 7 linears in e4m3 (10.6 MB) + head
    res = meta["result"]
    assert res["method"].startswith("grm-") and res["noise"] == 0.0
    assert res["test_id"]["pairs"] >= 1000 and res["test_ood"]["pairs"] >= 1000
    assert len(meta["check"]["scores"]) == len(meta["check"]["token_ids"]) >= 4


def test_default_model_reproduces_the_experiments_scores(default_path):
    meta = default_model.artifact_meta()
    loaded = load_grm(default_path)
    assert loaded.format == "grm"
    model = loaded.model.eval()
    assert model.grm_config.model_name == default_model.NAME
    assert model.grm_config.model_version == default_model.version()
    stats = json.loads((default_path / "default-model.json").read_text())
    assert stats["test_ood_accuracy"] == meta["result"]["test_ood"]["accuracy"]
    with torch.no_grad():
        got = [float(model.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)))
               for ids in meta["check"]["token_ids"]]
    want = meta["check"]["scores"]
    assert got == pytest.approx(want, abs=2e-4, rel=2e-4)
    # And the scores separate responses (a broken merge would give near-constant rewards).
    assert max(want) - min(want) > 0.1
    if meta.get("fp8"):  # FP8-trained: its trained layers load as the FP8 bytes training produced
        from safetensors.torch import load_file

        from grmserve.training.core.fp8 import FP8InferenceLinear

        layers = {n: m for n, m in model.lm.named_modules() if isinstance(m, FP8InferenceLinear)}
        assert len(layers) == 7 * meta["top_layers"]
        shipped = load_file(str(default_model.ARTIFACT_DIR / "top-layers.safetensors"))
        for name, module in layers.items():
            key = name.removeprefix("model.") + ".weight"
            assert torch.equal(module.weight.view(torch.uint8), shipped[key].view(torch.uint8)), key


def test_grm_serve_serves_the_default_model(default_path):
    from grmserve.server.background import ServerThread
    from grmserve.server.config import local

    cfg = local()  # loopback, free ports; no checkpoint: the default model
    assert cfg.model.checkpoint == ""
    with ServerThread(cfg) as server, server.client() as rm:
        info = rm.info()
        assert info.model_name == default_model.NAME and info.model_version == default_model.version()
        if default_model.artifact_meta().get("fp8"):
            assert info.precision == "fp8"  # served as trained, with no flags
        chat = [{"role": "user",
                 "content": "Describe the moon in exactly one sentence. Answer in all capital letters."}]
        scores = rm.score([(chat, "THE MOON IS EARTH'S ONLY NATURAL SATELLITE."), (chat, "the moon is a rock.")])
        assert len(scores) == 2 and all(map(lambda s: s == s, scores))
