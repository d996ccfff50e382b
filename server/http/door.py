"""The HTTP door: OpenRLHF's `/get_reward` and vLLM's `/classify` on the same engine as gRPC.

An aiohttp web server on the reward server's own event loop. Handlers only convert JSON ↔ domain
(protocols.py) and await `Engine.submit`, so HTTP callers share the gRPC callers' queue, batches
and prefix cache. One middleware checks the token and readiness, maps domain errors to HTTP status
codes (through the gRPC status the interceptor would give: one mapping for both doors) and records
`grm_serve_requests_total{method="/get_reward"|"/classify", code}` with the same code names as gRPC.

    >>> door = HttpDoor(config, engine, metrics)      # doctest: +SKIP
    >>> port = await door.start(); door.serving = True # doctest: +SKIP
    >>> await door.stop(grace=5)                       # doctest: +SKIP

Errors come back as `{"error": {"message", "type", "param", "code"}}` (vLLM's and OpenAI's shape):
400 bad input (`param` names the field), 401 missing or wrong `Authorization: Bearer` token (with
`--server.require_token`), 429 queue full, 503 loading or draining, 500 otherwise. `GET /health`
answers 200 `{"status": "SERVING"}` or 503 `{"status": "NOT_SERVING"}` and needs no token.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from aiohttp import web

from grmserve.training.core.prompts import InputError

from ..config import ServeConfig
from ..engine.base import Engine, NotServingError, ScoreJob, ScoreResult
from ..rpc.interceptors import AuthError, status_for
from .protocols import ScoreBatch, classify_response, get_reward_response, parse_classify, parse_get_reward

log = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.INTERNAL: 500,
}
"""gRPC status (from `status_for`, the one domain-error mapping) → HTTP status."""
SCORING_ROUTES = ("/get_reward", "/classify")
"""The routes counted in the request metrics (their paths are the `method` label)."""


def error_body(code: grpc.StatusCode, exc: BaseException) -> dict:
    message = f"internal error: {type(exc).__name__}: {exc}" if code == grpc.StatusCode.INTERNAL else str(exc)
    return {"error": {"message": message, "type": code.name, "param": getattr(exc, "field", None),
                      "code": HTTP_STATUS[code]}}


async def read_json(request: web.Request, limit_mb: int):
    """The request's JSON body; InputError when it is over `limit_mb` MiB or not JSON."""
    try:
        return json.loads(await request.read())
    except web.HTTPRequestEntityTooLarge as exc:
        raise InputError("body", f"is over the limit of {limit_mb} MiB (--limits.max_message_mb); split the "
                                 "request") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError("body", f"is not valid JSON ({exc})") from exc


class HttpDoor:
    """HTTP/JSON endpoints over an `Engine`; `serving` gates the scoring routes (503 while False)."""

    def __init__(self, config: ServeConfig, engine: Engine, metrics=None, token: str | None = None):
        self.config = config
        self.engine = engine
        self.metrics = metrics
        self.serving = False
        self._expected = f"Bearer {token}".encode() if token else None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grm-http-tokenize")
        self._runner: web.AppRunner | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # -- lifecycle ------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware],
                              client_max_size=self.config.limits.max_message_mb << 20)
        app.router.add_post("/get_reward", self.get_reward)
        app.router.add_post("/classify", self.classify)
        app.router.add_get("/health", self.health)
        return app

    async def start(self) -> int:
        """Bind and start listening; returns the port. OSError when the port cannot be bound."""
        net = self.config.server
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, net.http_host, net.http_port, ssl_context=self._ssl_context())
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        return self._runner.addresses[0][1]

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.server.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.server.tls_cert, self.config.server.tls_key)
        return context

    async def stop(self, grace: float) -> None:
        """Refuse new calls (503), let accepted ones finish (up to `grace` s), then close."""
        self.serving = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except asyncio.TimeoutError:
            log.warning("HTTP door: %d requests still running after %.1f s; closing", self._inflight, grace)
        if self._runner is not None:
            await self._runner.cleanup()
        self._pool.shutdown(wait=False)

    # -- the one place for auth, readiness, errors and metrics ----------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if request.path not in SCORING_ROUTES:
            return await handler(request)
        start = time.perf_counter()
        self._inflight += 1
        self._idle.clear()
        code = grpc.StatusCode.CANCELLED
        try:
            self._admit(request)
            response = await handler(request)
            code = grpc.StatusCode.OK
            return response
        except web.HTTPException:
            code = grpc.StatusCode.UNKNOWN  # aiohttp's own answers (e.g. 405 wrong method)
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves here as a status code
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", request.path)
            return web.json_response(error_body(code, exc), status=HTTP_STATUS[code])
        finally:
            if self.metrics is not None:
                self.metrics.observe_rpc(request.path, code.name, time.perf_counter() - start)
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    def _admit(self, request: web.Request) -> None:
        if self._expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                raise AuthError("missing or wrong bearer token: send the header `Authorization: Bearer <token>`")
        if not self.serving:
            raise NotServingError("the reward server is loading or draining; retry shortly")

    # -- handlers: JSON ↔ domain, then the engine -----------------------------------------------
    async def get_reward(self, request: web.Request) -> web.Response:
        limits = self.config.limits
        batch = parse_get_reward(await read_json(request, limits.max_message_mb), limits.max_pairs_per_request)
        return web.json_response(get_reward_response(await self._score(batch)))

    async def classify(self, request: web.Request) -> web.Response:
        limits, info = self.config.limits, self.engine.info
        batch, activation, model = parse_classify(await read_json(request, limits.max_message_mb),
                                                  limits.max_pairs_per_request, info.max_tokens, *self._bos_head)
        result = await self._score(batch)
        return web.json_response(classify_response(result, activation, model or info.model_name))

    @functools.cached_property
    def _bos_head(self) -> tuple[str | None, str]:
        """The tokenizer's BOS text, and the text every chat render starts with (with and without a
        system message; "" without a template)."""
        renderer = self.engine.renderer()
        if not renderer.use_chat_template:
            return None, ""
        plain = renderer.render_prompt([{"role": "user", "content": "x"}])
        system = renderer.render_prompt([{"role": "system", "content": "y"}, {"role": "user", "content": "x"}])
        return getattr(renderer.tokenizer, "bos_token", None), os.path.commonprefix([plain, system])

    async def health(self, request: web.Request) -> web.Response:
        status = "SERVING" if self.serving else "NOT_SERVING"
        return web.json_response({"status": status}, status=200 if self.serving else 503)

    async def _score(self, batch: ScoreBatch) -> ScoreResult:
        renderer, max_tokens = self.engine.renderer(), batch.max_tokens or self.engine.info.max_tokens

        def encode():
            return [s.encode(renderer, max_tokens, batch.truncate) for s in batch.samples]

        groups = await asyncio.get_running_loop().run_in_executor(self._pool, encode)
        return await self.engine.submit(ScoreJob(groups=groups, request_id=batch.request_id))
