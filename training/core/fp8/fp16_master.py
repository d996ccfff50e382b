"""FP16 master weights for the token embedding and the LM head (FP8-LM O2's precision decoupling
beyond the FP8 linears).

Under ``--precision.mode fp8-o2 --precision.fp8_master fp16`` the FP8 linears keep their weight as the
FP16 master with a per-tensor scale (training_linear.py). The embedding and the LM head stay out of
FP8 (FP8-LM keeps them in high precision), but they are large: SmolLM2-135M's tied embedding is a
fifth of its parameters, and in fp32 with an fp32 gradient it costs 4 + 4 + 1 + 2 = 11 bytes per
parameter against the FP8 linears' 6. Here it gets the same storage as an FP16-master linear:

- `FP16Master` holds the weight as a float16 parameter times a power-of-two per-tensor dequant scale
  (buffer ``weight_scale_inv``, linked as ``weight.master_scale_inv``, which `FP8AdamW` updates in
  place): 2 bytes per weight, no fp32 copy. Calling it returns the float32 value (one tensor for all
  the uses of a forward); the gradient of that value goes to ``weight.scaled_grad`` as float16 with
  its own per-tensor scale (the weight's scale would put the gradient deep in float16's subnormals),
  summed over micro-batches: 2 bytes per weight, not 4. ``weight.grad`` stays None.
- `MasterEmbedding` and `MasterHead` replace `nn.Embedding` and a bias-free `nn.Linear`. A tied
  embedding and LM head share one `FP16Master` module, so one scale serves both and the two gradients
  add up in one place.

Computation is unchanged: lookups and the head's matmul run in float32 on the dequantised weight
(exact: the scale is a power of two), so the only new rounding is the weight's and the gradient's
11 significant bits. State dicts name these weights ``<module>.fp16_master.weight`` and
``<module>.fp16_master.weight_scale_inv``; `dequantize_fp16_masters` turns such a state dict back
into the plain layout (float32 ``<module>.weight``) for export.

    >>> import torch
    >>> net = torch.nn.Module()
    >>> net.embed, net.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32, bias=False)
    >>> net.head.weight = net.embed.weight                                    # tied
    >>> keep_fp16_master_embeddings(net)
    ['embed', 'head']
    >>> net.head(net.embed(torch.tensor([1, 2]))).sum().backward()
    >>> w = net.embed.weight
    >>> w.dtype, w.grad, w.scaled_grad.q.dtype, net.head.fp16_master is net.embed.fp16_master
    (torch.float16, None, torch.float16, True)
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .optim import FP16, ScaledGrad, dequantize_scaled, tensor_quantize

_MASTER_KEY = re.compile(r"^(?:(.*)\.)?fp16_master\.weight$")


class _MasterValue(torch.autograd.Function):
    """float16 weight → its float32 value; backward sends the gradient to the weight's `ScaledGrad`."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, master: "FP16Master") -> torch.Tensor:
        ctx.master = master
        return master.value()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.master.accumulate_grad(grad)
        return None, None


def fp16_master_value(weight: torch.Tensor, scale_inv: torch.Tensor | None) -> torch.Tensor:
    """A weight's value: itself, or (an FP16 master: `scale_inv` given) its float16 values in float32
    times the scale."""
    return weight if scale_inv is None else dequantize_scaled(weight, scale_inv)


class FP16MasterLayout(nn.Module):
    """A module whose ``weight`` may be held as FP8-LM's FP16 master: float16 values (the parameter)
    times a per-tensor power-of-two dequant scale (buffer ``weight_scale_inv``), linked as
    ``weight.master_scale_inv``, where `FP8AdamW` finds the scale and updates it in place. No float32
    copy of the weight exists. `FP16Master` and the FP8 training linear (`keep_fp16_master`) use it."""

    def _hold_fp16_master(self, values: torch.Tensor, scale_inv: torch.Tensor, requires_grad: bool) -> None:
        """`values` (float16) become the ``weight`` parameter, `scale_inv` its buffer and link."""
        self.weight = nn.Parameter(values, requires_grad=requires_grad)
        self.register_buffer("weight_scale_inv", scale_inv)
        self.weight.master_scale_inv = self.weight_scale_inv

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if getattr(self, "weight_scale_inv", None) is not None:  # buffers are replaced, the parameter kept
            self.weight.master_scale_inv = self.weight_scale_inv
        return self


class FP16Master(FP16MasterLayout):
    """A weight stored as float16 values times a per-tensor power-of-two scale; calling the module
    returns its float32 value (see the module docstring).

        >>> w = torch.tensor([[1e-3, -2.0], [0.5, 3.0]])
        >>> m = FP16Master(w)
        >>> m.weight.dtype, float(m.weight_scale_inv), torch.allclose(m.value(), w, rtol=2**-11, atol=0)
        (torch.float16, 6.103515625e-05, True)
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self._hold_fp16_master(*tensor_quantize(weight, FP16), requires_grad=weight.requires_grad)
        self._pending: tuple[tuple[int, int], torch.Tensor] | None = None

    def forward(self) -> torch.Tensor:
        """The float32 value. While autograd records, the uses of one forward (a tied lookup and head, or
        several forward calls before one backward) get the same tensor: their gradients add up in
        autograd and reach ``scaled_grad`` in one rounding. A changed weight or scale (optimizer step,
        load) or the backward starts a fresh one."""
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return self.value()
        key = (self.weight._version, self.weight_scale_inv._version)
        if self._pending is None or self._pending[0] != key:
            self._pending = (key, _MasterValue.apply(self.weight, self))
        return self._pending[1]

    def __getstate__(self):  # copies and pickles never carry the pending autograd value
        return {**self.__dict__, "_pending": None}

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """The float32 weight, outside autograd."""
        return fp16_master_value(self.weight, self.weight_scale_inv)

    def accumulate_grad(self, grad: torch.Tensor) -> None:
        """Add `grad` (float) to ``weight.scaled_grad``: dequantise, add in float32, store as float16
        with a fresh per-tensor scale (one rounding per backward)."""
        self._pending = None
        previous = getattr(self.weight, "scaled_grad", None)
        total = grad.float() if previous is None else grad.float() + previous.dequantize()
        self.weight.scaled_grad = ScaledGrad.quantize(total, torch.float16)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._pending = None
        return self


class MasterEmbedding(nn.Module):
    """`nn.Embedding` (lookup, `padding_idx`) over an `FP16Master` weight."""

    def __init__(self, master: FP16Master, padding_idx: int | None = None):
        super().__init__()
        self.fp16_master = master
        self.num_embeddings, self.embedding_dim = master.weight.shape
        self.padding_idx = padding_idx

    @property
    def weight(self) -> nn.Parameter:
        return self.fp16_master.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        master = self.fp16_master
        if torch.is_grad_enabled() and master.weight.requires_grad:
            return F.embedding(input_ids, master(), self.padding_idx)
        return F.embedding(input_ids, master.weight, self.padding_idx).float() * master.weight_scale_inv  # rows only

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, weight=fp16 master"


class MasterHead(nn.Module):
    """A bias-free `nn.Linear` (the LM head) over an `FP16Master` weight (out, in)."""

    def __init__(self, master: FP16Master):
        super().__init__()
        self.fp16_master = master
        self.out_features, self.in_features = master.weight.shape

    @property
    def weight(self) -> nn.Parameter:
        return self.fp16_master.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.fp16_master()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False, weight=fp16 master"


def keep_fp16_master_embeddings(model: nn.Module) -> list[str]:
    """Store, in place, every trainable `nn.Embedding` of `model` and every bias-free `nn.Linear` tied to
    one (or that is a model's untied output embedding, ``get_output_embeddings()``) as an FP16 master;
    tied modules share one. Frozen ones are left alone. Returns the converted module names."""
    masters: dict[int, tuple[nn.Parameter, FP16Master]] = {}  # the parameter is kept so its id stays unique
    converted: list[str] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Embedding) and module.weight.requires_grad:
            if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
                raise ValueError(f"{name}: FP16-master embeddings support plain lookups only "
                                 "(no max_norm, scale_grad_by_freq or sparse gradients)")
            _, master = masters.setdefault(id(module.weight), (module.weight, FP16Master(module.weight)))
            model.set_submodule(name, MasterEmbedding(master, module.padding_idx))
            converted.append(name)
    outputs = {id(m.get_output_embeddings()) for m in model.modules()
               if callable(getattr(m, "get_output_embeddings", None))}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or module.bias is not None or not module.weight.requires_grad:
            continue
        if id(module.weight) in masters:
            model.set_submodule(name, MasterHead(masters[id(module.weight)][1]))
        elif id(module) in outputs:
            model.set_submodule(name, MasterHead(FP16Master(module.weight)))
        else:
            continue
        converted.append(name)
    return converted


def release_fp16_masters(model: nn.Module) -> list[str]:
    """Undo `keep_fp16_master_embeddings` in place: every `MasterEmbedding` / `MasterHead` becomes a plain
    `nn.Embedding` / bias-free `nn.Linear` holding the float32 value; modules that shared a master share
    the new parameter (ties kept), so the model saves as a plain Hugging Face model. Returns the names.

        >>> net = torch.nn.Sequential(torch.nn.Embedding(8, 4))
        >>> _ = keep_fp16_master_embeddings(net)
        >>> release_fp16_masters(net), net[0].weight.dtype
        (['0'], torch.float32)
    """
    params: dict[int, nn.Parameter] = {}
    released: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (MasterEmbedding, MasterHead)):
            continue
        master = module.fp16_master
        if id(master) not in params:
            params[id(master)] = nn.Parameter(master.value(), requires_grad=master.weight.requires_grad)
        if isinstance(module, MasterEmbedding):
            plain = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx, device="meta")
        else:
            plain = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        plain.weight = params[id(master)]
        model.set_submodule(name, plain)
        released.append(name)
    return released


def dequantize_fp16_masters(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict holding FP16 masters (``X.fp16_master.weight`` and ``X.fp16_master.weight_scale_inv``)
    in the plain layout: ``X.weight`` in float32. Other entries pass through.

        >>> sd = {"emb.fp16_master.weight": torch.tensor([1.0, -2.0]).half(),
        ...       "emb.fp16_master.weight_scale_inv": torch.tensor(0.25), "b": torch.ones(1)}
        >>> {k: v.tolist() for k, v in dequantize_fp16_masters(sd).items()}
        {'emb.weight': [0.25, -0.5], 'b': [1.0]}
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("fp16_master.weight_scale_inv"):
            continue
        match = _MASTER_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        prefix = f"{match.group(1)}." if match.group(1) else ""
        out[f"{prefix}weight"] = value.float() * state_dict[f"{prefix}fp16_master.weight_scale_inv"].float()
    return out


__all__ = ["FP16Master", "FP16MasterLayout", "MasterEmbedding", "MasterHead", "dequantize_fp16_masters",
           "fp16_master_value", "keep_fp16_master_embeddings", "release_fp16_masters"]
