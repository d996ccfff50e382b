"""Training tests run their tiny models on one thread: on a shared two-core machine, two OpenMP
threads wait on each other (a tiny step went from ~0.1 s to over 1 s under load)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
