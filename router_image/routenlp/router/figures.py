"""The router's counters per router version (`RolloutFigures`), served as `GET /routenlp/rollout` in the wire format
of routenlp.api.figures (definitions there), and the 24 h spend. Each version's counters start when the router first
serves it (start-up or version change) and are dropped when it is neither stable nor canary any more, so a promoted
canary keeps its history. The counters outlive the process (`snapshot`/`absorb`, written and taken over by
figures_store.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from routenlp.api.figures import COUNT_ATTRS, Counts, RolloutAnswer, VersionFigures, rates
from routenlp.api.routingpolicy import RiskMeasure

SPEND_BUCKET_SECONDS = 60
LABELS_REMEMBERED = 20_000  # attempts whose label a later one may replace (as many as the router keeps requests)
DAY_SECONDS = 24 * 3600


@dataclass
class VersionCounts:
    version: str
    since: float
    requests: int = 0  # answered requests
    accepted: int = 0  # answered by the first tier tried, accepted, not the reference tier
    escalations: int = 0  # answered requests that escalated at least once
    labelled: int = 0  # labels of accepted answers at non-reference tiers
    violations: int = 0  # ... that said unacceptable
    sampled: int = 0  # random-sample labels of attempts at non-reference tiers
    sampled_violations: int = 0  # ... accepted there and unacceptable
    spent_usd: float = 0.0
    reference_cost_usd: float = 0.0

    def counts(self) -> Counts:
        return Counts(**{attr: getattr(self, attr) for attr in COUNT_ATTRS.values()})

    def figures(self, risk_measure: str, chains: dict[str, list[str]] | None = None) -> VersionFigures:
        since = datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return rates(self.counts(), risk_measure, version=self.version, since=since, chains=chains)



@dataclass
class SpendWindow:
    """Spend over the last 24 h in one-minute buckets (for RoutingPolicy.spec.budget), across versions."""

    buckets: dict[int, float] = field(default_factory=dict)

    def add(self, usd: float, now: float) -> None:
        b = int(now // SPEND_BUCKET_SECONDS)
        self.buckets[b] = self.buckets.get(b, 0.0) + usd
        if len(self.buckets) > DAY_SECONDS // SPEND_BUCKET_SECONDS + 1:
            self._prune(now)

    def _prune(self, now: float) -> None:
        oldest = int((now - DAY_SECONDS) // SPEND_BUCKET_SECONDS)
        for b in [b for b in self.buckets if b <= oldest]:
            del self.buckets[b]

    def total(self, now: float) -> float:
        self._prune(now)
        return sum(self.buckets.values())


class RolloutFigures:
    """Counters per router version (only the stable and canary ones are kept) and the 24 h spend."""

    def __init__(self, clock: Callable[[], float] = time.time, risk_measure: str = RiskMeasure.ACCEPTED_ANSWERS.value):
        self.clock = clock
        self.risk_measure = risk_measure  # the policy's; the router sets it on every config load
        self.versions: dict[str, VersionCounts] = {}
        self.spend = SpendWindow()
        self.stable: str | None = None
        self.canary: str | None = None
        # (request id, tier) -> what its label added: (counts, acceptable, accepted, sampled), in insertion order
        self._labels: dict[tuple[str, str], tuple[VersionCounts, bool, bool, bool]] = {}
        self.chains: dict[str, dict[str, list[str]]] = {}  # version -> {task: its chain in force}, for the operator

    def set_versions(self, stable: str | None, canary: str | None) -> None:
        self.stable, self.canary = stable, canary
        keep = {v for v in (stable, canary) if v}
        self.versions = {v: c for v, c in self.versions.items() if v in keep}
        for v in keep:
            self.versions.setdefault(v, VersionCounts(v, self.clock()))

    def _counts(self, version: str | None) -> VersionCounts | None:
        return self.versions.get(version or "")

    def answered(self, version: str | None, first_tier_accepted: bool, escalated: bool,
                 reference_cost_usd: float) -> None:
        """One answered request (spend is added per tier call with `spent`)."""
        c = self._counts(version)
        if c is None:
            return
        c.requests += 1
        c.accepted += first_tier_accepted
        c.escalations += escalated
        c.reference_cost_usd += reference_cost_usd

    def spent(self, version: str | None, usd: float) -> None:
        self.spend.add(usd, self.clock())
        c = self._counts(version)
        if c is not None:
            c.spent_usd += usd

    def label(self, version: str | None, acceptable: bool, accepted: bool, sampled: bool,
              attempt: tuple[str, str] | None = None) -> None:
        """A label on an attempt at a non-reference tier: `accepted` there or not, `sampled`: a random-sample label
        (shadow, or a tier with no threshold), which counts whatever the tier decided. `attempt` = (request id,
        tier): a later label of the same attempt (a user correcting the judge) replaces the earlier one, as in the
        trainer's `eventlog.labelled_attempts`, instead of counting the attempt twice."""
        c = self._counts(version)
        if c is None:
            return
        if attempt is not None:
            old = self._labels.pop(attempt, None)
            if old is not None and old[0] is c:
                self._count(c, old[1], old[2], old[3], sign=-1)
            self._labels[attempt] = (c, acceptable, accepted, sampled)
            while len(self._labels) > LABELS_REMEMBERED:
                self._labels.pop(next(iter(self._labels)))
        self._count(c, acceptable, accepted, sampled)

    @staticmethod
    def _count(c: VersionCounts, acceptable: bool, accepted: bool, sampled: bool, sign: int = 1) -> None:
        if accepted:
            c.labelled += sign
            c.violations += sign * (not acceptable)
        if sampled:
            c.sampled += sign
            c.sampled_violations += sign * (accepted and not acceptable)

    # ---- persistence (figures_store.py): what a restarted or surviving router adds back --------------------------
    def snapshot(self) -> dict[str, Any]:
        """The counters of the kept versions and the 24 h spend buckets, as JSON-able data."""
        now = self.clock()
        self.spend.total(now)  # prune
        return {"versions": {v: {"since": c.since, **c.counts().wire()} for v, c in self.versions.items()},
                "spend": {str(b): usd for b, usd in self.spend.buckets.items()}}

    def absorb(self, snap: dict[str, Any], sign: int = 1) -> None:
        """Add (sign -1: take back) a snapshot's counts: versions this router keeps only (a version that is neither
        stable nor canary here any more is history), the earliest `since`, and the spend buckets."""
        for version, counts in (snap.get("versions") or {}).items():
            c = self.versions.get(version)
            if c is None:
                continue
            for name, attr in COUNT_ATTRS.items():
                setattr(c, attr, getattr(c, attr) + sign * type(getattr(c, attr))(counts.get(name) or 0))
            if sign > 0 and counts.get("since") is not None:
                c.since = min(c.since, float(counts["since"]))
        for bucket, usd in (snap.get("spend") or {}).items():
            b = int(bucket)
            self.spend.buckets[b] = self.spend.buckets.get(b, 0.0) + sign * float(usd)

    def report(self) -> RolloutAnswer:
        def block(version: str | None) -> VersionFigures | None:
            c = self._counts(version)
            return None if c is None else c.figures(self.risk_measure, self.chains.get(c.version))

        return RolloutAnswer(stable=block(self.stable), canary=block(self.canary),
                             spent_usd_24h=round(self.spend.total(self.clock()), 9))

    def answer(self) -> dict[str, Any]:
        """What `GET /routenlp/rollout` serves (api.figures)."""
        return self.report().wire()
