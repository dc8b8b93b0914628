"""Metrics of the routing benchmark (pure functions over arrays).

- cost reduction = 1 - C / C_ref and quality ratio = Q / Q_ref, where C, Q are mean cost and mean quality over the
  test queries and C_ref, Q_ref those of always answering with the reference model on the same queries.
- AIQ (RouterBench, Hu et al. 2024): the area under the non-decreasing convex hull of a method's (cost, quality)
  points, over the cost range [C_cheapest, C_ref] (cheapest single model to reference), divided by its width. Below
  a method's cheapest point the hull has no support and counts 0; above its dearest point it stays flat.
- operating point: among a method's settings, the cheapest whose CALIBRATION quality ratio reaches the target;
  the test figures are then read at that setting (no test data is used to choose it).
- violation rate (RouteNLP): see `violations`.
- CIs: mean +- t(0.975, s-1) x sd / sqrt(s) over s seeds.
"""

from __future__ import annotations

import math

import numpy as np

from routenlp.router.conformal import ACCEPTED_ANSWERS, ALL_REQUESTS

ACCEPTABLE = 0.5


def cost_reduction(cost: float, ref_cost: float) -> float:
    return float(1.0 - cost / ref_cost) if ref_cost > 0 else float("nan")


def quality_ratio(quality: float, ref_quality: float) -> float:
    return float(quality / ref_quality) if ref_quality > 0 else float("nan")


def upper_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-decreasing upper convex hull of (cost, quality) points, by increasing cost."""
    pts = sorted(set((float(c), float(q)) for c, q in points if math.isfinite(c) and math.isfinite(q)))
    # Non-decreasing: a point is useless if a cheaper one has at least its quality.
    keep, best = [], -math.inf
    for c, q in pts:
        if q > best:
            keep.append((c, q))
            best = q
    hull: list[tuple[float, float]] = []
    for p in keep:  # monotone chain, upper side
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] on or below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def aiq(points: list[tuple[float, float]], c_min: float, c_max: float, grid: int = 2001) -> float:
    """Average quality of the hull over [c_min, c_max] (see the module docstring)."""
    if not c_max > c_min:
        raise ValueError("aiq needs c_max > c_min")
    hull = upper_hull(points)
    if not hull:
        return float("nan")
    xs = np.linspace(c_min, c_max, grid)
    hx = np.array([p[0] for p in hull])
    hy = np.array([p[1] for p in hull])
    ys = np.interp(xs, hx, hy, left=0.0, right=hy[-1])
    ys[xs < hx[0]] = 0.0
    return float(np.trapezoid(ys, xs) / (c_max - c_min))


def operating_point(cal_points: list[tuple[float, float]], ref_quality: float, target: float) -> int | None:
    """Index of the cheapest setting whose calibration quality ratio >= target; None if no setting reaches it."""
    ok = [i for i, (c, q) in enumerate(cal_points) if q >= target * ref_quality - 1e-12]
    if not ok:
        return None
    return min(ok, key=lambda i: (cal_points[i][0], -cal_points[i][1]))


def mean_ci(values, level: float = 0.95) -> tuple[float, list[float]]:
    """Mean and Student-t confidence interval over seeds (a single value: the interval is the point)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), [float("nan"), float("nan")]
    m = float(v.mean())
    if len(v) == 1:
        return m, [m, m]
    from scipy import stats

    h = float(stats.t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, [m - h, m + h]


def violations(tier: np.ndarray, accepted: np.ndarray, quality: np.ndarray, tasks: np.ndarray, n_tiers: int,
               risk: float, min_accepted: int = 1, called: np.ndarray | None = None,
               risk_measure: str = ACCEPTED_ANSWERS, ends: np.ndarray | None = None) -> dict:
    """The quantity RouteNLP's guarantee bounds, measured on test queries.

    Guarantee (docs/guarantee.md), for each (task, non-reference tier), with probability >= 1 - delta over the
    calibration sample: `acceptedAnswers`: among the answers that tier ACCEPTS (score above its certified
    threshold), the unacceptable share is <= risk; `allRequests`: among the requests that REACH the tier (`called`,
    (n, K)), the share whose answer the tier accepts and is unacceptable is <= risk. Measured here:
    - `violation_rate`: that rate pooled over every (task, non-reference tier) cell: unacceptable accepted answers /
      accepted answers (`acceptedAnswers`; None when nothing was accepted below the reference: the guarantee then
      holds vacuously) or / requests reaching the tier (`allRequests`; None when no request reached one);
    - `cells`: per cell (task, tier, reached, accepted, unacceptable, rate); `cells_over_risk`: share of cells (with
      at least `min_accepted` answers in the denominator) whose test rate exceeds `risk` (finite test samples make
      some noise);
    - `unacceptable_share`: unacceptable accepted answers / all test queries.
    Answers from the chain's end (`ends`, (n,) per query; default the reference, the last tier), and fallbacks (not
    accepted by a threshold), are outside the guarantee: the end is never thresholded."""
    tier, accepted = np.asarray(tier), np.asarray(accepted, dtype=bool)
    ends = np.full(len(tier), n_tiers - 1) if ends is None else np.asarray(ends, dtype=int)
    bad = np.asarray(quality, dtype=float) < ACCEPTABLE
    sel = accepted & (tier >= 0) & (tier != ends)
    per_request = risk_measure == ALL_REQUESTS
    if per_request and called is None:
        raise ValueError("risk_measure='allRequests' needs `called` (which tiers each request reached)")
    cells = []
    n_den = 0
    for t in np.unique(tasks):
        for k in range(n_tiers):
            if np.all(ends[tasks == t] == k):  # the task's chain end: not thresholded
                continue
            m = sel & (tasks == t) & (tier == k)
            na = int(m.sum())
            reached = int((called[:, k] & (tasks == t)).sum()) if called is not None else None
            den = reached if per_request else na
            n_den += den
            if den:
                nb = int((m & bad).sum())
                cells.append({"task": int(t), "tier": k, "reached": reached, "accepted": na, "unacceptable": nb,
                              "rate": nb / den, "denominator": den})
    n_acc = int(sel.sum())
    n_bad = int((sel & bad).sum())
    counted = [c for c in cells if c["denominator"] >= min_accepted]
    if per_request:
        rate = n_bad / n_den if n_den else None
    else:
        rate = n_bad / n_acc if n_acc else None  # None: nothing accepted, nothing to measure
    return {
        "violation_rate": rate,
        "accepted_below_reference": n_acc / max(len(tier), 1),
        "unacceptable_share": n_bad / max(len(tier), 1),
        "cells": cells,
        "cells_over_risk": (sum(c["rate"] > risk for c in counted) / len(counted)) if counted else 0.0,
    }
