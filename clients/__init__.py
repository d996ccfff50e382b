"""Clients of the reward server: RewardClient, best-of-n, PPO."""
