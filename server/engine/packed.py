"""Packed forward passes: many sequences as one row of tokens, no padding in the linear layers.

A right-padded batch computes rows × longest tokens; with the short, uneven responses of reward
traffic (and the prompt reuse of prefix_cache.py, which leaves only the responses to compute) half
of that can be padding. Here the new tokens of every row are concatenated into one sequence of
sum(lengths) tokens, so every projection and MLP (nearly all the FLOPs) runs on real tokens only.
Attention is the one place the rows must stay apart: a registered attention function gathers
the packed queries, keys and values into a small padded (rows, heads, longest, d) layout, puts each
row's cached prefix state in front of its keys, runs one `scaled_dot_product_attention` with a
mask that lets token j of row i see that row's past and its own tokens up to j, and gathers the
result back. Rotary positions come from `position_ids`, which continue each row's past. A row may
also borrow the first new tokens of another row with the same past (two responses to one new
prompt: the prompt runs once, in one row, and the other row's keys start with it), so sequences
that share uncached tokens still take one pass.

The attention function is registered with transformers as ``grm_packed`` and is active only
inside `packed_forward`; any other call (padded batches, training code) falls through to
transformers' own SDPA attention and mask, unchanged.

    >>> use_packed_attention(model.lm)                                                # doctest: +SKIP
    >>> last, new_kv, starts = packed_forward(model.backbone, [[5, 6], [7]], pasts, past_lengths)  # doctest: +SKIP
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
    query_index: torch.Tensor  # (rows, longest) packed position of row i's token j (its last token past the end)
    key_index: torch.Tensor  # (rows, borrowed + longest) packed positions of the tokens borrowed, then its own
    out_index: torch.Tensor  # (N,) flat position (row * longest + j) of each packed token
    mask: torch.Tensor  # (rows, 1, longest, longest_past + borrowed + longest) bool
    pasts: torch.Tensor | None  # (layers, 2, rows, kv_heads, longest_past, d), right-padded
    capture: bool
    new_kv: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → (2, kv_heads, N, d)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(1, heads, N, d) packed → (rows, heads, T, d) gathered by a (rows, T) index of packed positions."""
    return x[0][:, index].transpose(0, 1)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    layout: _Layout | None = getattr(_state, "layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if layout.capture:
        layout.new_kv[module.layer_idx] = torch.stack([key[0], value[0]])  # (2, kv_heads, N, d)
    # Gathers, not scatters into zeros: padded slots repeat a real token (finite), and the mask hides them.
    q = _rows(query, layout.query_index)
    k, v = _rows(key, layout.key_index), _rows(value, layout.key_index)
    if layout.pasts is not None:
        past = layout.pasts[module.layer_idx]  # (2, rows, kv_heads, P, d)
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    # grouped-query attention (each kv head serves several query heads) without copying the keys
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, scale=scaling,
                                         enable_gqa=k.shape[1] != q.shape[1])  # (rows, heads, longest, d)
    rows, heads, longest, dim = out.shape
    out = out.transpose(1, 2).reshape(rows * longest, heads, dim)[layout.out_index]
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
                   capture: bool = False, borrow: list[tuple[int, int] | None] | None = None,
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    """Run rows of new tokens, each continuing its own past state, as one packed sequence.

    `pasts` is (layers, 2, rows, kv_heads, P, d) with row i's state in its first `past_lengths[i]`
    positions (None when no row has a past). `borrow[i] = (r, s)` makes row i continue, after its
    past, the first s new tokens of row r of the same pass (which must have the same past): the
    tokens two sequences share run once, in row r, and row i's own tokens come after them. Returns
    the last hidden state of every row (rows, H), the new tokens' keys and values per layer when
    `capture` ((2, kv_heads, N, d), in packed order), and the packed start offset of every row (rows,).
    """
    device = next(backbone.parameters()).device
    rows = len(news)
    lengths = torch.tensor([len(r) for r in news], device=device)  # (B,)
    if int(lengths.min()) < 1:
        raise ValueError("every packed row needs at least one new token")
    borrow = borrow or [None] * rows
    source = torch.tensor([b[0] if b else i for i, b in enumerate(borrow)], device=device)  # (B,)
    shared = torch.tensor([b[1] if b else 0 for b in borrow], device=device)  # (B,)
    if any(b and (b[1] > len(news[b[0]]) or past_lengths[b[0]] != past_lengths[i]) for i, b in enumerate(borrow)):
        raise ValueError("a row borrows more tokens than its source row has, or from a row with another past")
    longest, most_shared = int(lengths.max()), int(shared.max())
    longest_past = pasts.shape[4] if pasts is not None else 0
    plen = torch.tensor(past_lengths, device=device)  # (B,)
    starts = torch.cumsum(lengths, 0) - lengths  # (B,)
    row_of = torch.repeat_interleave(torch.arange(rows, device=device), lengths)  # (N,)
    j = torch.arange(int(lengths.sum()), device=device) - starts[row_of]  # (N,) position within the row
    ids = torch.tensor([t for r in news for t in r], device=device).unsqueeze(0)  # (1, N)
    positions = (plen[row_of] + shared[row_of] + j).unsqueeze(0)  # (1, N)
    q = torch.arange(longest, device=device).view(1, -1)
    query_index = starts.view(-1, 1) + torch.minimum(q, (lengths - 1).view(-1, 1))  # (B, R)
    b = torch.arange(most_shared, device=device).view(1, -1)
    borrowed_index = starts[source].view(-1, 1) + torch.minimum(b, (shared - 1).clamp(min=0).view(-1, 1))  # (B, S)
    q = q.view(1, longest, 1)  # query position within the row
    see_past = (torch.arange(longest_past, device=device).view(1, 1, -1) < plen.view(-1, 1, 1))  # (B, 1, P)
    see_borrowed = b.view(1, 1, -1) < shared.view(-1, 1, 1)  # (B, 1, S)
    kn = torch.arange(longest, device=device).view(1, 1, -1)
    see_new = (kn <= q) & (kn < lengths.view(-1, 1, 1))  # (B, R, R); padded queries see the whole row
    mask = torch.cat([see_past.expand(rows, longest, longest_past), see_borrowed.expand(rows, longest, most_shared),
                      see_new], dim=2).unsqueeze(1)  # (B, 1, R, P + S + R)
    layout = _Layout(query_index=query_index, key_index=torch.cat([borrowed_index, query_index], dim=1),
                     out_index=row_of * longest + j, mask=mask, pasts=pasts, capture=capture)
    _state.layout = layout
    try:
        hidden = backbone(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state  # (1, N, H)
    finally:
        _state.layout = None
    last = hidden[0, starts + lengths - 1]  # (B, H)
    return last, layout.new_kv, starts
