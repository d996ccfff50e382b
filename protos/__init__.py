"""Generated gRPC code for the versioned reward API (`grmserve.reward.v1`).

    >>> from grmserve.protos import reward_pb2
    >>> reward_pb2.ScoreRequest(
    ...     pairs=[reward_pb2.Pair(prompt=reward_pb2.Prompt(text="Hi"), response="Hello")]).pairs[0].response
    'Hello'
"""

from pathlib import Path

from .grmserve.reward.v1 import reward_pb2, reward_pb2_grpc

PROTO_FILE = Path(__file__).parent / "grmserve" / "reward" / "v1" / "reward.proto"
SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
DEFAULT_MAX_MESSAGE_MB = 64
"""Largest gRPC message either side sends or accepts by default, in MiB (the server's
`--limits.max_message_mb`; clients may pass their own)."""

__all__ = ["reward_pb2", "reward_pb2_grpc", "PROTO_FILE", "SERVICE_NAME", "DEFAULT_MAX_MESSAGE_MB"]
