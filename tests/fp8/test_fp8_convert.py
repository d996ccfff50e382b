"""The FP8 converter's filter and report, FP8 checkpoints (naming, bit-exact save→load), and the
reward accuracy of a converted tiny GRM."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grmserve.training.core.checkpoint import (
    CheckpointError,
    compressed_tensors_config,
    load_grm,
    quantize_checkpoint,
    save_fp8_grm,
)
from grmserve.training.core.fp8.convert import (
    FP8Recipe,
    convert_to_fp8,
    get_recipe,
    skip_reason,
)
from grmserve.training.core.fp8.linear import FP8InferenceLinear
from grmserve.training.core.model import GRMConfig

DECODER_LINEARS = 7  # q, k, v, o, gate, up, down per layer


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.ModuleDict({"a": torch.nn.Linear(64, 64), "odd": torch.nn.Linear(60, 64),
                                         "sensitive": torch.nn.Linear(64, 32), "narrow": torch.nn.Linear(64, 8)})
        self.reward_head = torch.nn.Linear(64, 64)
        self.lm_head = torch.nn.Linear(64, 128, bias=False)


def test_filter_skips_reward_head_lm_head_non_divisible_and_kept_layers():
    model = Toy()
    report = convert_to_fp8(model, FP8Recipe(keep=("body.sensitive",)))
    assert report.converted == ["body.a"]
    assert set(report.skipped) == {"body.odd", "body.sensitive", "body.narrow", "reward_head", "lm_head"}
    assert ("not multiples of 16" in report.skipped["body.odd"]
            and "not multiples of 16" in report.skipped["body.narrow"])
    assert "never converted" in report.skipped["reward_head"]
    assert isinstance(model.body["a"], FP8InferenceLinear) and type(model.reward_head) is torch.nn.Linear
    # Even a recipe that skips nothing leaves the reward head alone.
    assert skip_reason("reward_head.summary.0", torch.nn.Linear(64, 64), FP8Recipe(skip=())) is not None
    assert skip_reason("x", torch.nn.ReLU(), get_recipe()) == "not an nn.Linear"


def test_report_bytes():
    model = Toy()
    report = convert_to_fp8(model, "fp8-channel")
    assert report.converted == ["body.a", "body.sensitive"]
    assert report.converted_bytes_before == (64 * 64 + 32 * 64) * 4
    # float8 weights + a float32 scale per row
    assert report.converted_bytes_after == (64 * 64 + 32 * 64) + (64 + 32) * 4
    assert (report.linear_bytes_before - report.linear_bytes_after
            == report.converted_bytes_before - report.converted_bytes_after)
    assert "2 linear layers to FP8" in report.summary()


def test_recipes():
    assert get_recipe().granularity == "channel" and get_recipe("fp8-block64").block_size == 64
    with pytest.raises(ValueError, match="unknown FP8 recipe"):
        get_recipe("fp4")
    with pytest.raises(ValueError, match="granularity"):
        FP8Recipe(granularity="row")


def _random_batch(n=64, vocab=49152, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 48, (n,), generator=g)
    ids = torch.randint(3, vocab, (n, 48), generator=g)
    mask = (torch.arange(48).unsqueeze(0) < lengths.unsqueeze(1)).long()  # right padding
    return ids * mask, mask


@pytest.mark.parametrize("recipe", ["fp8-channel", "fp8-block64"])
def test_tiny_grm_fp8_rewards_correlate_with_fp32(make_tiny_grm, recipe):
    ref, fp8 = make_tiny_grm("mlp", seed=3), make_tiny_grm("mlp", seed=3)
    report = convert_to_fp8(fp8, recipe)
    assert len(report.converted) == DECODER_LINEARS * 2
    assert set(report.skipped) == {"lm.lm_head", "reward_head.summary.0", "reward_head.summary.2"}
    assert fp8.grm_config.quantization["modules"][0].startswith("model.layers.")
    ids, mask = _random_batch()
    with torch.no_grad():
        r_ref, r_fp8 = ref.score(ids, mask), fp8.score(ids, mask)
    corr = torch.corrcoef(torch.stack([r_ref, r_fp8]))[0, 1].item()
    assert corr > 0.99, corr


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("fp8") / "tiny-grm-fp8"
    report = quantize_checkpoint(tiny_checkpoint, out, "fp8-block64")
    return out, report


def test_checkpoint_naming_convention(fp8_checkpoint):
    out, report = fp8_checkpoint
    cfg = json.loads((out / "config.json").read_text())
    quant = cfg["grm"]["quantization"]
    assert quant["method"] == "fp8" and quant["granularity"] == "block" and quant["block_size"] == 64
    assert quant["scale"] == "dequant" and len(quant["modules"]) == DECODER_LINEARS * 2
    assert cfg["quantization_config"] == compressed_tensors_config(quant)
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        for name in quant["modules"]:
            w, s = fh.get_tensor(f"{name}.weight"), fh.get_tensor(f"{name}.weight_scale")
            assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
            assert s.shape == (w.shape[0], -(-w.shape[1] // 64))
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in keys, "tied to the embeddings, as in the source"
    assert report.converted_bytes_after < report.converted_bytes_before / 3


def test_checkpoint_save_load_is_bit_exact_with_identical_rewards(fp8_checkpoint, tiny_checkpoint):
    out, _ = fp8_checkpoint
    src = load_grm(tiny_checkpoint, load_tokenizer=False).model
    convert_to_fp8(src, "fp8-block64")
    loaded = load_grm(out)
    assert loaded.format == "grm" and loaded.model.grm_config.quantization["recipe"] == "fp8-block64"
    lm = loaded.model.lm
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    fp8_modules = {n: m for n, m in lm.named_modules() if isinstance(m, FP8InferenceLinear)}
    assert len(fp8_modules) == DECODER_LINEARS * 2
    src_modules = dict(src.lm.named_modules())
    for name, module in fp8_modules.items():
        assert torch.equal(module.weight.view(torch.uint8), src_modules[name].weight.view(torch.uint8)), name
        assert torch.equal(module.weight_scale, src_modules[name].weight_scale), name
    assert not any(t.is_meta for t in [*lm.parameters(), *lm.buffers()])
    ids, mask = _random_batch(n=16, seed=1)
    with torch.no_grad():
        assert torch.equal(loaded.model.score(ids, mask), src.score(ids, mask))


def test_loading_fp8_checkpoint_in_bf16(fp8_checkpoint):
    out, _ = fp8_checkpoint
    model = load_grm(out, dtype=torch.bfloat16, load_tokenizer=False).model
    assert model.lm.model.embed_tokens.weight.dtype == torch.bfloat16
    layer = model.lm.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    ids, mask = _random_batch(n=4, seed=2)
    with torch.no_grad():
        assert torch.isfinite(model.score(ids, mask)).all()


def test_resaving_a_loaded_fp8_checkpoint_round_trips(fp8_checkpoint, tmp_path, tokenizer):
    out, _ = fp8_checkpoint
    first = load_grm(out).model
    save_fp8_grm(first, tokenizer, tmp_path / "again")
    second = load_grm(tmp_path / "again").model
    for (n1, t1), (n2, t2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert n1 == n2 and torch.equal(t1.view(torch.uint8) if t1.dtype == torch.float8_e4m3fn else t1,
                                        t2.view(torch.uint8) if t2.dtype == torch.float8_e4m3fn else t2)


def test_plain_checkpoints_carry_no_quantization_key(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert "quantization" not in cfg["grm"] and "quantization_config" not in cfg
    assert "quantization" not in GRMConfig().to_json()


def _broken_copy(src, dst, edit_config=None, drop=None):
    import shutil

    shutil.copytree(src, dst)
    if edit_config:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        with safe_open(str(dst / "model.safetensors"), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != drop}
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_broken_fp8_checkpoints_name_the_problem(fp8_checkpoint, tmp_path):
    out, _ = fp8_checkpoint
    bad = _broken_copy(out, tmp_path / "ghost", lambda c: c["grm"]["quantization"]["modules"].append("model.nope"))
    with pytest.raises(CheckpointError, match="model.nope"):
        load_grm(bad, load_tokenizer=False)
    bad = _broken_copy(out, tmp_path / "noscale", drop="model.layers.0.mlp.up_proj.weight_scale")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj"):
        load_grm(bad, load_tokenizer=False)
    bad = _broken_copy(out, tmp_path / "gran", lambda c: c["grm"]["quantization"].update(granularity="channel"))
    with pytest.raises(CheckpointError, match="weight_scale has shape"):
        load_grm(bad, load_tokenizer=False)
    bad = _broken_copy(out, tmp_path / "noembed", drop="model.embed_tokens.weight")
    with pytest.raises(CheckpointError, match="embed_tokens"):
        load_grm(bad, load_tokenizer=False)
    bad = _broken_copy(out, tmp_path / "version", lambda c: c["grm"]["quantization"].update(version=99))
    with pytest.raises(CheckpointError, match="version"):
        load_grm(bad, load_tokenizer=False)


def test_grm_quantize_cli(tiny_checkpoint, tmp_path):
    import json

    from grmserve.training.core.checkpoint import load_grm
    from grmserve.training.quantize import main

    out = tmp_path / "fp8"
    assert main(["--src", str(tiny_checkpoint), "--out", str(out), "--recipe", "fp8-channel"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["grm"]["quantization"]["granularity"] == "channel"
    assert load_grm(out).model.grm_config.quantization
    assert main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_grm_quantize_keep_sensitive_cli(tiny_checkpoint, tmp_path, capsys):
    """--keep_sensitive: layer scan, then a linear scan of the worst layers on calibration pairs from
    the bundled benchmark; the kept linears stay full precision in the checkpoint and it loads."""
    from grmserve.training.core.fp8.linear import FP8InferenceLinear
    from grmserve.training.quantize import main

    out = tmp_path / "fp8-keep"
    assert main(["--src", str(tiny_checkpoint), "--out", str(out), "--recipe", "fp8-channel", "--keep_sensitive",
                 "--max_bytes_ratio", "0.6", "--calibration", "8"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    kept = report["kept"]
    assert kept and report["most_sensitive"][0]["module"] == kept[0]
    quant = json.loads((out / "config.json").read_text())["grm"]["quantization"]
    assert quant["kept_sensitive"] == kept
    model = load_grm(out).model
    for name in kept:
        assert type(model.get_submodule(name)) is torch.nn.Linear
        assert name.removeprefix("lm.") not in quant["modules"]
    assert sum(isinstance(m, FP8InferenceLinear) for m in model.modules()) == len(quant["modules"]) > 0
