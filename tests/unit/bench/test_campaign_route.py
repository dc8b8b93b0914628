"""The campaign bench routes with the serving engine (router/engine.py) against an OpenAI-compatible student, and
the oracle reference in process: costs, acceptance, the event log and the student's labels come out as the bench
reads them."""

import asyncio
import threading

import pytest
from aiohttp import web

from routenlp.bench.campaign import PRICES, REFERENCE, STUDENT, route
from routenlp.local.banking77 import Example
from routenlp.router.artifacts import Calibration, RouterArtifact
from routenlp.router.confidence import ConfidenceSet
from routenlp.router.conformal import ThresholdResult


class Student:
    """A fake vLLM student: right on queries that mention 'card', wrong otherwise; confident when right."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.calls = 0
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self):
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return self.runner.addresses[0][1]

    async def _chat(self, request):
        body = await request.json()
        self.calls += 1
        query = body["messages"][-1]["content"]
        text, lp = ("card_arrival", -0.01) if "card" in query else ("wrong_label", -3.0)
        return web.json_response({"choices": [{"message": {"content": text},
                                               "logprobs": {"content": [{"token": text, "logprob": lp}]}}],
                                  "usage": {"prompt_tokens": 30, "completion_tokens": 3}})

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def student():
    s = Student()
    yield s
    s.close()


QUERIES = [Example("where is my card", "card_arrival"), Example("my card has not come", "card_arrival"),
           Example("exchange rate please", "exchange_rate"), Example("top up failed", "top_up_failed")]


class Writer:
    def __init__(self):
        self.events = []

    def submit(self, e):
        self.events.append(e)
        return True


def test_no_router_version_tries_the_student_and_escalates_everything(student):
    w = Writer()
    r = route(QUERIES, f"http://127.0.0.1:{student.port}/v1", "smol", None, None, w, label="t")
    assert student.calls == 4 and r["student_tried"] == 4 and r["student_share"] == 0
    assert r["quality"] == 1.0 and r["cost_reduction"] < 0  # paid the student and the reference
    reqs = [e for e in w.events if e.type == "request"]
    assert all([a.tier for a in e.attempts] == [STUDENT, REFERENCE] and e.explored for e in reqs)
    labels = sorted(e.accepted for e in w.events if e.type == "feedback")
    assert labels == [False, False, True, True]
    assert [s["acceptable"] for s in r["_signals"]] == [True, True, False, False]
    assert all(s["token_logprobs"] for s in r["_signals"])


def test_certified_student_answers_what_it_is_sure_of(student):
    cal = Calibration(0.1, 0.1, tasks={"banking77-intent": {STUDENT: ThresholdResult(0.5, 300, 100, 0.0, True)}},
                      risk_measure="allRequests")
    art = RouterArtifact("v1", None, ConfidenceSet(), cal, {})
    r = route(QUERIES, f"http://127.0.0.1:{student.port}/v1", "smol", art, None, None, label="t")
    assert r["student_share"] == 0.5 and r["quality"] == 1.0 and r["router_version"] == "v1"
    assert 0 < r["cost_reduction"] < 1 and PRICES[STUDENT] < PRICES[REFERENCE]


class Prior:
    """A router double: the student is predicted right on half the queries, the reference always."""

    def task_index(self, task):
        return 0

    def predict_proba(self, x, tasks):
        import numpy as np

        return np.tile([0.5, 1.0], (len(x), 1))


class Zeros:
    def encode(self, texts):
        import numpy as np

        return np.zeros((len(texts), 4), dtype=np.float32)


@pytest.mark.parametrize("floor,tried", [(0.95, 0), (0.9, 4), (None, 4)])
def test_a_floor_version_starts_requests_by_its_certified_rule_as_the_server_does(student, floor, tried):
    """The version's floor plan was certified with qualityTarget 0.9 for floor 0.95: with that floor in force the
    student (predicted 0.5 of the reference) is not started on, as RouterState.start_rule decides; another floor
    or none falls back to the bench's qualityTarget 0.1 and the student is tried on every query."""
    cal = Calibration(0.1, 0.1, tasks={"banking77-intent": {STUDENT: ThresholdResult(0.04, 300, 100, 0.0, True)}},
                      risk_measure="allRequests")
    meta = {"floor_certificates": {"banking77-intent": {"floor": 0.95, "scope": "task", "level": 0.04,
                                                        "start_rule": {"qualityTarget": 0.9}}}}
    art = RouterArtifact("v2-floor", Prior(), ConfidenceSet(), cal, meta)
    r = route(QUERIES, f"http://127.0.0.1:{student.port}/v1", "smol", art, Zeros(), None, quality_target=0.1,
              label="t", quality_floor=floor)
    assert r["student_tried"] == tried == student.calls
    assert r["quality"] == (1.0 if tried == 0 else 0.5)  # the student's wrong answers pass a 0.04 threshold
