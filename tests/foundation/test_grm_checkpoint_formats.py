"""Every checkpoint format `load_grm` reads gives the reward a hand computation on the same weights
gives, with right, left or no padding; our own `grm` format round-trips and is frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from grmserve.training.core import assets
from grmserve.training.core.checkpoint import load_grm, save_grm

HIDDEN = 64
NEURONS = 16
# Ordinary vocabulary tokens only (ids 0-2 are <|endoftext|>, <|im_start|>, <|im_end|>).
SEQS = [[17, 263, 5012, 88, 941, 33, 1207], [402, 19, 3300], [77, 1500, 9, 2048, 611]]


def pad_batch(seqs: list[list[int]], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, T), padded on `side` with `pad_id`."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.tensor(s)
        mask[i, cols] = 1
    return ids, mask


def last_hidden_unpadded(decoder, seq: list[int]) -> torch.Tensor:
    """Final hidden state (H,) at the last token of one unpadded sequence."""
    with torch.no_grad():
        return decoder(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]


def add_tensors(weights_file: Path, extra: dict[str, torch.Tensor]) -> None:
    weights = load_file(str(weights_file))
    weights.update(extra)
    save_file(weights, str(weights_file), metadata={"format": "pt"})


def update_config(folder: Path, **keys) -> None:
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(keys)
    cfg_file.write_text(json.dumps(cfg, indent=2))


def make_research_checkpoint(folder: Path, layer_type: str, seed: int):
    """The official GRM code's layout: a causal LM folder whose model.safetensors also holds
    `v_head.summary.*`, and `vhead_*` keys in config.json. Returns (lm, head tensors)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    lm = LlamaForCausalLM(assets.tiny_llama_config(hidden_size=HIDDEN)).eval()
    lm.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed + 1000)
    if layer_type == "mlp":
        head = {
            "v_head.summary.0.weight": torch.randn(NEURONS, HIDDEN, generator=g) * 0.3,
            "v_head.summary.0.bias": torch.randn(NEURONS, generator=g) * 0.3,
            "v_head.summary.2.weight": torch.randn(1, NEURONS, generator=g) * 0.3,
            "v_head.summary.2.bias": torch.randn(1, generator=g),
        }
    else:
        head = {
            "v_head.summary.weight": torch.randn(1, HIDDEN, generator=g) * 0.3,
            "v_head.summary.bias": torch.randn(1, generator=g),
        }
    add_tensors(folder / "model.safetensors", head)
    update_config(folder, vhead_layer_type=layer_type, vhead_num_neurons=NEURONS, vhead_num_layers=1)
    return lm, head


def hand_research_reward(lm, head: dict[str, torch.Tensor], seq: list[int]) -> float:
    h = last_hidden_unpadded(lm.model, seq)  # (H,)
    if "v_head.summary.0.weight" in head:
        z = torch.relu(h @ head["v_head.summary.0.weight"].T + head["v_head.summary.0.bias"])  # (NEURONS,)
        return float(z @ head["v_head.summary.2.weight"][0] + head["v_head.summary.2.bias"][0])
    return float(h @ head["v_head.summary.weight"][0] + head["v_head.summary.bias"][0])


# -- grm-research ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_type", ["mlp", "linear"])
def test_research_layout_matches_hand_computation(tmp_path, layer_type):
    folder = tmp_path / f"research-{layer_type}"
    lm, head = make_research_checkpoint(folder, layer_type, seed=3)

    loaded = load_grm(folder, load_tokenizer=False)
    assert loaded.format == "grm-research"
    assert loaded.model.grm_config.head.type == layer_type
    if layer_type == "mlp":
        assert loaded.model.grm_config.head.hidden == NEURONS
    assert not loaded.model.training  # dropout off

    expected = torch.tensor([hand_research_reward(lm, head, s) for s in SEQS])
    assert expected.abs().min() > 1e-3  # a meaningful comparison, not zeros
    model = loaded.model
    with torch.no_grad():
        single = torch.stack([model.score(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in SEQS])
        right = model.score(*pad_batch(SEQS, "right"))
        left = model.score(*pad_batch(SEQS, "left"))
    torch.testing.assert_close(single, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(right, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(left, expected, rtol=1e-4, atol=1e-4)
    assert right.dtype == torch.float32


def test_research_layout_loads_the_backbone_weights_not_a_fresh_init(tmp_path):
    folder = tmp_path / "research"
    lm, _ = make_research_checkpoint(folder, "mlp", seed=5)
    loaded = load_grm(folder, load_tokenizer=False)
    ref = lm.state_dict()
    for name, tensor in loaded.model.lm.state_dict().items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0, msg=name)


# -- sequence-classification ------------------------------------------------------------------------


def make_seqcls_checkpoint(folder: Path, seed: int):
    from transformers import LlamaForSequenceClassification

    cfg = assets.tiny_llama_config(hidden_size=HIDDEN)
    cfg.num_labels = 1
    cfg.pad_token_id = 0
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(folder)
    return model


def test_sequence_classification_matches_hand_and_transformers(tmp_path):
    folder = tmp_path / "seqcls"
    ref = make_seqcls_checkpoint(folder, seed=7)

    loaded = load_grm(folder, load_tokenizer=False)
    assert loaded.format == "sequence-classification"
    assert loaded.model.grm_config.head.type == "linear"
    assert loaded.model.grm_config.head.bias is False

    w = ref.score.weight.detach()  # (1, H)
    expected = torch.stack([last_hidden_unpadded(ref.model, s) @ w.T for s in SEQS]).squeeze(-1)  # (B,)
    ids, mask = pad_batch(SEQS, "right", pad_id=0)
    with torch.no_grad():
        ours = loaded.model.score(ids, mask)
        ours_left = loaded.model.score(*pad_batch(SEQS, "left", pad_id=0))
        theirs = ref(input_ids=ids, attention_mask=mask).logits.squeeze(-1)  # (B,)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_left, expected, rtol=1e-4, atol=1e-5)


# -- grm (ours) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_grm_round_trip_gives_identical_rewards(tmp_path, make_tiny_grm, tokenizer, head):
    model = make_tiny_grm(head, seed=11)
    out = save_grm(model, tokenizer, tmp_path / f"grm-{head}")
    loaded = load_grm(out)

    assert loaded.format == "grm"
    assert loaded.model.grm_config == model.grm_config
    assert loaded.tokenizer.pad_token_id == tokenizer.pad_token_id == 0
    ids, mask = pad_batch(SEQS, "right")
    with torch.no_grad():
        before = model.score(ids, mask)
        after = loaded.model.score(ids, mask)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    loaded_state = loaded.model.state_dict()
    assert set(loaded_state) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded_state[name], tensor, rtol=0, atol=0, msg=name)


def test_grm_save_replaces_an_existing_folder_without_leftovers(tmp_path, make_tiny_grm, tokenizer):
    target = tmp_path / "ckpt"
    save_grm(make_tiny_grm("mlp", seed=1), tokenizer, target)
    second = make_tiny_grm("linear", seed=2)
    save_grm(second, tokenizer, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or .old siblings
    loaded = load_grm(target, load_tokenizer=False)
    assert loaded.model.grm_config.head.type == "linear"
    ids, mask = pad_batch(SEQS, "left")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.score(ids, mask), second.score(ids, mask), rtol=0, atol=0)


def test_grm_folder_loads_as_a_plain_causal_lm(tiny_checkpoint):
    """transformers (and so vLLM) read our folder as an ordinary causal LM, nothing missing."""
    from transformers import AutoModelForCausalLM

    lm, info = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, output_loading_info=True)
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["mismatched_keys"]


# Frozen: change these only deliberately, together with FORMAT_VERSION and the format documentation.
FROZEN_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "reward_head.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
FROZEN_GRM_BLOCK = {
    "format_version": 1,
    "head": {"type": "mlp", "hidden": 32, "dropout": 0.0, "bias": True},
    "pooling": "last_token",
    "chat_template": True,
    "max_tokens": 512,
    "model_name": "tiny-mlp",
    "model_version": "0",
}
FROZEN_HEAD_TENSORS = {
    "summary.0.weight": [32, 64],
    "summary.0.bias": [32],
    "summary.2.weight": [1, 32],
    "summary.2.bias": [1],
}
FROZEN_LINEAR_HEAD_TENSORS = {"summary.weight": [1, 64], "summary.bias": [1]}


def head_file_layout(folder: Path) -> tuple[dict[str, list[int]], dict[str, str], set[str]]:
    with safe_open(str(folder / "reward_head.safetensors"), framework="pt") as fh:
        shapes = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
        dtypes = {str(fh.get_tensor(k).dtype) for k in fh.keys()}
        return shapes, fh.metadata(), dtypes


def test_grm_format_is_frozen(tiny_checkpoint):
    assert {p.name for p in tiny_checkpoint.iterdir()} == FROZEN_FILES
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["grm"] == FROZEN_GRM_BLOCK
    assert set(cfg["grm"]) == set(FROZEN_GRM_BLOCK)
    assert set(cfg["grm"]["head"]) == set(FROZEN_GRM_BLOCK["head"])
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    shapes, metadata, dtypes = head_file_layout(tiny_checkpoint)
    assert shapes == FROZEN_HEAD_TENSORS
    assert metadata == {"format": "pt", "grm_head": "mlp"}
    assert dtypes == {"torch.float32"}


def test_grm_format_linear_head_tensors_are_frozen(tmp_path, make_tiny_grm):
    out = save_grm(make_tiny_grm("linear", seed=0), None, tmp_path / "linear")
    shapes, metadata, _ = head_file_layout(out)
    assert shapes == FROZEN_LINEAR_HEAD_TENSORS
    assert metadata["grm_head"] == "linear"
    assert json.loads((out / "config.json").read_text())["grm"]["head"]["type"] == "linear"


def test_export_sequence_classification_round_trip(make_tiny_grm, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from grmserve.training.core.checkpoint import (
        export_sequence_classification,
        load_grm,
    )
    from grmserve.training.core.model import HeadConfig

    model = make_tiny_grm("linear", seed=3)
    model.reward_head = type(model.reward_head)(model.lm.config.hidden_size,
                                                HeadConfig(type="linear", bias=False, dropout=0.0))
    out = export_sequence_classification(model, tokenizer, tmp_path / "seqcls")
    ids = torch.tensor([[1, 520, 9531, 198, 19556, 17, 2, 0, 0], [1, 520, 9531, 198, 6044, 2025, 2025, 17, 2]])
    mask = (torch.arange(9) < torch.tensor([[7], [9]])).long()
    with torch.no_grad():
        want = model.score(ids, mask)
        hf = AutoModelForSequenceClassification.from_pretrained(out).eval()(input_ids=ids,
                                                                            attention_mask=mask).logits[:, 0]
        loaded = load_grm(out)
        got = loaded.model.score(ids, mask)
    assert loaded.format == "sequence-classification"
    torch.testing.assert_close(hf, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_export_refuses_an_mlp_head(make_tiny_grm, tokenizer, tmp_path):
    import pytest

    from grmserve.training.core.checkpoint import export_sequence_classification

    with pytest.raises(ValueError, match="mlp"):
        export_sequence_classification(make_tiny_grm("mlp"), tokenizer, tmp_path / "x")
