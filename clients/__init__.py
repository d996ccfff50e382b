"""Clients of the reward server: `RewardClient` and `AsyncRewardClient` (grpc and the protos only)."""
