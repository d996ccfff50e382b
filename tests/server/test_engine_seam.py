"""The serving seam: `RewardServer` and the RPC layer talk to an `Engine` only through the methods
server/engine/base.py lists. A scripted engine with no model stands in for the batcher here, so
these tests check the transport (proto ↔ domain, errors → status codes, warm-up, drain) alone."""

from __future__ import annotations

import grpc
import pytest

from grmserve.clients.reward_client import RewardServerError
from grmserve.server.background import ServerThread
from grmserve.server.config import local
from grmserve.server.engine.base import (
    DeadlineExpiredError,
    DrainReport,
    Engine,
    EngineInfo,
    NotServingError,
    QueueFullError,
    ScoreJob,
    ScoreResult,
    StatsSinks,
)
from grmserve.training.core.prompts import PromptRenderer


class ScriptedEngine(Engine):
    """Scores a sequence by its token count; raises `fail` instead when it is set."""

    def __init__(self, tokenizer):
        self.info = EngineInfo(model_name="scripted", model_version="1", precision="fp32", max_tokens=256,
                               head_type="linear", checkpoint_format="grm", chat_template=True, device="cpu")
        self.sinks = StatsSinks()
        self._renderer = PromptRenderer(tokenizer)
        self.calls: list[str] = []
        self.jobs: list[ScoreJob] = []
        self.fail: Exception | None = None

    def renderer(self) -> PromptRenderer:
        return self._renderer

    async def start(self) -> None:
        self.calls.append("start")

    async def warmup(self) -> None:
        self.calls.append("warmup")

    async def submit(self, job: ScoreJob) -> ScoreResult:
        if self.fail is not None:
            raise self.fail
        self.jobs.append(job)
        lengths = [n for g in job.groups for n in g.sequence_lengths()]
        return ScoreResult(scores=[float(n) for n in lengths], sequence_tokens=lengths,
                           truncated=[False] * len(lengths), computed_tokens=sum(lengths), queue_seconds=0.0,
                           compute_seconds=0.0)

    async def drain(self) -> DrainReport:
        self.calls.append("drain")
        return DrainReport(answered=0, handed_back=0)

    async def close(self) -> None:
        self.calls.append("close")


@pytest.fixture()
def scripted(tokenizer):
    engine = ScriptedEngine(tokenizer)
    st = ServerThread(local(), engine).start()
    yield st, engine
    st.stop()


def test_the_server_uses_the_engine_through_its_interface(scripted, tokenizer):
    st, engine = scripted
    assert engine.calls == ["start", "warmup"]  # warmed up before reporting SERVING
    with st.client() as c:
        c.wait_ready()
        assert c.info().model_name == "scripted"
        got = c.score([("Hello", " there"), ([{"role": "user", "content": "Hi"}], "Yo")])
        cand = c.score_candidates("Q?", ["a", "b c"])
    renderer = PromptRenderer(tokenizer)
    want = [len(g.prompt_ids) + len(g.response_ids[0]) for g in
            (renderer.encode("Hello", [" there"], max_tokens=256),
             renderer.encode([{"role": "user", "content": "Hi"}], ["Yo"], max_tokens=256))]
    assert got == want
    assert engine.jobs[-1].shared_prompt and len(engine.jobs[-1].groups) == 1 and len(cand) == 2
    st.stop()
    assert engine.calls[-1] == "close"


@pytest.mark.parametrize("error, code", [
    (QueueFullError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpiredError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotServingError("draining"), grpc.StatusCode.UNAVAILABLE),
])
def test_engine_errors_become_their_status_codes(scripted, error, code):
    st, engine = scripted
    engine.fail = error
    with st.client() as c:
        with pytest.raises(RewardServerError) as err:
            c.score([("Hello", " there")])
        assert err.value.code == code and str(error) in str(err.value)
        engine.fail = None
        assert c.score([("Hello", " there")])  # still serving
