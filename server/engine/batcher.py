"""The dynamic batcher: one queue for all callers, batches formed by a token budget.

Every accepted job waits in one FIFO queue, bounded in pairs (a full queue answers
QueueFullError at once instead of growing). A single loop takes the queued work once no job has
arrived for `max_wait_ms` (at most `max_delay_ms` of waiting; at once when a token budget's worth
is waiting), drops jobs whose caller has gone or whose deadline has passed, and hands every
(prompt, response) pair of the step to the runner in one worker thread. The runner computes each
token prefix's KV state at most once (from its prefix cache, shared by all callers and kept across
steps, see prefix_cache.py), and packs what is left to compute into passes without padding
(packed.py), sorted by length, of at most `max_batch_tokens` tokens and `max_batch_rows` rows.
ScoreCandidates (one prompt, n responses) is the same case: its prompt runs once. Each caller
gets back exactly its own scores, in its own order.

    >>> engine = BatchingEngine(runner, renderer, info, BatchConfig())   # doctest: +SKIP
    >>> await engine.start()                                             # doctest: +SKIP
    >>> result = await engine.submit(ScoreJob(groups=[...]))             # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from grmserve.training.core.prompts import PromptRenderer

from ..config import BatchConfig
from .base import (
    DeadlineExpiredError,
    DrainReport,
    Engine,
    EngineInfo,
    JobStats,
    NotServingError,
    QueueFullError,
    Runner,
    ScoreJob,
    ScoreResult,
    StatsSinks,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    job: ScoreJob
    future: asyncio.Future
    enqueued: float
    tokens: int
    scores: list[float] = field(default_factory=list)


class BatchingEngine(Engine):
    """Engine over a ModelRunner with dynamic batching (see the module docstring)."""

    def __init__(self, runner: Runner, renderer: PromptRenderer, info: EngineInfo, config: BatchConfig,
                 sinks: StatsSinks | None = None):
        self.runner = runner
        self._renderer = renderer
        self.info = info
        self.config = config
        self.sinks = sinks or StatsSinks()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._pending_pairs = 0
        self._last_arrival = 0.0
        self._arrivals = 0  # jobs ever submitted
        self._step_end = (float("-inf"), 0, 0)  # when the last step ended, jobs it answered, arrivals by then
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grm-model")
        self._accepting = False
        self._queued_tokens = 0
        self._throughput: float | None = None  # tokens per second of recent steps (EMA), once measured
        self._answered = 0  # jobs answered with scores, ever

    def renderer(self) -> PromptRenderer:
        return self._renderer

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="grm-batcher")

    async def drain(self) -> DrainReport:
        self._accepting = False
        answered_before, handed_back = self._answered, 0
        while self._queue:  # not started: hand back at once, so the caller retries elsewhere now
            entry = self._queue.popleft()
            self._dequeued(entry)
            if entry.future.done():  # the caller went away: counted as in `_take`
                self._record(entry, "cancelled", 0.0)
                continue
            entry.future.set_exception(NotServingError(
                "the reward server is draining; this call was handed back before compute: retry on another replica"))
            handed_back += 1
            self._record(entry, "handed_back", 0.0)
        self._emit_depth()
        if self._idle is not None:
            await self._idle.wait()  # the step in progress (bounded by max_step_seconds)
        report = DrainReport(answered=self._answered - answered_before, handed_back=handed_back)
        log.info("drain: %d calls answered, %d handed back", report.answered, report.handed_back)
        return report

    async def close(self) -> None:
        if self._accepting or self._queue:
            await self.drain()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def warmup(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warmup)

    def run_sync(self, fn, *args):
        """Run `fn` on the model thread and wait for it (benchmarks reset the cache this way)."""
        return self._executor.submit(fn, *args).result()

    def _warmup(self) -> None:
        """On the model thread: one padded pass, both waves of `score_pairs` (a fresh prompt, then a
        response on its state); then forget what the cache learnt."""
        pad = self.runner.pad_id
        self.runner.score_rows([[pad] * 8, [pad] * 4])
        self.runner.score_pairs([((pad,) * 8, [pad] * 4), ((pad,) * 8, [pad] * 2)],
                                max_tokens=self.config.max_batch_tokens, max_rows=self.config.max_batch_rows)
        self.runner.cache.clear()

    # -- submission -----------------------------------------------------------------------------
    async def submit(self, job: ScoreJob) -> ScoreResult:
        if not self._accepting:
            raise NotServingError("the reward server is draining or not started; retry on another replica")
        pairs = job.num_pairs
        if self._pending_pairs + pairs > self.config.max_queue_pairs:
            raise QueueFullError(f"the queue holds {self._pending_pairs} pairs (limit {self.config.max_queue_pairs}); "
                                 "retry with backoff")
        tokens = sum(sum(g.sequence_lengths()) if not job.shared_prompt else
                     len(g.prompt_ids) + sum(len(r) for r in g.response_ids) for g in job.groups)
        queued = queue_seconds(self._queued_tokens + tokens, self._throughput)
        if self._queued_tokens and queued > self.config.max_queue_seconds > 0:
            raise QueueFullError(f"the queue holds about {queued:.1f} s of work at the measured "
                                 f"{self._throughput:.0f} tokens/s (limit --batch.max_queue_seconds "
                                 f"{self.config.max_queue_seconds:g}); retry with backoff or on another replica")
        entry = _Entry(job=job, future=asyncio.get_running_loop().create_future(), enqueued=time.monotonic(),
                       tokens=tokens)
        self._queue.append(entry)
        self._last_arrival = entry.enqueued
        self._arrivals += 1
        self._pending_pairs += pairs
        self._queued_tokens += tokens
        self._idle.clear()
        self._emit_depth()
        self._wake.set()
        return await entry.future  # cancelled with the caller's RPC; the loop then skips it

    def _emit_depth(self) -> None:
        for sink in self.sinks.on_queue_depth:
            sink(self._pending_pairs)

    # -- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._gather_company()
            work = self._take()
            if not work:
                continue
            try:
                compute_seconds = await loop.run_in_executor(self._executor, self._compute, work)
            except Exception as exc:  # noqa: BLE001 - a failed pass fails its callers, not the server
                log.exception("model pass failed")
                for entry in work:
                    self._finish(entry, error=exc)
                continue
            self._measure(work, compute_seconds)
            for entry in work:
                self._finish(entry, compute_seconds=compute_seconds)
            self._step_end = (time.monotonic(), len(work), self._arrivals)

    async def _gather_company(self) -> None:
        """Wait for company before a step, at most `max_delay_ms` from when the model became free;
        at once when a token budget's worth is queued.

        Callers answered by the step that just ended usually send their next request within
        milliseconds (RLHF workers, closed-loop clients). Without waiting for them, the few jobs
        that arrived during the step would run alone while those callers are still sending, and
        steps would settle into alternating a few rows and the rest. So, within `max_delay_ms` of
        the last step's end: wait for the first of its callers to come back, then go when all of
        them are back or after `max_wait_ms` without an arrival. After idling, nobody is
        expected: go after `max_wait_ms` without an arrival.
        """
        start = time.monotonic()
        delay, gap = self.config.max_delay_ms / 1000.0, self.config.max_wait_ms / 1000.0
        ended, answered, base = self._step_end
        if start - ended <= delay:  # a step ended just now: its callers may be on their way back
            expected, cap = answered, ended + delay
        else:
            expected, base, cap = 0, self._arrivals, start + delay
        while True:
            now = time.monotonic()
            arrived = self._arrivals - base
            if (sum(e.tokens for e in self._queue) >= self.config.max_batch_tokens or now >= cap
                    or (expected and arrived >= expected)):
                return
            # Nobody back yet from the last step: wait (up to the cap). Otherwise: until quiet.
            deadline = cap if expected and not arrived else min(cap, max(self._last_arrival, start) + gap)
            if now >= deadline:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=deadline - now)
            except asyncio.TimeoutError:
                pass

    def _take(self) -> list[_Entry]:
        """Pop the queued jobs for one step (up to ~2 budgets of tokens), dropping dead ones."""
        now = time.monotonic()
        taken: list[_Entry] = []
        budget = step_token_budget(self.config.max_batch_tokens, self._throughput, self.config.max_step_seconds)
        tokens = 0
        while self._queue and (not taken or tokens + self._queue[0].tokens <= budget):
            entry = self._queue.popleft()
            self._dequeued(entry)
            if entry.future.done():  # the caller cancelled (went away)
                self._record(entry, "cancelled", 0.0)
                continue
            if entry.job.deadline is not None and now >= entry.job.deadline:
                entry.future.set_exception(DeadlineExpiredError(
                    f"deadline passed after {now - entry.enqueued:.3f} s in the queue; nothing was computed"))
                self._record(entry, "expired", 0.0)
                continue
            taken.append(entry)
            tokens += entry.tokens
        self._emit_depth()
        return taken

    def _dequeued(self, entry: _Entry) -> None:
        self._pending_pairs -= entry.job.num_pairs
        self._queued_tokens -= entry.tokens

    def _measure(self, work: list[_Entry], compute_seconds: float) -> None:
        """Update the throughput estimate (queued tokens per second of compute) from one step."""
        tokens = sum(e.tokens for e in work)
        if compute_seconds > 0 and tokens:
            rate = tokens / compute_seconds
            self._throughput = rate if self._throughput is None else 0.7 * self._throughput + 0.3 * rate

    def _compute(self, work: list[_Entry]) -> float:
        """On the model thread: score every pair of this step in one call (the runner plans the
        passes and reuses prefix states); fill each entry's scores in its own order."""
        start = time.perf_counter()
        pairs: list[tuple[tuple[int, ...], list[int]]] = []
        owners: list[tuple[_Entry, int]] = []
        for entry in work:
            slot = 0
            for group in entry.job.groups:
                prompt = tuple(group.prompt_ids)
                for resp in group.response_ids:
                    pairs.append((prompt, resp))
                    owners.append((entry, slot))
                    slot += 1
            entry.scores = [0.0] * slot
        before = dataclasses.replace(self.runner.cache.stats)
        scores, stats = self.runner.score_pairs(pairs, max_tokens=self.config.max_batch_tokens,
                                                max_rows=self.config.max_batch_rows)
        for (entry, slot), score in zip(owners, scores):
            entry.scores[slot] = score
        for s in stats:
            self._emit_batch(s)
        cache = self.runner.cache
        delta = cache.stats.since(before)
        for sink in self.sinks.on_prefix:
            sink(delta, cache.nbytes, len(cache))
        return time.perf_counter() - start

    def _emit_batch(self, stats) -> None:
        for sink in self.sinks.on_batch:
            sink(stats)

    def _finish(self, entry: _Entry, *, compute_seconds: float = 0.0, error: Exception | None = None) -> None:
        if entry.future.done():
            self._record(entry, "cancelled", compute_seconds)
            return
        if error is not None:
            entry.future.set_exception(error)
            self._record(entry, "error", compute_seconds)
            return
        job = entry.job
        lengths = [n for g in job.groups for n in g.sequence_lengths()]
        truncated = [t for g in job.groups for t in g.truncated]
        queue_seconds = max(0.0, time.monotonic() - entry.enqueued - compute_seconds)
        self._answered += 1
        entry.future.set_result(ScoreResult(scores=entry.scores, sequence_tokens=lengths, truncated=truncated,
                                            computed_tokens=entry.tokens, queue_seconds=queue_seconds,
                                            compute_seconds=compute_seconds))
        self._record(entry, "ok", compute_seconds)

    def _record(self, entry: _Entry, outcome: str, compute_seconds: float) -> None:
        stats = JobStats(pairs=entry.job.num_pairs, tokens=entry.tokens,
                         queue_seconds=max(0.0, time.monotonic() - entry.enqueued - compute_seconds),
                         compute_seconds=compute_seconds, outcome=outcome)
        for sink in self.sinks.on_job:
            sink(stats)


def step_token_budget(max_batch_tokens: int, throughput: float | None, max_step_seconds: float) -> int:
    """Queued tokens one step may take: two passes' token budget, and no more than the measured
    throughput computes in `max_step_seconds` (a step always takes at least one job).

    >>> step_token_budget(16384, None, 5.0), step_token_budget(16384, 1000.0, 5.0), step_token_budget(16384, 1e6, 5.0)
    (32768, 5000, 32768)
    """
    budget = 2 * max_batch_tokens
    if throughput and max_step_seconds > 0:
        budget = min(budget, max(1, int(throughput * max_step_seconds)))
    return budget


def queue_seconds(tokens: int, throughput: float | None) -> float:
    """Seconds of compute `tokens` queued tokens take at `throughput` tokens/s (0 until measured).

    >>> queue_seconds(5000, 1000.0), queue_seconds(5000, None)
    (5.0, 0.0)
    """
    return tokens / throughput if throughput else 0.0
