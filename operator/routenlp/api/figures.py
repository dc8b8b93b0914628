"""The rollout figures: what a router observed per router version, the wire format between router and operator
(the operator's rollout, campaign triggers and budget). The router counts them (routenlp.router.figures).

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
- violationRate: the observed risk in the policy's `riskMeasure` (served as `riskMeasure`), as
  routenlp_violation_rate: `acceptedAnswers`: labels of accepted answers at non-reference tiers that said unacceptable
  (`violations`) over such labels (`labelled`); `allRequests`: over the random-sample labels of attempts at
  non-reference tiers (`sampled`: shadow-labelled, or at a tier with no threshold yet: the requests that reached the
  tier, whatever it decided), the ones accepted there and unacceptable (`sampledViolations`). None without labels;
  `riskLabels` is its denominator (`labelled` or `sampled`);
- costReduction: 1 - spentUsd / referenceCostUsd (what always-reference would have cost; shadow calls count as
  spent, as in routenlp_cost_usd_total); None before any cost.
Counts (requests, escalations, labelled, violations, sampled, sampledViolations, spentUsd, referenceCostUsd)
are served too, so an aggregator over several router pods can sum them and recompute exact rates (`merge`).
"""

from __future__ import annotations

from typing import Any

from .routingpolicy import RiskMeasure

# The served counts (camelCase, as in /routenlp/rollout and snapshots) -> VersionCounts attributes.
COUNT_ATTRS = {"requests": "requests", "accepted": "accepted", "escalations": "escalations", "labelled": "labelled",
               "violations": "violations", "sampled": "sampled", "sampledViolations": "sampled_violations",
               "spentUsd": "spent_usd", "referenceCostUsd": "reference_cost_usd"}
COUNT_FIELDS = tuple(COUNT_ATTRS)


def rates(counts: dict[str, float], risk_measure: str) -> dict[str, Any]:
    """The served block from counts (`COUNT_FIELDS`; None where the denominator is empty)."""
    c = {k: float(counts.get(k) or 0) for k in COUNT_FIELDS}
    n, spent, ref = c["requests"], c["spentUsd"], c["referenceCostUsd"]
    if RiskMeasure(risk_measure) == RiskMeasure.ALL_REQUESTS:
        bad, over = c["sampledViolations"], c["sampled"]
    else:
        bad, over = c["violations"], c["labelled"]
    return {
        **{k: int(c[k]) for k in COUNT_FIELDS if k not in ("spentUsd", "referenceCostUsd")},
        "spentUsd": round(spent, 9),
        "referenceCostUsd": round(ref, 9),
        "riskMeasure": RiskMeasure(risk_measure).value,
        "acceptanceRate": c["accepted"] / n if n else None,
        "escalationRate": c["escalations"] / n if n else None,
        "violationRate": bad / over if over else None,
        "riskLabels": int(over),  # the labels violationRate is over (the promotion guard's minLabels)
        "costReduction": 1 - spent / ref if ref > 0 else None,
    }


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
        # Pods of one policy share its config; a pod from before riskMeasure was served counts as the default.
        measure = blocks[0].get("riskMeasure") or RiskMeasure.ACCEPTED_ANSWERS.value
        merged = rates(sums, measure)
        out[role] = {"version": version, "since": min(str(b.get("since") or "") for b in blocks), "pods": len(blocks),
                     **merged}
        chains = next((b["chains"] for b in blocks if isinstance(b.get("chains"), dict)), None)
        if chains is not None:  # one version, one policy: every pod serves the same chains
            out[role]["chains"] = chains
    return out
