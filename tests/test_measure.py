import time

import torch

from graphred.measure import median_times, speedup


def test_median_times_alternate_and_rank_a_slower_callable():
    calls = []

    def slow(x):
        calls.append("a")
        time.sleep(0.004)
        return x

    def fast(x):
        calls.append("b")
        return x

    ta, tb = median_times(slow, fast, {"x": torch.ones(1)}, rounds=3)
    assert ta > tb > 0
    assert calls == ["a", "b"] * 4  # one warm-up each, then alternating
    assert speedup(slow, fast, {"x": torch.ones(1)}, rounds=3) > 1
