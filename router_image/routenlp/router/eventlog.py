"""Durable routing event log: JSON lines in size-rotated segment files that the trainer reads.

Writer: `EventLogWriter.submit(event)` never blocks; a background thread takes batches off a bounded queue, appends
each batch with one write() and fsyncs it. A full queue drops the event and counts it (`dropped`, exported as
routenlp_event_log_dropped_total). A crash (kill -9) can lose the batch not yet fsynced and can leave the last line
of the open segment incomplete; every new writer starts a new segment, and readers skip a last line without its
newline, so a torn record never breaks a reader.

The writer cannot die quietly: every record serialises (text UTF-8 cannot hold, i.e. lone surrogates, is replaced
by U+FFFD and counted in `replaced`), a failed write is retried on a new segment, and a batch that still fails is
counted as dropped and marks the writer unhealthy (`failing`; the router's /readyz answers 503) until a write
succeeds again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .events import FeedbackEvent, RoutingEvent, label_acceptable, label_trust, random_sample_label, resolve_label

log = logging.getLogger("routenlp.router.eventlog")

SEGMENT_GLOB = "events-*.jsonl"
RETRY_DELAYS = (0.05, 0.25, 1.0)  # seconds before each retry of a failed batch write
_SURROGATES = re.compile("[\ud800-\udfff]")

# What the writer takes: an event model, or a plain JSON object (records the trainer writes itself).
Record = RoutingEvent | FeedbackEvent | dict[str, Any]


def encode_record(event: Record) -> tuple[bytes, bool]:
    """One JSON line (without newline) and whether text had to be replaced. Lone surrogates (which a client can send
    as JSON escapes or non-UTF-8 header bytes) cannot be encoded as UTF-8: they become U+FFFD rather than failing."""
    try:
        if isinstance(event, dict):
            text = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
        else:
            text = event.model_dump_json(by_alias=True, exclude_none=True)
        return text.encode(), False
    except (ValueError, TypeError):  # UnicodeEncodeError and pydantic's serialisation error are ValueErrors
        data = event if isinstance(event, dict) else event.model_dump(mode="json", by_alias=True, exclude_none=True)
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)
        return _SURROGATES.sub("\ufffd", text).encode("utf-8", "replace"), True


class EventLogWriter:
    """Append events to `<dir>/events-<start ns>-<pid>-<seq>.jsonl` (rotated at `segment_bytes`).

    `on_drop(n)` / `on_replace(n)`: called (from any thread) when n events are dropped / written with replaced text.
    """

    def __init__(self, directory: str | Path, max_queue: int = 10000, batch_size: int = 512,
                 flush_interval: float = 0.05, segment_bytes: int = 64 << 20,
                 on_drop: Callable[[int], object] | None = None, on_replace: Callable[[int], object] | None = None,
                 retry_delays: tuple[float, ...] = RETRY_DELAYS):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.batch_size, self.flush_interval, self.segment_bytes = batch_size, flush_interval, segment_bytes
        self.retry_delays = retry_delays
        self._q: queue.Queue[Record] = queue.Queue(maxsize=max_queue)
        self._on_drop, self._on_replace = on_drop, on_replace
        self.dropped = 0
        self.replaced = 0
        self.written = 0
        self.failing: str | None = None  # why the last batch could not be written; None while writes succeed
        self._seq = 0
        self._file: BinaryIO | None = None
        self._size = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eventlog", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        """Writing: the thread runs (or was stopped by close()) and the last batch reached the disk."""
        return self.failing is None and (self._thread.is_alive() or self._stop.is_set())

    def submit(self, event: Record) -> bool:
        """Queue one event; False (and counted as dropped) when the queue is full. Never blocks."""
        try:
            self._q.put_nowait(event)
            return True
        except queue.Full:
            self._drop(1)
            return False

    def _drop(self, n: int) -> None:
        self.dropped += n
        if self._on_drop is not None:
            self._on_drop(n)

    def _open_segment(self) -> None:
        self._close_segment()
        self._seq += 1
        name = f"events-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.jsonl"
        self._file = open(self.dir / name, "ab", buffering=0)
        self._size = 0
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _close_segment(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def _encode(self, batch: list[Record]) -> tuple[bytes, int]:
        """The batch's JSON lines and how many there are."""
        lines, replaced, bad = [], 0, 0
        for ev in batch:
            try:
                line, was_replaced = encode_record(ev)
            except Exception:  # not JSON-able at all (a caller's bug): drop this record, never the batch
                log.exception("event not serialisable; dropped")
                bad += 1
                continue
            lines.append(line)
            replaced += was_replaced
        if bad:
            self._drop(bad)
        if replaced:
            self.replaced += replaced
            if self._on_replace is not None:
                self._on_replace(replaced)
        return b"".join(line + b"\n" for line in lines), len(lines)

    def _write(self, data: bytes) -> None:
        if self._file is None or self._size >= self.segment_bytes:
            self._open_segment()
        assert self._file is not None  # opened just above
        self._file.write(data)
        os.fsync(self._file.fileno())
        self._size += len(data)

    def _write_with_retries(self, data: bytes, n: int) -> None:
        """Write one batch; on failure retry on a new segment (a half-written line stays the old segment's torn,
        skipped last line). A batch that cannot be written is counted as dropped and marks the writer failing."""
        for delay in (*self.retry_delays, None):
            try:
                self._write(data)
            except OSError as e:  # disk full, volume gone, read-only remount
                self._close_segment()
                if delay is not None:
                    time.sleep(delay)
                    continue
                if self.failing is None:
                    log.error("event log %s: write failed after %d retries (%s); events are being dropped",
                              self.dir, len(self.retry_delays), e)
                self.failing = f"{type(e).__name__}: {e}"
                self._drop(n)
                return
            if self.failing is not None:
                log.warning("event log %s: writing again", self.dir)
            self.failing = None
            self.written += n
            return

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
                data, n = self._encode(batch)
                if n:
                    self._write_with_retries(data, n)
            except Exception as e:  # never let the thread die: later events would queue up and be lost silently
                log.exception("event log writer error; batch dropped")
                self.failing = f"{type(e).__name__}: {e}"
                self._drop(len(batch))
            finally:
                for _ in batch:
                    self._q.task_done()
        self._close_segment()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is on disk (or dropped)."""
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
    trust: int = 0  # events.label_trust of the label in force
    labeller: str | None = None


def labelled_attempts(events: Iterable[RoutingEvent | FeedbackEvent],
                      require_random_sample: bool = False) -> list[LabelledAttempt]:
    """Join feedback to the attempts it labels (feedback.tier, default the request's final tier), one label per
    (request, tier) under the precedence the router applies online (`events.resolve_label`): labels are taken in time
    order, a later one replaces the label in force only from the same or a more trusted source, and untrusted labels
    (unauthenticated user feedback, old logs included) never count. With `require_random_sample`, keep only labels
    that are an unbiased sample of the attempts reaching a tier (`events.random_sample_label`)."""
    requests: dict[str, RoutingEvent] = {}
    feedback: list[FeedbackEvent] = []
    for ev in events:
        if isinstance(ev, RoutingEvent):
            requests[ev.request_id] = ev
        else:
            feedback.append(ev)
    # Time order, not segment order: several routers' segments interleave (the sort is stable for equal times).
    feedback.sort(key=lambda fb: fb.time)
    labels: dict[tuple[str, str], tuple[int, bool, FeedbackEvent]] = {}
    for fb in feedback:
        req = requests.get(fb.request_id)
        if req is None:
            continue
        key = (fb.request_id, fb.tier or req.final_tier or "")
        trust, ok = label_trust(fb), label_acceptable(fb)
        current = labels.get(key)
        if resolve_label(None if current is None else current[:2], trust, ok)[0]:
            labels[key] = (trust, ok, fb)
    out = []
    for (rid, tier), (trust, ok, fb) in labels.items():
        req = requests[rid]
        att = next((a for a in req.attempts if a.tier == tier), None)
        if att is None:
            continue
        if require_random_sample and not random_sample_label(req, att):
            continue
        out.append(LabelledAttempt(rid, req.time, req.task, tier, att.score, att.predicted, att.threshold,
                                   att.accepted, ok, fb.source, req.shadow, trust, fb.labeller))
    return out
