"""`grm-ppo`: PPO for a causal-LM policy whose rollouts are scored remotely by grm-serve.

- config.py / presets.py: the `PPOConfig` tree and named configs (`tiny` runs on CPU in seconds).
- losses.py: GAE, clipped policy and value losses, KL estimators, whitening, the KL controller.
- rollout.py: prompts, the policy with its value head, sampling, remote scoring (overlapped, fault-aware).
- trainer.py: the loop, gold-reward evaluation, atomic checkpoints with exact resume.
- cli.py: the command line.
"""
