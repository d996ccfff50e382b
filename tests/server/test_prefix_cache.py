"""The radix prefix cache (server/engine/prefix_cache.py) on its own: no model."""

from __future__ import annotations

import torch

from grmserve.server.engine.prefix_cache import PrefixCache, common_head, common_length


def test_prefix_cache_evicts_least_recent_leaves_and_keeps_the_head():
    def state(n, value=0.0):
        return torch.full((2, 2, 1, n, 4), value)  # 64 bytes a token

    cache = PrefixCache(max_bytes=64 * 5)
    cache.pin_head((1, 2), state(2, 7.0))
    cache.insert((1, 2, 3, 4, 5), 2, state(3, 1.0))
    cache.insert((1, 2, 3, 9), 2, state(2, 2.0))  # splits (3, 4, 5) after 3: (3,) with (4, 5) and (9,) below
    assert len(cache) == 3 and cache.nbytes == 64 * 4
    n, parts = cache.match((1, 2, 3, 4, 5, 6))
    assert n == 5 and [p[0, 0, 0, :, 0].tolist() for p in parts] == [[7.0, 7.0], [1.0], [1.0, 1.0]]
    cache.insert((1, 2, 8, 8), 2, state(2, 3.0))  # over budget until trimmed
    assert cache.nbytes == 64 * 6
    cache.trim()  # (3, 9) is the least recently used leaf; (3,) still has a child, so it stays
    assert cache.nbytes == 64 * 5 and cache.stats.evictions == 1
    assert cache.match((1, 2, 3, 9))[0] == 3 and cache.match((1, 2, 3, 4, 5))[0] == 5
    cache.max_bytes = 0
    cache.trim()
    assert len(cache) == 0 and cache.nbytes == 0 and cache.match((1, 2, 3))[0] == 2  # the head stays
    cache.insert((1, 2, 3), 2, state(1))
    cache.clear()
    assert len(cache) == 0 and cache.match((1, 2, 3))[0] == 2
    cache.insert((1, 2, 3, 4), 3, state(1))  # continues a prefix that is gone: nothing stored
    assert len(cache) == 0


def test_common_length_and_common_head():
    assert common_length((3, 4, 5), [1, 2, 3, 4, 9], 2) == 2
    assert common_length((3,), [1, 2], 2) == 0
    assert common_head([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == [1, 2]
