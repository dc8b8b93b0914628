"""Event log: round trip, drops instead of blocking, rotation, kill -9 of a writer process, unencodable text, write
failures, and the label join's precedence."""

import json
import os
import signal
import subprocess
import sys
import time

from routenlp.router.eventlog import EventLogWriter, labelled_attempts, read_events
from routenlp.router.events import FeedbackEvent, RoutingEvent, TierAttempt
from routenlp.router.events import JUDGE, LABELLER, UNTRUSTED, label_trust, resolve_label


def _ev(i, **kw):
    return RoutingEvent(request_id=f"r{i}", time=float(i), policy="p", task="t", query=f"q{i}", **kw)


def test_round_trip_rotation_and_torn_line(tmp_path):
    w = EventLogWriter(tmp_path, segment_bytes=2000, batch_size=10)
    for i in range(100):
        assert w.submit(_ev(i))
    w.submit(FeedbackEvent(request_id="r3", time=1.0, accepted=True))
    w.close()
    assert len(list(tmp_path.glob("events-*.jsonl"))) > 1  # rotated by size
    last = sorted(tmp_path.glob("events-*.jsonl"))[-1]
    with open(last, "ab") as f:
        f.write(b'{"type":"request","request_id":"torn","ti')  # a crash mid-line
    with open(sorted(tmp_path.glob("events-*.jsonl"))[0], "ab") as f:
        f.write(b"not json\n")  # garbage line: skipped
    evs = list(read_events(tmp_path))
    ids = [e.request_id for e in evs if isinstance(e, RoutingEvent)]
    assert ids == [f"r{i}" for i in range(100)]
    assert isinstance(evs[-1], FeedbackEvent)


def test_full_queue_drops_and_never_blocks(tmp_path):
    drops = []
    w = EventLogWriter(tmp_path, max_queue=5, on_drop=drops.append)
    w._stop.set()
    t0 = time.monotonic()
    results = [w.submit(_ev(i)) for i in range(5000)]
    assert time.monotonic() - t0 < 5  # generous: this is about not blocking, not speed
    assert results.count(False) == w.dropped == sum(drops) > 0
    w.close()


def test_labelled_attempts_join(tmp_path):
    att = [TierAttempt(tier="small", model="m", score=0.4, threshold=None),
           TierAttempt(tier="big", model="M", score=0.9, threshold=0.5, accepted=True)]
    evs = [_ev(1, attempts=att, final_tier="big", escalations=1), _ev(2, attempts=att[1:], final_tier="big"),
           FeedbackEvent(request_id="r1", time=2, tier="small", accepted=False, source="judge"),
           FeedbackEvent(request_id="r1", time=3, accepted=True, labeller="qa"),  # default: the final tier
           FeedbackEvent(request_id="r2", time=3, score=0.2, labeller="qa"),
           FeedbackEvent(request_id="unknown", time=3, accepted=True, labeller="qa")]
    rows = {(r.request_id, r.tier): r for r in labelled_attempts(evs)}
    assert set(rows) == {("r1", "small"), ("r1", "big"), ("r2", "big")}
    assert rows[("r1", "small")].acceptable is False and rows[("r1", "small")].score == 0.4
    assert rows[("r1", "big")].acceptable is True and rows[("r2", "big")].acceptable is False
    # only unbiased labels: attempts made while uncalibrated (or shadow-sampled requests)
    assert {(r.request_id, r.tier) for r in labelled_attempts(evs, require_random_sample=True)} == {("r1", "small")}


def test_label_precedence_labeller_over_judge_over_unauthenticated():
    """One precedence for the router's windows and the trainer's join: a later label replaces the one in force only
    from the same or a more trusted source; unauthenticated labels (old logs' user feedback too) never count."""
    assert label_trust(FeedbackEvent(request_id="r", time=0, accepted=True)) == UNTRUSTED
    assert label_trust(FeedbackEvent(request_id="r", time=0, accepted=True, source="shadow")) == JUDGE
    assert label_trust(FeedbackEvent(request_id="r", time=0, accepted=True, labeller="qa")) == LABELLER
    assert resolve_label(None, UNTRUSTED, True) == (False, False)
    assert resolve_label((JUDGE, False), UNTRUSTED, True) == (False, True)  # a conflict, counted, ignored
    assert resolve_label((JUDGE, False), LABELLER, True) == (True, True)
    assert resolve_label((LABELLER, False), JUDGE, True) == (False, True)
    assert resolve_label((LABELLER, False), LABELLER, True) == (True, True)  # a labeller correcting itself
    assert resolve_label((JUDGE, True), JUDGE, True) == (True, False)

    att = [TierAttempt(tier="small", model="m", score=0.4, threshold=None, accepted=True)]
    evs = [_ev(1, attempts=att, final_tier="small", explored=True), _ev(2, attempts=att, final_tier="small"),
           _ev(3, attempts=att, final_tier="small"),
           # r1: the judge says bad, an anonymous user then says good (the attack of issue 14): the judge's stands
           FeedbackEvent(request_id="r1", time=5, tier="small", accepted=False, source="shadow"),
           FeedbackEvent(request_id="r1", time=6, tier="small", accepted=True),
           # r2: a labeller's label, then the judge (logged later by another router, read earlier): labeller's stands
           FeedbackEvent(request_id="r2", time=9, tier="small", accepted=True, source="judge"),
           FeedbackEvent(request_id="r2", time=7, tier="small", accepted=False, labeller="qa"),
           # r3: only an old unauthenticated label: does not count at all
           FeedbackEvent(request_id="r3", time=7, tier="small", accepted=True)]
    rows = {r.request_id: r for r in labelled_attempts(evs)}
    assert set(rows) == {"r1", "r2"}
    assert (rows["r1"].acceptable, rows["r1"].trust, rows["r1"].source) == (False, JUDGE, "shadow")
    assert (rows["r2"].acceptable, rows["r2"].trust, rows["r2"].labeller) == (False, LABELLER, "qa")


# Lone surrogates: what json.loads makes of "\ud800" escapes and aiohttp of non-UTF-8 header bytes.
BAD = "\ud800x\udfff"


def test_unencodable_text_in_every_field_is_replaced_and_counted_and_later_events_land(tmp_path):
    replaced = []
    w = EventLogWriter(tmp_path, on_replace=replaced.append)
    att = TierAttempt(tier=BAD, model=BAD, response=BAD, error=BAD)
    w.submit(RoutingEvent(request_id=BAD, time=1.0, policy=BAD, task=BAD, query=BAD, router_version=BAD,
                          attempts=[att], final_tier=BAD, client=BAD))
    w.submit(FeedbackEvent(request_id=BAD, time=2.0, tier=BAD, accepted=True, reference_response=BAD,
                           labeller=BAD, client=BAD))
    w.submit({"type": "note", BAD: BAD})  # plain dicts too, keys included
    w.flush()
    for i in range(20):  # the writer is still alive: every later event lands
        w.submit(_ev(i))
    w.close()
    assert w.replaced == sum(replaced) == 3 and w.dropped == 0 and w.healthy
    lines = [json.loads(line) for p in sorted(tmp_path.glob("events-*.jsonl")) for line in p.read_bytes().splitlines()]
    assert len(lines) == 23
    assert lines[0]["query"] == "\ufffdx\ufffd" and lines[0]["attempts"][0]["response"] == "\ufffdx\ufffd"
    assert lines[1]["labeller"] == "\ufffdx\ufffd" and lines[2] == {"type": "note", "\ufffdx\ufffd": "\ufffdx\ufffd"}
    evs = list(read_events(tmp_path))
    assert [e.request_id for e in evs] == ["\ufffdx\ufffd"] * 2 + [f"r{i}" for i in range(20)]


def test_a_record_that_cannot_serialise_at_all_is_dropped_alone(tmp_path):
    w = EventLogWriter(tmp_path)
    loop = {}
    loop["self"] = loop  # a caller's bug: circular
    w.submit(_ev(1))
    w.submit(loop)
    w.submit(_ev(2))
    w.close()
    assert w.dropped == 1 and [e.request_id for e in read_events(tmp_path)] == ["r1", "r2"]


def test_write_failures_are_retried_counted_and_reported(tmp_path, monkeypatch):
    """A failing disk: the batch is retried (on a new segment), then counted as dropped and the writer reports
    itself failing (the router's /readyz turns 503); once writes succeed again it is healthy and keeps writing."""
    drops = []
    w = EventLogWriter(tmp_path, on_drop=drops.append, retry_delays=(0.01, 0.01))
    real_write, calls = EventLogWriter._write, []

    def broken(self, data):
        calls.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(EventLogWriter, "_write", broken)
    w.submit(_ev(1))
    w.flush()
    assert len(calls) == 3  # first try + 2 retries
    assert w.dropped == sum(drops) == 1 and not w.healthy and "No space left" in w.failing
    calls.clear()
    flaky = iter([True, False])  # fails once, then the retry succeeds

    def sometimes(self, data):
        if next(flaky, False):
            raise OSError(5, "I/O error")
        return real_write(self, data)

    monkeypatch.setattr(EventLogWriter, "_write", sometimes)
    w.submit(_ev(2))
    w.flush()
    assert w.healthy and w.dropped == 1
    w.submit(_ev(3))
    w.close()
    assert [e.request_id for e in read_events(tmp_path)] == ["r2", "r3"]


def test_the_writer_thread_survives_any_error(tmp_path, monkeypatch):
    w = EventLogWriter(tmp_path)
    monkeypatch.setattr(EventLogWriter, "_encode", lambda self, batch: 1 / 0)
    w.submit(_ev(1))
    w.flush()
    assert w._thread.is_alive() and not w.healthy and w.dropped == 1
    monkeypatch.undo()
    w.submit(_ev(2))
    w.close()
    assert [e.request_id for e in read_events(tmp_path)] == ["r2"]


CHILD = r"""
import sys, time
from routenlp.router.eventlog import EventLogWriter
from routenlp.router.events import RoutingEvent
w = EventLogWriter(sys.argv[1], batch_size=64, flush_interval=0.001)
i = 0
while True:
    for _ in range(50):
        w.submit(RoutingEvent(request_id=f"r{i}", time=0.0, policy="p", task="t", query="x" * 200))
        i += 1
    if i % 500 == 0:
        w.flush()
        print(i, flush=True)  # everything before i is on disk
"""


def test_kill_9_loses_at_most_the_unflushed_batch(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    flushed = 0
    try:
        while flushed < 3000:
            line = proc.stdout.readline()
            assert line, "writer process died"
            flushed = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    ids = [int(e.request_id[1:]) for e in read_events(tmp_path)]  # never raises on a torn tail
    assert ids == list(range(len(ids)))  # a prefix: no gap, no duplicate, no corrupt record
    assert len(ids) >= flushed
    # a new writer starts a new segment; old and new events are all readable
    w = EventLogWriter(tmp_path)
    w.submit(_ev(10**9))
    w.close()
    assert [e.request_id for e in read_events(tmp_path)][-1] == f"r{10**9}"
