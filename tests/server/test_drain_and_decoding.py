"""Operations gaps found from outside (issue: deploy and operate): undecodable requests are the
caller's error, and a drain under load hands queued work back at once instead of letting it wait out
the grace period, so a round-robin client gets every call answered by another replica."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from grmserve.clients.reward_client import RewardClient
from grmserve.protos import reward_pb2

from .conftest import ServerThread, tiny_config
from .test_reward_server import metric_value

PAIRS = [([{"role": "user", "content": f"Name a colour ({i})."}], "Blue.") for i in range(2)]


def test_invalid_utf8_is_invalid_argument_counted_and_the_server_keeps_serving(server):
    good = reward_pb2.ScoreRequest(pairs=[reward_pb2.Pair(prompt=reward_pb2.Prompt(text="AAAA"), response="B")])
    raw = good.SerializeToString().replace(b"AAAA", b"\xff\xfe\xfd\xfc")  # the same length, not UTF-8
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/grmserve.reward.v1.RewardService/Score", request_serializer=None,
                                   response_deserializer=reward_pb2.ScoreResponse.FromString)
        with pytest.raises(grpc.RpcError) as err:
            call(raw, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in err.value.details()
    text = server.app.metrics.exposition().decode()
    assert metric_value(text, "grm_serve_requests_total", {"method": "Score", "code": "INVALID_ARGUMENT"}) >= 1
    with server.client() as c:
        assert len(c.score([("still", " serving")])) == 1


def test_drain_hands_queued_work_back_and_the_other_replica_answers_it(tiny_checkpoint, make_server):
    """Replica A computes slowly (1.5 s a step) and takes one call per step (a step is bounded to
    0.1 s of work at its measured throughput). While a step runs, more calls queue on A: more work
    than A's 3 s grace can compute. A is stopped: the step in progress is answered, the queued calls
    are handed back at once (UNAVAILABLE), and the round-robin client retries them on replica B.
    Every call gets its scores, and none is cancelled at the end of the grace period."""
    slow = make_server(slow=1.5)
    fast = ServerThread(tiny_config(tiny_checkpoint)).start()
    try:
        with fast.client() as c:
            expected = c.score(PAIRS)
        engine = slow.app.engine
        engine.config.max_step_seconds = 0.1
        results, errors = [], []

        def call(client):
            try:
                results.append(client.score(PAIRS))
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

        with RewardClient([slow.target, fast.target], timeout=60) as client:
            client.wait_ready()
            threads = [threading.Thread(target=call, args=(client,)) for _ in range(16)]
            for t in threads:
                t.start()
                time.sleep(0.05)
            deadline = time.monotonic() + 30
            while not (len(engine._queue) >= 3 and engine.runner.calls.count("pairs") >= 2):  # a step runs, more wait
                assert time.monotonic() < deadline, "replica A never had queued work behind a running step"
                time.sleep(0.01)
            queued = len(engine._queue)
            assert queued * 1.5 > 3.0, "the queued work must exceed the grace period"
            slow.grace = 3.0
            slow.stop()
            for t in threads:
                t.join(60)
        assert not errors, errors[:3]
        assert len(results) == 16 and all(r == pytest.approx(expected, abs=1e-5) for r in results)
        text = slow.app.metrics.exposition().decode()
        handed_back = metric_value(text, "grm_serve_jobs_total", {"outcome": "handed_back"})
        assert handed_back >= queued >= 1
        assert metric_value(text, "grm_serve_requests_total", {"method": "Score", "code": "UNAVAILABLE"}) == handed_back
        assert metric_value(text, "grm_serve_requests_total", {"method": "Score", "code": "CANCELLED"}) == 0
    finally:
        fast.stop()
