"""grm-ppo's tests: tiny models on one thread, like the training tests (two OpenMP threads on a
shared two-core machine wait on each other); reward servers on loopback ports."""

from ..training.conftest import one_thread  # noqa: F401  (autouse fixture)
