"""A quality floor's plan: chain set, start rule and confidence level chosen together (docs/guarantee.md, "The
quality floor"), by the trainer and the routing benchmark alike.

A **setting** is (chain set, start rule, level): the tasks' chains (learnt; learnt and cut where a cheaper tier is
good enough; the one global chain), where requests start on them (`cascade.StartRule`: a quality target, or a cost
weight), and one confidence level every cheaper chain tier must reach to answer. Learn-then-Test:

1. Learn (training split only): each setting's training curve gives E[y], E[y r] and cost, y = the routed answer
   acceptable, r = the reference's. `frontier` orders the settings by the predicted z of "quality ratio >= floor" at
   the calibration sample's size and keeps the training cost/z frontier (each setting cheaper on train than all
   before it: every test on the path buys a saving). Always-reference leads the sequence.
2. Test (calibration split): `choose` walks the sequence with `conformal.certify_level` at level delta; every
   setting before the first failure is certified jointly (fixed-sequence testing), so the cheapest of them on the
   calibration requests is used (cost needs no label). None certified: the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

from .cascade import StartRule
from .chains import learn_chains
from .conformal import LevelCertificate, certify_level

CUT_FACTORS = (0.99, 0.97, 0.95, 0.9)
# The chain sets: per-task chains as learnt; the same cut at the cheapest portfolio tier whose training quality on
# the task is at least f x the task's best ("learnt@f": with the start rule END_START, the per-task lookup of the
# cheapest good-enough model); the one global Pareto chain.
CHAIN_SETS = ("learnt",) + tuple(f"learnt@{f}" for f in CUT_FACTORS) + ("global",)
END_START = 1e9  # a quality target no cheaper tier meets: every request starts at its chain's end
QUALITY_TARGETS = (0.0, 0.9, 0.97, 1.0, END_START)  # 0: start at the chain's cheapest tier
COST_WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
COST_WEIGHT = "costWeight"

# A start rule as the search names it: a quality target, or (COST_WEIGHT, w).
Rule = Union[float, tuple[str, float]]


@dataclass(frozen=True)
class FloorSetting:
    chain_set: str
    start_rule: Rule
    level: float

    def start_rule_json(self) -> dict[str, float]:
        """As the trainer writes it into a version's metadata and the router reads it back (`rule_from_json`)."""
        if isinstance(self.start_rule, tuple):
            return {COST_WEIGHT: float(self.start_rule[1])}
        return {"qualityTarget": float(self.start_rule)}


def rule_from_json(doc: Mapping[str, float]) -> Rule:
    return (COST_WEIGHT, float(doc[COST_WEIGHT])) if COST_WEIGHT in doc else float(doc["qualityTarget"])


def floor_certificate(metadata: Mapping[str, Any] | None, task: str,
                      floor: tuple[str, float] | None) -> dict[str, Any] | None:
    """The version's quality-floor certificate for the task (metadata `floor_certificates`, written by the trainer's
    floor plan) when it was certified for the floor in force (same scope and floor), else None."""
    cert = ((metadata or {}).get("floor_certificates") or {}).get(task) or {}
    return cert if floor is not None and (cert.get("scope"), cert.get("floor")) == tuple(floor) else None


def served_rule(metadata: Mapping[str, Any] | None, task: str, floor: tuple[str, float] | None, default: Rule) -> Rule:
    """Where a task's requests start: the rule the version's floor plan was certified with (its thresholds hold the
    floor only with that rule), else `default` (the task's qualityTarget or costWeight)."""
    cert = floor_certificate(metadata, task, floor)
    return rule_from_json(cert["start_rule"]) if cert and cert.get("start_rule") else default


def start_rule(rule: Rule, relative_cost: Sequence[float] | np.ndarray | None) -> StartRule:
    """The `cascade.StartRule` a searched rule names; relative_cost ((K,) or (n, K)) weighs a cost-weighted one."""
    if isinstance(rule, tuple):
        return StartRule(cost_weight=rule[1], relative_cost=None if relative_cost is None
                         else np.asarray(relative_cost, dtype=float))
    return StartRule(quality_target=rule)


def start_rules(cost_weights: bool) -> list[Rule]:
    """The start rules searched: the quality targets, and the cost weights where tier costs are known."""
    rules: list[Rule] = list(QUALITY_TARGETS)
    return rules + [(COST_WEIGHT, float(w)) for w in COST_WEIGHTS] if cost_weights else rules


def cut_chains(chains: np.ndarray, quality: np.ndarray, task_ids: np.ndarray, factor: float) -> np.ndarray:
    """Each task's chain cut at the cheapest tier (of the portfolio, cheapest first) whose mean training quality on
    the task is at least factor x the task's best: that tier becomes the end, the chain's cheaper members stay."""
    out = np.zeros_like(chains)
    for t in range(len(chains)):
        m = task_ids == t
        q = np.nanmean(quality[m], axis=0) if m.any() else np.nanmean(quality, axis=0)
        q = np.nan_to_num(q, nan=-np.inf)
        end = int(np.flatnonzero(q >= factor * q.max() - 1e-12)[0])
        out[t, :end] = chains[t, :end]
        out[t, end] = True
    return out


def chain_sets(chains: np.ndarray, quality: np.ndarray, task_ids: np.ndarray,
               global_chain: np.ndarray | None = None, pinned: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """CHAIN_SETS as (n_tasks, K) bool arrays from each task's learnt chain and the training quality (n, K).
    global_chain: the pooled Pareto chain (default: learnt on the pooled quality). pinned (n_tasks,): tasks whose
    chain the policy pins keep it in every set."""
    K = chains.shape[1]
    if global_chain is None:
        global_chain = learn_chains(quality, np.tile(np.arange(K, dtype=float), (len(quality), 1)),
                                    np.zeros(len(quality), dtype=int), 1)[0]
    sets = {"learnt": chains, "global": np.broadcast_to(np.asarray(global_chain, bool), chains.shape).copy()}
    for f in CUT_FACTORS:
        sets[f"learnt@{f}"] = cut_chains(chains, quality, task_ids, f)
    if pinned is not None:
        keep = np.asarray(pinned, dtype=bool)
        for name in sets:
            sets[name][keep] = chains[keep]
    return sets


Curve = tuple[np.ndarray, np.ndarray, np.ndarray]  # E[y], E[y r], mean cost per level (strict to loose)


def training_curves(run: Callable[[str, Rule, float], tuple[np.ndarray, np.ndarray]], set_names: Sequence[str],
                    rules: Sequence[Rule], levels: Sequence[float], reference: np.ndarray
                    ) -> dict[tuple[str, Rule], Curve]:
    """Every (chain set, start rule)'s curve over the levels on the training rows. run(chain set, rule, level) ->
    (routed labels (n,), cost (n,)) of those rows, labels 1 = acceptable, NaN = unknown (left out of the means);
    reference (n,) the reference's labels."""
    r = np.asarray(reference, dtype=float)
    curves: dict[tuple[str, Rule], Curve] = {}
    for cs in set_names:
        for rule in rules:
            ey, eyr, cost = [], [], []
            for v in levels:
                y, c = run(cs, rule, float(v))
                ey.append(known_mean(y))
                eyr.append(known_mean(y * r))
                cost.append(float(np.mean(c)) if len(c) else 0.0)
            curves[(cs, rule)] = (np.array(ey), np.array(eyr), np.array(cost))
    return curves


def known_mean(x: np.ndarray) -> float:
    """Mean over the known (non-NaN) values; 0 when none is known."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else 0.0


def frontier(curves: Mapping[tuple[str, Rule], Curve], levels: Sequence[float], reference_rate: float, floor: float,
             n_calibration: float) -> list[FloorSetting]:
    """Step 1: the settings most likely to hold the floor first, keeping only those cheaper on train than every
    setting before them; settings predicted far below the floor (z < -1) are left out."""
    scored = []
    er = reference_rate
    for (cs, rule), (ey, eyr, cost) in curves.items():
        mean = ey - floor * er
        var = np.maximum(ey - ey ** 2 + floor ** 2 * (er - er ** 2) - 2 * floor * (eyr - ey * er), 1e-6)
        z = mean / np.sqrt(var / max(n_calibration, 1.0))
        scored += [(float(z[j]), -float(cost[j]), FloorSetting(cs, rule, float(v))) for j, v in enumerate(levels)]
    seq, cheapest = [], np.inf
    for z, neg_cost, setting in sorted(scored, key=lambda x: x[:2], reverse=True):
        if z >= -1.0 and -neg_cost < cheapest:
            seq.append(setting)
            cheapest = -neg_cost
    return seq


def choose(seq: Sequence[FloorSetting], routed: np.ndarray, costs: Sequence[float], reference: np.ndarray,
           floor: float, delta: float) -> tuple[FloorSetting | None, LevelCertificate]:
    """Step 2: routed (n, len(seq)) the calibration requests' labels under each setting (1 = acceptable, NaN =
    unknown), costs their mean cost under each, reference (n,) the reference's labels. Returns the cheapest
    certified setting (None: serve the reference) and the certificate (index 0 = always-reference)."""
    ref = np.asarray(reference, dtype=float)
    cols = np.column_stack([ref] + [np.asarray(routed)[:, j] for j in range(len(seq))]) if len(ref) else \
        np.zeros((0, len(seq) + 1))
    cert = certify_level(cols, ref, floor, delta)
    if cert.index is None or cert.index < 1:
        return None, cert
    j = min(range(cert.index), key=lambda i: costs[i])  # certified settings: sequence positions 1..index
    return seq[j], cert
