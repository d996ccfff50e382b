"""The `grm-serve` command as users run it: a real process, signals, exit codes, frozen flags."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import subprocess
import sys
import time

import grpc
import pytest

from grmserve.clients.reward_client import RewardClient, RewardServerError
from grmserve.server.config import cli_flags, parse_serve_args

from ..processes import start_grm_serve

FROZEN_FLAGS = [
    "--preset",
    "--model.checkpoint", "--model.precision", "--model.fp8_recipe", "--model.device", "--model.threads",
    "--model.compile",
    "--model.max_tokens", "--model.warmup",
    "--batch.max_batch_tokens", "--batch.max_batch_rows", "--batch.max_wait_ms", "--batch.max_delay_ms",
    "--batch.max_queue_pairs", "--batch.max_queue_seconds", "--batch.max_step_seconds",
    "--batch.prefix_cache_mib",
    "--limits.max_pairs_per_request", "--limits.max_candidates", "--limits.max_message_mb",
    "--server.host", "--server.port", "--server.metrics_port", "--server.metrics_host", "--server.http_port",
    "--server.http_host", "--server.tls_cert",
    "--server.tls_key", "--server.require_token", "--server.grace_seconds",
    "--log_level",
]


def test_cli_flags_are_frozen():
    """Changing a flag breaks users' deployment scripts: update this list (and the docs) on purpose."""
    assert cli_flags() == FROZEN_FLAGS


def test_cli_precedence_and_validation():
    cfg = parse_serve_args(["--preset", "local", "--server.port", "1234", "--model.compile", "true"])
    assert (cfg.server.host, cfg.server.port, cfg.model.compile) == ("127.0.0.1", 1234, True)
    with pytest.raises(SystemExit):
        parse_serve_args(["--model.precision", "fp16"])
    for bad in (["--batch.max_wait_ms", "80"], ["--batch.prefix_cache_mib", "-1"]):  # wait > max_delay (50)
        with pytest.raises((SystemExit, ValueError)):
            parse_serve_args(bad)
    cfg = parse_serve_args(["--batch.max_wait_ms", "80", "--batch.max_delay_ms", "100",
                            "--batch.prefix_cache_mib", "0"])
    assert (cfg.batch.max_wait_ms, cfg.batch.max_delay_ms, cfg.batch.prefix_cache_mib) == (80, 100, 0)


def test_sigterm_under_load_loses_no_accepted_request(tiny_checkpoint):
    proc, port = start_grm_serve(tiny_checkpoint, "--batch.max_batch_tokens", "2048")
    target = f"127.0.0.1:{port}"
    long_pairs = [(f"Prompt {i}: " + "lorem ipsum " * 60, " a long enough answer " * 10) for i in range(64)]
    try:
        with RewardClient(target) as c, cf.ThreadPoolExecutor(8) as pool:
            c.wait_ready(30)
            futures = [pool.submit(c.score, long_pairs) for _ in range(8)]
            time.sleep(0.5)  # requests are accepted and being computed
            proc.send_signal(signal.SIGTERM)
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(len(f.result(timeout=120)))
                except RewardServerError as exc:
                    outcomes.append(exc.code)
        # Every call either completed with all its scores or was refused before it was accepted.
        assert all(o == 64 or o in (grpc.StatusCode.UNAVAILABLE,) for o in outcomes), outcomes
        assert outcomes.count(64) >= 1
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "grmserve.server.cli", "--preset", "local", "--model.checkpoint",
                          str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "nope" in out.stderr and "not a checkpoint folder" in out.stderr


def test_port_in_use_is_a_clear_error(tiny_checkpoint):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "grmserve.server.cli", "--preset", "local", "--model.checkpoint",
                              str(tiny_checkpoint), "--model.warmup", "false", "--server.port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"127.0.0.1:{port}" in out.stderr and "in use" in out.stderr
