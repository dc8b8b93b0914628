"""What the router observed per router version, for the operator's rollout, campaign triggers and budget.

Served as `GET /routenlp/rollout`:

    {"stable": {version, since, requests, acceptanceRate, violationRate, escalationRate, costReduction,
                escalations, labelled, violations, spentUsd, referenceCostUsd} ,
     "canary": {same fields} | null,
     "spentUsd24h": float}

Each version's counters start when the router first serves it (start-up or version change) and are dropped when it
is neither stable nor canary any more, so a promoted canary keeps its history. Definitions are the metrics' ones:
- acceptanceRate: answered requests accepted by the first tier they tried, at a non-reference tier
  (the "first-tier acceptance" the promotion guard compares), over answered requests;
- escalationRate: answered requests that escalated at least once (`escalations`) over answered requests;
- violationRate: labels of accepted answers at non-reference tiers that said unacceptable (`violations`) over such
  labels (`labelled`) — routenlp_violation_rate; None without labels;
- costReduction: 1 - spentUsd / referenceCostUsd (what always-reference would have cost; shadow calls count as
  spent, as in routenlp_cost_usd_total); None before any cost.
Counts (requests, escalations, labelled, violations, spentUsd, referenceCostUsd) are served too, so an aggregator
over several router pods can sum them and recompute exact rates (`merge`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

SPEND_BUCKET_SECONDS = 60
DAY_SECONDS = 24 * 3600


@dataclass
class VersionCounts:
    version: str
    since: float
    requests: int = 0  # answered requests
    accepted: int = 0  # answered by the first tier tried, accepted, not the reference tier
    escalations: int = 0  # answered requests that escalated at least once
    labelled: int = 0
    violations: int = 0
    spent_usd: float = 0.0
    reference_cost_usd: float = 0.0

    def figures(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "since": datetime.fromtimestamp(self.since, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **rates(self.requests, self.accepted, self.escalations, self.labelled, self.violations, self.spent_usd,
                    self.reference_cost_usd),
        }


def rates(requests: int, accepted: int, escalations: int, labelled: int, violations: int, spent_usd: float,
          reference_cost_usd: float) -> dict[str, Any]:
    """The served block from counts (None where the denominator is empty)."""
    return {
        "requests": requests,
        "accepted": accepted,
        "escalations": escalations,
        "labelled": labelled,
        "violations": violations,
        "spentUsd": round(spent_usd, 9),
        "referenceCostUsd": round(reference_cost_usd, 9),
        "acceptanceRate": accepted / requests if requests else None,
        "escalationRate": escalations / requests if requests else None,
        "violationRate": violations / labelled if labelled else None,
        "costReduction": 1 - spent_usd / reference_cost_usd if reference_cost_usd > 0 else None,
    }


COUNT_FIELDS = ("requests", "accepted", "escalations", "labelled", "violations", "spentUsd", "referenceCostUsd")


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

    def __init__(self, clock=time.time):
        self.clock = clock
        self.versions: dict[str, VersionCounts] = {}
        self.spend = SpendWindow()
        self.stable: str | None = None
        self.canary: str | None = None

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

    def label(self, version: str | None, acceptable: bool) -> None:
        """A label on an accepted answer at a non-reference tier."""
        c = self._counts(version)
        if c is not None:
            c.labelled += 1
            c.violations += not acceptable

    def answer(self) -> dict[str, Any]:
        stable, canary = self._counts(self.stable), self._counts(self.canary)
        return {"stable": stable.figures() if stable else None, "canary": canary.figures() if canary else None,
                "spentUsd24h": round(self.spend.total(self.clock()), 9)}


def merge(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the figures several router pods serve (same versions) into one answer with exact rates. A role whose
    version differs between pods (a rollout in progress) keeps the pods serving the most common version."""
    out: dict[str, Any] = {"spentUsd24h": sum(float(a.get("spentUsd24h") or 0) for a in answers)}
    for role in ("stable", "canary"):
        blocks = [a[role] for a in answers if isinstance(a.get(role), dict)]
        if not blocks:
            out[role] = None
            continue
        versions = [b.get("version") for b in blocks]
        version = max(set(versions), key=versions.count)
        blocks = [b for b in blocks if b.get("version") == version]
        sums = {k: sum(float(b.get(k) or 0) for b in blocks) for k in COUNT_FIELDS}
        merged = rates(int(sums["requests"]), int(sums["accepted"]), int(sums["escalations"]), int(sums["labelled"]),
                       int(sums["violations"]), sums["spentUsd"], sums["referenceCostUsd"])
        out[role] = {"version": version, "since": min(str(b.get("since") or "") for b in blocks), "pods": len(blocks),
                     **merged}
    return out
