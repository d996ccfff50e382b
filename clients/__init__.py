"""Clients of the reward server: `RewardClient` and `AsyncRewardClient` (grpc and the protos only).

    >>> from grmserve.clients import RewardClient
    >>> RewardClient.__module__
    'grmserve.clients.reward_client'
"""

from grmserve.clients.reward_client import AsyncRewardClient, RetryPolicy, RewardClient, RewardServerError

__all__ = ["AsyncRewardClient", "RetryPolicy", "RewardClient", "RewardServerError"]
