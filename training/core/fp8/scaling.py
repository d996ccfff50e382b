"""FP8 training scaling: recipes, one scaling state per tensor role, and the pure functions behind them.

A **recipe** (`FP8TrainingRecipe`, by name through `get_training_recipe`) says how each tensor of a
linear layer is scaled before it is cast to FP8:

- ``delayed`` (FP8-LM, per tensor): the scale comes from the largest amax in a window of the last
  `history_len` steps, after `warmup_steps` steps of current scaling. The amax of the tensor being
  quantised is recorded *after* it is used, so the scale never waits on the tensor it scales.
- ``current`` (per tensor): the scale comes from this tensor's own amax (one extra reduction).
- ``block`` (DeepSeek-V3): current scaling per 1×128 tile of activations and gradients (a scale per
  row per 128 values along the contraction dim) and per 128×128 block of weights.

Roles and formats: ``input`` and ``weight`` are E4M3 (forward), ``grad_output`` is E5M2 (backward:
more range, less precision), ``weight_grad`` (the FP8 weight gradient of FP8-LM O1) is E4M3 with
its own current per-tensor scale. Every scale is a power of two (`compute_scale`), so FP8 → float
dequantisation is exact.

`ScalingState` holds one role's state: amax history, last good scale, counters of saturated
(overflow) and flushed-to-zero (underflow) elements and of non-finite steps. A non-finite amax (an
overflowed step) is never recorded and never yields a scale: the last good scale is kept, the step
is counted, and for backward roles (``zero_nonfinite``) the whole quantised tensor is zeroed, so no
inf/NaN reaches a gradient or a weight. Counters stay on the device (no host sync per call).
With torch.distributed initialised, per-tensor amaxes are all-reduced with MAX so every rank uses
the same scale (block scales are local by construction).

    >>> import torch
    >>> st = ScalingState("e4m3", mode="delayed", history_len=4, warmup_steps=1)
    >>> q, s_inv = st.quantize(torch.full((4, 4), 2.0))      # warm-up: current scaling
    >>> q.dtype, s_inv.item()
    (torch.float8_e4m3fn, 0.0078125)
    >>> q, s_inv = st.quantize(torch.full((4, 4), 0.5))      # delayed: history max is 2.0
    >>> s_inv.item()
    0.0078125
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, NamedTuple, get_args

import torch
import torch.distributed as dist

from .comm import all_reduce_max_
from .formats import E4M3, FP8Format, cast_to_fp8, compute_scale, get_format, num_blocks, saturate

TrainingRecipeName = Literal["delayed", "current", "block"]
RECIPE_NAMES: tuple[str, ...] = get_args(TrainingRecipeName)
ROLES = ("input", "weight", "grad_output", "weight_grad")
MODES = ("delayed", "current")


# ---------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True, kw_only=True)
class FP8TrainingRecipe:
    """How the tensors of an FP8 training linear are scaled (see the module docstring)."""

    name: str = "delayed"
    """`delayed`, `current` or `block`."""
    history_len: int = 16
    """Amax history window of delayed scaling (steps)."""
    warmup_steps: int = 1
    """Steps of current scaling before delayed scaling starts (the history fills meanwhile)."""
    margin: int = 0
    """Extra power-of-two headroom: the scale is divided by 2**margin."""
    forward_format: str = "e4m3"
    """Inputs and weights."""
    backward_format: str = "e5m2"
    """Output gradients flowing back."""
    weight_grad_format: str = "e4m3"
    """The FP8 weight gradient (FP8-LM O1), current per-tensor scaling."""
    tile: int = 128
    """`block`: activation / gradient tiles of 1×tile along the contraction dim."""
    weight_block: int = 128
    """`block`: weight blocks of weight_block×weight_block."""
    reduce_amax: bool = True
    """All-reduce per-tensor amaxes with MAX across ranks when torch.distributed is initialised."""
    count: bool = True
    """Keep overflow / underflow element counters (two cheap extra reductions per quantisation)."""

    def __post_init__(self) -> None:
        if self.name not in RECIPE_NAMES:
            raise ValueError(f"unknown FP8 training recipe {self.name!r}; expected one of {RECIPE_NAMES}")
        for f in (self.forward_format, self.backward_format, self.weight_grad_format):
            get_format(f)
        if self.history_len < 1 or self.warmup_steps < 1:
            raise ValueError(f"history_len and warmup_steps must be >= 1, got {self.history_len}, "
                             f"{self.warmup_steps} (delayed scaling starts from an amax history; without "
                             "a step of current scaling the first one would use scale 1)")
        if self.tile % 16 or self.weight_block % 16 or self.tile <= 0 or self.weight_block <= 0:
            raise ValueError(f"tile ({self.tile}) and weight_block ({self.weight_block}) must be positive "
                             "multiples of 16")

    @property
    def granularity(self) -> str:
        """``"tensor"`` (delayed, current) or ``"block"``."""
        return "block" if self.name == "block" else "tensor"

    @property
    def serving_layout(self) -> tuple[str, int | None]:
        """(granularity, block size) of `FP8InferenceLinear` that holds this recipe's trained weights:
        per-tensor scales → ``("tensor", None)``; 128×128 blocks → ``("block", 128)`` (block scales
        repeated on their rows)."""
        return ("block", self.weight_block) if self.granularity == "block" else ("tensor", None)


TRAINING_RECIPES: dict[str, Callable[[], FP8TrainingRecipe]] = {
    "delayed": lambda: FP8TrainingRecipe(name="delayed"),
    "current": lambda: FP8TrainingRecipe(name="current"),
    "block": lambda: FP8TrainingRecipe(name="block"),
}


def get_training_recipe(recipe: str | FP8TrainingRecipe | None = None, **overrides: Any) -> FP8TrainingRecipe:
    """A training recipe by name (None → ``"delayed"``) or unchanged, with field overrides.

        >>> get_training_recipe("block").weight_block
        128
        >>> get_training_recipe("delayed", history_len=4).history_len
        4
    """
    if not isinstance(recipe, FP8TrainingRecipe):
        name = recipe or "delayed"
        if name not in TRAINING_RECIPES:
            raise ValueError(f"unknown FP8 training recipe {name!r}; expected one of {sorted(TRAINING_RECIPES)}")
        recipe = TRAINING_RECIPES[name]()
    return replace(recipe, **overrides) if overrides else recipe


# ---------------------------------------------------------------------------------------------
# Pure functions


def min_subnormal(fmt: str | FP8Format) -> float:
    """Smallest positive value of the format (e4m3: 2**-9, e5m2: 2**-16)."""
    info = torch.finfo(get_format(fmt).dtype)
    return info.smallest_normal * info.eps


def tile_amax(x2d: torch.Tensor, tile: int) -> torch.Tensor:
    """(R, C) → (R, ceil(C / tile)): amax of each 1×tile tile along the last dim."""
    rows, cols = x2d.shape
    nb = num_blocks(cols, tile)
    padded = torch.nn.functional.pad(x2d.detach().abs().float(), (0, nb * tile - cols))  # (R, nb*tile)
    return padded.view(rows, nb, tile).amax(dim=-1)  # (R, nb)


def block_amax(w: torch.Tensor, block: int) -> torch.Tensor:
    """(R, C) → (ceil(R / block), ceil(C / block)): amax of each block×block block."""
    rows, cols = w.shape
    nr, nc = num_blocks(rows, block), num_blocks(cols, block)
    padded = torch.nn.functional.pad(w.detach().abs().float(), (0, nc * block - cols, 0, nr * block - rows))
    return padded.view(nr, block, nc, block).amax(dim=(1, 3))  # (nr, nc)


def expand_tiles(s: torch.Tensor, tile: int, cols: int) -> torch.Tensor:
    """(R, nb) per-tile values → (R, cols) per element."""
    rows, nb = s.shape
    return s.unsqueeze(-1).expand(rows, nb, tile).reshape(rows, nb * tile)[:, :cols]


def expand_blocks(s: torch.Tensor, block: int, rows: int, cols: int) -> torch.Tensor:
    """(nr, nc) per-block values → (rows, cols) per element."""
    nr, nc = s.shape
    full = s[:, None, :, None].expand(nr, block, nc, block).reshape(nr * block, nc * block)  # (nr*b, nc*b)
    return full[:rows, :cols]


def quantize_scaled(x: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """``fp8(clamp(x * scale))`` with `scale` broadcasting against `x`."""
    return cast_to_fp8(x.float() * scale, fmt)


def quantize_and_count(x: torch.Tensor, scale: torch.Tensor, keep: torch.Tensor, fmax: float, half_min: float,
                       dtype: torch.dtype, count: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: ``y = x * scale`` (zeroed where `keep` is False, a 0-dim bool), FP8 cast of
    saturate(y) (an inf or NaN element becomes NaN: it stays visible), and the counts of saturated
    (|y| > fmax) and flushed (0 < |y| <= half_min) elements.
    Pure tensor code, so `torch.compile` fuses it into one kernel (`ScalingState(fused=True)`)."""
    y = torch.where(keep, x.float() * scale, 0.0)
    q = saturate(y, fmax).to(dtype)
    if not count:
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        return q, zero, zero
    # Counted per row, then over the rows: compiled with dynamic shapes, one flat reduction of a large
    # tensor became a kernel running at 5 % of an H100's bandwidth; per row it runs in parallel.
    a = y.abs().reshape(-1, x.shape[-1]) if x.ndim > 1 and x.shape[-1] else y.abs().reshape(1, -1)
    return q, (a > fmax).sum(dim=1).sum(), ((a > 0) & (a <= half_min)).sum(dim=1).sum()


def delayed_scale_of(history: torch.Tensor, last_scale: torch.Tensor, fmt: FP8Format, margin: int) -> torch.Tensor:
    """Delayed scaling's scale: from the largest amax of the history, or `last_scale` while the history
    holds nothing (every step so far overflowed)."""
    hmax = history.max()
    return torch.where(hmax > 0, compute_scale(hmax, fmt, margin, check_finite=False), last_scale)


def current_scale_of(amax: torch.Tensor, last_scale: torch.Tensor, fmt: FP8Format, margin: int) -> torch.Tensor:
    """Current scaling's scale from this tensor's `amax`; a zero or non-finite amax keeps `last_scale`."""
    finite = torch.isfinite(amax)
    cur = compute_scale(torch.where(finite, amax, 0.0), fmt, margin, check_finite=False)
    cur = torch.where(amax > 0, cur, last_scale)  # an all-zero tensor keeps the last scale
    return torch.where(finite, cur, last_scale)


def record_amax(amax: torch.Tensor, scale: torch.Tensor | None, finite: torch.Tensor, history: torch.Tensor,
                last_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The history and last good scale after a step: a finite `amax` enters the history (most recent
    first); a finite, non-zero one makes `scale` the last good scale (None: per-tile / per-block steps
    keep it)."""
    rolled = torch.cat([amax.reshape(1).float(), history[:-1]])  # (history_len,)
    history = torch.where(finite, rolled, history)
    if scale is not None:
        last_scale = torch.where(finite & (amax > 0), scale, last_scale)
    return history, last_scale


def tensor_amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as a 0-dim float32 tensor (0 for an empty tensor; NaN if any element is), from one
    `aminmax` pass: on CPU that took 0.22 ms per 4M float32 elements where ``vector_norm(x, inf)``
    took 5.2 ms, which had made amaxes ~9 % of an eager fp8-o2 step.

        >>> tensor_amax(torch.tensor([1.0, -3.0, 2.0])).item(), tensor_amax(torch.tensor([1.0, float("nan")])).item()
        (3.0, nan)
    """
    if not x.numel():
        return torch.zeros((), dtype=torch.float32, device=x.device)
    lo, hi = torch.aminmax(x.detach())
    return torch.maximum(hi.float(), -lo.float())


def per_tensor_step(x: torch.Tensor, amax: torch.Tensor | None, history: torch.Tensor, last_scale: torch.Tensor,
                    counters: torch.Tensor, fmt: FP8Format, margin: int, *, delayed: bool, zero_nonfinite: bool,
                    count: bool) -> tuple[torch.Tensor, ...]:
    """One recorded per-tensor quantisation of `x` (amax `amax`, or None: computed here, so that a
    compiled step fuses it) as a pure function of the scaling state.

    Returns ``(q, scale_inv, history, last_scale, counters)``: the FP8 tensor, its dequant scale, and
    the state after the step. The scale is delayed (`delayed_scale_of`) or current (`current_scale_of`);
    counters add saturated and flushed elements (when `count`), the step if its amax is non-finite, and
    the elements (when `count`). `ScalingState(fused=True)` runs it through `torch.compile`: a couple of
    kernels in place of some sixty small ops, which is what a GPU step is made of at small widths.
    """
    amax = tensor_amax(x) if amax is None else amax
    finite = torch.isfinite(amax)
    scale = (delayed_scale_of(history, last_scale, fmt, margin) if delayed
             else current_scale_of(amax, last_scale, fmt, margin))
    keep = finite if zero_nonfinite else torch.ones((), dtype=torch.bool, device=x.device)
    q, over, under = quantize_and_count(x, scale, keep, fmt.max, min_subnormal(fmt) / 2, fmt.dtype, count)
    history, last_scale = record_amax(amax, scale, finite, history, last_scale)
    elements = torch.full((), x.numel() if count else 0, dtype=torch.int64, device=x.device)
    counters = counters + torch.stack([over, under, (~finite).to(torch.int64), elements])
    return q, 1.0 / scale, history, last_scale, counters


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    """`torch.compile(fn, dynamic=True)`, built once per function (the first call of each shape compiles:
    ~20 s on 2 cores). Tensor sizes stay symbolic; Python ints and floats among the arguments (formats'
    limits, block sizes, betas) are compiled in as constants: left symbolic, they cost 8x on CPU. What
    changes every step (learning rate, bias corrections) must therefore come in tensors. Casts are
    rounded as eager rounds them (inductor's ``emulate_precision_casts``): by default a fused kernel
    keeps ``x.to(float16).float()`` in float32, which made an FP16 master's copy in the parameter
    differ from the master itself."""
    import torch._dynamo.config as dynamo_config

    compiled_fn = torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})
    keys = [k for k in ("specialize_int", "specialize_float") if hasattr(dynamo_config, k)]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        saved = [getattr(dynamo_config, k) for k in keys]  # (config.patch builds a class per call: too slow here)
        for k in keys:
            setattr(dynamo_config, k, True)
        try:
            return compiled_fn(*args, **kwargs)
        finally:
            for k, value in zip(keys, saved):
                setattr(dynamo_config, k, value)

    return call


# ---------------------------------------------------------------------------------------------
# One role's scaling state


class ScalingState:
    """Scaling state of one tensor role: amax history, last good scale, counters.

    `mode` is ``"delayed"`` (history window after `warmup_steps` of current scaling) or
    ``"current"``. `quantize(x)` picks the scale, quantises, and records the step; `quantize_tiles` /
    `quantize_blocks` quantise with current per-tile / per-block scales instead (`block` recipe) and
    record the step too (amax max, counters). With ``record=False`` none of them changes the state.
    `zero_nonfinite=True` (backward roles) zeroes the whole quantised tensor of a step whose amax is
    inf/NaN.

        >>> import torch
        >>> st = ScalingState("e5m2", mode="current", zero_nonfinite=True)
        >>> q, s_inv = st.quantize(torch.tensor([1.0, float("inf")]))
        >>> q.float().tolist(), st.stats()["nonfinite_steps"]
        ([0.0, 0.0], 1)
    """

    def __init__(self, fmt: str | FP8Format = E4M3, *, mode: str = "delayed", history_len: int = 16,
                 warmup_steps: int = 1, margin: int = 0, zero_nonfinite: bool = False, reduce_amax: bool = True,
                 count: bool = True, fused: bool = False, group: Any = None,
                 device: torch.device | str | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown scaling mode {mode!r}; expected one of {MODES}")
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        if mode == "delayed" and warmup_steps < 1:
            raise ValueError(f"delayed scaling needs warmup_steps >= 1, got {warmup_steps}: its first step "
                             "would use scale 1 (no amax history yet), flushing small values to zero")
        self.fmt = get_format(fmt)
        self.mode, self.history_len, self.warmup_steps, self.margin = mode, history_len, warmup_steps, margin
        self.zero_nonfinite, self.reduce_amax, self.count, self.group = zero_nonfinite, reduce_amax, count, group
        self.fused = fused
        """Run each recorded per-tensor step (`per_tensor_step`) and the per-tile / per-block
        quantise-and-count passes through `torch.compile` (bit-identical to eager)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.amax_history = torch.zeros(history_len, dtype=torch.float32, device=device)
        """Most recent first; only finite amaxes enter."""
        self.last_scale = torch.ones((), dtype=torch.float32, device=device)
        """The scale of the last step with a finite amax (used when a step's amax is inf/NaN)."""
        self.steps = 0
        """Quantisations seen (one per forward / backward call of the layer)."""
        self._counters = torch.zeros(4, dtype=torch.int64, device=device)  # overflow, underflow, nonfinite, elements

    # -- scale choice ------------------------------------------------------------------------

    @property
    def in_warmup(self) -> bool:
        return self.mode == "current" or self.steps < self.warmup_steps

    def delayed_scale(self) -> torch.Tensor:
        """The scale delayed scaling gives now: from the history max, or the last good scale when the
        history holds nothing yet (every step so far overflowed)."""
        return delayed_scale_of(self.amax_history, self.last_scale, self.fmt, self.margin)

    def next_scale(self, amax: torch.Tensor | None = None) -> torch.Tensor:
        """The quantisation scale this state would use now for a tensor of amax `amax` (no update).
        In warm-up / current mode it needs `amax`; a non-finite amax gives the last good scale."""
        if not self.in_warmup:
            return self.delayed_scale()
        if amax is None:
            raise ValueError("current scaling needs the tensor's amax")
        return current_scale_of(amax, self.last_scale, self.fmt, self.margin)

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tensor amax of `x` (float32, 0-dim), all-reduced with MAX across ranks if enabled."""
        a = tensor_amax(x)
        return all_reduce_max_(a, self.group) if self.reduce_amax else a

    def amax_is_local(self) -> bool:
        """Whether this process's amax is the one to use (no MAX all-reduce across ranks to wait for)."""
        return not (self.reduce_amax and dist.is_available() and dist.is_initialized())

    # -- quantise + record ---------------------------------------------------------------------

    def quantize(self, x: torch.Tensor, amax: torch.Tensor | None = None, *,
                 record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise `x` with one scale; returns ``(q, scale_inv)`` (``scale_inv`` 0-dim float32).
        Records the step (amax into the history, counters). ``record=False`` (evaluation) leaves the
        state as it is: delayed scaling then uses the scale training reached (what an exported
        checkpoint stores as its static activation scale); current scaling still measures `x`."""
        if not record:
            if self.in_warmup:  # current scaling still measures x
                amax = self.amax(x) if amax is None else amax
                scale, finite = self.next_scale(amax), torch.isfinite(amax)
            else:
                scale, finite = self.delayed_scale(), torch.ones((), dtype=torch.bool, device=x.device)
            return self._quantize(x, scale, finite, count=False), 1.0 / scale
        state, constants = self.step_args(x, amax)
        step = compiled(per_tensor_step) if self.fused else per_tensor_step
        q, scale_inv, *after = step(x.detach(), *state, **constants)
        self.commit(*after)
        return q, scale_inv

    def step_args(self, x: torch.Tensor | Callable[[], torch.Tensor],
                  amax: torch.Tensor | None = None) -> tuple[tuple, dict[str, Any]]:
        """`per_tensor_step`'s arguments after the tensor `x`, for recording its step now: ``(amax,
        history, last_scale, counters)`` and the constants (format, margin, delayed or current,
        zero_nonfinite, count). The amax is `amax` if given; else, when it must be all-reduced across
        ranks, measured here (`x` may be a function giving the tensor, called only then); else None, and
        the step measures `x` itself (inside the compiled step). `commit` takes the state it returns."""
        if amax is None and not self.amax_is_local():
            amax = self.amax(x() if callable(x) else x)
        return ((amax, self.amax_history, self.last_scale, self._counters),
                dict(fmt=self.fmt, margin=self.margin, delayed=not self.in_warmup,
                     zero_nonfinite=self.zero_nonfinite, count=self.count))

    def commit(self, history: torch.Tensor, last_scale: torch.Tensor, counters: torch.Tensor) -> None:
        """Take the state after a recorded step (the last three outputs of `per_tensor_step`)."""
        self.amax_history, self.last_scale, self._counters = history, last_scale, counters
        self.steps += 1

    def quantize_tiles(self, x2d: torch.Tensor, tile: int, *,
                       record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, C) → e4m3/e5m2 (R, C) and dequant scales (R, ceil(C / tile)), current per 1×tile tile.
        Records the step and counts; ``record=False`` (evaluation, or a second layout of a tensor
        already recorded) gives the same bytes and leaves the state as it is."""
        amax = tile_amax(x2d, tile)  # (R, nb)
        scale = self.local_scales(amax)
        finite = torch.isfinite(amax).all()
        q = self._quantize(x2d, expand_tiles(scale, tile, x2d.shape[1]), finite, count=record)
        if record:
            self._record(amax.max() if amax.numel() else amax.new_zeros(()), None, finite)
        return q, 1.0 / scale

    def quantize_blocks(self, w: torch.Tensor, block: int, *,
                        record: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, C) → FP8 (R, C) and dequant scales (ceil(R / block), ceil(C / block)), current per block.
        ``record=False``: the same bytes, the state left as it is (as `quantize_tiles`)."""
        amax = block_amax(w, block)  # (nr, nc)
        scale = self.local_scales(amax)
        finite = torch.isfinite(amax).all()
        q = self._quantize(w, expand_blocks(scale, block, *w.shape), finite, count=record)
        if record:
            self._record(amax.max(), None, finite)
        return q, 1.0 / scale

    def record_quantized(self, amax: torch.Tensor, scale_inv: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Record a step whose quantisation happened elsewhere with this state's scale: FSDP2's FP8
        all-gather (fsdp.py) quantises each shard and hands the layer the bytes, `scale_inv`, amax and
        the (saturated, flushed, elements) `counts` of this process's shard, which the counters add."""
        self._record(amax, 1.0 / scale_inv, torch.isfinite(amax))
        if counts is not None and self.count:
            self._counters += torch.stack([counts[0], counts[1], torch.zeros_like(counts[0]), counts[2]])

    def local_scales(self, amax: torch.Tensor) -> torch.Tensor:
        """Per-tile / per-block current scales; non-finite or zero amaxes get scale 1."""
        ok = torch.isfinite(amax) & (amax > 0)
        return torch.where(ok, compute_scale(torch.where(ok, amax, 1.0), self.fmt, self.margin, check_finite=False),
                           torch.ones_like(amax))

    def _quantize(self, x: torch.Tensor, scale: torch.Tensor, finite: torch.Tensor, count: bool = True) -> torch.Tensor:
        """Quantise with `scale` and add to the counters (unless `count` is False). Backward roles zero a
        step whose amax is non-finite whole (nothing non-finite flows on)."""
        count = self.count and count
        keep = finite if self.zero_nonfinite else torch.ones((), dtype=torch.bool, device=x.device)
        if self.fused:  # contiguous inputs: one compiled variant per format and scale kind, not per stride
            fn, x, scale = compiled(quantize_and_count), x.detach().contiguous(), scale.contiguous()
        else:
            fn = quantize_and_count
        q, over, under = fn(x, scale, keep, self.fmt.max, min_subnormal(self.fmt) / 2, self.fmt.dtype, count)
        if count:
            self._counters += torch.stack([over, under, torch.zeros_like(over),
                                           torch.tensor(x.numel(), device=x.device)])
        return q

    def _record(self, amax: torch.Tensor, scale: torch.Tensor | None, finite: torch.Tensor) -> None:
        self.amax_history, self.last_scale = record_amax(amax, scale, finite, self.amax_history, self.last_scale)
        self.steps += 1
        self._counters[2] += (~finite).to(torch.int64)

    # -- reporting and checkpoints --------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters (one host sync): saturated (overflow) and flushed-to-zero (underflow) elements,
        steps with a non-finite amax, elements quantised, steps."""
        over, under, nonfinite, elements = (int(v) for v in self._counters.tolist())
        return {"overflow": over, "underflow": under, "nonfinite_steps": nonfinite, "elements": elements,
                "steps": self.steps}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to produce bit-identical scales."""
        return {"fmt": self.fmt.name, "mode": self.mode, "history_len": self.history_len,
                "amax_history": self.amax_history.clone(), "last_scale": self.last_scale.clone(),
                "steps": self.steps, "counters": self._counters.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fmt"] != self.fmt.name or state["mode"] != self.mode or state["history_len"] != self.history_len:
            raise ValueError(f"scaling state for {state['fmt']}/{state['mode']}/history {state['history_len']} does "
                             f"not match this state ({self.fmt.name}/{self.mode}/history {self.history_len})")
        device = self.amax_history.device
        self.amax_history = state["amax_history"].to(device=device, dtype=torch.float32).clone()
        self.last_scale = state["last_scale"].to(device=device, dtype=torch.float32).clone()
        self.steps = int(state["steps"])
        self._counters = state["counters"].to(device=device, dtype=torch.int64).clone()

    def to(self, device: torch.device | str) -> "ScalingState":
        """Move the state's tensors to `device` (in place; returns self). State on the meta device (a
        skeleton built without memory) comes out zeroed: load a state dict into it."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(t, device=device) if t.is_meta else t.to(device)

        self.amax_history, self.last_scale, self._counters = map(move, (self.amax_history, self.last_scale,
                                                                        self._counters))
        return self

    def __repr__(self) -> str:
        return f"ScalingState({self.fmt.name}, mode={self.mode}, history_len={self.history_len}, steps={self.steps})"


class RoleStates(NamedTuple):
    """The four scaling states of one FP8 training linear."""

    input: ScalingState
    weight: ScalingState
    grad_output: ScalingState
    weight_grad: ScalingState


def build_role_states(recipe: FP8TrainingRecipe, device: torch.device | str | None = None,
                      group: Any = None, fused: bool = False) -> RoleStates:
    """One `ScalingState` per role for `recipe`: E4M3 input/weight, E5M2 grad_output (both zeroed on a
    non-finite step when flowing back), E4M3 weight_grad with current scaling.

        >>> states = build_role_states(get_training_recipe("delayed"))
        >>> [s.fmt.name for s in states], states.weight_grad.mode
        (['e4m3', 'e4m3', 'e5m2', 'e4m3'], 'current')
    """
    mode = "current" if recipe.name == "current" else "delayed"
    common = dict(history_len=recipe.history_len, warmup_steps=recipe.warmup_steps, margin=recipe.margin,
                  reduce_amax=recipe.reduce_amax, count=recipe.count, fused=fused, group=group, device=device)
    return RoleStates(
        input=ScalingState(recipe.forward_format, mode=mode, **common),
        weight=ScalingState(recipe.forward_format, mode=mode, **common),
        grad_output=ScalingState(recipe.backward_format, mode=mode, zero_nonfinite=True, **common),
        weight_grad=ScalingState(recipe.weight_grad_format, mode="current", zero_nonfinite=True, **common),
    )

