"""GRMModel.forward: response log-probs for the regulariser, rewards equal to `score`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grmserve.training.core.model import last_token_index


def batch():
    """Right-padded (ids, attention mask, response mask). The response mask is also 1 on the pad
    positions of row 0, which forward must ignore."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 5000, (3, 9), generator=g)
    mask = torch.tensor([
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 0, 0, 0, 0],
    ])
    ids[mask == 0] = 0
    response = torch.tensor([
        [0, 0, 0, 1, 1, 1, 1, 1, 1],  # prompt of 3, response of 3, then pads
        [0, 0, 1, 1, 1, 1, 1, 1, 1],  # prompt of 2, response of 7
        [0, 0, 0, 0, 1, 0, 0, 0, 0],  # prompt of 4, response of 1
    ])
    return ids, mask, response


def hand_logps(model, ids, mask, response) -> torch.Tensor:
    """Full log_softmax over the LM head's logits, summed over response tokens only."""
    with torch.no_grad():
        logits = model.lm(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V)
    logp = F.log_softmax(logits, dim=-1)
    out = torch.zeros(ids.shape[0])
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if response[b, t] and mask[b, t]:
                out[b] += logp[b, t - 1, ids[b, t]]
    return out


def test_forward_logps_match_full_log_softmax(make_tiny_grm):
    model = make_tiny_grm("mlp", seed=4)
    ids, mask, response = batch()
    with torch.no_grad():
        out = model(ids, mask, response_mask=response)
    expected = hand_logps(model, ids, mask, response)
    assert out.logps.shape == (3,) and out.logps.dtype == torch.float32
    torch.testing.assert_close(out.logps, expected, rtol=1e-5, atol=1e-4)
    # The pad positions under row 0's response mask were excluded: counting them changes the sum.
    with_pads = hand_logps(model, ids, torch.ones_like(mask), response)
    assert not torch.allclose(with_pads[0], expected[0], atol=1e-3)


def test_forward_without_response_mask_has_no_logps(make_tiny_grm):
    model = make_tiny_grm("linear", seed=4)
    ids, mask, _ = batch()
    with torch.no_grad():
        out = model(ids, mask)
    assert out.logps is None
    assert out.hidden.shape == (3, 9, model.hf_config.hidden_size)


def test_logps_gradient_reaches_backbone(make_tiny_grm):
    model = make_tiny_grm("mlp", seed=4).train()
    ids, mask, response = batch()
    out = model(ids, mask, response_mask=response)
    out.logps.sum().backward()
    grad = model.lm.get_decoder().layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval()


def test_score_equals_forward_rewards_and_skips_lm_head(make_tiny_grm):
    model = make_tiny_grm("mlp", seed=9)
    ids, mask, response = batch()
    calls = []
    hook = model.lm.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            scores = model.score(ids, mask)
        assert calls == []  # the scoring path never runs the LM head
        with torch.no_grad():
            rewards = model(ids, mask, response_mask=response).rewards
    finally:
        hook.remove()
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, rewards, rtol=0, atol=0)


def test_reward_reads_the_last_real_token(make_tiny_grm):
    """Changing a token before the last real one changes the reward; changing a pad does not."""
    model = make_tiny_grm("mlp", seed=2)
    ids, mask, _ = batch()
    with torch.no_grad():
        base = model.score(ids, mask)
        pads_changed = ids.clone()
        pads_changed[mask == 0] = 123
        same = model.score(pads_changed, mask)
        last_changed = ids.clone()
        last_changed[0, 5] = 4321
        differs = model.score(last_changed, mask)
    torch.testing.assert_close(same, base, rtol=0, atol=1e-6)
    assert abs(float(differs[0] - base[0])) > 1e-6
    torch.testing.assert_close(differs[1:], base[1:], rtol=0, atol=1e-6)


def test_last_token_index_right_left_and_no_padding():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 2]
