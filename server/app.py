"""The reward server as a whole: load the model, build the engine, serve gRPC and /metrics,
report health, drain on shutdown.

    >>> app = RewardServer(local())            # doctest: +SKIP
    >>> await app.start(); print(app.port)     # doctest: +SKIP
    >>> await app.stop()                       # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import torch

from grmserve.training.core import env
from grmserve.training.core.checkpoint import load_grm
from grmserve.training.core.devices import resolve_device
from grmserve.training.core.prompts import PromptRenderer

from .config import ServeConfig
from .engine.base import Engine, EngineInfo
from .engine.batcher import BatchingEngine
from .engine.prefix_cache import common_head
from .engine.runner import ModelRunner, prepare_model
from .http.door import HttpDoor
from .metrics import ServerMetrics
from .rpc.server import ConfigError, create_server, set_serving
from .rpc.servicer import SERVER_VERSION

log = logging.getLogger(__name__)


def default_checkpoint() -> Path:
    """The embedded default reward model (built on first use; see grmserve.training.core.default_model)."""
    from grmserve.training.core.default_model import ensure_default_model

    return ensure_default_model()


def build_engine(config: ServeConfig) -> BatchingEngine:
    """Load the checkpoint, prepare it for the configured precision and device, wrap it in a batcher."""
    return BatchingEngine(*load_runner(config), config.batch)


def load_runner(config: ServeConfig) -> tuple[ModelRunner, PromptRenderer, EngineInfo]:
    """The model runner for `config.model` (loaded, converted, on its device), its renderer and info."""
    path = Path(config.model.checkpoint) if config.model.checkpoint else default_checkpoint()
    if config.model.threads > 0:
        torch.set_num_threads(config.model.threads)
    device = resolve_device(config.model.device)
    start = time.perf_counter()
    loaded = load_grm(path, dtype=torch.float32)
    model = loaded.model
    precision = prepare_model(model, config.model.precision, device, config.model.fp8_recipe)
    if config.model.compile:
        model.lm.model.forward = torch.compile(model.lm.model.forward, dynamic=True)
    grm = model.grm_config
    max_tokens = config.model.max_tokens or grm.max_tokens
    renderer = PromptRenderer(loaded.tokenizer, use_chat_template=grm.chat_template)
    info = EngineInfo(model_name=grm.model_name, model_version=grm.model_version, precision=precision,
                      max_tokens=max_tokens, head_type=grm.head.type, checkpoint_format=loaded.format,
                      chat_template=renderer.use_chat_template, device=str(device))
    log.info("loaded %s (%s, %s) from %s in %.1f s on %s", grm.model_name, loaded.format, precision,
             path, time.perf_counter() - start, device)
    runner = ModelRunner(model, pad_id=loaded.tokenizer.pad_token_id, device=device,
                         cache_bytes=config.batch.prefix_cache_mib << 20)
    runner.set_head(template_head(renderer))
    return runner, renderer, info


def template_head(renderer: PromptRenderer) -> list[int]:
    """The tokens every chat prompt this renderer makes starts with (system block, user tag):
    the common prefix of a few unrelated renders. Empty without a chat template."""
    if not renderer.use_chat_template:
        return []
    probes = ["Hi", "x", "7 apples?", "Zebra stripes", "\n\nhello"]
    return common_head([renderer.encode([{"role": "user", "content": p}], ["ok"], max_tokens=1 << 30).prompt_ids
                        for p in probes])


class RewardServer:
    """Engine + gRPC server + HTTP door (with --server.http_port) + metrics endpoint + health, with an
    orderly start and stop."""

    def __init__(self, config: ServeConfig, engine: Engine | None = None):
        self.config = config
        self.engine = engine
        self.metrics = ServerMetrics()
        self.server = None
        self.health = None
        self.http: HttpDoor | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None

    async def start(self) -> None:
        if self.engine is None:
            self.engine = await asyncio.get_running_loop().run_in_executor(None, build_engine, self.config)
        self.metrics.attach(self.engine.sinks)
        self.metrics.set_model(self.engine.info, SERVER_VERSION)
        self.server, self.port, self.health = await create_server(self.config, self.engine, self.metrics)
        if self.config.server.metrics_port >= 0:
            try:
                self.metrics_port = self.metrics.serve(self.config.server.metrics_host, self.config.server.metrics_port)
            except OSError as exc:
                raise ConfigError(f"could not bind the metrics port {self.config.server.metrics_host}:"
                                  f"{self.config.server.metrics_port} ({exc}); pick another with "
                                  "--server.metrics_port") from exc
        await self.server.start()  # health says NOT_SERVING until warm-up is done
        await self.engine.start()
        await self._start_http()  # answers 503 until warm-up is done
        if self.config.model.warmup:
            await self.engine.warmup()
        await set_serving(self.health, True)
        if self.http is not None:
            self.http.serving = True
        self.metrics.ready.set(1)
        log.info("serving on port %s (metrics on %s, HTTP on %s)", self.port, self.metrics_port, self.http_port)

    async def _start_http(self) -> None:
        net = self.config.server
        if net.http_port < 0:
            return
        self.http = HttpDoor(self.config, self.engine, self.metrics, env.auth_token() if net.require_token else None)
        try:
            self.http_port = await self.http.start()
        except OSError as exc:
            raise ConfigError(f"could not bind the HTTP port {net.http_host}:{net.http_port} ({exc}); pick another "
                              "with --server.http_port") from exc

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, hand queued work that has not started back at once
        (UNAVAILABLE: the client retries on another replica), finish the step in progress (up to
        `grace` s), then close."""
        grace = self.config.server.grace_seconds if grace is None else grace
        self.metrics.ready.set(0)
        if self.health is not None:
            await set_serving(self.health, False)
        if self.http is not None:
            self.http.serving = False  # the HTTP door answers 503 from now on
        if self.engine is not None:
            try:
                await asyncio.wait_for(self.engine.drain(), timeout=grace)
            except asyncio.TimeoutError:
                log.warning("drain: the step in progress did not finish within %.1f s; cancelling it", grace)
        stopping = [door.stop(grace) for door in (self.server, self.http) if door is not None]
        await asyncio.gather(*stopping)  # both doors close once their accepted calls are answered
        if self.engine is not None:
            await self.engine.close()
        self.metrics.close()
