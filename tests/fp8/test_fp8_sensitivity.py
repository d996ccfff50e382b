"""The per-layer FP8 sensitivity scan (which replays each layer's stored input instead of re-running
the layers below) equals quantising that one layer and scoring the whole model; `pick_keep`
respects the byte budget; a recipe with kept layers leaves exactly those in full precision."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from grmserve.training.core.fp8.convert import convert_to_fp8
from grmserve.training.core.fp8.linear import FP8InferenceLinear
from grmserve.training.core.fp8.sensitivity import (
    pick_keep,
    recipe_with_keep,
    scan_layers,
)


@pytest.fixture()
def model_and_seqs(make_tiny_grm):
    model = make_tiny_grm(layers=4, hidden_size=64)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 1000, (int(n),), generator=g).tolist() for n in torch.randint(6, 30, (24,), generator=g)]
    return model, seqs


def _scores(model, seqs):
    with torch.no_grad():
        return torch.cat([model.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])


def test_scan_matches_quantising_one_layer_at_a_time(model_and_seqs):
    model, seqs = model_and_seqs
    scan = scan_layers(model, seqs, "fp8-channel", pad_id=0, batch_tokens=200, progress=False)
    assert [s.layer for s in scan] == [0, 1, 2, 3]
    ref = _scores(model, seqs)
    for s in scan:
        q = copy.deepcopy(model)
        recipe = recipe_with_keep("fp8-channel", [p.keep_pattern for p in scan if p.layer != s.layer])
        report = convert_to_fp8(q, dataclasses.replace(recipe, compute_dtype="float32"))  # the scan's compute dtype
        assert report.converted and all(n.startswith(s.prefix + ".") for n in report.converted)
        want = float((_scores(q, seqs) - ref).pow(2).mean().sqrt() / ref.std())
        assert s.error == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert s.error > 0 and s.weights == sum(q.get_submodule(n).weight.numel() for n in report.converted)
    # The model is left as it was: full precision, same scores.
    assert not any(isinstance(m, FP8InferenceLinear) for m in model.modules())
    assert torch.equal(_scores(model, seqs), ref)


def test_pick_keep_stays_within_the_byte_budget(model_and_seqs):
    model, seqs = model_and_seqs
    scan = scan_layers(model, seqs, "fp8-channel", pad_id=0, progress=False)
    assert pick_keep(scan, model, "fp8-channel", max_bytes_ratio=0.5) == []
    keep = pick_keep(scan, model, "fp8-channel", max_bytes_ratio=0.76)  # room for two of four equal layers
    assert keep == [s.prefix + ".*" for s in sorted(scan, key=lambda s: -s.error)[:2]]
    assert len(pick_keep(scan, model, "fp8-channel", max_bytes_ratio=1.0)) == 4
    q = copy.deepcopy(model)
    report = convert_to_fp8(q, recipe_with_keep("fp8-channel", keep))
    assert not any(n.startswith(k[:-1]) for n in report.converted for k in keep)
    # Bytes as served in bf16: kept and never-converted linears 2 per weight, FP8 ones 1 (+ none for channel scales).
    fp8 = sum(q.get_submodule(n).weight.numel() for n in report.converted)
    total = sum(m.weight.numel() for m in model.backbone.modules() if isinstance(m, torch.nn.Linear))
    assert fp8 + 2 * (total - fp8) <= 0.76 * 2 * total


def test_linear_scan_matches_quantising_one_linear(model_and_seqs):
    model, seqs = model_and_seqs
    scan = scan_layers(model, seqs, "fp8-channel", pad_id=0, progress=False, linears_of=[1])
    assert len(scan) == 7 and all(s.layer == 1 and not s.whole_layer for s in scan)
    ref = _scores(model, seqs)
    worst = max(scan, key=lambda s: s.error)
    q = copy.deepcopy(model)
    everything_else = [n for n, m in q.named_modules() if isinstance(m, torch.nn.Linear) and n != worst.prefix]
    report = convert_to_fp8(q, dataclasses.replace(recipe_with_keep("fp8-channel", everything_else),
                                                   compute_dtype="float32"))
    assert report.converted == [worst.prefix]
    want = float((_scores(q, seqs) - ref).pow(2).mean().sqrt() / ref.std())
    assert worst.error == pytest.approx(want, rel=1e-4, abs=1e-7)
    keep = pick_keep(scan, model, "fp8-channel", max_bytes_ratio=0.52)
    assert keep and keep[0] == worst.prefix  # a linear's pattern is its exact name
