"""Rollout figures outlive a router process: restored by the pod's next container, adopted from routers that are gone,
never counted twice (figures_store.py)."""

import json

import pytest

from routenlp.router.figures_store import ORPHAN_SECONDS, FiguresStore
from routenlp.router.figures import RolloutFigures
from routenlp.router.server import STATE, build_app

from .fakes import FakeEncoder
from .live import request
from .test_rollout_figures import Clock
from .test_server import calibrated, stack_factory  # noqa: F401  (fixture)


def busy(clock, versions=("v1", None), n=3, usd=1.0):
    """Figures with `n` answered requests on the stable version, one label, `usd` spent per request."""
    f = RolloutFigures(clock, risk_measure="allRequests")
    f.set_versions(*versions)
    for _ in range(n):
        f.answered(versions[0], True, False, 10.0)
        f.spent(versions[0], usd)
    f.label(versions[0], False, accepted=True, sampled=True)
    return f


def test_snapshot_absorb_round_trip_and_take_back():
    clock = Clock()
    a = busy(clock)
    b = RolloutFigures(clock, risk_measure="allRequests")
    b.set_versions("v1", None)
    clock.t += 60
    b.answered("v1", False, True, 10.0)
    b.absorb(json.loads(json.dumps(a.snapshot())))  # through JSON, as on disk
    s = b.answer()["stable"]
    assert (s["requests"], s["accepted"], s["escalations"], s["sampledViolations"]) == (4, 3, 1, 1)
    assert s["since"] == a.answer()["stable"]["since"]  # the earliest start
    assert b.answer()["spentUsd24h"] == pytest.approx(3.0)
    b.absorb(a.snapshot(), sign=-1)
    s = b.answer()["stable"]
    assert (s["requests"], s["sampled"], b.answer()["spentUsd24h"]) == (1, 0, pytest.approx(0.0))
    # a version this router no longer keeps is history: not added
    c = RolloutFigures(clock)
    c.set_versions("v2", None)
    c.absorb(a.snapshot())
    assert c.answer()["stable"]["requests"] == 0 and c.answer()["spentUsd24h"] == pytest.approx(3.0)


def test_the_next_container_of_a_pod_restores_its_figures(tmp_path):
    clock = Clock()
    store = FiguresStore(tmp_path, slot="router-abc-1", clock=clock)
    assert store.take_own() is None  # first start: nothing to restore
    assert store.adopted_meanwhile() is None  # nothing written yet, nothing adopted
    store.write(busy(clock).snapshot())
    # the container crashes; the next one (same pod name, pid 1) restores and carries on
    again = FiguresStore(tmp_path, slot="router-abc-1", clock=clock)
    f = RolloutFigures(clock)
    f.set_versions("v1", None)
    f.absorb(again.take_own())
    assert f.answer()["stable"]["requests"] == 3 and f.answer()["spentUsd24h"] == pytest.approx(3.0)
    again.write(f.snapshot())
    assert again.adopted_meanwhile() is None


def test_gone_routers_are_adopted_once_released_or_stale(tmp_path):
    clock = Clock()
    for slot, released in (("gone-released", True), ("alive", False), ("crashed", False)):
        FiguresStore(tmp_path, slot=slot, clock=clock).write(busy(clock).snapshot(), released=released)
    clock.t += 10
    FiguresStore(tmp_path, slot="alive", clock=clock).write(busy(clock).snapshot())  # still writing
    a, b = FiguresStore(tmp_path, slot="a", clock=clock), FiguresStore(tmp_path, slot="b", clock=clock)
    assert [s["slot"] for s in a.take_orphans()] == ["gone-released"]
    assert b.take_orphans() == []  # claimed by a: never added twice
    clock.t += ORPHAN_SECONDS  # "crashed" (written at t0) and now "alive" (t0 + 10) are not quite both stale
    assert [s["slot"] for s in b.take_orphans()] == ["crashed"]
    clock.t += 10
    assert [s["slot"] for s in a.take_orphans()] == ["alive"]
    assert sorted(p.name for p in (tmp_path / "rollout-figures").iterdir()) == []


def test_a_stalled_router_whose_figures_were_adopted_counts_nothing_twice(tmp_path):
    clock = Clock()
    store = FiguresStore(tmp_path, slot="slow", clock=clock)
    slow = busy(clock, n=3)
    store.write(slow.snapshot())
    clock.t += ORPHAN_SECONDS + 1  # stalled: another router takes it for dead
    other = busy(clock, n=0)
    for snap in FiguresStore(tmp_path, slot="other", clock=clock).take_orphans():
        other.absorb(snap)
    slow.answered("v1", True, False, 10.0)  # it wakes up and serves one more request
    gone = store.adopted_meanwhile()  # its snapshot is gone: the other router holds those counts now
    assert gone is not None and store.adopted_meanwhile() is None  # taken back once
    slow.absorb(gone, sign=-1)
    store.write(slow.snapshot())
    total = slow.answer()["stable"]["requests"] + other.answer()["stable"]["requests"]
    assert total == 4 and slow.answer()["stable"]["requests"] == 1


def test_an_unreadable_snapshot_is_set_aside(tmp_path):
    d = tmp_path / "rollout-figures"
    d.mkdir()
    (d / "torn.json").write_text('{"slot": "torn", "upd')
    assert FiguresStore(tmp_path, slot="a").take_orphans() == []
    assert [p.name for p in d.iterdir()] == ["torn.json.bad"]


def test_router_figures_survive_a_restart_and_a_replaced_pod_over_http(stack_factory):
    """The first router answers requests and shuts down cleanly; a router in its place (same slot: the pod's next
    container) serves the same counts; a router of another pod on the same volume adopts them once that one is gone."""
    s = stack_factory(artifacts=[("v1", {"router": None, "calibration": calibrated()})], router={"current": "v1"})
    for text in ("refund easy", "refund medium", "refund hard"):
        assert s.chat(text)[0] == 200
    before_all = _figures(s.port)
    before = before_all["stable"]
    assert before["requests"] == 3
    s.live.stop(len(s.live.runners) - 1)  # the router (served last), cleanly: its figures are written, released

    def start(slot=None):
        app = build_app(s.config, encoder=FakeEncoder())
        if slot is not None:
            app[STATE].figures_store = FiguresStore(s.config.event_log_dir, slot=slot)
        return app, s.live.serve(app)

    app, port = start()  # same process: same slot, as the pod's next container
    after = _figures(port)
    keys = ("requests", "escalations", "spentUsd", "referenceCostUsd", "since")
    assert {k: after["stable"][k] for k in keys} == {k: before[k] for k in keys}
    assert after["spentUsd24h"] == pytest.approx(before_all["spentUsd24h"])
    assert request(port, "POST", "/v1/chat/completions",
                   {"model": "support-intent", "messages": [{"role": "user", "content": "refund easy"}]})[0] == 200
    s.live.stop(len(s.live.runners) - 1)
    _, port_b = start(slot="another-pod")  # a new pod: adopts the released figures at start-up
    assert _figures(port_b)["stable"]["requests"] == 4


def _figures(port):
    status, _, body = request(port, "GET", "/routenlp/rollout")
    assert status == 200
    return json.loads(body)
