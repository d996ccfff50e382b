"""GPTQ rounding onto the e4m3 grid: same grid and scales as round-to-nearest, lower output error on
correlated inputs, residual columns rounded last absorb the compensation, Hessians count real tokens
once per shared input, and `grm-quantize --rounding` writes and records it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from grmserve.training.core.checkpoint import load_grm
from grmserve.training.core.fp8.convert import convert_to_fp8, get_recipe
from grmserve.training.core.fp8.formats import (
    E4M3,
    cast_to_fp8,
    dequantize,
    expand_block_scale,
)
from grmserve.training.core.fp8.gptq import (
    GPTQError,
    gptq_requantize,
    gptq_round,
    input_hessians,
)
from grmserve.training.core.fp8.linear import FP8InferenceLinear, quantize_weight
from grmserve.training.core.fp8.residuals import convertible_linears


def _problem(out_f=48, in_f=192, tokens=3000, seed=0):
    """A weight and inputs whose features are correlated (as a layer's inputs are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + 0.3 * torch.eye(in_f)
    x = torch.randn(tokens, in_f, generator=g) @ mix
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return w, x


def _output_error(w_hat, w, x):
    return float(((w_hat - w) @ x.T).pow(2).mean())


@pytest.mark.parametrize("granularity,block", [("channel", None), ("block", 64)])
def test_gptq_lowers_the_output_error_on_the_same_grid(granularity, block):
    w, x = _problem()
    q0, scale = quantize_weight(w, granularity, block or 64)
    q, target = gptq_round(w, x.T @ x, scale, block_size=block)
    assert q.dtype == E4M3.dtype and q.shape == w.shape
    rtn = dequantize(q0, scale, block_size=block)
    gptq = dequantize(q, scale, block_size=block)
    assert _output_error(gptq, w, x) < 0.7 * _output_error(rtn, w, x)
    assert not torch.equal(q.float(), q0.float())
    # Each weight is the nearest grid point (same scales) to the compensated value it was rounded from.
    s = scale if granularity == "channel" else expand_block_scale(scale, block, w.shape[1])
    assert torch.equal(cast_to_fp8(target / s).float(), q.float())


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    w, _ = _problem()
    q0, scale = quantize_weight(w, "channel")
    h = torch.diag(torch.rand(w.shape[1]) + 0.5)  # diagonal Hessian: nothing to compensate across columns
    q, _ = gptq_round(w, h, scale)
    assert torch.equal(q.float(), q0.float())


def test_kept_columns_go_last_and_absorb_the_compensation():
    w, x = _problem()
    h = x.T @ x
    _, scale = quantize_weight(w, "channel")
    keep = list(range(0, w.shape[1], 12))
    q_plain, _ = gptq_round(w, h, scale)
    q, target = gptq_round(w, h, scale, keep=keep)
    layer = FP8InferenceLinear.from_quantized(q, scale, None, granularity="channel")
    layer.set_residual_columns(target, keep)
    with_residuals = layer.dequantized_weight()
    plain = dequantize(q_plain, scale)
    assert _output_error(with_residuals, w, x) < 0.9 * _output_error(plain, w, x)
    # The kept columns carry compensation (they moved away from their own weights) and come back
    # almost exactly from their residual.
    assert (target[:, keep] - w[:, keep]).abs().max() > 0
    assert (with_residuals[:, keep] - target[:, keep]).abs().max() < 0.2 * (plain[:, keep] - w[:, keep]).abs().max()


def test_gptq_checks_its_inputs():
    w, x = _problem(in_f=64)
    _, scale = quantize_weight(w, "channel")
    h = x.T @ x
    h[5, :] = h[:, 5] = 0  # an input that is always zero
    q, _ = gptq_round(w, h, scale)
    assert torch.isfinite(q.float()).all()
    with pytest.raises(ValueError, match="shape"):
        gptq_round(w, h[:10, :10], scale)
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(GPTQError, match="non-finite"):
        gptq_round(w, bad, scale)


def test_input_hessians_count_real_tokens_once_per_shared_input(make_tiny_grm):
    model = make_tiny_grm(layers=2, hidden_size=64)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 1000, (int(n),), generator=g).tolist() for n in (5, 9, 3, 12, 7)]
    linears = convertible_linears(model, get_recipe("fp8-channel"))
    hessians, tokens = input_hessians(model, seqs, linears, pad_id=0, batch_size=2, progress=False)
    assert tokens == sum(map(len, seqs)) and set(hessians) == set(linears)
    layer = "lm.model.layers.1"
    assert hessians[f"{layer}.self_attn.q_proj"] is hessians[f"{layer}.self_attn.v_proj"]
    assert hessians[f"{layer}.mlp.gate_proj"] is hessians[f"{layer}.mlp.up_proj"]
    name = f"{layer}.mlp.down_proj"
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: seen.append(i[0][0].detach()))
    with torch.no_grad():
        for s in seqs:  # one unpadded sequence at a time
            model.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))
    handle.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(hessians[name], x.T @ x, rtol=1e-4, atol=1e-4)


def test_gptq_requantize_keeps_scales_and_records_the_method(make_tiny_grm):
    model = make_tiny_grm(layers=2, hidden_size=64)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, 1000, (int(n),), generator=g).tolist() for n in torch.randint(6, 30, (12,), generator=g)]
    recipe = get_recipe("fp8-channel")
    linears = convertible_linears(model, recipe)
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    hessians, tokens = input_hessians(model, seqs, linears, pad_id=0, progress=False)
    rtn = copy.deepcopy(model)
    convert_to_fp8(rtn, recipe)
    q = copy.deepcopy(rtn)
    name = "lm.model.layers.0.self_attn.o_proj"
    count = gptq_requantize(q, weights, hessians, {name: [1, 2, 3]}, tokens=tokens, progress=False)
    assert count == 3 and q.get_submodule(name).residual_columns == 3
    assert q.grm_config.quantization["rounding"]["method"] == "gptq"
    assert q.grm_config.quantization["rounding"]["calibration_tokens"] == tokens
    changed = 0
    for n in linears:
        a, b = rtn.get_submodule(n), q.get_submodule(n)
        assert torch.equal(a.weight_scale, b.weight_scale) and b.weight.dtype == E4M3.dtype
        changed += not torch.equal(a.weight.float(), b.weight.float())
    assert changed == len(linears)
    with pytest.raises(ValueError, match="not an FP8 layer"):
        gptq_requantize(model, weights, hessians, progress=False)


def test_grm_quantize_rounding_flag(tiny_checkpoint, tmp_path, capsys):
    from grmserve.training.quantize import main

    out = tmp_path / "gptq-only"
    assert main(["--src", str(tiny_checkpoint), "--out", str(out), "--recipe", "fp8-channel", "--rounding", "gptq",
                 "--calibration", "8"]) == 0
    quant = json.loads((out / "config.json").read_text())["grm"]["quantization"]
    assert quant["rounding"]["method"] == "gptq" and "residual_columns" not in quant
    model = load_grm(out).model
    assert all(m.residual_columns == 0 for m in model.modules() if isinstance(m, FP8InferenceLinear))
    assert json.loads(capsys.readouterr().out.splitlines()[0])["rounding"] == "gptq"
    assert main(["--src", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--keep_sensitive", "--rounding",
                 "gptq"]) == 2
    assert "--rounding gptq" in capsys.readouterr().err


def test_grm_quantize_calibrates_on_given_pairs(tiny_checkpoint, tmp_path, capsys):
    from grmserve.training.quantize import main

    data = tmp_path / "traffic.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f" {2 * i}.",
             "rejected": f" {2 * i + 1}, I think."}
            for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "own-calibration"
    assert main(["--src", str(tiny_checkpoint), "--out", str(out), "--recipe", "fp8-channel", "--rounding", "gptq",
                 "--calibration", "8", "--calibration_data", str(data)]) == 0
    quant = json.loads((out / "config.json").read_text())["grm"]["quantization"]
    assert quant["calibration"] == {"data": str(data), "sequences": 8}
    default = tmp_path / "bundled-calibration"
    assert main(["--src", str(tiny_checkpoint), "--out", str(default), "--recipe", "fp8-channel", "--rounding", "gptq",
                 "--calibration", "8"]) == 0
    a, b = load_grm(out).model, load_grm(default).model
    name = "lm.model.layers.0.mlp.down_proj"
    assert not torch.equal(a.get_submodule(name).weight.float(), b.get_submodule(name).weight.float())
    capsys.readouterr()
    # A missing or unusable calibration file is named, and nothing is written.
    assert main(["--src", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--rounding", "gptq",
                 "--calibration_data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such data file" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}) + "\n")
    assert main(["--src", str(tiny_checkpoint), "--out", str(tmp_path / "y"), "--keep_columns",
                 "--calibration_data", str(empty)]) == 2
    assert "no usable preference pairs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
