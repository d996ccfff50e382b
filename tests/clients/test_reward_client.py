"""RewardClient and AsyncRewardClient against a real server on loopback ports: retries across a
restart and on a full queue, chunking to the server's limits, deadlines, errors with the address."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import socket
import threading
import time

import grpc
import pytest

from grmserve.clients.reward_client import (
    AsyncRewardClient,
    Limits,
    RetryPolicy,
    RewardClient,
    RewardServerError,
    channel_options,
    split_candidates,
    split_score,
)

from ..server.conftest import ServerThread, tiny_config
from ..server.test_reward_server import metric_value, scrape

CHAT = [{"role": "user", "content": "Name a colour."}]
PATIENT = RetryPolicy(max_attempts=5, initial_backoff=2.0, max_backoff=8.0)
"""Retries spread over ~20 s on average: room for a server to come back before they run out."""


def calls(server, method: str, code: str = "OK") -> float:
    return metric_value(scrape(server), "grm_serve_requests_total", {"method": method, "code": code})


def wait_for(condition, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


class RefusingPort:
    """Listens on `port` and closes every connection at once (a server that is down but whose
    address answers), counting the connection attempts."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()
        self.attempts = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.attempts += 1
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def test_channel_options_carry_the_retry_policy():
    options = dict(channel_options(retry=RetryPolicy(max_attempts=4, initial_backoff=0.5)))
    assert options["grpc.enable_retries"] == 1
    (method,) = json.loads(options["grpc.service_config"])["methodConfig"]
    assert method["name"] == [{"service": "grmserve.reward.v1.RewardService"}]
    assert method["retryPolicy"] == {"maxAttempts": 4, "initialBackoff": "0.5s", "maxBackoff": "4s",
                                     "backoffMultiplier": 2.0,
                                     "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"]}
    off = dict(channel_options(retry=None))
    assert off["grpc.enable_retries"] == 0 and "retryPolicy" not in off["grpc.service_config"]


def test_a_call_rides_out_a_server_restart(tiny_checkpoint):
    """Stop the server; while nothing serves its port the client's call fails and is retried; a new
    server on the same port answers a retry, and the call returns its scores."""
    from grmserve.server.app import build_engine

    first = ServerThread(tiny_config(tiny_checkpoint)).start()
    cfg = tiny_config(tiny_checkpoint)
    cfg.server.port, cfg.model.warmup = first.app.port, False
    engine = build_engine(cfg)  # loaded beforehand: the restart itself takes milliseconds
    pair = [(CHAT, "Blue.")]
    with RewardClient(first.target, retry=PATIENT, timeout=120) as c, cf.ThreadPoolExecutor(1) as pool:
        before = c.score(pair)
        first.stop()
        down = RefusingPort(cfg.server.port)
        call = pool.submit(c.score, pair)
        wait_for(lambda: down.attempts >= 1)  # the call has failed at least once
        down.close()
        second = ServerThread(cfg, engine).start()
        try:
            assert call.result(timeout=120) == pytest.approx(before, abs=1e-5)
            assert calls(second, "Score") == 1
        finally:
            second.stop()


def test_full_queue_is_retried_until_there_is_room(make_server):
    server = make_server(slow=0.0, max_queue_pairs=2)
    runner = server.app.engine.runner
    runner.gate.clear()
    with server.client(retry=PATIENT) as c, cf.ThreadPoolExecutor(3) as pool:
        busy = pool.submit(c.score, [("keeps the model busy", " r")])
        wait_for(lambda: runner.calls.count("pairs") >= 2)
        queued = pool.submit(c.score, [("fills", " the queue"), ("the", " queue")])
        wait_for(lambda: metric_value(scrape(server), "grm_serve_queue_depth_pairs") == 2)
        retried = pool.submit(c.score, [("waits for", " room")])
        wait_for(lambda: calls(server, "Score", "RESOURCE_EXHAUSTED") >= 1)
        runner.gate.set()
        assert len(retried.result(timeout=120)) == 1 and len(queued.result()) == 2 and len(busy.result()) == 1


def test_batches_above_the_limit_are_split_and_scores_match(make_server):
    server = make_server(max_pairs=4, max_candidates=4)
    pairs = [([{"role": "user", "content": f"Question {i}?"}], f"Answer {i} " * (1 + i % 3)) for i in range(10)]
    responses = [f"Candidate {i}" for i in range(10)]
    with server.client() as c:
        one_by_one = [c.score([p])[0] for p in pairs]
        each_candidate = [c.score_candidates(CHAT, [r])[0] for r in responses]
        score_calls, candidate_calls = calls(server, "Score"), calls(server, "ScoreCandidates")
        got = c.score(pairs)
        assert calls(server, "Score") - score_calls == 3  # 4 + 4 + 2
        got_candidates = c.score_candidates(CHAT, responses)
        assert calls(server, "ScoreCandidates") - candidate_calls == 3
        full = c.score_full(pairs)
    assert got == pytest.approx(one_by_one, abs=1e-5)
    assert got_candidates == pytest.approx(each_candidate, abs=1e-5)
    assert len(full.metadata.sequence_tokens) == len(full.scores) == 10
    assert calls(server, "Info") == 1  # the limits are read once per client

    async def async_scores():
        async with AsyncRewardClient(server.target) as ac:
            return await ac.score(pairs), await ac.score_candidates(CHAT, responses)

    async_got, async_candidates = asyncio.run(async_scores())
    assert async_got == pytest.approx(one_by_one, abs=1e-5)
    assert async_candidates == pytest.approx(each_candidate, abs=1e-5)


def test_chunks_stay_within_the_message_bytes():
    limits = Limits(max_pairs=100, max_candidates=100, max_bytes=2000)
    pairs = [("prompt " * (i % 7), "response " * 30) for i in range(40)]
    requests = split_score(pairs, limits, truncate=False, request_id="r")
    assert len(requests) > 1 and sum(len(r.pairs) for r in requests) == 40
    assert all(r.ByteSize() <= 2000 + 64 for r in requests)
    assert [p.response for r in requests for p in r.pairs] == [p[1] for p in pairs]
    big = split_candidates(CHAT, ["x" * 900] * 5, limits, truncate=False, request_id="")
    assert [len(r.responses) for r in big] == [2, 2, 1]
    assert split_score(pairs, None, False, "")[0].pairs[39].response == pairs[39][1]


def test_small_chunk_bytes_split_a_call(make_server):
    server = make_server()
    pairs = [(f"Prompt {i}: " + "context " * 40, " reply " * 20) for i in range(6)]
    with server.client() as c:
        want = c.score(pairs)
    with server.client(chunk_bytes=1500) as small:
        before = calls(server, "Score")
        assert small.score(pairs) == pytest.approx(want, abs=1e-5)
        assert calls(server, "Score") - before >= 3


def test_per_call_deadline(make_server):
    server = make_server(slow=1.0)
    with server.client(timeout=60) as c:
        with pytest.raises(RewardServerError) as err:
            c.score([("too slow", " for 0.2 s")], timeout=0.2)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.value.target == server.target and server.target in str(err.value)
        assert len(c.score([("the client's", " default deadline")])) == 1

    async def impatient():
        async with AsyncRewardClient(server.target) as ac:
            await ac.score([("async and", " too slow")], timeout=0.2)

    with pytest.raises(RewardServerError) as err:
        asyncio.run(impatient())
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_errors_carry_the_status_and_the_address(server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    with RewardClient(closed, timeout=10, retry=RetryPolicy(max_attempts=2, initial_backoff=0.1)) as c:
        with pytest.raises(RewardServerError) as err:
            c.score([("a", " b")])
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and closed in str(err.value)
        with pytest.raises(TimeoutError, match=closed):
            c.wait_ready(timeout=0.5)
    with server.client() as c:
        c.wait_ready(timeout=30)
        with pytest.raises(RewardServerError) as err:
            c.score([("", " empty prompt")])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"INVALID_ARGUMENT from {server.target}: pairs[0].prompt" in str(err.value)
