"""Build the gRPC server apart from running it.

    >>> server, port, health = await create_server(config, engine, metrics)   # doctest: +SKIP
    >>> await server.start()                                                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from grmserve.protos import SERVICE_NAME, reward_pb2, reward_pb2_grpc
from grmserve.training.core import env

from ..config import ServeConfig
from ..engine.base import Engine
from .interceptors import BearerTokenInterceptor, ErrorsAndMetricsInterceptor
from .servicer import RewardServicer

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The server cannot be built from this configuration."""


async def create_server(config: ServeConfig, engine: Engine, metrics=None, *, max_tokens: int | None = None):
    """A grpc.aio server with RewardService, grpc.health.v1 (NOT_SERVING until `set_serving`)
    and reflection, bound but not started. Returns (server, port, health_servicer)."""
    interceptors = [ErrorsAndMetricsInterceptor(metrics)]
    if config.server.require_token:
        token = env.auth_token()
        if not token:
            raise ConfigError("--server.require_token is set but $GRM_SERVE_TOKEN is empty; export the token first")
        interceptors.append(BearerTokenInterceptor(token))
    limit = config.limits.max_message_mb * 1024 * 1024
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0)])
    reward_pb2_grpc.add_RewardServiceServicer_to_server(
        RewardServicer(engine, config.limits, max_tokens or engine.info.max_tokens), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    address = f"{config.server.host}:{config.server.port}"
    if config.server.tls_cert:
        try:
            creds = grpc.ssl_server_credentials([(Path(config.server.tls_key).read_bytes(),
                                                  Path(config.server.tls_cert).read_bytes())])
        except OSError as exc:
            raise ConfigError(f"cannot read the TLS key or certificate: {exc}") from exc
    else:
        creds = None
    try:
        port = server.add_secure_port(address, creds) if config.server.tls_cert else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"could not bind {address}: is the port in use? ({exc})") from exc
    if port == 0:
        raise ConfigError(f"could not bind {address}: is the port in use?")
    return server, port, health_servicer


async def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)


__all__ = ["create_server", "set_serving", "ConfigError", "reward_pb2"]
