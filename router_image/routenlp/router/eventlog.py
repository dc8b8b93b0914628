"""Durable routing event log: JSON lines in size-rotated segment files that the trainer reads.

Writer: `EventLogWriter.submit(event)` never blocks; a background thread takes batches off a bounded queue, appends
each batch with one write() and fsyncs it. A full queue drops the event and counts it (`dropped`, exported as
routenlp_event_log_dropped_total). A crash (kill -9) can lose the batch not yet fsynced and can leave the last line
of the open segment incomplete; every new writer starts a new segment, and readers skip a last line without its
newline, so a torn record never breaks a reader.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .events import FeedbackEvent, RoutingEvent, random_sample_label

SEGMENT_GLOB = "events-*.jsonl"


class EventLogWriter:
    """Append events to `<dir>/events-<start ns>-<pid>-<seq>.jsonl` (rotated at `segment_bytes`)."""

    def __init__(self, directory: str | Path, max_queue: int = 10000, batch_size: int = 512,
                 flush_interval: float = 0.05, segment_bytes: int = 64 << 20, on_drop=None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.batch_size, self.flush_interval, self.segment_bytes = batch_size, flush_interval, segment_bytes
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._on_drop = on_drop
        self.dropped = 0
        self.written = 0
        self._seq = 0
        self._file = None
        self._size = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eventlog", daemon=True)
        self._thread.start()

    def submit(self, event: RoutingEvent | FeedbackEvent | dict) -> bool:
        """Queue one event; False (and counted as dropped) when the queue is full. Never blocks."""
        try:
            self._q.put_nowait(event)
            return True
        except queue.Full:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            return False

    def _open_segment(self) -> None:
        if self._file is not None:
            self._file.close()
        self._seq += 1
        name = f"events-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.jsonl"
        self._file = open(self.dir / name, "ab", buffering=0)
        self._size = 0
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _write(self, batch: list) -> None:
        lines = []
        for ev in batch:
            if isinstance(ev, dict):
                lines.append(json.dumps(ev, separators=(",", ":")))
            else:
                lines.append(ev.model_dump_json(by_alias=True, exclude_none=True))
        data = ("\n".join(lines) + "\n").encode()
        if self._file is None or self._size >= self.segment_bytes:
            self._open_segment()
        self._file.write(data)
        os.fsync(self._file.fileno())
        self._size += len(data)
        self.written += len(batch)

    def _run(self) -> None:
        while True:
            try:
                first = self._q.get(timeout=self.flush_interval)
            except queue.Empty:
                if self._stop.is_set():
                    break
                continue
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._q.get_nowait())
                except queue.Empty:
                    break
            try:
                self._write(batch)
            except OSError:  # disk full / volume gone: count as dropped, keep the router serving
                self.dropped += len(batch)
            finally:
                for _ in batch:
                    self._q.task_done()
        if self._file is not None:
            self._file.close()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is on disk."""
        deadline = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        """Flush and stop the writer thread."""
        self.flush()
        self._stop.set()
        self._thread.join(timeout=10)


def parse_event(line: bytes | str) -> RoutingEvent | FeedbackEvent | None:
    """One event from one JSON line; None for a line that is not a valid event."""
    try:
        d = json.loads(line)
        if d.get("type") == "feedback":
            return FeedbackEvent.model_validate(d)
        return RoutingEvent.model_validate(d)
    except (ValueError, AttributeError, TypeError):
        return None


def read_events(directory: str | Path, since_segment: str | None = None) -> Iterator[RoutingEvent | FeedbackEvent]:
    """Every complete event in segment order. A last line without newline (torn by a crash, or being written right
    now) and lines that do not parse are skipped, never raised."""
    d = Path(directory)
    if not d.is_dir():
        return
    for seg in sorted(d.glob(SEGMENT_GLOB)):
        if since_segment is not None and seg.name < since_segment:
            continue
        with open(seg, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            continue
        for line in data[: end + 1].splitlines():
            if line.strip():
                ev = parse_event(line)
                if ev is not None:
                    yield ev


@dataclass(frozen=True)
class LabelledAttempt:
    """One tier answer with a label: the calibration/training unit."""

    request_id: str
    time: float
    task: str
    tier: str
    score: float | None
    predicted: float | None
    threshold: float | None
    accepted_by_router: bool
    acceptable: bool
    source: str
    shadow: bool


def labelled_attempts(events, require_random_sample: bool = False) -> list[LabelledAttempt]:
    """Join feedback to the attempts it labels (feedback.tier, default the request's final tier). Later feedback on
    the same (request, tier) wins. With `require_random_sample`, keep only labels that are an unbiased sample of the
    attempts reaching a tier (`events.random_sample_label`)."""
    requests: dict[str, RoutingEvent] = {}
    feedback: list[FeedbackEvent] = []
    for ev in events:
        if isinstance(ev, RoutingEvent):
            requests[ev.request_id] = ev
        else:
            feedback.append(ev)
    labels: dict[tuple[str, str], FeedbackEvent] = {}
    for fb in feedback:  # in log order: a later label of the same attempt wins
        req = requests.get(fb.request_id)
        if req is not None:
            labels[(fb.request_id, fb.tier or req.final_tier or "")] = fb
    out = []
    for (rid, tier), fb in labels.items():
        req = requests[rid]
        att = next((a for a in req.attempts if a.tier == tier), None)
        if att is None:
            continue
        ok = fb.accepted if fb.accepted is not None else (fb.score is not None and fb.score >= 0.5)
        if require_random_sample and not random_sample_label(req, att):
            continue
        out.append(LabelledAttempt(rid, req.time, req.task, tier, att.score, att.predicted, att.threshold,
                                   att.accepted, bool(ok), fb.source, req.shadow))
    return out
