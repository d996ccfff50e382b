"""FP16 master weights for the token embedding and the LM head (O2 with ``fp8_master fp16``): a tied
pair shares one FP16 master, its gradient from both uses lands in one FP16 `ScaledGrad` that matches
fp32 autograd to FP16's precision, and the precision plan holds 2 + 2 + 1 + 2 bytes per embedding
parameter instead of 4 + 4 + 1 + 2."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grmserve.training.config import PrecisionConfig
from grmserve.training.core.assets import tiny_llama_config
from grmserve.training.core.fp8.fp16_master import (
    MasterEmbedding,
    MasterHead,
    dequantize_fp16_masters,
    keep_fp16_master_embeddings,
)
from grmserve.training.core.fp8.optim import FP8AdamW, clip_grad_norm_, gradient
from grmserve.training.core.model import GRMConfig, HeadConfig, init_grm
from grmserve.training.precision import apply_precision

from ..processes import free_port

PAD = 0  # tiny_llama_config's pad_token_id, the embedding's padding_idx


def _grm(tied: bool = True):
    config = tiny_llama_config(hidden_size=64)
    config.tie_word_embeddings = tied
    return init_grm(config, seed=0, grm=GRMConfig(head=HeadConfig(dropout=0.0)))


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 500, (3, 12), generator=g)
    ids[:, -3:] = PAD  # padded tails: the padding row must get no gradient
    mask = (ids != PAD).long()
    response = torch.zeros_like(ids)
    response[:, 4:9] = 1
    return ids, mask, response


def _loss(model) -> torch.Tensor:
    ids, mask, response = _batch()
    out = model(ids, mask, response_mask=response)  # rewards (embedding lookup) and log-probs (tied LM head)
    return out.rewards.sum() + out.logps.sum() / 10


def test_tied_embedding_and_head_share_one_master_and_sum_both_gradients():
    reference = _grm()
    model = copy.deepcopy(reference)
    assert keep_fp16_master_embeddings(model) == ["lm.model.embed_tokens", "lm.lm_head"]
    embed, head = model.lm.get_input_embeddings(), model.lm.get_output_embeddings()
    assert isinstance(embed, MasterEmbedding) and isinstance(head, MasterHead)
    assert embed.fp16_master is head.fp16_master and embed.weight.dtype == torch.float16
    assert {n for n, _ in model.named_parameters()} >= {"lm.model.embed_tokens.fp16_master.weight"}
    assert sum(p.dtype == torch.float16 for p in model.parameters()) == 1  # one parameter for both uses
    _loss(reference).backward()
    _loss(model).backward()
    want = reference.lm.get_input_embeddings().weight.grad  # fp32 autograd: lookup + head, summed
    assert embed.weight.grad is None and embed.weight.scaled_grad.q.dtype == torch.float16
    got = embed.weight.scaled_grad.dequantize()
    assert (got - want).norm() / want.norm() < 2e-3  # FP16 weight and gradient: 11 significant bits
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):  # the rest is unchanged fp32 autograd
        if p.dtype == torch.float32:
            assert (p.grad - q.grad).norm() <= 2e-3 * q.grad.norm(), name
    params = list(model.parameters())
    norm = torch.linalg.vector_norm(torch.cat([gradient(p).reshape(-1) for p in params]))
    assert torch.allclose(clip_grad_norm_(params, 1e9), norm, rtol=1e-5)


def test_uses_of_one_forward_share_one_value_and_copies_leave_it_behind():
    model = _grm()
    keep_fp16_master_embeddings(model)
    master = model.lm.get_input_embeddings().fp16_master
    first = master()
    assert master() is first  # the lookup and the tied head of one forward: one autograd value
    copied = copy.deepcopy(model)  # a pending value is not copied (non-leaf tensors cannot be)
    assert copied.lm.get_input_embeddings().fp16_master._pending is None
    with torch.no_grad():
        master.weight.mul_(0.5)  # an optimizer step or a load changes the version: a fresh value
    assert master() is not first and torch.equal(master().detach(), first.detach() / 2)


def test_gradients_accumulate_over_micro_batches():
    reference, model = _grm(), _grm()
    keep_fp16_master_embeddings(model)
    for _ in range(3):
        _loss(reference).backward()
        _loss(model).backward()
    want = reference.lm.get_input_embeddings().weight.grad
    got = model.lm.get_input_embeddings().weight.scaled_grad.dequantize()
    assert (got - want).norm() / want.norm() < 3e-3  # one FP16 rounding per use and micro-batch


def test_untied_head_gets_its_own_master_and_frozen_embeddings_are_left_alone():
    model = _grm(tied=False)
    assert keep_fp16_master_embeddings(model) == ["lm.model.embed_tokens", "lm.lm_head"]
    embed = model.lm.get_input_embeddings()
    assert embed.fp16_master is not model.lm.get_output_embeddings().fp16_master
    ids = _batch()[0]
    embed(ids).sum().backward()  # the lookup alone: each row's gradient is how often it was looked up
    counts = torch.bincount(ids.reshape(-1), minlength=embed.num_embeddings).float()
    counts[PAD] = 0  # padding_idx: no gradient
    assert torch.equal(embed.weight.scaled_grad.dequantize(), counts[:, None].expand(-1, embed.embedding_dim))
    frozen = _grm()
    frozen.lm.get_input_embeddings().weight.requires_grad_(False)  # frozen and tied: both stay as they are
    assert keep_fp16_master_embeddings(frozen) == []
    embedding = torch.nn.Embedding(8, 4, max_norm=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        keep_fp16_master_embeddings(torch.nn.Sequential(embedding))


def test_o2_fp16_plan_holds_seven_bytes_per_embedding_parameter_and_trains_like_fp32():
    """2 (FP16 master) + 2 (FP16 gradient) + 1 (E4M3 m) + 2 (FP16 sqrt v), against fp32 master and
    gradient's 4 + 4 + 1 + 2; the embedding's updates track the fp32-master run's."""
    plans = {}
    for master in ("fp32", "fp16"):
        cfg = PrecisionConfig(mode="fp8-o2", fp8_master=master, fp8_backend="emulated")
        plans[master] = apply_precision(_grm(), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), cfg,
                                        device=torch.device("cpu"))
        for _ in range(3):
            _loss(plans[master].model).backward()
            plans[master].optimizer.step()
            plans[master].optimizer.zero_grad()
        _loss(plans[master].model).backward()
    plan = plans["fp16"]
    assert isinstance(plan.optimizer, FP8AdamW)
    weight = plan.model.lm.get_input_embeddings().weight
    state = plan.optimizer.state[weight]
    assert "master" not in state and state["exp_avg"].dtype == torch.float8_e4m3fn
    stored = [weight, weight.scaled_grad.q, state["exp_avg"], state["exp_avg_sq"]]
    assert sum(t.numel() * t.element_size() for t in stored) / weight.numel() == 7.0
    assert len(state["exp_avg_scale_inv"]) == -(-weight.numel() // 128)  # block scales: + 0.06 bytes
    fp32 = plans["fp32"].model.lm.get_input_embeddings().weight
    assert fp32.dtype == torch.float32 and fp32.grad is not None  # the fp32-master plan is unchanged
    start = _grm().lm.get_input_embeddings().weight
    value = plan.model.lm.get_input_embeddings().fp16_master.value()
    moved, apart = (fp32 - start).norm(), (value - fp32).norm()
    # Measured 0.085 of the distance moved after 3 steps; the FP8 linears' FP16 masters drift 0.28-0.30 in
    # the same runs (Adam turns rounding differences in tiny gradient entries into full-size steps).
    assert moved > 0 and apart < 0.15 * moved, (float(apart), float(moved))


def test_state_dict_round_trips_and_dequantizes_to_the_plain_layout():
    model = _grm()
    keep_fp16_master_embeddings(model)
    sd = model.state_dict()
    assert "lm.model.embed_tokens.fp16_master.weight_scale_inv" in sd
    plain = _grm()
    plain.load_state_dict(dequantize_fp16_masters(sd))  # strict: every key matched
    value = model.lm.get_input_embeddings().fp16_master.value()
    assert torch.equal(plain.lm.get_input_embeddings().weight, value)
    again = _grm()
    keep_fp16_master_embeddings(again)
    again.load_state_dict(sd)
    assert (again.lm.get_input_embeddings().weight.master_scale_inv
            is again.lm.get_input_embeddings().fp16_master.weight_scale_inv)
    assert torch.equal(again.lm.get_input_embeddings().fp16_master.value(), value)


def _reduce_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: a different batch per rank, then the trainer's gradient all-reduce."""
    from grmserve.training.core.fp8.training_linear import FP8TrainingLinear
    from grmserve.training.trainer import DistInfo, all_reduce_grads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model on both ranks
        model = torch.nn.Sequential(torch.nn.Embedding(64, 32), FP8TrainingLinear(32, 32, grad_storage="fp8"))
        keep_fp16_master_embeddings(model)
        torch.manual_seed(10 + rank)  # different data
        model(torch.randint(0, 64, (24,))).square().sum().backward()
        params = dict(model.named_parameters())
        before = {n: gradient(p).clone() for n, p in params.items()}
        all_reduce_grads(model, DistInfo(rank=rank, world_size=2))
        after = {n: gradient(p) for n, p in params.items()}
        kinds = {n: p.scaled_grad.q.dtype for n, p in params.items() if getattr(p, "scaled_grad", None) is not None}
        torch.save({"before": before, "after": after, "kinds": kinds}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_reduction_averages_scaled_gradients_in_their_own_formats(tmp_path):
    """`all_reduce_grads` (grm-train without FSDP): the embedding's FP16 gradient is averaged in float32
    and stored as FP16 again; the FP8 linear's is averaged as FP8 and stored as E4M3 again."""
    mp.spawn(_reduce_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["kinds"] == {"0.fp16_master.weight": torch.float16, "1.weight": torch.float8_e4m3fn}
    for name, bar in (("0.fp16_master.weight", 1e-3), ("1.weight", 0.1), ("1.bias", 1e-6)):
        want = (r0["before"][name] + r1["before"][name]) / 2
        assert not torch.equal(r0["before"][name], r1["before"][name])  # the ranks' gradients differed
        assert torch.equal(r0["after"][name], r1["after"][name]), name  # and now agree
        assert (r0["after"][name] - want).norm() <= bar * want.norm(), name
