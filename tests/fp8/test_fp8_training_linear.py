"""FP8TrainingLinear: forward, dgrad and wgrad against fp32 (SQNR) per recipe, scaled_mm numerics on
CPU against the emulated path, backend selection, the converter, export to FP8InferenceLinear, and
bit-identical resume through state_dict."""

from __future__ import annotations

import io

import pytest
import torch

from grmserve.training.core.fp8.formats import sqnr_db
from grmserve.training.core.fp8.linear import FP8BackendError, FP8InferenceLinear
from grmserve.training.core.fp8.optim import FP8AdamW, ScaledGrad
from grmserve.training.core.fp8.training_linear import (
    FP8TrainingLinear,
    convert_to_fp8_training,
    export_fp8_weights,
    fp8_scaling_stats,
    to_fp8_inference,
)

RECIPES = ["delayed", "current", "block"]
M, K, N = 96, 320, 192  # K and M are not multiples of 128: partial tiles and blocks


def _data(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    x, g = torch.randn(M, K), torch.randn(M, N)
    if kind == "outliers":  # LLM-like: a few huge activation channels, a spiky token, heavy-tailed gradients
        x[:, :6] *= 300.0
        x[7] *= 40.0
        g = g * torch.distributions.StudentT(2.0).sample((M, N)).abs().clamp(max=1e3)
        g[:, :3] *= 1e3
    return lin, x, g


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, g: torch.Tensor):
    module.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_(True)
    y = module(xr)
    y.backward(g)
    return y.detach(), xr.grad, module.weight.grad.clone(), module.bias.grad.clone()


@pytest.mark.parametrize("kind", ["random", "outliers"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_forward_dgrad_wgrad_sqnr_vs_fp32(recipe, kind):
    lin, x, g = _data(kind)
    ref = _fwd_bwd(lin, x, g)
    layer = FP8TrainingLinear.from_linear(lin, recipe=recipe, backend="emulated", compute_dtype=torch.float32)
    for _ in range(3):  # past warm-up: delayed scaling runs from the history
        out = _fwd_bwd(layer, x, g)
    names = ("forward", "dgrad", "wgrad", "bias grad")
    sqnr = {n: sqnr_db(r, o) for n, r, o in zip(names, ref, out)}
    assert all(v >= 20 for v in sqnr.values()), sqnr
    on_grid = ScaledGrad.quantize(layer.weight.grad, torch.float8_e4m3fn).dequantize()
    assert torch.equal(on_grid, layer.weight.grad), (
        ".grad is a dequantised E4M3 weight gradient (one power-of-two scale)")
    stats = layer.scaling_stats()
    assert stats["input"]["steps"] >= 3 and stats["grad_output"]["nonfinite_steps"] == 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_compute_stays_within_fp8_error(recipe):
    lin, x, g = _data("random", seed=1)
    ref = _fwd_bwd(lin, x, g)
    layer = FP8TrainingLinear.from_linear(lin, recipe=recipe, backend="emulated", compute_dtype=torch.bfloat16)
    out = _fwd_bwd(layer, x, g)
    assert all(sqnr_db(r, o) >= 20 for r, o in zip(ref, out))


@pytest.mark.parametrize("recipe", RECIPES)
def test_scaled_mm_on_cpu_matches_emulated(recipe):
    lin, x, g = _data("outliers", seed=2)
    emu = FP8TrainingLinear.from_linear(lin, recipe=recipe, backend="emulated", compute_dtype=torch.float32)
    out_emu = _fwd_bwd(emu, x, g)
    lin2, _, _ = _data("outliers", seed=2)
    smm = FP8TrainingLinear.from_linear(lin2, recipe=recipe, backend="scaled_mm", allow_cpu_scaled_mm=True)
    out_smm = _fwd_bwd(smm, x, g)
    for a, b in zip(out_emu, out_smm):  # same FP8 operands; only the summation order differs
        assert sqnr_db(a, b) >= 80, (recipe, sqnr_db(a, b))


def test_backend_selection_errors_name_the_fix():
    assert FP8TrainingLinear(32, 16).resolved_backend(torch.device("cpu")) == "emulated"
    with pytest.raises(FP8BackendError, match="emulated"):
        FP8TrainingLinear(32, 16, backend="scaled_mm")
    with pytest.raises(ValueError, match="unknown FP8 backend"):
        FP8TrainingLinear(32, 16, backend="cublas")


class _TinyGRM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(50, 64)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"q_proj": torch.nn.Linear(64, 64),
                                                               "odd": torch.nn.Linear(64, 40)}) for _ in range(2))
        self.lm_head = torch.nn.Linear(64, 64)
        self.reward_head = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = h + layer["q_proj"](h) + torch.nn.functional.pad(layer["odd"](h), (0, 24))
        return self.reward_head(h[:, -1]).squeeze(-1) + self.lm_head(h).mean((1, 2))


def test_converter_filter_report_and_training_step():
    model = _TinyGRM()
    report = convert_to_fp8_training(model, "delayed")
    assert report.converted == ["layers.0.q_proj", "layers.1.q_proj"]
    assert report.skipped["lm_head"].startswith("skip pattern")
    assert report.skipped["reward_head.0"] == "reward head (never converted)"
    assert report.skipped["layers.0.odd"] == "dims (40, 64) not multiples of 16"
    assert isinstance(model.reward_head[0], torch.nn.Linear) and isinstance(model.lm_head, torch.nn.Linear)
    model(torch.randint(0, 50, (4, 8))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert set(fp8_scaling_stats(model)) == {"layers.0.q_proj", "layers.1.q_proj"}


def _captured_fp8_weight(layer: FP8TrainingLinear, x: torch.Tensor) -> torch.Tensor:
    """The E4M3 (out, in) weight a forward saves for backward (its bytes are what the GEMM used)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x.requires_grad_(True))
    return next(t for t in saved if t.dtype == torch.float8_e4m3fn and tuple(t.shape) == (N, K))


@pytest.mark.parametrize("recipe", RECIPES)
def test_export_holds_the_bytes_training_computes_with(recipe):
    lin, x, g = _data("random", seed=3)
    layer = FP8TrainingLinear.from_linear(lin, recipe=recipe, compute_dtype=torch.float32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(3):  # weights and scaling history move
        _fwd_bwd(layer, x, g)
        opt.step()
    steps = layer.states.weight.steps
    exported = export_fp8_weights(layer)
    assert layer.states.weight.steps == steps, "exporting must not advance the scaling state"
    trained = _captured_fp8_weight(layer, x)
    assert torch.equal(exported.weight.view(torch.uint8), trained.view(torch.uint8))
    served = exported.to_inference_linear(compute_dtype=torch.float32)
    assert isinstance(served, FP8InferenceLinear)
    assert served.granularity == ("block" if recipe == "block" else "tensor")
    with torch.no_grad():  # W8A16 serving vs the training forward (W8A8): activation rounding apart
        assert sqnr_db(layer(x), served(x)) >= 25
    model = torch.nn.Sequential(layer)
    expected = export_fp8_weights(layer).weight  # the scaling state moved with the forward above
    assert to_fp8_inference(model, compute_dtype=torch.float32) == 1
    assert torch.equal(model[0].weight.view(torch.uint8), expected.view(torch.uint8))


def _train(model, opt, x, g, steps):
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(x).backward(g)
        opt.step()


@pytest.mark.parametrize("recipe", RECIPES)
def test_state_dict_resume_is_bit_identical(recipe):
    _, x, g = _data("random", seed=4)

    def build():
        torch.manual_seed(5)
        layer = FP8TrainingLinear(K, N, recipe=recipe, compute_dtype=torch.float32)
        return layer, FP8AdamW(layer.parameters(), lr=1e-2, master_weights="fp16")

    a, opt_a = build()
    _train(a, opt_a, x, g, 3)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    _train(a, opt_a, x, g, 3)

    b, opt_b = build()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    _train(b, opt_b, x, g, 3)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert a.get_extra_state()["input"]["steps"] == b.get_extra_state()["input"]["steps"]
    assert torch.equal(a.states.input.amax_history, b.states.input.amax_history)


def test_underflow_counters_expose_e4m3_weight_gradients_on_outliers():
    # Outlier channels in x and g make the wgrad span more than E4M3's ~2^17 range: with one scale the
    # bulk of the entries flush to zero (the total SQNR, dominated by the outliers, hides it); the
    # counters show it, and E5M2 weight gradients keep the bulk.
    from grmserve.training.core.fp8.scaling import get_training_recipe

    bulk = {}
    for fmt in ("e4m3", "e5m2"):
        lin, x, g = _data("outliers")
        ref = _fwd_bwd(lin, x, g)
        layer = FP8TrainingLinear.from_linear(lin, recipe=get_training_recipe("delayed", weight_grad_format=fmt),
                                              compute_dtype=torch.float32)
        out = _fwd_bwd(layer, x, g)
        st = layer.scaling_stats()["weight_grad"]
        bulk[fmt] = (sqnr_db(ref[2][3:, 6:], out[2][3:, 6:]), st["underflow"] / st["elements"])
    assert bulk["e4m3"][1] > 0.5 and bulk["e4m3"][0] < 10, bulk
    assert bulk["e5m2"][1] < 0.01 and bulk["e5m2"][0] >= 20, bulk


def test_evaluation_leaves_the_scaling_state_and_serving_reproduces_it_exactly():
    """In eval mode the delayed recipe rounds inputs with the scale training reached and records
    nothing; the exported FP8InferenceLinear (weight bytes + static input scale) computes exactly the
    same outputs (up to float32 summation order), so a served FP8-trained layer is the training layer's
    evaluation."""
    lin, x, g = _data("outliers", seed=3)
    layer = FP8TrainingLinear.from_linear(lin, recipe="delayed", compute_dtype=torch.float32)
    for _ in range(3):  # past the warm-up: delayed scaling from the amax history
        _fwd_bwd(layer, x, g)
    layer.eval()
    before = repr(layer.get_extra_state())
    with torch.no_grad():
        want = torch.cat([layer(x[i:i + 16]) for i in range(0, M, 16)])  # any batching: one static scale
    assert repr(layer.get_extra_state()) == before
    export = export_fp8_weights(layer)
    assert export.input_scale is not None and export.input_scale.dim() == 0
    served = export.to_inference_linear(compute_dtype=torch.float32)
    with torch.no_grad():  # the same rounded operands; only the matmul's summation order may differ
        got = served(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()
    fresh = FP8TrainingLinear(K, N, recipe="delayed")  # still in warm-up: no static scale to export
    assert export_fp8_weights(fresh).input_scale is None
    with pytest.raises(ValueError, match="input_scale"):
        served.set_input_scale(torch.tensor([-1.0]))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("recipe", RECIPES)
def test_gradient_checkpointing_replays_the_recorded_forward(recipe, reentrant):
    """A checkpointed block's forward runs again in the backward: it must compute with the FP8 bytes of
    the forward that made the loss and record no second step, so that training with checkpointing is
    bit for bit training without it, scaling state included (delayed scales move at every record)."""
    from torch.utils.checkpoint import checkpoint

    def build():
        torch.manual_seed(7)
        return torch.nn.Sequential(FP8TrainingLinear(K, N, recipe=recipe, compute_dtype=torch.float32,
                                                     grad_storage="fp8"),
                                   torch.nn.GELU(), FP8TrainingLinear(N, K, recipe=recipe, compute_dtype=torch.float32,
                                                                      grad_storage="fp8"))

    def train(net: torch.nn.Sequential, checkpointed: bool) -> None:
        opt = FP8AdamW(net.parameters(), lr=1e-2)
        for step in range(4):
            for micro in range(2):  # gradient accumulation: a replay per micro-batch
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(10 * step + micro), requires_grad=True)
                y = checkpoint(net, x, use_reentrant=reentrant) if checkpointed else net(x)
                (y.square().mean() * (1 + 50 * step)).backward()  # growing amaxes: delayed scales lag
            opt.step()
            opt.zero_grad()

    plain, checkpointed = build(), build()
    train(plain, False)
    train(checkpointed, True)
    for a, b in zip(plain, checkpointed):
        if isinstance(a, FP8TrainingLinear):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
            for role, state in a.get_extra_state().items():
                if isinstance(state, dict):
                    other = b.get_extra_state()[role]
                    assert state["steps"] == other["steps"] == 8, role  # one step per micro-batch
                    assert torch.equal(state["amax_history"], other["amax_history"]), role
                    assert torch.equal(state["counters"], other["counters"]), role


def test_gradient_checkpointing_refuses_to_replay_one_of_two_forwards():
    from torch.utils.checkpoint import checkpoint

    layer = FP8TrainingLinear(K, N, compute_dtype=torch.float32)
    x = torch.randn(M, K, requires_grad=True)
    first, second = checkpoint(layer, x, use_reentrant=False), checkpoint(layer, 2 * x, use_reentrant=False)
    with pytest.raises(RuntimeError, match="ran 2 training forwards since its last backward"):
        (first.sum() + second.sum()).backward()
