"""`grm-serve`: run the GRM reward server.

    $ grm-serve                                              # the default model, port 50051, precision auto
    $ grm-serve --model.checkpoint runs/my-grm --model.precision fp8 --server.port 8001
    $ GRM_SERVE_TOKEN=s3cret grm-serve --server.require_token true
    $ grm-serve --server.http_port 8000                      # plus OpenRLHF's /get_reward and vLLM's /classify

SIGTERM or Ctrl-C: report NOT_SERVING, refuse new calls, hand queued calls that have not started back
at once (UNAVAILABLE: clients retry elsewhere), finish the step in progress, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from grmserve.training.core.checkpoint import CheckpointError
from grmserve.training.core.configtools import fail
from grmserve.training.core.devices import DeviceError

from .app import RewardServer
from .config import parse_serve_args
from .rpc.server import ConfigError


async def serve(config) -> int:
    app = RewardServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    http = f"; HTTP (/get_reward, /classify) on :{app.http_port}" if app.http_port is not None else ""
    print(f"grm-serve: serving {app.engine.info.model_name} ({app.engine.info.precision}) on "
          f"{config.server.host}:{app.port}; metrics on :{app.metrics_port}{http}", flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down: draining in-flight requests")
    await app.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    config = parse_serve_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(config))
    except (CheckpointError, ConfigError, DeviceError) as exc:
        return fail("grm-serve", exc)


if __name__ == "__main__":
    raise SystemExit(main())
