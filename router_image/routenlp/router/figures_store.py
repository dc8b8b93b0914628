"""Rollout figures that outlive a router process: one snapshot file per process on the event-log volume.

The operator's canary guard and budget read the counters of `rollout.RolloutFigures` from every router pod. Kept
only in memory, a crash-looping container would reset the spend the budget compares (and let spending restart from
zero) and a rolled Deployment would forget a canary's labels. So each process writes its counters, every few seconds,
to `<event_log_dir>/rollout-figures/<slot>.json` (write to a temporary file, then rename: a crash never leaves a
torn snapshot), with slot = `<hostname>-<pid>`:

- a restarted container of the same pod has the same hostname (the pod name) and pid (1, the container's first
  process), so it finds its own snapshot and restores it;
- a process that is gone for good (pod deleted, scaled down, rolled) leaves its snapshot behind; another router of
  the policy adopts it: at once when it was released by a clean shutdown, or once it has not been rewritten for
  `ORPHAN_SECONDS` (it crashed; well above the liveness probe's kill window, so a live process is never taken for
  dead). Adoption claims the file with an atomic rename, so two routers never both add it;
- should a live process find its snapshot adopted anyway (it stalled beyond `ORPHAN_SECONDS`), it takes back what
  that snapshot held before writing again, so nothing is counted twice.

What can be lost: the counts of the last save interval (`SAVE_SECONDS`, checked on the router's reload tick) before a crash (the event log still holds the requests).
A later correction of a label written before a restart counts as one more label instead of replacing it.

The store only moves files (callers run it off the event loop); `RolloutFigures.snapshot/absorb` do the counting.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("routenlp.router")

SNAPSHOT_DIR = "rollout-figures"
SAVE_SECONDS = 5.0
ORPHAN_SECONDS = 300.0
ADOPT_SECONDS = 30.0  # how often a running router looks for snapshots of routers that went away


class FiguresStore:
    def __init__(self, event_log_dir: str | Path, slot: str | None = None, clock: Callable[[], float] = time.time):
        self.dir = Path(event_log_dir) / SNAPSHOT_DIR
        self.slot = slot or f"{socket.gethostname()}-{os.getpid()}"
        self.path = self.dir / f"{self.slot}.json"
        self.clock = clock
        self.written: dict[str, Any] | None = None  # what our snapshot file holds (an adopter adds exactly this)

    def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            doc = json.loads(path.read_text())
            if isinstance(doc, dict):
                return doc
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        log.warning("rollout figures snapshot %s unreadable; set aside as %s.bad", path, path.name)
        try:
            os.replace(path, path.with_name(path.name + ".bad"))
        except OSError:
            pass
        return None

    def _claim(self, path: Path) -> dict[str, Any] | None:
        """Take a snapshot file over: rename it (atomic: of several routers one wins, the others find it gone), read
        what was claimed (the owner may have rewritten it since it was judged orphaned), delete it."""
        claimed = path.with_name(f"{path.name}.claimed-by-{self.slot}")
        try:
            os.replace(path, claimed)
        except FileNotFoundError:
            return None
        snap = self._read(claimed)
        claimed.unlink(missing_ok=True)
        return snap

    def take_own(self) -> dict[str, Any] | None:
        """This slot's snapshot, left by the previous container of this pod (claimed like an adoption: a released
        snapshot may be adopted by another router at the same moment)."""
        snap = self._claim(self.path)
        if snap is not None:
            log.info("rollout figures restored from %s", self.path.name)
        return snap

    def take_orphans(self) -> list[dict[str, Any]]:
        """The snapshots of routers that are gone: released, or not rewritten for ORPHAN_SECONDS."""
        if not self.dir.is_dir():
            return []
        now, out = self.clock(), []
        for path in sorted(self.dir.glob("*.json")):
            if path == self.path:
                continue
            snap = self._read(path)
            if snap is None or not (snap.get("released") or now - float(snap.get("updated") or 0) > ORPHAN_SECONDS):
                continue
            snap = self._claim(path)
            if snap is not None:
                out.append(snap)
                log.info("rollout figures of router %s adopted (%s)", path.stem, "released" if snap.get("released")
                         else "not rewritten for %.0f s" % (now - float(snap.get("updated") or 0)))
        return out

    def adopted_meanwhile(self) -> dict[str, Any] | None:
        """The snapshot another router adopted while this process was alive (it stalled past ORPHAN_SECONDS): the
        caller takes it back (`absorb(..., sign=-1)`) before writing again, since the adopter holds those counts."""
        if self.written is None or self.path.exists():
            return None
        log.warning("rollout figures snapshot %s was adopted by another router; counting on from there",
                    self.path.name)
        gone, self.written = self.written, None
        return gone

    def write(self, snap: dict[str, Any], released: bool = False) -> None:
        """Write `snap` (`RolloutFigures.snapshot()`) as this process's snapshot; released=True on a clean shutdown
        (adopt at once)."""
        doc = {"slot": self.slot, "updated": self.clock(), "released": released, **snap}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{self.slot}.json.tmp"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)
        self.written = doc
