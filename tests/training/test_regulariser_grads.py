"""The GRM regularisers train the backbone through the hidden state it shares with the reward head.

With the reward loss weighted 0 (alpha = 1), a regulariser alone must put a nonzero gradient on
a backbone weight and on the LM head, and none on the reward head.
"""

from __future__ import annotations

import pytest
import torch

from grmserve.training.components import ReferenceModel, compute_loss
from grmserve.training.config import TrainConfig
from grmserve.training.data import EncodedPair, collate_pairs


def _batch(tokenizer):
    pairs = []
    for i in range(3):
        prompt = tokenizer(f"Question {i}: what is good?", add_special_tokens=False)["input_ids"]
        chosen = tokenizer(f" A kind and helpful answer number {i}.", add_special_tokens=False)["input_ids"]
        rejected = tokenizer(" No.", add_special_tokens=False)["input_ids"]
        pairs.append(EncodedPair(prompt, chosen, rejected))
    return collate_pairs(pairs, pad_id=tokenizer.pad_token_id)


@pytest.mark.parametrize("regulariser", ["sft", "sft-nll", "dpo", "dpo-noref"])
def test_regulariser_alone_reaches_backbone_and_lm_head(regulariser, make_tiny_grm, tokenizer):
    model = make_tiny_grm("mlp", seed=1).train()
    cfg = TrainConfig()
    cfg.loss.regulariser, cfg.loss.alpha = regulariser, 1.0  # the reward loss has weight 0
    batch = _batch(tokenizer)
    reference = None
    if regulariser == "dpo":
        reference = ReferenceModel(make_tiny_grm("mlp", seed=2).lm)  # a different reference: nonzero DPO gradient
    loss, stats = compute_loss(model, batch, cfg, reference)
    loss.backward()
    assert stats["reg_loss"] == pytest.approx(loss.item(), rel=1e-6)

    backbone_weight = model.backbone.layers[0].mlp.up_proj.weight
    assert backbone_weight.grad is not None and backbone_weight.grad.abs().sum() > 0
    # The LM head (tied to the embeddings here) gets a gradient on every vocabulary row through the
    # softmax; an embedding lookup alone would touch only the rows of the input tokens.
    lm_head = model.lm.get_output_embeddings().weight
    rows_with_grad = int((lm_head.grad.abs().sum(-1) > 0).sum())
    assert rows_with_grad > len(set(batch.input_ids.flatten().tolist()))
    for p in model.reward_head.parameters():
        assert p.grad is None or p.grad.abs().sum() == 0


def test_reward_loss_alone_skips_lm_head(make_tiny_grm, tokenizer):
    model = make_tiny_grm("mlp", seed=1).train()
    cfg = TrainConfig()
    cfg.loss.regulariser = "none"
    loss, stats = compute_loss(model, _batch(tokenizer), cfg)
    loss.backward()
    assert "reg_loss" not in stats
    assert model.backbone.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert model.reward_head.summary[0].weight.grad.abs().sum() > 0
    # Tied LM head = embeddings: only the rows of the input tokens get a gradient (no LM-head logits).
    emb_grad = model.lm.get_output_embeddings().weight.grad
    assert (emb_grad.abs().sum(-1) > 0).sum() <= len(set(_batch(tokenizer).input_ids.flatten().tolist()))


def test_dpo_with_reference_equal_to_policy_starts_at_log2(make_tiny_grm, tokenizer):
    model = make_tiny_grm("mlp", seed=1).train()
    ref = ReferenceModel(make_tiny_grm("mlp", seed=1).lm)
    cfg = TrainConfig()
    cfg.loss.regulariser, cfg.loss.alpha = "dpo", 1.0
    loss, _ = compute_loss(model, _batch(tokenizer), cfg, ref)
    assert loss.item() == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-5)
