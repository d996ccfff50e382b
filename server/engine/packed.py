"""Packed forward passes: many sequences as one row of tokens, no padding in the linear layers.

A right-padded batch computes rows × longest tokens; with the short, uneven responses of reward
traffic (and the prompt reuse of prefix_cache.py, which leaves only the responses to compute) half
of that can be padding. Here the new tokens of every row are concatenated into one sequence of
sum(lengths) tokens, so every projection and MLP (nearly all the FLOPs) runs on real tokens only.
Attention is the one place the rows must stay apart: a registered attention function scatters
the packed queries, keys and values into a small padded (rows, heads, longest, d) layout, puts each
row's cached prompt state in front of its keys, runs one `scaled_dot_product_attention` with a
mask that lets token j of row i see that row's past and its own tokens up to j, and gathers the
result back. Rotary positions come from `position_ids`, which continue each row's past.

The attention function is registered with transformers as ``grm_packed`` and is active only
inside `packed_forward`; any other call (padded batches, training code) falls through to
transformers' own SDPA attention and mask, unchanged.

    >>> use_packed_attention(model.lm)                                                # doctest: +SKIP
    >>> hidden, new_kv = packed_forward(model.backbone, [[5, 6], [7]], pasts, past_lengths)  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "grm_packed"
# Architectures whose attention modules call the attention interface with rotary-embedded
# (batch, heads, tokens, head_dim) queries/keys/values and carry `layer_idx`, with no sliding window.
PACKED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

_state = threading.local()


@dataclass
class _Layout:
    rows: int
    longest: int  # longest row of new tokens
    index: torch.Tensor  # (N,) flat position (row * longest + j) of each packed token
    mask: torch.Tensor  # (rows, 1, longest, longest_past + longest) bool
    pasts: torch.Tensor | None  # (layers, 2, rows, kv_heads, longest_past, d), right-padded
    capture: bool
    new_kv: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → (2, kv_heads, N, d)


def _pad_rows(x: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """(1, heads, N, d) packed → (rows, heads, longest, d) padded with zeros."""
    _, heads, _, dim = x.shape
    out = x.new_zeros(layout.rows * layout.longest, heads, dim)
    out[layout.index] = x[0].transpose(0, 1)
    return out.view(layout.rows, layout.longest, heads, dim).transpose(1, 2)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    layout: _Layout | None = getattr(_state, "layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if layout.capture:
        layout.new_kv[module.layer_idx] = torch.stack([key[0], value[0]])  # (2, kv_heads, N, d)
    q, k, v = _pad_rows(query, layout), _pad_rows(key, layout), _pad_rows(value, layout)
    if layout.pasts is not None:
        past = layout.pasts[module.layer_idx]  # (2, rows, kv_heads, P, d)
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    # grouped-query attention (each kv head serves several query heads) without copying the keys
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, scale=scaling,
                                         enable_gqa=k.shape[1] != q.shape[1])  # (rows, heads, longest, d)
    out = out.transpose(1, 2).reshape(layout.rows * layout.longest, q.shape[1], q.shape[3])[layout.index]
    return out.unsqueeze(0), None  # (1, N, heads, d), as transformers' attention functions return it


def _mask(*args, **kwargs):
    if getattr(_state, "layout", None) is not None:
        return None  # _attention builds its own
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, _mask)


def supports_packing(lm) -> bool:
    """Whether `lm` (a transformers causal LM) can run `packed_forward`."""
    config = lm.config.get_text_config()
    if config.model_type not in PACKED_MODEL_TYPES:
        return False
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return not window


def use_packed_attention(lm) -> None:
    """Switch `lm` to the `grm_packed` attention function (SDPA outside `packed_forward`)."""
    lm.set_attn_implementation(NAME)


def packed_forward(backbone, news: list[list[int]], pasts: torch.Tensor | None, past_lengths: list[int], *,
                   capture: bool = False) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    """Run rows of new tokens, each continuing its own past state, as one packed sequence.

    `pasts` is (layers, 2, rows, kv_heads, P, d) with row i's state in its first `past_lengths[i]`
    positions (None when no row has a past). Returns the last hidden state of every row (rows, H),
    the new tokens' keys and values per layer when `capture` ((2, kv_heads, N, d), in packed order),
    and the packed start offset of every row (rows,).
    """
    device = next(backbone.parameters()).device
    rows = len(news)
    lengths = torch.tensor([len(r) for r in news], device=device)  # (B,)
    if int(lengths.min()) < 1:
        raise ValueError("every packed row needs at least one new token")
    longest = int(lengths.max())
    longest_past = pasts.shape[4] if pasts is not None else 0
    plen = torch.tensor(past_lengths, device=device)  # (B,)
    starts = torch.cumsum(lengths, 0) - lengths  # (B,)
    row_of = torch.repeat_interleave(torch.arange(rows, device=device), lengths)  # (N,)
    j = torch.arange(int(lengths.sum()), device=device) - starts[row_of]  # (N,) position within the row
    index = row_of * longest + j
    ids = torch.tensor([t for r in news for t in r], device=device).unsqueeze(0)  # (1, N)
    positions = (plen[row_of] + j).unsqueeze(0)  # (1, N)
    q = torch.arange(longest, device=device).view(1, longest, 1)  # query position within the row
    kp = torch.arange(longest_past, device=device).view(1, 1, -1)
    kn = torch.arange(longest, device=device).view(1, 1, -1)
    see_past = (kp < plen.view(-1, 1, 1)).expand(rows, longest, longest_past)  # (B, R, P)
    see_new = (kn <= q) & (kn < lengths.view(-1, 1, 1))  # (B, R, R); padded queries see the whole row
    mask = torch.cat([see_past, see_new], dim=2).unsqueeze(1)  # (B, 1, R, P + R)
    layout = _Layout(rows=rows, longest=longest, index=index, mask=mask, pasts=pasts, capture=capture)
    _state.layout = layout
    try:
        hidden = backbone(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state  # (1, N, H)
    finally:
        _state.layout = None
    last = hidden[0, starts + lengths - 1]  # (B, H)
    return last, layout.new_kv, starts
