"""The guarantee: conformal (Learn-then-Test) thresholds per (task, tier).

For one (task, tier) and labelled calibration answers (score s_i, acceptable y_i), `calibrate_threshold` returns a
threshold lambda such that, with probability >= 1 - delta over the calibration sample,

    P(answer unacceptable | score >= lambda) <= alpha   (alpha = risk_level)

i.e. the rate of unacceptable answers among the answers ACCEPTED at that tier is at most alpha. The work is done by
MAPIE's `BinaryClassificationController` (Learn-then-Test with the precision risk, Hoeffding-Bentkus p-values and
Bonferroni-Holm FWER control over a fixed grid of candidate thresholds). If no candidate is certified, the tier
accepts nothing for that task (threshold None: always escalate). `calibrate_cascade` applies it tier by tier on the
queries that reach each tier at run time. See docs/guarantee.md for the exact statement and assumptions.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import numpy as np

from . import cascade as _cascade

# Candidate thresholds: fixed before seeing data (the FWER correction pays for each one).
DEFAULT_GRID = np.round(np.linspace(0.0, 0.99, 100), 4)


@dataclass(frozen=True)
class ThresholdResult:
    """Outcome of calibrating one (task, tier). threshold None = nothing certified: the tier accepts nothing."""

    threshold: float | None
    n: int  # labelled calibration answers used
    n_accepted: int  # of those, how many the threshold accepts
    empirical_risk: float | None  # unacceptable rate among the accepted calibration answers
    certified: bool

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "ThresholdResult":
        return cls(d.get("threshold"), int(d.get("n", 0)), int(d.get("n_accepted", 0)), d.get("empirical_risk"),
                   bool(d.get("certified", False)))


def _holm_without_empty_sets():
    """MAPIE's Bonferroni-Holm, with a NaN p-value (a threshold that accepts no calibration answer) read as 1:
    such a threshold is never certified but still counts in the correction (MAPIE's argmin would pick the NaN)."""
    from mapie.risk_control.fwer_control import FWERBonferroniHolm

    class _Holm(FWERBonferroniHolm):
        def run(self, p_values, delta):
            return super().run(np.nan_to_num(np.asarray(p_values, float), nan=1.0), delta)

    return _Holm()


class _Scores:
    """predict_proba-like wrapper MAPIE calls with X = precomputed scores (column 1 = P(acceptable))."""

    def __call__(self, scores) -> np.ndarray:
        s = np.asarray(scores, dtype=float).reshape(-1)
        return np.column_stack([1.0 - s, s])


def calibrate_threshold(scores, labels, risk_level: float, delta: float, min_samples: int = 1,
                        grid: np.ndarray | None = None) -> ThresholdResult:
    """Certify the lowest threshold on `grid` whose accepted-but-unacceptable rate is <= risk_level w.p. >= 1-delta.

    scores: confidence in [0, 1]; labels: 1/True = acceptable answer. Fewer than `min_samples` labels -> uncertified."""
    from mapie.risk_control import BinaryClassificationController

    if not 0 < risk_level < 1 or not 0 < delta < 1:
        raise ValueError(f"risk_level and delta must be in (0, 1); got {risk_level}, {delta}")
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=float).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape} vs {y.shape}")
    keep = ~(np.isnan(s) | np.isnan(y))
    s, y = np.clip(s[keep], 0.0, 1.0), y[keep].astype(int)
    n = int(len(s))
    if n < max(min_samples, 1):
        return ThresholdResult(None, n, 0, None, False)
    grid = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=float)
    controller = BinaryClassificationController(
        predict_function=_Scores(), risk="precision", target_level=float(1.0 - risk_level),
        confidence_level=float(1.0 - delta), list_predict_params=grid, fwer_method=_holm_without_empty_sets(),
    )
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # all-0/1 score warnings, empty accepted sets at high thresholds
        controller.calibrate(s, y)
    thr = controller.best_predict_param
    if thr is None:
        return ThresholdResult(None, n, 0, None, False)
    acc = s >= thr
    n_acc = int(acc.sum())
    risk = float(1.0 - y[acc].mean()) if n_acc else None
    return ThresholdResult(float(thr), n, n_acc, risk, True)


def calibrate_cascade(task_ids, start, scores, labels, n_tasks: int, risk_level: float, delta: float,
                      min_samples: int, max_escalations: int, tier_up=None, grid=None) -> list[list[ThresholdResult]]:
    """Sequential calibration over the cascade: result[task][tier].

    Arrays over calibration queries: task_ids (n,), start (n,) start tier from the router's start rule,
    scores (n, K) confidence of each tier's answer, labels (n, K) 1 = acceptable (NaN = unknown).
    Tier k of a task is calibrated only on the queries that would reach it at run time: their plan (start tier,
    skipped tiers, escalation limit: `cascade.attempt_plan`) contains k and the already-calibrated thresholds of the
    tiers tried before k reject them. The last (reference) tier is never thresholded: it always answers."""
    task_ids = np.asarray(task_ids, dtype=int)
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=float)
    n, K = scores.shape
    plan = _cascade.attempt_plan(np.asarray(start, dtype=int), K, max_escalations, tier_up)
    thresholds = np.full((n_tasks, K), np.nan)
    out: list[list[ThresholdResult]] = [[ThresholdResult(None, 0, 0, None, False)] * K for _ in range(n_tasks)]
    rejected_so_far = np.ones(n, dtype=bool)  # not accepted by any earlier tier
    for k in range(K):
        reach = plan[:, k] & rejected_so_far
        if k < K - 1:
            for t in range(n_tasks):
                m = reach & (task_ids == t)
                res = calibrate_threshold(scores[m, k], labels[m, k], risk_level, delta, min_samples, grid)
                out[t][k] = res
                if res.threshold is not None:
                    thresholds[t, k] = res.threshold
        else:
            for t in range(n_tasks):
                m = reach & (task_ids == t) & ~np.isnan(labels[:, k])
                out[t][k] = ThresholdResult(None, int(m.sum()), int(m.sum()), None, False)
        thr = thresholds[task_ids, k]
        accepted = reach & ~np.isnan(thr) & (np.nan_to_num(scores[:, k], nan=-1.0) >= np.nan_to_num(thr, nan=2.0))
        rejected_so_far &= ~accepted
    return out


def thresholds_table(results: list[list[ThresholdResult]]) -> np.ndarray:
    """(n_tasks, K) array of thresholds, NaN where uncertified (for `cascade.simulate_cascade`)."""
    return np.array([[np.nan if r.threshold is None else r.threshold for r in row] for row in results], dtype=float)
