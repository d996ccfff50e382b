"""The scoring engine interface, its domain errors and the plain stats objects it emits.

`Engine` lists everything the app (app.py) and the RPC layer (rpc/) use; tests swap engines through
it. `Runner` lists what the batcher uses of the model runner. The RPC layer only converts protos
to `ScoreJob`s and awaits `Engine.submit`; the engine never sees a proto. Errors raised here are
turned into gRPC status codes in exactly one interceptor (server/rpc/interceptors.py).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

from grmserve.training.core.prompts import EncodedGroup, PromptRenderer

if TYPE_CHECKING:
    from .prefix_cache import PrefixCache, PrefixStats


class EngineError(Exception):
    """Base class of the engine's domain errors."""


class QueueFullError(EngineError):
    """The bounded queue has no room (→ RESOURCE_EXHAUSTED)."""


class DeadlineExpiredError(EngineError):
    """The caller's deadline passed before its work was computed (→ DEADLINE_EXCEEDED)."""


class NotServingError(EngineError):
    """The engine is not loaded yet, or is draining (→ UNAVAILABLE)."""


@dataclass
class ScoreJob:
    """One call's work: groups of (prompt, responses). `shared_prompt` runs each group's prompt
    once and reuses its KV cache for every response; otherwise every pair is its own sequence."""

    groups: list[EncodedGroup]
    shared_prompt: bool = False
    deadline: float | None = None  # time.monotonic() seconds
    request_id: str = ""

    @property
    def num_pairs(self) -> int:
        return sum(len(g.response_ids) for g in self.groups)


@dataclass
class ScoreResult:
    scores: list[float]
    sequence_tokens: list[int]
    truncated: list[bool]
    computed_tokens: int
    queue_seconds: float
    compute_seconds: float


@dataclass
class BatchStats:
    """Emitted once per forward pass."""

    rows: int
    tokens: int  # real tokens computed
    padded_tokens: int  # tokens through the linear layers: rows × longest row when padded, = tokens when packed
    compute_seconds: float
    # "pairs" (every row from scratch or the template head) or "cached_prompt" (rows continue a cached prefix)
    kind: str


@dataclass
class JobStats:
    """Emitted once per finished (or dropped) job."""

    pairs: int
    tokens: int
    queue_seconds: float
    compute_seconds: float
    outcome: str  # "ok", "expired", "cancelled", "error", "handed_back"


@dataclass
class DrainReport:
    """What a drain did with the accepted work."""

    answered: int
    """Jobs answered with their scores after the drain began (the step in progress)."""
    handed_back: int
    """Queued jobs that had not started, answered at once with NotServingError (UNAVAILABLE: retry elsewhere)."""


@dataclass
class EngineInfo:
    model_name: str
    model_version: str
    precision: str
    max_tokens: int
    head_type: str
    checkpoint_format: str
    chat_template: bool
    device: str


@dataclass
class StatsSinks:
    on_batch: list[Callable[[BatchStats], None]] = field(default_factory=list)
    on_job: list[Callable[[JobStats], None]] = field(default_factory=list)
    on_queue_depth: list[Callable[[int], None]] = field(default_factory=list)
    # (hits, misses, evictions and reused tokens of one step; cache bytes; cache entries)
    on_prefix: list[Callable[[PrefixStats, int, int], None]] = field(default_factory=list)


class Engine(abc.ABC):
    """Everything the app and the RPC layer use of a scoring engine."""

    info: EngineInfo
    """What is served (model, precision, limits), for Info and the model_info metric."""
    sinks: StatsSinks
    """Where the engine's stats go (the metrics module subscribes)."""

    @abc.abstractmethod
    def renderer(self) -> PromptRenderer:
        """The PromptRenderer that turns prompts and responses into token ids for this model."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start background work (the batcher)."""

    @abc.abstractmethod
    async def warmup(self) -> None:
        """Run a small batch through the model (first-call costs) and forget it; before SERVING."""

    @abc.abstractmethod
    async def submit(self, job: ScoreJob) -> ScoreResult:
        """Queue `job`, wait for its scores. Raises QueueFullError, DeadlineExpiredError, NotServingError."""

    @abc.abstractmethod
    async def drain(self) -> DrainReport:
        """Refuse new jobs, hand queued jobs that have not started back at once (NotServingError),
        and return once the step in progress has finished."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Drain, then stop background work and release the model thread."""


class Runner(Protocol):
    """What the batcher uses of the model runner (runner.py's `ModelRunner`); called on one thread."""

    pad_id: int
    cache: PrefixCache

    def score_pairs(self, pairs: list[tuple[Sequence[int], Sequence[int]]], *, max_tokens: int,
                    max_rows: int) -> tuple[list[float], list[BatchStats]]:
        """Scores of (prompt ids, response ids) pairs, in order, and one stats object per pass."""

    def score_rows(self, rows: list[list[int]]) -> tuple[list[float], BatchStats]:
        """Scores of independent token rows in one right-padded pass (the reference path)."""
