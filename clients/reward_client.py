"""Clients for the grm-serve reward server: `RewardClient` (blocking) and `AsyncRewardClient`.

A prompt is a string (sent verbatim, already rendered) or a list of chat messages
(`{"role": ..., "content": ...}`) that the server renders with the model's chat template.

    >>> client = RewardClient("localhost:50051", timeout=30)                      # doctest: +SKIP
    >>> client.wait_ready()                                                       # doctest: +SKIP
    >>> client.score([([{"role": "user", "content": "2+2?"}], "4")])              # doctest: +SKIP
    [1.73]
    >>> client.score_candidates([{"role": "user", "content": "2+2?"}], ["4", "5"])  # doctest: +SKIP
    [1.73, -0.41]

What the clients do for you:

- **Retries.** Calls that fail with UNAVAILABLE (server restarting, draining, unreachable) or
  RESOURCE_EXHAUSTED (queue full) are retried by gRPC itself with exponential backoff, as the
  channel's service config says (`RetryPolicy`; gRPC allows at most 5 attempts). The channel
  reconnects within `max_reconnect_backoff_ms` (2 s) of a server coming back.
- **Deadlines.** `timeout` (seconds) bounds a whole call, retries and chunks included; set it on the
  client, or per call (`score(pairs, timeout=5)`).
- **Chunking.** A batch bigger than the server's limits (`Info`: pairs per request, candidates per
  call, message bytes; and the client's `chunk_bytes`) is split into requests that fit, sent a
  few at a time (`parallel_chunks`) so that the server batches them together; the scores come
  back in order. A single pair is never split, so it needs no `Info` call.
- **Errors.** A failed call raises `RewardServerError` with the status code and the server's
  address; there is no silent `None`.
- **TLS and tokens.** `root_certificates` (PEM bytes, or a path) turns on TLS; `token` is sent as
  `authorization: Bearer <token>`.

- **Replicas.** Give a list of addresses, or a `dns:///` name that resolves to every replica (a
  Kubernetes headless Service): calls are spread round-robin over the replicas that report SERVING
  (client-side health checking, so a draining replica gets no new calls), and a call a replica
  hands back (UNAVAILABLE while it drains) is retried on another one.

    >>> RewardClient(["10.0.0.5:50051", "10.0.0.6:50051"])                       # doctest: +SKIP
    >>> RewardClient("dns:///grm-serve-headless.rlhf.svc.cluster.local:50051")   # doctest: +SKIP
    >>> channel_target(["127.0.0.1:1", "127.0.0.1:2"])
    'ipv4:127.0.0.1:1,127.0.0.1:2'

Every channel option (message limits, load balancing, reconnect backoff, retries) is built by
`channel_options`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grmserve.protos import DEFAULT_MAX_MESSAGE_MB, SERVICE_NAME, reward_pb2, reward_pb2_grpc

Prompt = str | Sequence[dict]
DEFAULT_CHUNK_BYTES = 4 << 20
"""Largest request the clients send (they split bigger batches); gRPC buffers a request this size
per call for its retries."""
_ENVELOPE_BYTES = 1024  # request fields other than the pairs (truncate, request_id), with room to spare


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy for every RewardService call (gRFC A6): after a failed attempt, wait a
    random time up to `initial_backoff` × `multiplier`^(attempt-1) seconds (at most `max_backoff`).

    >>> RetryPolicy(max_attempts=3).to_service_config()["maxAttempts"]
    3
    """

    max_attempts: int = 5
    """Attempts per call, the first included (gRPC caps it at 5)."""
    initial_backoff: float = 0.25
    max_backoff: float = 4.0
    multiplier: float = 2.0
    codes: tuple[str, ...] = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED")
    """Status codes that are retried (CANCELLED: a call that reached a replica just as it began to
    stop; a call the caller cancels itself is never retried). Scoring is a pure function of the
    request, so repeating a call is safe."""

    def to_service_config(self) -> dict:
        return {"maxAttempts": self.max_attempts, "initialBackoff": f"{self.initial_backoff:g}s",
                "maxBackoff": f"{self.max_backoff:g}s", "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": list(self.codes)}


class RewardServerError(RuntimeError):
    """A call to the reward server failed: `code` (a grpc.StatusCode), `details` (the server's
    message) and `target` (the address called) are all in the message.

    >>> str(RewardServerError(grpc.StatusCode.UNAVAILABLE, "connection refused", "rm:50051"))
    'UNAVAILABLE from rm:50051: connection refused'
    """

    def __init__(self, code: grpc.StatusCode, message: str, target: str = ""):
        super().__init__(f"{code.name}{f' from {target}' if target else ''}: {message}")
        self.code = code
        self.details = message
        self.target = target


def service_config(retry: RetryPolicy | None) -> dict:
    """The channel's service config: round-robin over the replicas that report SERVING on
    grpc.health.v1, and `retry` applied to every RewardService method."""
    method = {"name": [{"service": SERVICE_NAME}]}
    if retry is not None:
        method["retryPolicy"] = retry.to_service_config()
    return {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": SERVICE_NAME},
            "methodConfig": [method]}


def channel_options(*, retry: RetryPolicy | None = RetryPolicy(), max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[tuple[str, object]]:
    """Every option of the clients' channels, in one place.

    >>> dict(channel_options())["grpc.enable_retries"]
    1
    """
    limit = max_message_mb << 20
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.enable_retries", int(retry is not None)),
            ("grpc.service_config", json.dumps(service_config(retry))),
            ("grpc.per_rpc_retry_buffer_size", 2 * chunk_bytes),  # a chunk fits: it can be retried
            ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000),
            # re-resolve a dns:/// name soon after a replica disappears (default 30 s)
            ("grpc.dns_min_time_between_resolutions_ms", 5000)]


Target = str | Sequence[str]
"""One address (`host:port`), a gRPC target (`dns:///name:port`, `ipv4:a:p,b:p`), or several `host:port`
addresses (a list, or one comma-separated string)."""

SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")
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


def _credentials(root_certificates: bytes | str | os.PathLike | None):
    if root_certificates is None:
        return None
    pem = root_certificates if isinstance(root_certificates, bytes) else Path(root_certificates).read_bytes()
    return grpc.ssl_channel_credentials(pem)


def _open_channel(api, target: str, root_certificates, options):
    """A channel from `api` (`grpc` or `grpc.aio`): TLS when root certificates are given."""
    creds = _credentials(root_certificates)
    if creds is not None:
        return api.secure_channel(target, creds, options=options)
    return api.insecure_channel(target, options=options)


# -- requests -------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Limits:
    """How big one request may be: the server's limits (from `Info`) and the client's own."""

    max_pairs: int
    max_candidates: int
    max_bytes: int

    @classmethod
    def from_info(cls, info: reward_pb2.InfoResponse, client_bytes: int) -> "Limits":
        server_bytes = info.max_message_bytes or client_bytes  # 0: a server that does not report it
        return cls(max_pairs=info.max_pairs_per_request or 1, max_candidates=info.max_candidates or 1,
                   max_bytes=max(1, min(server_bytes, client_bytes) - _ENVELOPE_BYTES))


def plan_chunks(sizes: Sequence[int], max_items: int, max_bytes: int) -> list[range]:
    """Split items of the given serialized sizes into consecutive runs of at most `max_items`
    items and `max_bytes` bytes (an item bigger than `max_bytes` goes alone). No items: one empty
    run, so that the server still answers (and names what is wrong).

    >>> plan_chunks([10] * 10, max_items=4, max_bytes=1000)
    [range(0, 4), range(4, 8), range(8, 10)]
    >>> plan_chunks([600, 600, 100, 2000], max_items=8, max_bytes=1000)
    [range(0, 1), range(1, 3), range(3, 4)]
    """
    chunks, start, used = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_items or used + size > max_bytes):
            chunks.append(range(start, i))
            start, used = i, 0
        used += size
    chunks.append(range(start, len(sizes)))
    return chunks


def _field_bytes(message_bytes: int) -> int:
    return message_bytes + 6  # tag + length prefix of an embedded message or string


def split_score(pairs: Sequence[tuple[Prompt, str]], limits: Limits | None, truncate: bool,
                request_id: str) -> list[reward_pb2.ScoreRequest]:
    """Score requests for `pairs`, each within `limits` (None: one request)."""
    request = score_request(pairs, truncate, request_id)
    if limits is None:
        return [request]
    sizes = [_field_bytes(p.ByteSize()) for p in request.pairs]
    return [reward_pb2.ScoreRequest(pairs=request.pairs[c.start:c.stop], truncate=truncate, request_id=request_id)
            for c in plan_chunks(sizes, limits.max_pairs, limits.max_bytes)]


def split_candidates(prompt: Prompt, responses: Sequence[str], limits: Limits | None, truncate: bool,
                     request_id: str) -> list[reward_pb2.ScoreCandidatesRequest]:
    """ScoreCandidates requests for n responses to one prompt, each within `limits` (None: one)."""
    if limits is None:
        return [candidates_request(prompt, responses, truncate, request_id)]
    proto_prompt = to_prompt(prompt)
    budget = max(1, limits.max_bytes - _field_bytes(proto_prompt.ByteSize()))
    sizes = [_field_bytes(len(r.encode())) for r in responses]
    return [reward_pb2.ScoreCandidatesRequest(prompt=proto_prompt, responses=list(responses[c.start:c.stop]),
                                              truncate=truncate, request_id=request_id)
            for c in plan_chunks(sizes, limits.max_candidates, budget)]


def merge_scores(responses: Sequence[reward_pb2.ScoreResponse]) -> reward_pb2.ScoreResponse:
    """One ScoreResponse for the chunks of one call, in order (times: the slowest chunk's)."""
    if len(responses) == 1:
        return responses[0]
    merged = reward_pb2.ScoreResponse(metadata=reward_pb2.CallMetadata(request_id=responses[0].metadata.request_id))
    for r in responses:
        merged.scores.extend(r.scores)
        merged.metadata.sequence_tokens.extend(r.metadata.sequence_tokens)
        merged.metadata.truncated.extend(r.metadata.truncated)
        merged.metadata.computed_tokens += r.metadata.computed_tokens
        merged.metadata.queue_seconds = max(merged.metadata.queue_seconds, r.metadata.queue_seconds)
        merged.metadata.compute_seconds = max(merged.metadata.compute_seconds, r.metadata.compute_seconds)
    return merged


def _needs_limits(n: int) -> bool:
    return n > 1  # a single pair or response is never split


def _not_reachable(target: str, timeout: float) -> TimeoutError:
    return TimeoutError(f"could not reach the reward server at {target} within {timeout:g} s (or it never "
                        "reported SERVING); start it with `grm-serve --server.port <port>` and check the address")


class _ClientBase:
    """What the blocking and the asyncio client share: settings, deadlines, errors."""

    def __init__(self, target: Target, *, token: str | None, root_certificates, timeout: float,
                 retry: RetryPolicy | None, max_message_mb: int, chunk_bytes: int, parallel_chunks: int):
        self.target = channel_target(target)
        self.timeout = timeout
        self.parallel_chunks = max(1, parallel_chunks)
        self._metadata = [("authorization", f"Bearer {token}")] if token else None
        self._client_bytes = min(max_message_mb << 20, chunk_bytes)
        self._options = channel_options(retry=retry, max_message_mb=max_message_mb, chunk_bytes=chunk_bytes)
        self._root_certificates = root_certificates
        self._limits: Limits | None = None

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _remaining(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RewardServerError(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed between chunks",
                                    self.target)
        return left

    def _error(self, exc: grpc.RpcError) -> RewardServerError:
        return RewardServerError(exc.code(), exc.details() or "", self.target)

    def _waves(self, requests: list) -> list[list]:
        n = self.parallel_chunks
        return [requests[i:i + n] for i in range(0, len(requests), n)]


class RewardClient(_ClientBase):
    """Blocking client; thread-safe (one channel, shared). `target`: one address, several (a list),
    or a `dns:///` name of many replicas; `timeout` is the default deadline of a call in seconds;
    `retry=None` turns retries off."""

    def __init__(self, target: Target = "localhost:50051", *, token: str | None = None,
                 root_certificates: bytes | str | os.PathLike | None = None, timeout: float = 60.0,
                 retry: RetryPolicy | None = RetryPolicy(), max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, parallel_chunks: int = 4):
        super().__init__(target, token=token, root_certificates=root_certificates, timeout=timeout, retry=retry,
                         max_message_mb=max_message_mb, chunk_bytes=chunk_bytes, parallel_chunks=parallel_chunks)
        self.channel = _open_channel(grpc, self.target, root_certificates, self._options)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    def _call_all(self, method, requests: list, deadline: float) -> list:
        """Send `requests` a wave of `parallel_chunks` at a time; their responses, in order."""
        if len(requests) == 1:
            return [self._call(method, requests[0], self._remaining(deadline))]
        out = []
        for wave in self._waves(requests):
            timeout = self._remaining(deadline)
            futures = [method.future(r, timeout=timeout, metadata=self._metadata) for r in wave]
            try:
                out.extend(f.result() for f in futures)
            except grpc.RpcError as exc:
                for f in futures:
                    f.cancel()
                raise self._error(exc) from exc
        return out

    def limits(self, timeout: float | None = None) -> Limits:
        """The request limits (read from the server's `Info` once, then kept)."""
        if self._limits is None:
            self._limits = Limits.from_info(self.info(timeout=timeout), self._client_bytes)
        return self._limits

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server's health check reports SERVING; TimeoutError after `timeout` s."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                resp = self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                          timeout=max(0.1, min(2.0, end - time.monotonic())))
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise _not_reachable(self.target, timeout)

    def score(self, pairs: Sequence[tuple[Prompt, str]], *, truncate: bool = False, request_id: str = "",
              timeout: float | None = None) -> list[float]:
        """Raw rewards for (prompt, response) pairs, in order."""
        return list(self.score_full(pairs, truncate=truncate, request_id=request_id, timeout=timeout).scores)

    def score_full(self, pairs: Sequence[tuple[Prompt, str]], *, truncate: bool = False, request_id: str = "",
                   timeout: float | None = None) -> reward_pb2.ScoreResponse:
        """Scores and call metadata (token counts, truncation, queue and compute seconds)."""
        deadline = self._deadline(timeout)
        limits = self.limits(self._remaining(deadline)) if _needs_limits(len(pairs)) else None
        requests = split_score(pairs, limits, truncate, request_id)
        return merge_scores(self._call_all(self.stub.Score, requests, deadline))

    def score_candidates(self, prompt: Prompt, responses: Sequence[str], *, truncate: bool = False,
                         request_id: str = "", timeout: float | None = None) -> list[float]:
        """Raw rewards for n responses to one prompt (the server encodes the prompt once)."""
        deadline = self._deadline(timeout)
        limits = self.limits(self._remaining(deadline)) if _needs_limits(len(responses)) else None
        requests = split_candidates(prompt, responses, limits, truncate, request_id)
        return [s for r in self._call_all(self.stub.ScoreCandidates, requests, deadline) for s in r.scores]

    def info(self, *, timeout: float | None = None) -> reward_pb2.InfoResponse:
        """What is served: model, precision, limits."""
        return self._call(self.stub.Info, reward_pb2.InfoRequest(), timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncRewardClient(_ClientBase):
    """asyncio client with the same methods as `RewardClient` (awaitable). Create it inside the
    event loop that uses it (a grpc.aio channel belongs to one loop)."""

    def __init__(self, target: Target = "localhost:50051", *, token: str | None = None,
                 root_certificates: bytes | str | os.PathLike | None = None, timeout: float = 60.0,
                 retry: RetryPolicy | None = RetryPolicy(), max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, parallel_chunks: int = 4):
        super().__init__(target, token=token, root_certificates=root_certificates, timeout=timeout, retry=retry,
                         max_message_mb=max_message_mb, chunk_bytes=chunk_bytes, parallel_chunks=parallel_chunks)
        self.channel = _open_channel(grpc.aio, self.target, root_certificates, self._options)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def _call(self, method, request, timeout: float | None = None):
        try:
            return await method(request, timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc

    async def _call_all(self, method, requests: list, deadline: float) -> list:
        out = []
        for wave in self._waves(requests):
            timeout = self._remaining(deadline)
            tasks = [asyncio.ensure_future(self._call(method, r, timeout)) for r in wave]
            try:
                out.extend(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise
        return out

    async def limits(self, timeout: float | None = None) -> Limits:
        if self._limits is None:
            self._limits = Limits.from_info(await self.info(timeout=timeout), self._client_bytes)
        return self._limits

    async def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                resp = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                timeout=max(0.1, min(2.0, end - time.monotonic())))
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.2)
        raise _not_reachable(self.target, timeout)

    async def score(self, pairs: Sequence[tuple[Prompt, str]], *, truncate: bool = False, request_id: str = "",
                    timeout: float | None = None) -> list[float]:
        resp = await self.score_full(pairs, truncate=truncate, request_id=request_id, timeout=timeout)
        return list(resp.scores)

    async def score_full(self, pairs: Sequence[tuple[Prompt, str]], *, truncate: bool = False, request_id: str = "",
                         timeout: float | None = None) -> reward_pb2.ScoreResponse:
        deadline = self._deadline(timeout)
        limits = await self.limits(self._remaining(deadline)) if _needs_limits(len(pairs)) else None
        requests = split_score(pairs, limits, truncate, request_id)
        return merge_scores(await self._call_all(self.stub.Score, requests, deadline))

    async def score_candidates(self, prompt: Prompt, responses: Sequence[str], *, truncate: bool = False,
                               request_id: str = "", timeout: float | None = None) -> list[float]:
        deadline = self._deadline(timeout)
        limits = await self.limits(self._remaining(deadline)) if _needs_limits(len(responses)) else None
        requests = split_candidates(prompt, responses, limits, truncate, request_id)
        return [s for r in await self._call_all(self.stub.ScoreCandidates, requests, deadline) for s in r.scores]

    async def info(self, *, timeout: float | None = None) -> reward_pb2.InfoResponse:
        return await self._call(self.stub.Info, reward_pb2.InfoRequest(), timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncRewardClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
