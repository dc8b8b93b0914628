"""Router version rollout of a RoutingPolicy, as a pure function.

`spec.router.version` is the user's: a pinned version is served as is (the operator never rewrites it). With
`auto`, versions produced by campaigns become a canary at `canaryPercent`, then are promoted when the promotion
guard holds on the canary's labelled traffic or rolled back when it does not. Every decision lands in
status.router.history, so GitOps users see what happened without the operator touching their spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from routenlp.api import RoutingPolicy
from routenlp.api.common import BUDGET_EXCEEDED
from routenlp.api.figures import RolloutAnswer, VersionFigures

from .status import condition

Obj = dict[str, Any]
HISTORY_LIMIT = 20


@dataclass(frozen=True)
class CanaryStats:
    """What the router observed for the canary and the stable version (its `/routenlp/rollout` answer)."""

    requests: int
    violation_rate: float | None
    acceptance_rate: float | None
    stable_acceptance_rate: float | None
    risk_labels: int | None = None  # labels violation_rate rests on (None: a router that does not say)

    @classmethod
    def from_answer(cls, answer: RolloutAnswer, canary: str | None = None) -> "CanaryStats | None":
        """None when the router reports another canary than `canary` (its pods have not reloaded the config yet):
        figures of one version never decide about another."""
        c, s = answer.canary or VersionFigures(), answer.stable or VersionFigures()
        if canary is not None and c.version not in (None, canary):
            return None
        return cls(c.requests or 0, c.violation_rate, c.acceptance_rate, s.acceptance_rate, c.risk_labels)


def _event(version: str, action: str, reason: str, now: str) -> Obj:
    return {"version": version, "action": action, "reason": reason, "time": now}


def decide(policy: RoutingPolicy, router_status: Obj | None, campaign_version: str | None,
           stats: CanaryStats | None, now: str, propose_only: bool = False, canary_percent: int | None = None,
           promote_after: float = 0.0) -> tuple[Obj, list[tuple[str, str, str]]]:
    """New status.router and the events to emit. `campaign_version`: newest version a campaign produced for this
    policy; `propose_only`: that campaign has autoApply false, so the version is only proposed. `canary_percent`,
    `promote_after` (seconds): that campaign's spec.rollout, for its version only (None / 0: the policy's settings)."""
    spec = policy.spec.router
    percent = spec.canary_percent if canary_percent is None else canary_percent
    st: Obj = json.loads(json.dumps(router_status or {}))
    st.setdefault("history", [])
    events: list[tuple[str, str, str]] = []

    def log(version: str, action: str, reason: str, etype: str = "Normal") -> None:
        st["history"] = (st["history"] + [_event(version, action, reason, now)])[-HISTORY_LIMIT:]
        events.append((etype, f"Router{action}", f"router version {version}: {action} ({reason})"))

    if spec.version != "auto":
        if st.get("current") != spec.version or st.get("canary"):
            st.update(current=spec.version, canary=None, canaryPercent=0)
            log(spec.version, "Pinned", "SpecVersion")
        if campaign_version and campaign_version != spec.version and st.get("proposed") != campaign_version:
            st["proposed"] = campaign_version
            log(campaign_version, "Proposed", "VersionPinnedInSpec")
        return _clean(st), events

    rolled_back = {h["version"] for h in st["history"] if h["action"] == "RolledBack"}
    new = campaign_version
    if new and new not in (st.get("current"), st.get("canary")) and new not in rolled_back:
        if propose_only:
            if st.get("proposed") != new:
                st["proposed"] = new
                log(new, "Proposed", "AutoApplyDisabled")
        elif not st.get("current"):
            st.update(current=new, canary=None, canaryPercent=0, proposed=None)
            log(new, "Promoted", "FirstVersion")
        elif percent == 0:
            st.update(current=new, canary=None, canaryPercent=0, proposed=None)
            log(new, "Promoted", "NoCanary")
        else:
            st.update(canary=new, canaryPercent=percent, proposed=None)
            log(new, "Canary", f"{percent}PercentOfTraffic")

    canary = st.get("canary")
    if canary and stats is not None:
        guard = policy.spec.router.promotion_guard
        if stats.requests >= guard.min_requests:
            max_violation = guard.max_violation_rate or policy.spec.cascade.risk_level
            drop = None
            if stats.acceptance_rate is not None and stats.stable_acceptance_rate is not None:
                drop = stats.stable_acceptance_rate - stats.acceptance_rate
            # A rate over a handful of labels decides nothing (one label is a rate of 0 or 1).
            enough = stats.violation_rate is not None and (stats.risk_labels is None
                                                           or stats.risk_labels >= guard.min_labels)
            if enough and stats.violation_rate > max_violation:
                st.update(canary=None, canaryPercent=0)
                log(canary, "RolledBack", "ViolationRateAboveRisk", "Warning")
            elif drop is not None and drop > guard.max_acceptance_drop:
                st.update(canary=None, canaryPercent=0)
                log(canary, "RolledBack", "AcceptanceDropped", "Warning")
            elif not enough:
                pass  # too few labels on the canary's traffic yet: keep waiting
            elif canary == new and _serving_seconds(st["history"], canary, now) < promote_after:
                pass  # the campaign's promoteAfter has not passed: the guard may still roll back, not promote
            else:
                st.update(current=canary, canary=None, canaryPercent=0)
                log(canary, "Promoted", "GuardHeld")
    return _clean(st), events


def _serving_seconds(history: list[Obj], canary: str, now: str) -> float:
    """How long `canary` has been the canary (since its latest Canary event; unknown: forever)."""
    since = next((h["time"] for h in reversed(history) if h["version"] == canary and h["action"] == "Canary"), None)
    return float("inf") if since is None else (parse_time(now) - parse_time(since)).total_seconds()


def parse_time(s: str) -> datetime:
    """An RFC 3339 time as Kubernetes writes it (`Z` suffix)."""
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def _clean(st: Obj) -> Obj:
    return {k: v for k, v in st.items() if v is not None}


# ---------------------------------------------------------------- the router's figures and the budget
def observed_figures(answer: RolloutAnswer) -> Obj:
    """Status fields from the router's answer: the stable version's costReduction / escalationRate / violationRate,
    its `escalations` count (what a campaign's trigger.minFailures compares) and the policy's spentUsd24h."""
    stable = answer.stable or VersionFigures()
    rates = {"costReduction": stable.cost_reduction, "escalationRate": stable.escalation_rate,
             "violationRate": stable.violation_rate}
    out: Obj = {k: v for k, v in rates.items() if v is not None}
    if stable.escalations is not None:
        out["escalations"] = stable.escalations
    if stable.version is not None:
        out["figuresVersion"] = stable.version
    if stable.chains is not None:
        out["chains"] = [{"task": t, "tiers": tiers} for t, tiers in sorted(stable.chains.items())]
        out["chainSummary"] = "; ".join(f"{c['task']}: {'>'.join(c['tiers'])}" for c in out["chains"])
    if answer.spent_usd_24h is not None:
        out["spentUsd24h"] = round(answer.spent_usd_24h, 6)
    return out


def budget_condition(policy: RoutingPolicy, spent_usd_24h: float | None, generation: int | None) -> Obj | None:
    """The `BudgetExceeded` condition (True = over budget), or None without spec.budget."""

    budget = policy.spec.budget
    if budget is None:
        return None
    limit = budget.max_usd_per_day
    if spent_usd_24h is None:
        return condition(BUDGET_EXCEEDED, None, "SpendUnknown",
                         f"the router has not reported its spend yet (limit ${limit:.2f} per day)", generation)
    figures = f"${spent_usd_24h:.2f} spent over the last 24 h, limit spec.budget.maxUsdPerDay ${limit:.2f}"
    if spent_usd_24h > limit:
        note = "" if budget.action == "Alert" else "; PreferCheaper: every request starts at the cheapest tier"
        return condition(BUDGET_EXCEEDED, True, "DailyBudgetExceeded", figures + note, generation)
    return condition(BUDGET_EXCEEDED, False, "WithinBudget", figures, generation)


def prefer_cheaper(policy: RoutingPolicy, budget: Obj | None) -> bool:
    """Whether the routers should start every request at the cheapest tier: spec.budget.action PreferCheaper and
    the policy over budget (`budget`: this resync's BudgetExceeded condition, or the last one when the router's
    figures could not be read this time)."""
    b = policy.spec.budget
    return bool(b and b.action == "PreferCheaper" and budget and budget.get("status") == "True")
