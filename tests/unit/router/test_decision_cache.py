"""The exact-match decision cache: keys, bounds, counters, and the router's use of it (over HTTP)."""

import numpy as np
import pytest
import torch

from routenlp.router.decision_cache import DecisionCache, normalise
from routenlp.router.difficulty import DifficultyRouter

from .fakes import FakeEncoder
from .test_server import TIERS, calibrated, stack_factory  # noqa: F401 (fixture)


def test_key_normalises_whitespace_and_case_only():
    k = DecisionCache.key
    assert normalise("  Where IS\tmy\n card? ") == "where is my card?"
    assert k("v1", "intent", "Where is my card?") == k("v1", "intent", "  where   IS my CARD? ")
    assert k("v1", "intent", "where is my card?") != k("v1", "intent", "where is my card")
    assert k("v1", "intent", "q") != k("v2", "intent", "q") != k("v1", "chat", "q")
    assert k("v1", "ab", "c") != k("v1", "a", "bc")  # parts cannot run into each other
    assert len(k("v1", "intent", "x" * 1_000_000)) == 16 and k("v1", "t", "\ud800") != k("v1", "t", "")


def test_lru_bound_counters_and_read_only_entries():
    class Count:
        def __init__(self):
            self.n = 0

        def inc(self):
            self.n += 1

    hits, misses = Count(), Count()
    c = DecisionCache(size=2, counters=(hits, misses))
    a, b, d = (DecisionCache.key("v", "t", q) for q in "abd")
    assert c.get(a) is None and c.hit_rate == 0.0
    c.put(a, np.array([0.1, 0.9]))
    c.put(b, np.array([0.2, 0.8]))
    assert c.get(a)[0] == 0.1  # a is now the most recently used
    c.put(d, np.array([0.3, 0.7]))  # evicts b, the least recently used
    assert len(c) == 2 and c.get(b) is None and c.get(d) is not None
    assert (c.hits, c.misses, hits.n, misses.n) == (2, 2, 2, 2) and c.hit_rate == 0.5
    with pytest.raises(ValueError):
        c.get(a)[0] = 1.0  # shared by every hit: read-only
    off = DecisionCache(size=0)
    off.put(a, np.array([1.0]))
    assert off.get(a) is None and len(off) == 0
    with pytest.raises(ValueError):
        DecisionCache(size=-1)


def test_router_answers_repeats_from_the_cache(stack_factory):
    torch.manual_seed(0)
    enc = FakeEncoder()
    s = stack_factory(artifacts=[("v1", {"router": DifficultyRouter(TIERS, ["intent", "chat"]),
                                         "calibration": calibrated()})], encoder=enc)
    state = s.state

    async def decide(q, task="intent"):
        return await state.decide(state.stable, task, q)

    run = s.live.run
    first = run(decide("Where is my refund?"))
    n = len(enc.batch_sizes)
    again = run(decide("  where IS my   refund? "))
    assert len(enc.batch_sizes) == n  # not encoded again
    np.testing.assert_array_equal(first, again)
    run(decide("Where is my refund?", task="chat"))  # another task: its own entry
    assert len(enc.batch_sizes) == n + 1
    assert s.metric("routenlp_decision_cache_hits_total", policy="support") == 1
    assert s.metric("routenlp_decision_cache_misses_total", policy="support") == 2
    # the budget switch (cheapest tier first) acts in the plan, after the prior: a cached prior serves it too
    state.prefer_cheaper = True
    np.testing.assert_array_equal(run(decide("where is my refund?")), first)
    # a request through the HTTP path counts as well
    status, _, _ = s.chat("WHERE is my refund?")
    assert status == 200 and s.metric("routenlp_decision_cache_hits_total", policy="support") == 3
