"""Several replicas behind one client: gRPC round-robin spreads calls over real `grm-serve`
processes, and a call rides through a replica going away (retried on UNAVAILABLE, health-checked
subchannels). Tests in file order: the last one stops servers [1] and [2]."""

from __future__ import annotations

import asyncio
import signal
import threading

import pytest

from grmserve.clients.reward_client import AsyncRewardClient, RewardClient, channel_target

CHAT = [{"role": "user", "content": "Name a prime number."}]
PAIRS = [(CHAT, "7"), (CHAT, "Nine is prime."), ("plain text prompt", " and a response")]


def same_as(scores):
    """Equal up to float rounding: a pair served from cached prefixes is summed in another order."""
    return pytest.approx(scores, abs=1e-4)


def score_calls(server) -> float:
    return server.samples("grm_serve_requests_total", method="Score", code="OK")


# -- targets ----------------------------------------------------------------------------------


def test_one_address_or_a_target_with_a_scheme_is_used_as_given():
    assert channel_target("localhost:50051") == "localhost:50051"
    assert channel_target(["10.0.0.5:50051"]) == "10.0.0.5:50051"
    assert channel_target("dns:///grm-serve-headless.ns.svc.cluster.local:50051").startswith("dns:///")
    assert channel_target("ipv4:10.0.0.5:1,10.0.0.6:2") == "ipv4:10.0.0.5:1,10.0.0.6:2"


def test_several_addresses_become_one_ip_list_target():
    assert channel_target(["10.0.0.5:50051", "10.0.0.6:50051"]) == "ipv4:10.0.0.5:50051,10.0.0.6:50051"
    assert channel_target("localhost:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target(["[::1]:1", "[fe80::1]:2"]) == "ipv6:[::1]:1,[fe80::1]:2"


@pytest.mark.parametrize("bad, message", [(["10.0.0.5:1", "[::1]:2"], "cannot mix IPv4 and IPv6"),
                                          (["10.0.0.5", "10.0.0.6:1"], "must be host:port"),
                                          (["no-such-host.invalid:1", "10.0.0.6:1"], "dns:///no-such-host.invalid:1"),
                                          ([], "no reward server address")])
def test_bad_address_lists_say_what_to_do(bad, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        channel_target(bad)


# -- real servers -----------------------------------------------------------------------------


def until_every_replica_served(call, servers, most: int = 200) -> None:
    """Call until each replica has answered once: a new channel connects to (and health-checks)
    its replicas one by one, and round-robin picks only those that are ready so far."""
    before = [score_calls(s) for s in servers]
    for _ in range(most):
        call()
        if all(score_calls(s) > b for s, b in zip(servers, before)):
            return
    raise AssertionError(f"after {most} calls some replica never answered: {[score_calls(s) for s in servers]}")


def test_round_robin_client_spreads_calls_over_every_replica(servers):
    with RewardClient([s.target for s in servers], timeout=30) as client:
        client.wait_ready()
        until_every_replica_served(lambda: client.score(PAIRS), servers)
        before = [score_calls(s) for s in servers]
        scores = [client.score(PAIRS) for _ in range(4 * len(servers))]
    assert all(s == same_as(scores[0]) for s in scores), "replicas of one checkpoint give the same scores"
    served = [score_calls(s) - b for s, b in zip(servers, before)]
    assert sum(served) == len(scores) and all(n > 0 for n in served), f"Score calls answered per replica: {served}"


def test_async_client_spreads_calls_too(servers):
    async def run():
        async with AsyncRewardClient([s.target for s in servers], timeout=30) as client:
            await client.wait_ready()
            for _ in range(200):
                await asyncio.gather(*(client.score(PAIRS) for _ in servers))
                if all(score_calls(s) > b for s, b in zip(servers, before)):
                    return True
            return False

    before = [score_calls(s) for s in servers]
    assert asyncio.run(run()), f"some replica never answered: {[score_calls(s) - b for s, b in zip(servers, before)]}"


def call_until(client, stop: threading.Event, answered: list, failed: list) -> None:
    while not stop.is_set():
        try:
            answered.append(client.score(PAIRS))
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            failed.append(repr(exc))


def test_calls_ride_through_replicas_going_away(servers):
    """Traffic from 4 threads while replica [1] drains (SIGTERM) and replica [2] is killed
    (SIGKILL, in-flight calls cut); every call is answered, then and after, by the survivor."""
    survivor, drained, killed = servers
    with RewardClient([s.target for s in servers], timeout=60) as client:
        client.wait_ready()
        expected = client.score(PAIRS)
        until_every_replica_served(lambda: client.score(PAIRS), servers)  # all three in the rotation
        stop, answered, failed = threading.Event(), [], []
        callers = [threading.Thread(target=call_until, args=(client, stop, answered, failed)) for _ in range(4)]
        for t in callers:
            t.start()
        try:
            assert drained.stop(signal.SIGTERM) == 0, "a drained grm-serve exits 0"
            killed.stop(signal.SIGKILL)
        finally:
            stop.set()
            for t in callers:
                t.join(120)
        assert not failed, f"{len(failed)} calls failed while replicas went away, e.g. {failed[:3]}"
        assert answered and all(s == same_as(expected) for s in answered)
        before = score_calls(survivor)
        later = [client.score(PAIRS) for _ in range(10)]
    assert all(s == same_as(expected) for s in later)
    assert score_calls(survivor) - before == len(later), "the remaining replica answers every later call"
