"""The reward server's configuration: one dataclass tree, from which the CLI is generated.

Precedence: command line > `--preset` > field defaults. Every field has a one-line docstring,
which becomes its `--help` text.

    >>> cfg = parse_serve_args(["--model.precision", "fp32", "--server.port", "0"])
    >>> cfg.model.precision, cfg.server.port
    ('fp32', 0)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable, Literal

from grmserve.protos import DEFAULT_MAX_MESSAGE_MB
from grmserve.training.core.configtools import add_config_arguments, apply_overrides, check_literals, iter_leaves
from grmserve.training.core.fp8.convert import RecipeName

Precision = Literal["auto", "fp8", "bf16", "fp32"]


@dataclass(kw_only=True)
class ModelConfig:
    """Which reward model to serve, and how to run it."""

    checkpoint: str = ""
    """Checkpoint folder (grm, grm-research or sequence-classification format); empty = the default model."""
    precision: Precision = "auto"
    """fp8 (float8 e4m3 weights), bf16, fp32, or auto: fp8 on CUDA ≥ sm89, bf16 where it is fast, else fp32."""
    fp8_recipe: RecipeName = "fp8-block64"
    """FP8 recipe for --model.precision fp8: fp8-block64, fp8-block128, fp8-channel (W8A8 on GPU) or fp8-tensor."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (cuda when available, else cpu)."""
    threads: int = 0
    """Intra-op threads for CPU inference; 0 = all cores."""
    compile: bool = False
    """torch.compile the model (slow start-up; fuses FP8 dequantisation on CPU). Packed passes
    change shape every step, so with them it recompiles until torch's recompile limit: about 20
    minutes of warm-up on 2 CPU cores, then no faster than eager in fp32."""
    max_tokens: int = 0
    """Longest prompt + response accepted, in tokens; 0 = the checkpoint's limit."""
    warmup: bool = True
    """Run one batch through the model before reporting SERVING."""


@dataclass(kw_only=True)
class BatchConfig:
    """The dynamic batcher."""

    max_batch_tokens: int = 16384
    """Token budget of one forward pass, padding included."""
    max_batch_rows: int = 64
    """Most sequences in one forward pass."""
    max_wait_ms: float = 5.0
    """A batch waits for company until no request has arrived for this long (see max_delay_ms)."""
    max_delay_ms: float = 50.0
    """The longest a batch waits for company while requests keep arriving, counted from when the
    model is free."""
    max_queue_pairs: int = 4096
    """Pairs waiting in the queue before new requests get RESOURCE_EXHAUSTED."""
    max_queue_seconds: float = 20.0
    """Also refuse new requests (RESOURCE_EXHAUSTED) when the queue holds more than this many seconds
    of work at the measured throughput, so that accepted work can finish within a drain; 0: no limit."""
    max_step_seconds: float = 5.0
    """Take at most this many seconds of queued work (at the measured throughput) into one step, so a
    step, and what a drain waits for, stays short on slow devices; 0: token budgets only."""
    prefix_cache_mib: int = 1024
    """KV states of token prefixes (prompts, and responses that open alike) kept across requests,
    least recently used out, in MiB; 0 keeps none (a prefix shared inside one batch still runs
    once, and the chat template's head is always kept)."""


@dataclass(kw_only=True)
class LimitsConfig:
    """Per-request limits (violations answer INVALID_ARGUMENT naming the field and the limit)."""

    max_pairs_per_request: int = 512
    """Most pairs in one Score call."""
    max_candidates: int = 128
    """Most responses in one ScoreCandidates call."""
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    """Largest gRPC message, in MiB."""


@dataclass(kw_only=True)
class NetConfig:
    """Ports, TLS and authentication."""

    host: str = "0.0.0.0"
    """Address the gRPC server binds."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    metrics_port: int = 9400
    """Prometheus /metrics HTTP port; 0 picks a free one, -1 disables."""
    metrics_host: str = "0.0.0.0"
    """Address the metrics endpoint binds."""
    http_port: int = -1
    """HTTP port for OpenRLHF's /get_reward and vLLM's /classify (same queue as gRPC); 0 picks one, -1 is off."""
    http_host: str = "0.0.0.0"
    """Address the HTTP door binds."""
    tls_cert: str = ""
    """PEM certificate chain; with tls_key, serve TLS."""
    tls_key: str = ""
    """PEM private key for tls_cert."""
    require_token: bool = False
    """Require `authorization: Bearer <token>` metadata; the token is read from $GRM_SERVE_TOKEN."""
    grace_seconds: float = 30.0
    """On SIGTERM: stop accepting, then wait this long for in-flight requests to finish."""


@dataclass(kw_only=True)
class ServeConfig:
    """grm-serve: the GRM reward server."""

    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    server: NetConfig = field(default_factory=NetConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level."""

    def validate(self) -> None:
        check_literals(self)
        if bool(self.server.tls_cert) != bool(self.server.tls_key):
            raise ValueError("--server.tls_cert and --server.tls_key go together")
        if not 0 <= self.batch.max_wait_ms <= self.batch.max_delay_ms:
            raise ValueError(f"need 0 ≤ --batch.max_wait_ms ({self.batch.max_wait_ms}) ≤ --batch.max_delay_ms "
                             f"({self.batch.max_delay_ms})")
        if self.batch.prefix_cache_mib < 0:
            raise ValueError(f"--batch.prefix_cache_mib must be ≥ 0, got {self.batch.prefix_cache_mib}")
        for name, value in (("batch.max_batch_tokens", self.batch.max_batch_tokens),
                            ("batch.max_batch_rows", self.batch.max_batch_rows),
                            ("batch.max_queue_pairs", self.batch.max_queue_pairs),
                            ("limits.max_pairs_per_request", self.limits.max_pairs_per_request),
                            ("limits.max_candidates", self.limits.max_candidates)):
            if value <= 0:
                raise ValueError(f"--{name} must be positive, got {value}")


# ---------------------------------------------------------------------------------------------
# Presets are functions returning a config; the CLI applies its flags on top.


def default() -> ServeConfig:
    """Production defaults."""
    return ServeConfig()


def local() -> ServeConfig:
    """Loopback only, random ports: for trying things out and for tests."""
    cfg = ServeConfig()
    cfg.server.host = "127.0.0.1"
    cfg.server.metrics_host = "127.0.0.1"
    cfg.server.http_host = "127.0.0.1"
    cfg.server.port = 0
    cfg.server.metrics_port = 0
    return cfg


PRESETS: dict[str, Callable[[], ServeConfig]] = {"default": default, "local": local}


# ---------------------------------------------------------------------------------------------
# CLI generated from the dataclasses (grmserve.training.core.configtools): one `--section.field` flag
# per leaf field.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grm-serve", description=(ServeConfig.__doc__ or "").strip())
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="named starting configuration")
    add_config_arguments(parser, ServeConfig)
    return parser


def parse_serve_args(argv: list[str] | None = None) -> ServeConfig:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    cfg = PRESETS[args.pop("preset")]()
    apply_overrides(cfg, args)
    try:
        cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return cfg


def cli_flags() -> list[str]:
    """Every CLI flag, for the test that freezes the public surface."""
    return ["--preset"] + [f"--{dotted}" for dotted, _, _ in iter_leaves(ServeConfig)]
