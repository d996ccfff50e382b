"""grm-experiment: cached frozen layers + trained top layers equal the full model, configurations
resume, and the exported artifact rebuilds a full checkpoint with the same scores."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from grmserve.training.benchmark import load_split
from grmserve.training.core.default_model import apply_artifact
from grmserve.training.core.model import GRMConfig, GRMModel, HeadConfig
from grmserve.training.core.prompts import PromptRenderer
from grmserve.training.data import encode_pairs, read_pairs
from grmserve.training.experiment import (
    ExperimentConfig,
    SplitFeatures,
    build_top_model,
    compute_features,
    export_artifact,
    load_backbone,
    main,
    pair_batch,
    run,
    score_responses,
    split_lm,
)


def _cfg(tmp_path, **kw) -> ExperimentConfig:
    base = dict(out=str(tmp_path / "exp"), backbone="tiny", tiny_layers=3, top_layers=1, lora_r=4, lora_alpha=8,
                head=HeadConfig(type="mlp", hidden=16), train_prompts=6, test_prompts=3, epochs=1, batch_size=8,
                methods=["bt", "grm-sft"], noise=[0.0], feature_tokens=600)
    base.update(kw)
    return ExperimentConfig(**base)


def _encoded(tok, split: str, n: int):
    pairs, report = read_pairs(load_split(split), limit=n)
    return encode_pairs(pairs, PromptRenderer(tok), report, max_tokens=256)


def test_cached_lower_layers_plus_top_equal_the_full_model(tmp_path):
    cfg = _cfg(tmp_path)
    lm, tok = load_backbone(cfg)
    enc = _encoded(tok, "test_id", 12)
    feats, index = SplitFeatures.from_pairs(enc)
    assert len(feats.prompts) < len(enc) and len(feats.responses) < 2 * len(enc)  # pairs share prompts/responses
    lower, upper = split_lm(lm, cfg.top_layers)
    # A small token budget forces several prompt groups and several response chunks per group.
    compute_features(lower, feats, pad_id=tok.pad_token_id, batch_tokens=300, desc="test")
    top = build_top_model(upper, cfg, seed=1).eval()
    with torch.no_grad():  # move the LoRA factors off their zero init so the adapters matter
        for name, p in top.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    got = score_responses(top, feats, pad_id=tok.pad_token_id, batch_tokens=200)
    # The same weights as one full model: merge LoRA into a copy of the full LM.
    full_lm = load_backbone(cfg)[0]
    merged = top.lm.merge_and_unload()
    n = len(full_lm.get_decoder().layers)
    for i, layer in enumerate(merged.get_decoder().layers):
        full_lm.get_decoder().layers[n - cfg.top_layers + i].load_state_dict(layer.state_dict())
    full = GRMModel(full_lm, top.reward_head, GRMConfig(head=cfg.head)).eval()
    with torch.no_grad():
        want = torch.cat([full.score(torch.tensor([feats.prompts[p] + r]), torch.ones(1, len(feats.prompts[p]) + len(r),
                                                                                        dtype=torch.long))
                          for p, r in feats.responses])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
    # A training batch built from the cache carries the same ids the trainer would collate.
    batch = pair_batch(index, [0, 1], tok.pad_token_id)
    assert batch.inputs_embeds.shape[:2] == batch.input_ids.shape
    assert torch.equal(batch.input_ids[0, : len(enc[0].prompt_ids)], torch.tensor(enc[0].prompt_ids))


def test_feature_cache_resumes_from_saved_parts(tmp_path):
    cfg = _cfg(tmp_path)
    lm, tok = load_backbone(cfg)
    lower, _ = split_lm(lm, 1)
    enc = _encoded(tok, "train", 12)
    feats, _ = SplitFeatures.from_pairs(enc)
    parts = tmp_path / "parts"
    parts.mkdir()
    compute_features(lower, feats, pad_id=tok.pad_token_id, batch_tokens=400, desc="a", part_dir=parts)
    saved = sorted(parts.glob("part-*.pt"))
    assert len(saved) > 1
    # Poison the layers: a resumed run must read the parts, not recompute.
    with torch.no_grad():
        for p in lower.parameters():
            p.zero_()
    again, _ = SplitFeatures.from_pairs(enc)
    compute_features(lower, again, pad_id=tok.pad_token_id, batch_tokens=400, desc="b", part_dir=parts)
    for a, b in zip(feats.response_hidden, again.response_hidden):
        assert torch.equal(a, b)


def test_run_trains_every_configuration_skips_finished_ones_and_exports(tmp_path, caplog):
    cfg = _cfg(tmp_path, noise=[0.0, 0.25], methods=["bt", "grm-sft", "grm-dpo-noref"])
    results = run(cfg)
    assert [(r["method"], r["noise"]) for r in results] == [
        ("bt", 0.0), ("grm-sft", 0.0), ("grm-dpo-noref", 0.0), ("bt", 0.25), ("grm-sft", 0.25), ("grm-dpo-noref", 0.25)]
    for r in results:
        assert 0.0 <= r["test_id"]["accuracy"] <= 1.0 and r["test_id"]["pairs"] > 0 and r["test_ood"]["pairs"] > 0
        assert r["flipped"] == (round(0.25 * r["train_pairs"]) if r["noise"] else 0)
        log = [json.loads(line) for line in (tmp_path / "exp" / "logs" / f"{r['name']}.jsonl").read_text().splitlines()]
        assert len(log) == r["steps"] and ("reg_loss" in log[0]) == (r["method"] != "bt")
    table = (tmp_path / "exp" / "results.md").read_text()
    assert table.count("\n| grm-sft |") == 2
    # Resume: a second run trains nothing and returns the same results.
    (tmp_path / "exp" / "results" / "grm-sft-noise0.25.json").unlink()
    caplog.set_level("INFO")
    again = run(cfg)
    assert sum("done before, skipped" in m for m in caplog.messages) == 5
    assert [r["test_ood"]["accuracy"] for r in again if r["name"] != "grm-sft-noise0.25"] == \
        [r["test_ood"]["accuracy"] for r in results if r["name"] != "grm-sft-noise0.25"]

    # Export -> merge into a fresh full backbone: the full model scores test responses like the run did.
    dest = export_artifact(cfg, "grm-sft-noise0.00", tmp_path / "artifact")
    meta = json.loads((dest / "top-layers.json").read_text())
    tensors = load_file(str(dest / "top-layers.safetensors"))
    assert any(k.startswith("layers.2.") and k.endswith("lora_A") for k in tensors)  # layer numbers of the full model
    lm, tok = load_backbone(cfg)
    head = apply_artifact(lm, tensors, meta)
    full = GRMModel(lm, head, GRMConfig(head=cfg.head)).eval()
    enc = _encoded(tok, "test_id", 8)
    with torch.no_grad():
        for e in enc[:4]:
            ids = torch.tensor([e.prompt_ids + e.chosen_ids])
            assert torch.isfinite(full.score(ids, torch.ones_like(ids))).all()
    # Rebuild the run's own top model from the saved parameters and compare scores on one split.
    _, upper = split_lm(load_backbone(cfg)[0], 1)
    top = build_top_model(upper, cfg, seed=0).eval()
    saved = load_file(str(tmp_path / "exp" / "params" / "grm-sft-noise0.00.safetensors"))
    top.lm.load_state_dict({k[3:]: v for k, v in saved.items() if k.startswith("lm.")}, strict=False)
    top.reward_head.load_state_dict({k[12:]: v for k, v in saved.items() if k.startswith("reward_head.")})
    feats, _ = SplitFeatures.from_pairs(enc)
    lower, _ = split_lm(load_backbone(cfg)[0], 1)
    compute_features(lower, feats, pad_id=tok.pad_token_id, batch_tokens=600, desc="check")
    got = score_responses(top, feats, pad_id=tok.pad_token_id)
    with torch.no_grad():
        want = torch.cat([full.score(torch.tensor([feats.prompts[p] + r]), torch.ones(1, len(feats.prompts[p]) + len(r),
                                                                                        dtype=torch.long))
                          for p, r in feats.responses])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_artifact_for_another_backbone_is_refused(tmp_path):
    cfg = _cfg(tmp_path)
    lm, _ = load_backbone(cfg)
    with pytest.raises(ValueError, match="30-layer backbone, this one has 3"):
        apply_artifact(lm, {}, {"format": "grm-top-layers-v1", "layers": 30, "lora_r": 4, "lora_alpha": 8})
    with pytest.raises(ValueError, match="not a grm-top-layers-v1 artifact"):
        apply_artifact(lm, {}, {"format": "something"})


def test_cli_rejects_unknown_method_and_bad_top_layers(tmp_path, capsys):
    assert main(["--backbone", "tiny", "--out", str(tmp_path / "x"), "--methods", "bt,magic"]) == 2
    assert "unknown methods ['magic']" in capsys.readouterr().err
    assert main(["--backbone", "tiny", "--tiny_layers", "3", "--out", str(tmp_path / "y"), "--top_layers", "3"]) == 2
    assert "top_layers must be in [1, 2]" in capsys.readouterr().err
    assert main(["--backbone", "tiny", "--out", str(tmp_path / "z"), "--export", "bt-noise0.00"]) == 2
    assert "no finished configuration 'bt-noise0.00'" in capsys.readouterr().err
    assert main(["--backbone", "tiny", "--out", str(tmp_path / "r"), "--fp8_recipe", "current"]) == 2
    assert "--fp8_recipe current sets the FP8 scaling recipe, which --precision fp32 does not use" in \
        capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # refused before anything was written



def test_fp8_trained_top_layers_ship_their_e4m3_bytes_and_rebuild_exactly(tmp_path):
    """--precision fp8-o2 with full weights: the artifact holds the trained E4M3 bytes and scales, the
    rebuilt full model serves them in FP8InferenceLinear layers, and it reproduces the artifact's
    reference scores (computed on the cached lower layers + top model with the same FP8 layers)."""
    from grmserve.training.core.fp8 import FP8InferenceLinear

    cfg = _cfg(tmp_path, methods=["bt"], lora_r=0, lr=1e-3, precision="fp8-o2")
    [result] = run(cfg)
    assert result["name"] == "bt-noise0.00-fp8-o2" and result["steps"] > 0
    dest = export_artifact(cfg, "bt-noise0.00-fp8-o2", tmp_path / "artifact")
    meta = json.loads((dest / "top-layers.json").read_text())
    tensors = load_file(str(dest / "top-layers.safetensors"))
    fp8 = [k for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn]
    assert meta["fp8"]["granularity"] == "tensor" and len(fp8) == 7  # q, k, v, o, gate, up, down of layer 2
    assert all(k.startswith("layers.2.") and f"{k}_scale" in tensors for k in fp8)
    lm, _ = load_backbone(cfg)
    head = apply_artifact(lm, tensors, meta)
    layer = lm.get_decoder().layers[2]
    assert isinstance(layer.mlp.up_proj, FP8InferenceLinear)
    assert torch.equal(layer.mlp.up_proj.weight.view(torch.uint8),
                       tensors["layers.2.mlp.up_proj.weight"].view(torch.uint8))
    full = GRMModel(lm, head, GRMConfig(head=cfg.head)).eval()
    for m in full.modules():
        if isinstance(m, FP8InferenceLinear):
            m.compute_dtype = torch.float32
    check = meta["check"]
    with torch.no_grad():
        got = [float(full.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0])
               for ids in check["token_ids"]]
    assert got == pytest.approx(check["scores"], abs=2e-4)


def test_ctrl_c_says_what_is_kept_and_how_to_go_on(tmp_path, capsys, monkeypatch):
    from grmserve.training import experiment
    from grmserve.training.core.configtools import INTERRUPTED

    def interrupted_run(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "run", interrupted_run)
    assert main(["--backbone", "tiny", "--out", str(tmp_path / "x")]) == INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    kept = tmp_path / "x" / "results"
    assert f"grm-experiment: interrupted mid-run; the finished configurations are kept in {kept}" in err
    assert "rerun the same command to run the rest" in err
