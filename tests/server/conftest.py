"""A real reward server on a loopback port, run in a background thread with its own event loop."""

from __future__ import annotations

import threading
import time

import pytest

from grmserve.server.app import load_runner
from grmserve.server.background import ServerThread  # noqa: F401  (tests import it from here)
from grmserve.server.config import local
from grmserve.server.engine.batcher import BatchingEngine


class SlowRunner:
    """A `Runner` (server/engine/base.py) around a ModelRunner: sleeps before every call, records the
    sequences it scored (`seen`, and per score_pairs call `batches`), and holds score_pairs while
    `gate` is clear (tests clear it to keep the model busy until they have queued their calls)."""

    def __init__(self, runner, delay: float):
        self._runner = runner
        self.delay = delay
        self.seen: list[list[int]] = []
        self.batches: list[list[list[int]]] = []
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.pad_id = runner.pad_id

    @property
    def cache(self):
        return self._runner.cache

    def score_rows(self, rows):
        self.calls.append("rows")
        time.sleep(self.delay)
        self.seen.extend(rows)
        return self._runner.score_rows(rows)

    def score_pairs(self, pairs, **limits):
        self.calls.append("pairs")
        self.gate.wait(60)
        time.sleep(self.delay)
        self.seen.extend(list(p) + r for p, r in pairs)
        self.batches.append([list(p) + r for p, r in pairs])
        return self._runner.score_pairs(pairs, **limits)


def tiny_config(checkpoint, **limits):
    cfg = local()
    cfg.model.checkpoint = str(checkpoint)
    cfg.model.precision = "fp32"
    cfg.model.max_tokens = limits.pop("max_tokens", 256)
    cfg.limits.max_pairs_per_request = limits.pop("max_pairs", 16)
    cfg.limits.max_candidates = limits.pop("max_candidates", 16)
    cfg.batch.max_queue_pairs = limits.pop("max_queue_pairs", 4096)
    cfg.server.http_port = limits.pop("http_port", -1)
    assert not limits, limits
    return cfg


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    st = ServerThread(tiny_config(tiny_checkpoint)).start()
    yield st
    st.stop()


@pytest.fixture()
def make_server(tiny_checkpoint):
    started = []

    def make(slow: float | None = None, **limits):
        cfg = tiny_config(tiny_checkpoint, **limits)
        runner, renderer, info = load_runner(cfg)
        if slow is not None:
            runner = SlowRunner(runner, slow)
        st = ServerThread(cfg, BatchingEngine(runner, renderer, info, cfg.batch)).start()
        started.append(st)
        return st

    yield make
    for st in started:
        st.stop()
