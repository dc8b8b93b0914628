"""The cascade engine (router/engine.py): equal to the routing benchmark's array simulation on the same inputs, and
its handling of tier faults, client faults and deadlines, with in-process tiers (no sockets)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from routenlp.api.modeltier import TierCost
from routenlp.router import cascade
from routenlp.router.clients import CircuitBreaker, UpstreamError, UpstreamResult
from routenlp.router.confidence import ConfidenceSet
from routenlp.router.conformal import ThresholdResult
from routenlp.router.engine import CascadeEngine, Plan, TierInfo, classify, make_plan, redacted_message
from routenlp.router.protocol import parse_chat

MILLION = 1_000_000


class Port:
    """An in-process tier: `reply(query)` -> (status, body-or-None, retry_after) or raises UpstreamError."""

    def __init__(self, reply, clock=None):
        self.reply = reply
        self.breaker = CircuitBreaker(failures=1, reset_seconds=5.0, **({"clock": clock} if clock else {}))
        self.calls = 0
        self.timeouts: list[float | None] = []

    async def post(self, path, body, timeout=None):
        self.calls += 1
        self.timeouts.append(timeout)
        status, payload, retry_after = self.reply(body["messages"][-1]["content"])
        return UpstreamResult(status, payload, "", 0.001, retry_after)


def answer(text: str, logprob: float) -> dict:
    """An OpenAI chat response whose one token has `logprob` and whose usage makes cost = the tier's input price."""
    return {"choices": [{"message": {"role": "assistant", "content": text},
                         "logprobs": {"content": [{"token": text, "logprob": logprob}]}}],
            "usage": {"prompt_tokens": MILLION, "completion_tokens": 0}}


def engine_for(ports, prices):
    tiers = [TierInfo(f"t{k}", f"m{k}", TierCost(input_per_million=p, output_per_million=0))
             for k, p in enumerate(prices)]
    return CascadeEngine(tiers, ports)


def thr(value):
    return None if value is None or math.isnan(value) else ThresholdResult(float(value), 100, 50, 0.0, True)


def run(engine, query, plan, deadline=None):
    req = parse_chat({"messages": [{"role": "user", "content": query}]})
    return asyncio.run(engine.run(req, "task", False, plan, ConfidenceSet(), deadline))


@pytest.mark.parametrize("middle", [0.8, np.nan])  # NaN: the middle tier is uncertified, so the plan skips it
def test_engine_equals_the_array_simulation(middle):
    """Same scores, thresholds, starts and costs: the engine and `cascade.simulate_cascade` call the same tiers,
    return the same tier, pay the same cost and get the same quality, query by query."""
    rng = np.random.default_rng(7)
    n, K = 300, 3
    scores = rng.uniform(0.05, 1, (n, K))
    quality = (rng.uniform(size=(n, K)) < [0.5, 0.7, 0.9]).astype(float)
    prices = [1.0, 4.0, 20.0]
    thresholds = np.array([0.6, middle, np.nan])
    prior = rng.uniform(size=(n, K))
    qt = 0.9
    ports = [Port(lambda q, k=k: (200, answer(f"{q}:{k}", math.log(scores[int(q), k])), None)) for k in range(K)]
    eng = engine_for(ports, prices)
    sim = cascade.simulate_cascade(cascade.start_tiers(prior, qt, cascade.usable_tiers(thresholds)), scores, quality,
                                   np.tile(prices, (n, 1)), np.tile(thresholds, (n, 1)), max_escalations=K - 1)
    for i in range(n):
        plan = make_plan(prior[i], qt, [thr(t) for t in thresholds], [True] * K, K - 1)
        out = run(eng, str(i), plan)
        assert out.final == sim.tier[i], i
        assert sum(a.cost_usd for a in out.attempts) == pytest.approx(sim.cost[i]), i
        assert quality[i, out.final] == sim.quality[i]
        assert [eng.tiers.index(next(t for t in eng.tiers if t.name == a.tier)) for a in out.attempts] == \
            list(np.flatnonzero(sim.called[i])), i
        assert (out.outcome == "accepted") == bool(sim.accepted[i])


@pytest.mark.parametrize("status", [401, 403, 404, 429, 500, 503])
def test_a_faulty_cheaper_tier_escalates_and_counts_on_its_breaker(status):
    ports = [Port(lambda q: (status, {"error": {"message": "key sk-abcdefghijklmnopqrstuvwx invalid"}}, None)),
             Port(lambda q: (200, answer("refund", -0.01), None))]
    eng = engine_for(ports, [1, 10])
    plan = make_plan(None, 0.9, [thr(0.5), None], [True, True], 1)
    out = run(eng, "q", plan)
    assert out.final == 1 and out.outcome == "accepted" and out.client_fault is None
    assert out.attempts[0].error == f"HTTP {status}" and "sk-" not in out.attempts[0].error
    assert ports[0].breaker.is_open  # failures=1 in these ports


def test_malformed_200_is_a_tier_fault():
    ports = [Port(lambda q: (200, None, None)), Port(lambda q: (200, answer("refund", -0.01), None))]
    eng = engine_for(ports, [1, 10])
    out = run(eng, "q", make_plan(None, 0.9, [thr(0.5), None], [True, True], 1))
    assert out.final == 1 and out.attempts[0].error == "malformed response" and ports[0].breaker.is_open


def test_retry_after_holds_the_breaker_open_that_long():
    now = [0.0]
    ports = [Port(lambda q: (429, {}, 120.0), clock=lambda: now[0]), Port(lambda q: (200, answer("x", -0.01), None))]
    eng = engine_for(ports, [1, 10])
    run(eng, "q", make_plan(None, 0.9, [thr(0.5), None], [True, True], 1))
    now[0] = 60.0
    assert ports[0].breaker.is_open and not ports[0].breaker.allow()  # reset_seconds (5) alone would have let it by
    now[0] = 121.0
    assert ports[0].breaker.allow()


def test_client_fault_of_the_end_tier_goes_back_redacted():
    body = {"error": {"message": "max_tokens too large for key sk-abcdefghijklmnopqrstuvwxyz0123"}}
    ports = [Port(lambda q: (400, body, None)), Port(lambda q: (400, body, None))]
    eng = engine_for(ports, [1, 10])
    out = run(eng, "q", make_plan(None, 0.9, [thr(0.5), None], [True, True], 1))
    # the cheaper tier's 400 escalates (its context may be shorter); the end tier's 400 is the client's
    assert out.client_fault is not None and out.client_fault.status == 400 and ports[1].calls == 1
    msg = redacted_message(out.client_fault)
    assert "max_tokens too large" in msg and "sk-abc" not in msg and "[redacted]" in msg
    assert not ports[0].breaker.is_open and not ports[1].breaker.is_open


def test_classify():
    ok = UpstreamResult(200, answer("a", -1), "", 0.0)
    assert classify(ok, False) == "answer"
    assert classify(UpstreamResult(200, {"choices": []}, "", 0.0), True) == "tier_fault"
    assert classify(UpstreamResult(422, None, "", 0.0), True) == "client_fault"
    assert classify(UpstreamResult(422, None, "", 0.0), False) == "escalate"
    assert classify(UpstreamResult(404, None, "", 0.0), True) == "tier_fault"


def test_deadline_stops_escalation_and_cuts_call_timeouts():
    now = [0.0]

    def slow_reject(q):
        now[0] += 3.0  # each call takes 3 s of the budget
        return 200, answer("card", math.log(0.1)), None

    ports = [Port(slow_reject), Port(slow_reject), Port(lambda q: (200, answer("ok", -0.01), None))]
    eng = engine_for(ports, [1, 2, 10])
    eng.clock = lambda: now[0]
    out = run(eng, "q", make_plan(None, 0.9, [thr(0.5), thr(0.5), None], [True] * 3, 2), deadline=5.0)
    assert ports[0].timeouts == [5.0] and ports[1].timeouts == [2.0] and ports[2].calls == 0
    assert out.deadline_exceeded and out.outcome == "fallback" and out.final == 1


def test_transport_error_falls_back_to_the_highest_tier_up():
    def refuse(q):
        raise UpstreamError("t1: ClientConnectorError")

    class Refusing(Port):
        async def post(self, path, body, timeout=None):
            self.calls += 1
            self.breaker.failure()
            refuse(None)

    ports = [Port(lambda q: (200, answer("card", math.log(0.1)), None)), Refusing(None),
             Port(lambda q: (200, answer("ok", -0.01), None))]
    eng = engine_for(ports, [1, 2, 10])
    plan = Plan(None, 0, [0, 1], [0.5, 0.5, None], end=2)  # a plan cut short by max_escalations=1
    out = run(eng, "q", plan)
    assert out.final == 2 and [a.tier for a in out.attempts] == ["t0", "t1", "t2"]
    assert out.attempts[1].error.startswith("t1:")
