"""Residual columns: an FP8 layer restores chosen input columns (both backends), the column
sensitivity is the first-order margin change it claims to be, the picker stays in its byte budget,
residuals cut the margin error on held-out sequences, and FP8 checkpoints carry them (`grm-quantize
--keep_columns`), with broken residual tensors named."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grmserve.training.core.checkpoint import CheckpointError, load_grm
from grmserve.training.core.fp8.convert import _linear_bytes, convert_to_fp8, get_recipe
from grmserve.training.core.fp8.formats import E4M3, dequantize
from grmserve.training.core.fp8.linear import FP8InferenceLinear
from grmserve.training.core.fp8.residuals import (
    add_residual_columns,
    column_sensitivity,
    convertible_linears,
    linear_budget,
    pick_columns,
    rounding_error,
)


def _linear(in_f=256, out_f=128, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f)


def test_residual_columns_restore_the_kept_columns_only():
    lin = _linear()
    fp8 = FP8InferenceLinear.from_linear(lin, "channel", compute_dtype=torch.float32)
    before = fp8.dequantized_weight()
    cols = [3, 17, 200, 17]  # a duplicate is stored once
    fp8.set_residual_columns(lin.weight, cols)
    assert fp8.residual_columns == 3 and fp8.residual_index.dtype == torch.int32
    assert fp8.residual.dtype == E4M3.dtype and fp8.residual.shape == (128, 3) and fp8.residual_scale.shape == (128, 1)
    after, w = fp8.dequantized_weight(), lin.weight.detach()
    kept = [3, 17, 200]
    other = [j for j in range(256) if j not in kept]
    assert torch.equal(after[:, other], before[:, other])
    err_before, err_after = (before[:, kept] - w[:, kept]).abs().max(), (after[:, kept] - w[:, kept]).abs().max()
    assert err_after < err_before / 8, (err_before, err_after)
    x = torch.randn(5, 256)
    with torch.no_grad():
        torch.testing.assert_close(fp8(x), x @ after.t() + lin.bias, rtol=1e-5, atol=1e-5)
    assert fp8.storage_bytes() == 128 * 256 + 4 * 128 + 4 * 3 + 128 * 3 + 4 * 128
    fp8.set_residual_columns(lin.weight, [])
    assert fp8.residual_columns == 0 and torch.equal(fp8.dequantized_weight(), before)
    assert set(fp8.state_dict()) == {"weight", "weight_scale", "bias"}


def test_residual_columns_with_block_scales_and_dtype_moves():
    lin = _linear()
    fp8 = FP8InferenceLinear.from_linear(lin, "block", 64)
    fp8.set_residual_columns(lin.weight, [0, 255])
    bits = fp8.residual.view(torch.uint8).clone()
    fp8.to(torch.bfloat16)
    assert fp8.residual.dtype == E4M3.dtype and torch.equal(fp8.residual.view(torch.uint8), bits)
    assert fp8.residual_scale.dtype == torch.float32 and fp8.residual_index.dtype == torch.int32
    assert set(fp8.state_dict()) == {"weight", "weight_scale", "bias", "residual_index", "residual", "residual_scale"}
    w = lin.weight.detach()
    deq = fp8.dequantized_weight()
    assert (deq[:, [0, 255]] - w[:, [0, 255]]).abs().max() < (deq[:, 1:255] - w[:, 1:255]).abs().max() / 8


def test_scaled_mm_adds_the_residual_columns_on_cpu():
    lin = _linear()
    fp8 = FP8InferenceLinear.from_linear(lin, "channel", backend="scaled_mm")
    x = torch.randn(2, 24, 256)
    with torch.no_grad():
        plain = fp8(x)
        fp8.set_residual_columns(lin.weight, [5, 9, 100])
        corrected = fp8(x)
    r = dequantize(fp8.residual, fp8.residual_scale)
    want = x[..., [5, 9, 100]] @ r.t()
    # Output rounded to bf16 twice (2^-8 relative of the output's size).
    torch.testing.assert_close(corrected - plain, want, rtol=0, atol=2**-7 * plain.abs().max().item())
    assert (corrected - plain).abs().max() > 0


def test_load_residual_columns_checks_what_it_is_given():
    lin = _linear()
    fp8 = FP8InferenceLinear.from_linear(lin, "channel")
    fp8.set_residual_columns(lin.weight, [1, 2])
    idx, q, s = fp8.residual_index, fp8.residual, fp8.residual_scale
    with pytest.raises(ValueError, match="int32"):
        fp8.load_residual_columns(idx.long(), q, s)
    with pytest.raises(ValueError, match=r"\(128, 2\)"):
        fp8.load_residual_columns(idx, q.float(), s)
    with pytest.raises(ValueError, match="residual_scale"):
        fp8.load_residual_columns(idx, q, s[:10])
    with pytest.raises(ValueError, match="distinct columns"):
        fp8.load_residual_columns(torch.tensor([1, 256], dtype=torch.int32), q, s)
    with pytest.raises(ValueError, match="distinct columns"):
        fp8.load_residual_columns(torch.tensor([1, 1], dtype=torch.int32), q, s)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        fp8.set_residual_columns(lin.weight, [300])


# --- choosing the columns ------------------------------------------------------------------------


@pytest.fixture()
def model_and_pairs(make_tiny_grm):
    model = make_tiny_grm(layers=2, hidden_size=64)
    g = torch.Generator().manual_seed(0)

    def pairs(n, seed):
        g.manual_seed(seed)
        out = []
        for _ in range(n):
            prompt = torch.randint(5, 1000, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(2):
                out.append(prompt + torch.randint(5, 1000, (int(torch.randint(3, 10, (1,), generator=g)),),
                                                  generator=g).tolist())
        return out

    return model, pairs


def _scores(model, seqs):
    with torch.no_grad():
        return torch.cat([model.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)) for s in seqs])


def _margins(model, seqs):
    s = _scores(model, seqs)
    return s[0::2] - s[1::2]


def test_column_sensitivity_is_the_first_order_margin_change(model_and_pairs):
    model, pairs = model_and_pairs
    seqs = pairs(6, seed=1)
    gains = column_sensitivity(model, seqs, "fp8-channel", pad_id=0, batch_pairs=2, progress=False)
    name = "lm.model.layers.1.mlp.down_proj"
    recipe = get_recipe("fp8-channel")
    assert set(gains) == set(convertible_linears(model, recipe))
    assert all(g.shape == (model.get_submodule(n).in_features,) and (g >= 0).all() for n, g in gains.items())
    assert not any(p.grad is not None for p in model.parameters()), "no weight gradients are kept"
    lin = model.get_submodule(name)
    delta = rounding_error(lin, recipe)
    ref = _margins(model, seqs)
    for j in gains[name].argsort(descending=True)[:3].tolist():
        q = copy.deepcopy(model)
        with torch.no_grad():
            q.get_submodule(name).weight[:, j] += delta[:, j]  # only column j rounded
        actual = float((_margins(q, seqs) - ref).pow(2).sum())
        assert actual > 0
        assert float(gains[name][j]) == pytest.approx(actual, rel=0.1), (j, actual)


def test_pick_columns_spends_the_budget_on_the_most_sensitive_columns(model_and_pairs):
    model, pairs = model_and_pairs
    recipe = "fp8-channel"
    gains = column_sensitivity(model, pairs(4, seed=2), recipe, pad_id=0, progress=False)
    assert pick_columns(gains, model, recipe, max_bytes_ratio=0.5) == {}, "FP8 alone takes 0.5x and more"
    columns = pick_columns(gains, model, recipe, max_bytes_ratio=0.56)
    assert columns
    best_name, best = max(((n, int(g.argmax())) for n, g in gains.items()),
                          key=lambda t: gains[t[0]][t[1]] / (model.get_submodule(t[0]).out_features + 4))
    assert best in columns[best_name]
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in columns}
    q = copy.deepcopy(model)
    convert_to_fp8(q, recipe)
    count = add_residual_columns(q, columns, weights)
    assert count == sum(map(len, columns.values()))
    budget, _ = linear_budget(model, get_recipe(recipe), 0.56)
    in_backbone = {id(m) for m in q.backbone.modules()}
    used = sum(m.storage_bytes() for m in q.modules() if isinstance(m, FP8InferenceLinear) and id(m) in in_backbone)
    assert used <= budget and used > 0.97 * budget, (used, budget)
    assert q.grm_config.quantization["residual_columns"]["count"] == count


def test_residual_columns_cut_the_margin_error_on_held_out_pairs(model_and_pairs):
    model, pairs = model_and_pairs
    recipe = "fp8-channel"
    gains = column_sensitivity(model, pairs(16, seed=3), recipe, pad_id=0, progress=False)
    columns = pick_columns(gains, model, recipe, max_bytes_ratio=0.6)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in columns}
    held_out = pairs(24, seed=4)
    ref = _margins(model, held_out)
    plain = copy.deepcopy(model)
    convert_to_fp8(plain, recipe)
    with_residuals = copy.deepcopy(plain)
    add_residual_columns(with_residuals, columns, weights)
    for m in [*plain.modules(), *with_residuals.modules()]:
        if isinstance(m, FP8InferenceLinear):
            m.compute_dtype = torch.float32  # rounding of the weights only, as on this CPU
    err_plain = float((_margins(plain, held_out) - ref).pow(2).mean().sqrt())
    err_res = float((_margins(with_residuals, held_out) - ref).pow(2).mean().sqrt())
    assert err_res < 0.8 * err_plain, (err_res, err_plain)


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def residual_checkpoint(tiny_checkpoint, tmp_path_factory):
    from grmserve.training.quantize import main

    out = tmp_path_factory.mktemp("fp8res") / "tiny-fp8-columns"
    assert main(["--src", str(tiny_checkpoint), "--out", str(out), "--recipe", "fp8-channel", "--keep_columns",
                 "--max_bytes_ratio", "0.58", "--calibration", "8"]) == 0
    return out


def test_grm_quantize_keep_columns_writes_a_loadable_checkpoint(residual_checkpoint, tiny_checkpoint):
    quant = json.loads((residual_checkpoint / "config.json").read_text())["grm"]["quantization"]
    count = quant["residual_columns"]["count"]
    assert count > 0
    model = load_grm(residual_checkpoint).model
    fp8 = {n: m for n, m in model.named_modules() if isinstance(m, FP8InferenceLinear)}
    assert len(fp8) == len(quant["modules"]) and sum(m.residual_columns for m in fp8.values()) == count
    src = load_grm(tiny_checkpoint, load_tokenizer=False).model
    total = sum(m.weight.numel() for m in src.backbone.modules() if isinstance(m, torch.nn.Linear))
    assert _linear_bytes(model.backbone) <= 0.58 * 2 * total
    # Residual columns bring the scores closer to full precision than FP8 alone.
    plain = copy.deepcopy(src)
    convert_to_fp8(plain, "fp8-channel")
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(5, 1000, (int(n),), generator=g).tolist() for n in torch.randint(8, 40, (24,), generator=g)]
    for m in [*plain.modules(), *model.modules()]:
        if isinstance(m, FP8InferenceLinear):
            m.compute_dtype = torch.float32
    ref = _scores(src, seqs)
    assert (_scores(model, seqs) - ref).pow(2).mean() < (_scores(plain, seqs) - ref).pow(2).mean()


def test_broken_residual_tensors_name_the_file_and_tensor(residual_checkpoint, tmp_path):
    import shutil

    with safe_open(str(residual_checkpoint / "model.safetensors"), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    name = next(k for k in tensors if k.endswith(".residual_index")).removesuffix(".residual_index")

    def broken(tag, edit):
        dst = tmp_path / tag
        shutil.copytree(residual_checkpoint, dst)
        t = dict(tensors)
        edit(t)
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst

    bad = broken("noscale", lambda t: t.pop(f"{name}.residual_scale"))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.*{name}\.residual_scale"):
        load_grm(bad, load_tokenizer=False)
    bad = broken("range", lambda t: t.update({f"{name}.residual_index": t[f"{name}.residual_index"] + 10_000}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.*`{name}`.*distinct columns"):
        load_grm(bad, load_tokenizer=False)
    bad = broken("dtype", lambda t: t.update({f"{name}.residual": t[f"{name}.residual"].float()}))
    with pytest.raises(CheckpointError, match="residual must be"):
        load_grm(bad, load_tokenizer=False)
