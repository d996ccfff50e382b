"""Clients for the grm-serve reward server: `RewardClient` (blocking) and `AsyncRewardClient`.

A prompt is a string (sent verbatim, already rendered) or a list of chat messages
(`{"role": ..., "content": ...}`) that the server renders with the model's chat template.

    >>> client = RewardClient("localhost:50051")                                  # doctest: +SKIP
    >>> client.wait_ready()                                                       # doctest: +SKIP
    >>> client.score([([{"role": "user", "content": "2+2?"}], "4")])              # doctest: +SKIP
    [1.73]
    >>> client.score_candidates([{"role": "user", "content": "2+2?"}], ["4", "5"])  # doctest: +SKIP
    [1.73, -0.41]

Several replicas: give a list of addresses, or a `dns:///` name that resolves to every replica (a
Kubernetes headless Service). Calls are spread round-robin over the replicas that report SERVING,
and a call that meets UNAVAILABLE (a replica going away) is retried on another one:

    >>> RewardClient(["10.0.0.5:50051", "10.0.0.6:50051"])                       # doctest: +SKIP
    >>> RewardClient("dns:///grm-serve-headless.rlhf.svc.cluster.local:50051")   # doctest: +SKIP
    >>> channel_target(["127.0.0.1:1", "127.0.0.1:2"])
    'ipv4:127.0.0.1:1,127.0.0.1:2'
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grmserve.protos import DEFAULT_MAX_MESSAGE_MB, SERVICE_NAME, reward_pb2, reward_pb2_grpc

Prompt = str | Sequence[dict]


class RewardServerError(RuntimeError):
    """The reward server answered with an error status (code and message included)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


def to_prompt(prompt: Prompt) -> reward_pb2.Prompt:
    if isinstance(prompt, str):
        return reward_pb2.Prompt(text=prompt)
    return reward_pb2.Prompt(messages=reward_pb2.ChatMessages(
        messages=[reward_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt]))


def score_request(pairs: Sequence[tuple[Prompt, str]], truncate: bool, request_id: str) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(pairs=[reward_pb2.Pair(prompt=to_prompt(p), response=r) for p, r in pairs],
                                   truncate=truncate, request_id=request_id)


def candidates_request(prompt: Prompt, responses: Sequence[str], truncate: bool, request_id: str):
    return reward_pb2.ScoreCandidatesRequest(prompt=to_prompt(prompt), responses=list(responses),
                                             truncate=truncate, request_id=request_id)


def _channel_args(token: str | None):
    return [("authorization", f"Bearer {token}")] if token else None


Target = str | Sequence[str]
"""One address (`host:port`), a gRPC target (`dns:///name:port`, `ipv4:a:p,b:p`), or several `host:port`
addresses (a list, or one comma-separated string)."""

SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")
MAX_ATTEMPTS = 5
"""Tries per call when a replica hands it back (gRPC caps retries at 5 attempts)."""


def service_config() -> str:
    """Round-robin over the replicas that report SERVING on grpc.health.v1 (client-side health
    checking: a draining replica gets no new calls), and retries on another replica of calls a
    replica hands back: UNAVAILABLE (connection lost, replica stopping) and CANCELLED (a call that
    reached a replica just as it began to stop; a call the caller cancels itself is never retried).
    Score and ScoreCandidates are pure functions of the request, so repeating one is safe."""
    retry = {"maxAttempts": MAX_ATTEMPTS, "initialBackoff": "0.05s", "maxBackoff": "1s", "backoffMultiplier": 2,
             "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                       "healthCheckConfig": {"serviceName": SERVICE_NAME},
                       "methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": retry}]})


_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_MB << 20),
                    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_MB << 20),
                    ("grpc.service_config", service_config()), ("grpc.enable_retries", 1),
                    # a request is kept for retries only up to this size (default 256 KiB): as large as a message
                    ("grpc.per_rpc_retry_buffer_size", DEFAULT_MAX_MESSAGE_MB << 20),
                    # re-resolve a dns:/// name soon after a replica disappears (default 30 s)
                    ("grpc.dns_min_time_between_resolutions_ms", 5000)]


def _resolve(address: str) -> tuple[int, str]:
    """`host:port` → (address family, literal `ip:port`, brackets around IPv6); host names resolved once."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"reward server address {address!r} must be host:port")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve reward server host {host!r} ({exc}); for a name that resolves to "
                             f"many replicas pass one target, dns:///{host}:{port}") from exc
        ip = ipaddress.ip_address(min(info, key=lambda i: i[0] != socket.AF_INET)[4][0])  # IPv4 first
    return ip.version, (f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")


def channel_target(target: Target) -> str:
    """The gRPC target for one address, a target with a scheme, or several `host:port` addresses
    (→ an `ipv4:`/`ipv6:` list; host names are resolved once, here)."""
    if isinstance(target, str):
        if target.startswith(SCHEMES) or "," not in target:
            return target
        target = target.split(",")
    addresses = [a.strip() for a in target if a.strip()]
    if not addresses:
        raise ValueError("no reward server address given")
    if len(addresses) == 1:
        return addresses[0]
    resolved = [_resolve(a) for a in addresses]
    families = {version for version, _ in resolved}
    if len(families) > 1:
        raise ValueError(f"cannot mix IPv4 and IPv6 reward server addresses in one client: {addresses}")
    return f"ipv{families.pop()}:" + ",".join(literal for _, literal in resolved)


def _open_channel(api, target: str, root_certificates: bytes | None):
    """A channel from `api` (`grpc` or `grpc.aio`): TLS when root certificates are given."""
    if root_certificates is not None:
        return api.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), options=_CHANNEL_OPTIONS)
    return api.insecure_channel(target, options=_CHANNEL_OPTIONS)


def _not_reachable(target: str, timeout: float) -> TimeoutError:
    return TimeoutError(f"could not reach the reward server at {target} within {timeout:g} s (or it never "
                        "reported SERVING); start it with `grm-serve --server.port <port>` and check the address")


class RewardClient:
    """Blocking client. `target`: one address, several (a list), or a `dns:///` name of many replicas
    (see the module docstring); `timeout` is the per-call deadline in seconds, retries included."""

    def __init__(self, target: Target = "localhost:50051", *, token: str | None = None, root_certificates: bytes | None = None,
                 timeout: float = 60.0):
        self.target = channel_target(target)
        self.timeout = timeout
        self._metadata = _channel_args(token)
        self.channel = _open_channel(grpc, self.target, root_certificates)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RewardServerError(exc.code(), exc.details()) from exc

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server (with several replicas: one of them) reports SERVING."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                resp = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise _not_reachable(self.target, timeout)

    def score(self, pairs: Sequence[tuple[Prompt, str]], *, truncate: bool = False, request_id: str = "") -> list[float]:
        """Raw rewards for (prompt, response) pairs, in order."""
        return list(self.score_full(pairs, truncate=truncate, request_id=request_id).scores)

    def score_full(self, pairs, *, truncate: bool = False, request_id: str = "") -> reward_pb2.ScoreResponse:
        return self._call(self.stub.Score, score_request(pairs, truncate, request_id))

    def score_candidates(self, prompt: Prompt, responses: Sequence[str], *, truncate: bool = False,
                         request_id: str = "") -> list[float]:
        """Raw rewards for n responses to one prompt (the server encodes the prompt once)."""
        return list(self._call(self.stub.ScoreCandidates, candidates_request(prompt, responses, truncate, request_id)).scores)

    def info(self) -> reward_pb2.InfoResponse:
        return self._call(self.stub.Info, reward_pb2.InfoRequest())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRewardClient:
    """asyncio client with the same methods and targets as `RewardClient` (awaitable)."""

    def __init__(self, target: Target = "localhost:50051", *, token: str | None = None, root_certificates: bytes | None = None,
                 timeout: float = 60.0):
        self.target = channel_target(target)
        self.timeout = timeout
        self._metadata = _channel_args(token)
        self.channel = _open_channel(grpc.aio, self.target, root_certificates)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RewardServerError(exc.code(), exc.details()) from exc

    async def wait_ready(self, timeout: float = 30.0) -> None:
        import asyncio

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                resp = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=2.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.2)
        raise _not_reachable(self.target, timeout)

    async def score(self, pairs, *, truncate: bool = False, request_id: str = "") -> list[float]:
        return list((await self._call(self.stub.Score, score_request(pairs, truncate, request_id))).scores)

    async def score_candidates(self, prompt, responses, *, truncate: bool = False, request_id: str = "") -> list[float]:
        resp = await self._call(self.stub.ScoreCandidates, candidates_request(prompt, responses, truncate, request_id))
        return list(resp.scores)

    async def info(self) -> reward_pb2.InfoResponse:
        return await self._call(self.stub.Info, reward_pb2.InfoRequest())

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
