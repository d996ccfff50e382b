"""`python -m grmserve.clients.healthcheck [TARGET]`: exit 0 when a reward server reports SERVING
on grpc.health.v1, else 1; prints the status. For container HEALTHCHECKs and scripts (imports grpc
and the generated protos only, no torch: it answers in well under a second).

    $ python -m grmserve.clients.healthcheck 127.0.0.1:50051
    SERVING
    $ python -m grmserve.clients.healthcheck 127.0.0.1:50052 --timeout 2
    UNREACHABLE 127.0.0.1:50052: UNAVAILABLE: failed to connect to all addresses; ...
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grmserve.protos import SERVICE_NAME


def health_status(target: str, *, service: str = SERVICE_NAME, timeout: float = 3.0) -> str:
    """The server's grpc.health.v1 status name for `service` (SERVING, NOT_SERVING, ...).
    Raises grpc.RpcError when the server cannot be reached within `timeout` seconds."""
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grmserve.clients.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="host:port of the gRPC server")
    parser.add_argument("--service", default=SERVICE_NAME, help="health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
    args = parser.parse_args(argv)
    try:
        status = health_status(args.target, service=args.service, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"UNREACHABLE {args.target}: {exc.code().name}: {exc.details()}")
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
