"""The dynamic batcher: one queue for all callers, batches formed by a token budget.

Every accepted job waits in one FIFO queue, bounded in pairs (a full queue answers
QueueFullError at once instead of growing). A single loop takes the queued work when the first
waiting job has waited `max_wait_ms` (or sooner, once a token budget's worth is waiting), drops
jobs whose caller has gone or whose deadline has passed, sorts the independent sequences by
length so similar lengths share a forward pass (less padding), cuts them into passes of at most
`max_batch_tokens` padded tokens and `max_batch_rows` rows, and runs them in one worker thread.
Shared-prompt jobs (ScoreCandidates) run as their own pass: prompt once, n responses on its cache.
Each caller gets back exactly its own scores, in its own order.

    >>> engine = BatchingEngine(runner, renderer, info, BatchConfig())   # doctest: +SKIP
    >>> await engine.start()                                             # doctest: +SKIP
    >>> result = await engine.submit(ScoreJob(groups=[...]))             # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import BatchConfig
from .base import (DeadlineExpiredError, Engine, EngineInfo, JobStats, NotServingError, QueueFullError, ScoreJob,
                   ScoreResult, StatsSinks)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Entry:
    job: ScoreJob
    future: asyncio.Future
    enqueued: float
    tokens: int
    scores: list[float] = field(default_factory=list)


def plan_batches(lengths: list[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices of sequences grouped into passes: sorted by length, each pass's rows × longest
    row within `max_tokens` (a single over-long row still gets its own pass).

    >>> plan_batches([5, 100, 6, 90], max_tokens=200, max_rows=8)
    [[0, 2], [3, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted ascending: the newest row is the longest
        if current and ((len(current) + 1) * longest > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _worth_sharing(prompt_len: int, response_lens: list[int]) -> bool:
    """Run a repeated prompt once only when that saves a real share of the work: a separate prompt
    pass costs a little, and saving a few tokens of a short prompt does not pay for it.

    >>> _worth_sharing(600, [64] * 16), _worth_sharing(10, [200, 200]), _worth_sharing(45, [20])
    (True, False, False)
    """
    n = len(response_lens)
    saved = (n - 1) * prompt_len
    return n > 1 and saved >= 32 and saved >= 0.25 * (n * prompt_len + sum(response_lens))


class BatchingEngine(Engine):
    """Engine over a ModelRunner with dynamic batching (see the module docstring)."""

    def __init__(self, runner, renderer, info: EngineInfo, config: BatchConfig, sinks: StatsSinks | None = None):
        self.runner = runner
        self._renderer = renderer
        self.info = info
        self.config = config
        self.sinks = sinks or StatsSinks()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._pending_pairs = 0
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grm-model")
        self._accepting = False

    def renderer(self):
        return self._renderer

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="grm-batcher")

    async def drain(self) -> None:
        self._accepting = False
        if self._idle is not None:
            await self._idle.wait()

    async def close(self) -> None:
        await self.drain()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def run_sync(self, fn, *args):
        """Run `fn` on the model thread (e.g. warm-up) and wait for it."""
        return self._executor.submit(fn, *args).result()

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
        entry = _Entry(job=job, future=asyncio.get_running_loop().create_future(), enqueued=time.monotonic(), tokens=tokens)
        self._queue.append(entry)
        self._pending_pairs += pairs
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
                results = await loop.run_in_executor(self._executor, self._compute, work)
            except Exception as exc:  # noqa: BLE001 - a failed pass fails its callers, not the server
                log.exception("model pass failed")
                for entry in work:
                    self._finish(entry, error=exc)
                continue
            compute_seconds = results
            for entry in work:
                self._finish(entry, compute_seconds=compute_seconds)

    async def _gather_company(self) -> None:
        """Wait until the oldest job has waited max_wait_ms, or a budget's worth is queued."""
        deadline = self._queue[0].enqueued + self.config.max_wait_ms / 1000.0
        while True:
            queued_tokens = sum(e.tokens for e in self._queue)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or queued_tokens >= self.config.max_batch_tokens:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Entry]:
        """Pop the queued jobs for one step (up to ~2 budgets of tokens), dropping dead ones."""
        now = time.monotonic()
        taken: list[_Entry] = []
        budget = 2 * self.config.max_batch_tokens
        tokens = 0
        while self._queue and (not taken or tokens + self._queue[0].tokens <= budget):
            entry = self._queue.popleft()
            self._pending_pairs -= entry.job.num_pairs
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

    def _compute(self, work: list[_Entry]) -> float:
        """On the model thread: run every pass of this step; fill each entry's scores."""
        start = time.perf_counter()
        by_prompt: dict[tuple[int, ...], list[tuple[list[int], _Entry, int]]] = {}
        for entry in work:
            job = entry.job
            if job.shared_prompt:
                for group in job.groups:
                    scores, stats = self.runner.score_shared(group.prompt_ids, group.response_ids)
                    entry.scores.extend(scores)
                    self._emit_batch(stats)
                continue
            slot = 0
            for group in job.groups:
                for resp in group.response_ids:
                    by_prompt.setdefault(tuple(group.prompt_ids), []).append((resp, entry, slot))
                    slot += 1
            entry.scores = [0.0] * slot
        # Pairs whose prompt appears more than once in this step share one prompt pass; the rest
        # are independent sequences, sorted by length into padded passes.
        shared = {p: rows for p, rows in by_prompt.items() if _worth_sharing(len(p), [len(r) for r, _, _ in rows])}
        single = [(list(p) + resp, entry, slot) for p, rows in by_prompt.items() if p not in shared
                  for resp, entry, slot in rows]
        for batch in plan_batches([len(r) for r, _, _ in single], self.config.max_batch_tokens,
                                  self.config.max_batch_rows):
            scores, stats = self.runner.score_rows([single[i][0] for i in batch])
            for i, score in zip(batch, scores):
                _, entry, slot = single[i]
                entry.scores[slot] = score
            self._emit_batch(stats)
        for prompts, rows in self._plan_shared(shared):
            scores, stats = self.runner.score_prefixed(prompts, [(pi, resp) for pi, resp, _, _ in rows], kind="pairs")
            for (_, _, entry, slot), score in zip(rows, scores):
                entry.scores[slot] = score
            self._emit_batch(stats)
        return time.perf_counter() - start

    def _plan_shared(self, shared: dict[tuple[int, ...], list]):
        """Pack prompt groups into passes within the token and row budgets (prompt pass + response pass)."""
        budget, max_rows = self.config.max_batch_tokens, self.config.max_batch_rows
        prompts: list[list[int]] = []
        rows: list[tuple[int, list[int], _Entry, int]] = []
        longest_prompt = longest_resp = 0
        for key in sorted(shared, key=len):
            group = shared[key]
            lp = max(longest_prompt, len(key))
            lr = max([longest_resp] + [len(r) for r, _, _ in group])
            cost = (len(prompts) + 1) * lp + (len(rows) + len(group)) * lr
            if prompts and (cost > budget or len(rows) + len(group) > max_rows):
                yield prompts, rows
                prompts, rows, lp, lr = [], [], len(key), max(len(r) for r, _, _ in group)
            prompts.append(list(key))
            rows.extend((len(prompts) - 1, resp, entry, slot) for resp, entry, slot in group)
            longest_prompt, longest_resp = lp, lr
        if prompts:
            yield prompts, rows

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
