"""Server interceptors: the ONE place where domain errors become gRPC status codes, RPC metrics
are recorded, and bearer tokens are checked."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from grmserve.training.core.prompts import InputError

from ..engine.base import DeadlineExpiredError, NotServingError, QueueFullError

log = logging.getLogger(__name__)

REWARD_SERVICE_PREFIX = "/grmserve.reward.v1.RewardService/"
AUTH_EXEMPT = ("/grpc.health.v1.Health/",)


class AuthError(Exception):
    """Missing or wrong bearer token (→ UNAUTHENTICATED)."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    """Domain error → gRPC status code."""
    if isinstance(exc, InputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, DeadlineExpiredError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, NotServingError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED
    return grpc.StatusCode.INTERNAL


class ErrorsAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Maps domain errors to status codes (with the error's message) and records each RewardService
    call's status and latency. Only RewardService methods are labelled, so labels stay bounded."""

    def __init__(self, metrics=None):
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith(REWARD_SERVICE_PREFIX):
            return handler
        method = details.method[len(REWARD_SERVICE_PREFIX):]
        inner = handler.unary_unary
        metrics = self.metrics
        deserialize = handler.request_deserializer

        async def wrapped(raw: bytes, context):
            start = time.perf_counter()

            def record(code: grpc.StatusCode) -> None:
                # Recorded before the status goes out, so a scrape right after the caller sees it counts it.
                if metrics is not None:
                    metrics.observe_rpc(method, code.name, time.perf_counter() - start)

            try:
                request = parse_request(deserialize, raw, method)
                response = await inner(request, context)
            except asyncio.CancelledError:
                record(grpc.StatusCode.CANCELLED)
                raise
            except grpc.aio.AbortError:
                record(context.code() or grpc.StatusCode.UNKNOWN)
                raise
            except Exception as exc:  # noqa: BLE001 - every error leaves here as a status code
                code = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                    message = f"internal error: {type(exc).__name__}: {exc}"
                else:
                    message = str(exc)
                record(code)
                await context.abort(code, message)
            record(grpc.StatusCode.OK)
            return response

        # The request is parsed inside `wrapped`, so that a message grpc cannot decode (invalid UTF-8 in
        # a string field, truncated bytes) is answered INVALID_ARGUMENT and counted, not UNKNOWN.
        return grpc.unary_unary_rpc_method_handler(wrapped, request_deserializer=None,
                                                   response_serializer=handler.response_serializer)


def parse_request(deserialize, raw: bytes, method: str):
    """The request message from its bytes; undecodable bytes are the caller's error (InputError)."""
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except DecodeError as exc:
        raise InputError("request", f"is not a valid {method} message ({exc}); string fields must be valid "
                                    "UTF-8") from None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every call except health checks."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("BearerTokenInterceptor needs a non-empty token")
        self._expected = f"Bearer {token}".encode()

    def _ok(self, details) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(self, continuation, details):
        if details.method.startswith(AUTH_EXEMPT) or self._ok(details):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        message = "missing or wrong bearer token: send metadata `authorization: Bearer <token>`"

        async def deny_unary(request, context):
            raise AuthError(message)

        async def deny_stream(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(deny_unary, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(deny_stream, request_deserializer=handler.request_deserializer,
                                                         response_serializer=handler.response_serializer)

        async def deny_other(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(deny_other, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
