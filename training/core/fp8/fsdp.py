"""FP8 weight all-gather for FSDP2 (FP8-LM O3): each process sends its weight shard as E4M3 bytes.

FSDP2 (`torch.distributed.fsdp.fully_shard`) all-gathers every sharded parameter before a module's
forward and backward. Its extension point is two methods on the parameter's local tensor,
``fsdp_pre_all_gather`` (what to send) and ``fsdp_post_all_gather`` (what the module sees). Two tensor
subclasses use it for `FP8TrainingLinear` weights:

- `FP8AllGatherWeight` wraps the high-precision weight shard (the master, fp32). FSDP's sharding
  ops (chunk, view, copy, padding) keep the wrapper; everything else sees the plain tensor. Before
  the all-gather it computes the scale the layer's weight `ScalingState` gives now from the amax of
  the whole weight (local amaxes all-reduced with MAX over the FSDP mesh, so every process uses one
  scale) and sends its shard quantised to E4M3: 1 byte per element instead of 4 (fp32) or 2 (bf16).
- `GatheredWeight` is the unsharded weight after the all-gather: the E4M3 bytes and their
  dequant scale, shaped like the weight. `FP8TrainingLinear` uses them as its FP8 weight operand
  as they are (no second quantisation) and records the step in its scaling state once per forward
  (with the saturated and flushed elements of this process's shard); any other use sees the
  dequantised values. The weight gradient the module sees stays float32, so the sharded optimizer
  state (`FP8AdamW` on each process's shard) works unchanged; it travels in E4M3 (`FP8ReduceScatter`).

The token embedding and LM head (tied or not) can travel narrow too (`gather_embeddings_in`, O3's
``fp8_embedding_gather``): `BF16AllGatherWeight` sends them as bf16 (2 bytes per element instead of
4), `E4M3AllGatherWeight` as E4M3 bytes with one current scale for the whole weight (1 byte; the
scale comes from the weight's amax now, all-reduced with MAX, since these weights have no FP8 layer
and so no scaling state). Either way the model computes in float32 from the gathered values, and the
float32 shards stay the masters.

Per-tensor recipes only (``delayed``, ``current``): 128×128 weight blocks would straddle shard
boundaries. `training_linear.shard_fp8_weights(model)` wraps the weights; call it after
`convert_to_fp8_training` and before `fully_shard`.

The gradients can travel back in FP8 too (O3's ``fp8_reduce_scatter``): `FP8ReduceScatter` replaces
the reduce-scatter of an FSDP2 module (``set_custom_reduce_scatter``), `reduce_scatter_in_fp8(model)`
sets it on the modules whose parameters include FP8 linears' weights. FSDP2 hands it one flat
float32 buffer of W equal shards (the shard destined to rank r holds rank r's piece of every
gradient of the module), so it scales per 1×128 block of that buffer, not per tensor: the block
amaxes are all-reduced with MAX and every block gets one shared power-of-two scale pre-divided by
W (FP8-LM's automatic scaling, as `comm.fp8_all_reduce_` does per tensor for O1), so the sum of W
contributions cannot overflow. The E4M3 bytes then go through an all-to-all, and each rank sums
its shard in float32: 1 byte per element instead of 4, plus 4 bytes of amax per block of 128.
`BF16ReduceScatter` sends the root module's gradients (embedding, heads) as bf16 when asked.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map_only

from .comm import all_reduce_max_, fp8_sum_to_shards, shared_scales
from .formats import E4M3, cast_to_fp8, compute_scale, fp8_to_float32
from .scaling import ScalingState, min_subnormal, quantize_and_count, tensor_amax

_aten = torch.ops.aten
SHARDING_OPS = {  # the ops FSDP2 applies to a parameter while sharding it: they keep the wrapper
    _aten.empty_like.default, _aten.new_zeros.default, _aten.new_empty.default, _aten.slice.Tensor,
    _aten.copy_.default, _aten.view.default, _aten.as_strided.default, _aten._to_copy.default,
    _aten._pin_memory.default, _aten.split.Tensor, _aten.clone.default, _aten.detach.default,
    _aten.alias.default,
}
VIEW_OPS = {_aten.view.default, _aten.as_strided.default, _aten.detach.default, _aten.alias.default,
            _aten.slice.Tensor, _aten._unsafe_view.default, _aten.reshape.default}


_SENT = {"fp8_linears": 0, "bf16_embeddings": 0, "e4m3_embeddings": 0}
_REDUCED = {"e4m3_gradients": 0, "block_amax": 0}


def all_gather_bytes() -> dict[str, int]:
    """Bytes this process has sent into FSDP2 all-gathers since it started (evaluation's included)
    through the narrow wrappers (its shards, every gather): ``fp8_linears`` (`FP8AllGatherWeight`,
    E4M3), ``bf16_embeddings`` and ``e4m3_embeddings`` (`gather_embeddings_in`). Anything else FSDP2
    gathers goes as it is stored."""
    return dict(_SENT)


def reduce_scatter_bytes() -> dict[str, int]:
    """Bytes this process has put into FP8 reduce-scatters since it started (`FP8ReduceScatter`):
    ``e4m3_gradients``, the all-to-all's E4M3 input (W shards, each padded to whole blocks of 128; the
    own shard stays local, so (W-1)/W of it goes on the wire, as for FSDP2's float32 reduce-scatter
    input) and ``block_amax``, the all-reduced amaxes (4 bytes per block). Other modules' gradients
    are reduce-scattered in float32, or the root's in bf16 (`BF16ReduceScatter`)."""
    return dict(_REDUCED)


class _AllGatherWrapper(torch.Tensor):
    """A float32 parameter shard `_hp` that FSDP2 all-gathers in a narrower form (the subclass's
    ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``). FSDP's sharding ops (chunk, view, copy,
    padding) keep the wrapper; everything else sees the plain tensor."""

    _hp: torch.Tensor

    @staticmethod
    def __new__(cls, hp: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, hp.size(), strides=hp.stride(),
                                                   storage_offset=hp.storage_offset(), dtype=hp.dtype,
                                                   device=hp.device, requires_grad=hp.requires_grad)

    def __init__(self, hp: torch.Tensor):
        self._hp = hp

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._hp!r})"

    def __tensor_flatten__(self):
        return ["_hp"], None

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        return cls(inner["_hp"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        args, kwargs = tree_map_only(_AllGatherWrapper, lambda t: t._hp, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in SHARDING_OPS:
            return out
        return tree_map_only(torch.Tensor, cls, out)


class BF16AllGatherWeight(_AllGatherWrapper):
    """A float32 weight shard that FSDP2 all-gathers as bf16 (2 bytes per element instead of 4): O3's
    embeddings and untied LM head, which compute in float32 from the gathered bf16 values (as bf16
    mixed precision rounds them). The float32 shard stays the master."""

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module: nn.Module, mp_policy):
        data = self._hp.detach().to(torch.bfloat16)
        _SENT["bf16_embeddings"] += data.numel() * 2
        return (data,), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (data,) = all_gather_outputs
        if out is not None:  # FSDP reuses the unsharded parameter, whose payload is `data` itself
            return
        return GatheredWeight(data, torch.ones((), device=data.device), None, param_dtype), (data,)


class FP8AllGatherWeight(_AllGatherWrapper):
    """A high-precision weight (shard) that FSDP2 all-gathers as E4M3 bytes; see the module docstring."""

    _counter = "fp8_linears"  # its key in `all_gather_bytes`
    _count_elements = True  # saturated and flushed elements, for the layer's weight scaling state

    # -- FSDP2 all-gather extension ----------------------------------------------------------------

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module: nn.Module, mp_policy):
        """Quantise this shard with the scale of the whole weight; send its E4M3 bytes. The shard's
        saturated and flushed elements are counted (the layer adds them to its weight state's counters)."""
        amax = all_reduce_max_(tensor_amax(self._hp), mesh.get_group())
        scale = self._scale(amax, module)
        shard = self._hp.detach()
        keep = torch.ones((), dtype=torch.bool, device=shard.device)
        count = self._count_elements
        q, over, under = quantize_and_count(shard, scale, keep, E4M3.max, min_subnormal(E4M3) / 2, E4M3.dtype, count)
        counts = torch.stack([over, under, torch.tensor(shard.numel() if count else 0, device=shard.device)])
        _SENT[self._counter] += q.numel()
        return (q.view(torch.uint8),), (scale, amax, counts)

    def _scale(self, amax: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """The scale the FP8 layer's weight `ScalingState` gives now (delayed or current)."""
        state: ScalingState = module.states.weight
        return state.next_scale(amax)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (data,) = all_gather_outputs
        scale, amax, counts = metadata
        q = data.view(torch.float8_e4m3fn)
        if out is not None:  # FSDP reuses the unsharded parameter: refresh its scale in place
            out._scale_inv.copy_(1.0 / scale)
            out._amax.copy_(amax)
            out._counts.copy_(counts)
            return
        return GatheredWeight(q, 1.0 / scale, amax, param_dtype, counts), (data,)


class E4M3AllGatherWeight(FP8AllGatherWeight):
    """A float32 embedding or LM head shard that FSDP2 all-gathers as E4M3 bytes (1 byte per element
    instead of 4) with one current power-of-two scale for the whole weight (its amax now; these
    weights have no FP8 layer, so no delayed scaling state). The model computes in float32 from the
    dequantised values; the float32 shard stays the master and its gradient stays float32."""

    _counter = "e4m3_embeddings"
    _count_elements = False  # no scaling state to add them to

    def _scale(self, amax: torch.Tensor, module: nn.Module) -> torch.Tensor:
        return compute_scale(amax, E4M3, check_finite=False)  # a non-finite weight shows as NaN, not hidden


class GatheredWeight(torch.Tensor):
    """An all-gathered weight in its narrow form: E4M3 bytes `_q` with a 0-dim dequant scale
    `_scale_inv`, the whole weight's `_amax` and this process's shard's (saturated, flushed, elements)
    `_counts`, or bf16 values (scale 1, no amax or counts). It presents itself as a `dtype` tensor:
    views stay narrow, any other op sees the dequantised (upcast) values."""

    @staticmethod
    def __new__(cls, q: torch.Tensor, scale_inv: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype,
                counts: torch.Tensor | None = None):
        return torch.Tensor._make_wrapper_subclass(cls, q.size(), strides=q.stride(), storage_offset=q.storage_offset(),
                                                   dtype=dtype, device=q.device, requires_grad=False)

    def __init__(self, q, scale_inv, amax, dtype, counts=None):
        self._q, self._scale_inv, self._amax, self._counts = q, scale_inv, amax, counts

    def __repr__(self) -> str:
        return f"GatheredWeight({self._q.dtype}, shape={tuple(self.shape)}, scale_inv={float(self._scale_inv):g})"

    def __tensor_flatten__(self):
        optional = [name for name in ("_amax", "_counts") if getattr(self, name) is not None]
        return ["_q", "_scale_inv", *optional], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner, dtype, outer_size, outer_stride):
        return GatheredWeight(inner["_q"], inner["_scale_inv"], inner.get("_amax"), dtype, inner.get("_counts"))

    def dequantize(self) -> torch.Tensor:
        if self._q.element_size() != 1:  # bf16 values
            return self._q.to(self.dtype)
        return (fp8_to_float32(self._q) * self._scale_inv).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in VIEW_OPS and isinstance(args[0], GatheredWeight):
            w = args[0]
            return GatheredWeight(func(w._q, *args[1:], **kwargs), w._scale_inv, w._amax, w.dtype, w._counts)
        args, kwargs = tree_map_only(GatheredWeight, lambda t: t.dequantize(), (args, kwargs))
        return func(*args, **kwargs)


def gathered_weight_operand(weight: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """``(E4M3 bytes, dequant scale, amax, shard counts)`` of an all-gathered FP8 weight, or None for
    any other tensor."""
    if isinstance(weight, GatheredWeight) and weight._amax is not None:
        return weight._q, weight._scale_inv, weight._amax, weight._counts
    return None


EMBEDDING_GATHERS: dict[str, type[_AllGatherWrapper]] = {"bf16": BF16AllGatherWeight, "e4m3": E4M3AllGatherWeight}


def gather_embeddings_in(model: nn.Module, dtype: str) -> list[str]:
    """Wrap the token embedding and the LM head of `model` (float32; tied or not) so that FSDP2
    all-gathers them as `dtype` (``bf16`` or ``e4m3``: `EMBEDDING_GATHERS`), in place and before
    `fully_shard`, keeping ties; returns the wrapped parameter names. With the decoder's linears in
    E4M3, these weights would otherwise be most of the bytes O3 gathers."""
    try:
        wrapper = EMBEDDING_GATHERS[dtype]
    except KeyError:
        raise ValueError(f"embeddings are all-gathered as one of {sorted(EMBEDDING_GATHERS)}, not {dtype!r}") from None
    wanted = [m.weight for name, m in model.named_modules()
              if isinstance(m, nn.Embedding) or (name.split(".")[-1] == "lm_head" and isinstance(m, nn.Linear))]
    new = {id(p): nn.Parameter(wrapper(p.data), requires_grad=p.requires_grad)
           for p in wanted if p.dtype == torch.float32 and not isinstance(p.data, _AllGatherWrapper)}
    names = []
    for module_name, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) in new:
                setattr(module, name, new[id(p)])
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The plain local tensor behind a (possibly sharded, possibly wrapped) parameter or gradient."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t._hp if isinstance(t, _AllGatherWrapper) else t


class _NarrowReduceScatter:
    """What the narrow reduce-scatters share: FSDP2's ``ReduceScatter`` interface (``allocate``, then the
    call) and the ops a sum of rounded gradients serves (SUM and AVG; a divide factor is refused)."""

    label = ""
    option = ""  # the precision setting that installs it, for the error

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _check_op(self, op) -> None:
        if op not in (dist.ReduceOp.AVG, dist.ReduceOp.SUM):
            raise ValueError(f"the {self.label} reduce-scatter sums or averages gradients; FSDP2 asked for {op} "
                             f"(a gradient divide factor is not supported with {self.option})")


class FP8ReduceScatter(_NarrowReduceScatter):
    """FSDP2's gradient reduce-scatter with E4M3 bytes on the wire (the ``ReduceScatter`` interface
    of ``FSDPModule.set_custom_reduce_scatter``: ``allocate`` and the call); see the module docstring.

    The input is FSDP2's flat float32 buffer of W equal shards, the output this rank's shard: the
    sum (``SUM``) or mean (``AVG``, FSDP2's choice for float32) of the W ranks' shards, each rounded
    to E4M3 with its block's shared scale. A non-finite gradient comes out NaN (its whole block: the
    amax all-reduce carries it to every rank as +inf): nothing is hidden, and the optimizer's
    finiteness check skips the step on every process."""

    block = 128
    label, option = "FP8", "precision.fp8_reduce_scatter e4m3"

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        self._check_op(op)
        world = dist.get_world_size(group)
        blocks = input_tensor.view(world, -1)  # (W, S): row r goes to rank r
        shard = blocks.size(1)
        padded = -(-shard // self.block) * self.block
        blocks = torch.nn.functional.pad(blocks, (0, padded - shard)).view(world, -1, self.block)  # (W, nb, 128)
        amax = all_reduce_max_(blocks.abs().amax(-1), group)  # (W, nb)
        scales = shared_scales(amax, world).unsqueeze(-1)  # (W, nb, 1): W * amax * scale <= 448
        q = cast_to_fp8(blocks * scales, E4M3).view(-1)  # (W * nb * 128,) E4M3
        _REDUCED["e4m3_gradients"] += q.numel()
        _REDUCED["block_amax"] += amax.numel() * 4
        mine = fp8_sum_to_shards(q, world, group).view(-1, self.block) / scales[dist.get_rank(group)]  # (nb, 128)
        if op == dist.ReduceOp.AVG:
            mine = mine / world
        output_tensor.copy_(mine.view(-1)[:shard])
        return None


class BF16ReduceScatter(_NarrowReduceScatter):
    """FSDP2's gradient reduce-scatter with bf16 on the wire (the ``ReduceScatter`` interface of
    ``FSDPModule.set_custom_reduce_scatter``), for the root module under O3
    (``fp8_root_reduce_scatter bf16``): FSDP2's float32 buffer is cast to bf16, reduce-scattered
    (summed by the backend in bf16), and this rank's shard written back as float32 (divided by W for
    ``AVG``). 2 bytes per value instead of 4. Only the wire is bf16: FSDP2's own
    ``MixedPrecisionPolicy(reduce_dtype=bf16)`` would also accumulate the gradients of unsynchronised
    micro-batches (``grad_accum`` > 1) in bf16, one more rounding per micro-batch."""

    label, option = "bf16", "precision.fp8_root_reduce_scatter bf16"

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op, async_op: bool = False):
        self._check_op(op)
        summed = torch.empty(output_tensor.shape, dtype=torch.bfloat16, device=output_tensor.device)
        dist.reduce_scatter_single(summed, input_tensor.to(torch.bfloat16), op=dist.ReduceOp.SUM, group=group)
        mine = summed.float()
        if op == dist.ReduceOp.AVG:
            mine = mine / dist.get_world_size(group)
        output_tensor.copy_(mine)
        return None
