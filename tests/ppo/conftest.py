"""grm-ppo's tests: tiny models on one thread (two OpenMP threads on a shared two-core machine wait
on each other), reward servers on loopback ports."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
