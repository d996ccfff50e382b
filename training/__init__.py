"""Training: the shared core (`core/`: model, checkpoints, prompts, FP8, used by the server too) and the
drivers on top of it (config, presets, one training step, losses, data, grm-train, grm-experiment,
grm-eval, grm-quantize, the bundled benchmark). Importing this package imports nothing else."""
