"""Scoring engine: the model runner, the dynamic batcher and a fake engine for tests."""
