"""Event log: round trip, drops instead of blocking, rotation, kill -9 of a writer process."""

import os
import signal
import subprocess
import sys
import time

from routenlp.router.eventlog import EventLogWriter, labelled_attempts, read_events
from routenlp.router.events import FeedbackEvent, RoutingEvent, TierAttempt


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
    w = EventLogWriter(tmp_path, max_queue=5, on_drop=lambda: drops.append(1))
    w._stop.set()
    t0 = time.monotonic()
    results = [w.submit(_ev(i)) for i in range(5000)]
    assert time.monotonic() - t0 < 5  # generous: this is about not blocking, not speed
    assert results.count(False) == w.dropped == len(drops) > 0
    w.close()


def test_labelled_attempts_join(tmp_path):
    att = [TierAttempt(tier="small", model="m", score=0.4, threshold=None),
           TierAttempt(tier="big", model="M", score=0.9, threshold=0.5, accepted=True)]
    evs = [_ev(1, attempts=att, final_tier="big", escalations=1), _ev(2, attempts=att[1:], final_tier="big"),
           FeedbackEvent(request_id="r1", time=2, tier="small", accepted=False, source="judge"),
           FeedbackEvent(request_id="r1", time=3, accepted=True),  # default: the final tier
           FeedbackEvent(request_id="r2", time=3, score=0.2),
           FeedbackEvent(request_id="unknown", time=3, accepted=True)]
    rows = {(r.request_id, r.tier): r for r in labelled_attempts(evs)}
    assert set(rows) == {("r1", "small"), ("r1", "big"), ("r2", "big")}
    assert rows[("r1", "small")].acceptable is False and rows[("r1", "small")].score == 0.4
    assert rows[("r1", "big")].acceptable is True and rows[("r2", "big")].acceptable is False
    # only unbiased labels: attempts made while uncalibrated (or shadow-sampled requests)
    assert {(r.request_id, r.tier) for r in labelled_attempts(evs, require_random_sample=True)} == {("r1", "small")}


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
