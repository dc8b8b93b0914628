"""The guarantee: conformal (Learn-then-Test) thresholds per (task, tier).

For one (task, tier) and labelled calibration answers (score s_i, acceptable y_i) of requests that reach the tier,
`calibrate_threshold` returns a threshold lambda such that, with probability >= 1 - delta over the calibration
sample, the policy's risk measure is at most alpha (= risk_level):

    risk_measure="acceptedAnswers":  P(answer unacceptable | score >= lambda) <= alpha
        the rate of unacceptable answers among the answers ACCEPTED at that tier;
    risk_measure="allRequests":      P(score >= lambda and answer unacceptable) <= alpha
        the share of ALL requests reaching the tier that get an unacceptable answer accepted there (so the tier
        costs the task at most alpha of quality versus a perfect fallback: it bounds the quality drop directly).

The work is done by MAPIE's `BinaryClassificationController` (Learn-then-Test with Hoeffding-Bentkus p-values; the
precision risk, or `_accepted_and_unacceptable` for allRequests) over a grid of candidate thresholds fixed before
the calibration labels are seen, with one of two FWER procedures: `fwer="holm"` (Bonferroni-Holm, any grid: the
default grid 0.00..0.99) or `fwer="fixed_sequence"` (MAPIE's `FWERFixedSequenceTesting`: the grid is walked from
strict (high) to loose and each test is at level delta / n_starts, stopping a branch at its first non-rejection;
more powerful at a fixed alpha when the sequence starts where the scores lie: `ordered_grid` learns it from the router-TRAINING split, disjoint from the calibration data).
If no candidate is certified, the tier accepts nothing for that task (threshold None: the cascade skips it).
`calibrate_cascade` applies it tier by tier on the queries that reach each tier at run time. See docs/guarantee.md
for the exact statement and assumptions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike

from routenlp.api.routingpolicy import RiskMeasure

from . import cascade as _cascade

# Candidate thresholds: fixed before seeing data (the FWER correction pays for each one).
DEFAULT_GRID = np.round(np.linspace(0.0, 0.99, 100), 4)


@dataclass(frozen=True)
class ThresholdResult:
    """Outcome of calibrating one (task, tier). threshold None = nothing certified: the tier accepts nothing."""

    threshold: float | None
    n: int  # labelled calibration answers used
    n_accepted: int  # of those, how many the threshold accepts
    empirical_risk: float | None  # the risk measure on the calibration answers at that threshold
    certified: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ThresholdResult":
        return cls(d.get("threshold"), int(d.get("n", 0)), int(d.get("n_accepted", 0)), d.get("empirical_risk"),
                   bool(d.get("certified", False)))


class _FwerProcedure(Protocol):
    """What MAPIE's FWER procedures offer: the indices of the hypotheses rejected at level delta."""

    def run(self, p_values: np.ndarray, delta: float) -> np.ndarray: ...


def _holm_without_empty_sets() -> _FwerProcedure:
    """MAPIE's Bonferroni-Holm, with a NaN p-value (a threshold that accepts no calibration answer) read as 1:
    such a threshold is never certified but still counts in the correction (MAPIE's argmin would pick the NaN)."""
    from mapie.risk_control.fwer_control import FWERBonferroniHolm

    class _Holm(FWERBonferroniHolm):  # type: ignore[misc]  # mapie ships no type information (no py.typed)
        def run(self, p_values: ArrayLike, delta: float) -> np.ndarray:
            rejected: np.ndarray = super().run(np.nan_to_num(np.asarray(p_values, float), nan=1.0), delta)
            return rejected

    return _Holm()


def _fixed_sequence(n_starts: int) -> _FwerProcedure:
    """MAPIE's fixed-sequence testing, with a NaN p-value (no calibration answer accepted) read as 1: a
    non-rejection, which ends that branch (comparing NaN would do the same; made explicit here)."""
    from mapie.risk_control.fwer_control import FWERFixedSequenceTesting

    class _FST(FWERFixedSequenceTesting):  # type: ignore[misc]  # mapie ships no type information (no py.typed)
        def run(self, p_values: ArrayLike, delta: float) -> np.ndarray:
            rejected: np.ndarray = super().run(np.nan_to_num(np.asarray(p_values, float), nan=1.0), delta)
            return rejected

    return _FST(n_starts=n_starts)


FWER_METHODS = ("holm", "fixed_sequence")
# One name per concept: the values of the RoutingPolicy's `cascade.riskMeasure`.
ACCEPTED_ANSWERS, ALL_REQUESTS = RiskMeasure.ACCEPTED_ANSWERS.value, RiskMeasure.ALL_REQUESTS.value
RISK_MEASURES = tuple(m.value for m in RiskMeasure)


def _accepted_and_unacceptable() -> object:
    """MAPIE binary risk for `allRequests`: the share of all calibration answers that are accepted (y_pred = 1)
    and unacceptable (y_true = 0). Every answer counts (condition always true), so the effective sample is n."""
    from mapie.risk_control import BinaryRisk

    return BinaryRisk(risk_occurrence=lambda y_true, y_pred: (y_pred.ravel() == 1) & (y_true.ravel() == 0),
                      risk_condition=lambda y_true, y_pred: np.ones(len(y_true.ravel()), dtype=bool),
                      higher_is_better=False)


def _check_measure(risk_measure: str) -> None:
    if risk_measure not in RISK_MEASURES:
        raise ValueError(f"risk_measure must be one of {RISK_MEASURES}; got {risk_measure!r}")


def training_grid(train_scores: ArrayLike, n_points: int = 50, top: float = 0.99) -> np.ndarray | None:
    """Candidate thresholds from scores of the router-TRAINING split (never calibration data): the quantiles at
    levels `top` down to 0 (n_points of them), unique, descending. None when there are no finite scores."""
    s = np.asarray(train_scores, dtype=float).reshape(-1)
    s = s[np.isfinite(s)]
    if not len(s):
        return None
    q = np.quantile(np.clip(s, 0.0, 1.0), np.linspace(top, 0.0, n_points))
    return np.unique(np.round(q, 6))[::-1]


def ordered_grid(train_scores: ArrayLike, train_labels: ArrayLike, n_cal: int, risk_level: float, delta: float,
                 n_points: int = 50, n_boot: int = 50, seed: int = 0,
                 risk_measure: str = ACCEPTED_ANSWERS) -> np.ndarray | None:
    """The fixed sequence for `fwer="fixed_sequence"`, learnt on the router-TRAINING split only.

    Fixed-sequence testing stops at its first non-rejection, so where the sequence starts decides everything: a
    start that accepts a handful of calibration answers certifies nothing, a start too loose fails its first test.
    Candidates are `training_grid` quantiles (descending). The start is chosen by simulation on training answers
    (score, label): `n_boot` bootstrap samples of size `n_cal` are drawn from them, each gets the Hoeffding-Bentkus
    p-values MAPIE would compute, and for every possible start the fixed-sequence walk at level delta is replayed;
    the start with the largest mean accepted share wins (ties: the stricter). The looser candidates follow in order.
    Only training data and the calibration COUNT enter, never calibration scores or labels, so the sequence is fixed
    before the calibration test and fixed-sequence validity holds. With `allRequests` the risk grows as the
    threshold falls, so the best start is usually the strictest candidate; the simulation finds that too."""
    from mapie.risk_control.methods import compute_hoeffding_bentkus_p_value

    s = np.asarray(train_scores, dtype=float).reshape(-1)
    y = np.asarray(train_labels, dtype=float).reshape(-1)
    keep = np.isfinite(s) & np.isfinite(y)
    s, y = np.clip(s[keep], 0.0, 1.0), y[keep]
    grid = training_grid(s, n_points)
    if grid is None or n_cal <= 0 or len(grid) == 1:
        return grid
    acc = s[None, :] >= grid[:, None]  # (G, m)
    bad = 1.0 - y
    rng = np.random.default_rng(seed)
    G = len(grid)
    # All bootstrap samples at once (the same draws as one sample at a time): (n_boot, n_cal) indices.
    idx = rng.integers(0, len(s), (n_boot, n_cal))
    A = acc[:, idx]  # (G, B, n_cal)
    n_acc = A.sum(2).T  # (B, G)
    n_bad = (A * bad[idx][None]).sum(2).T
    if risk_measure == ALL_REQUESTS:  # every answer is in the sample; accepting none is risk 0
        risk, n_obs, defined = n_bad / n_cal, np.full(n_acc.shape, float(n_cal)), np.ones(n_acc.shape, dtype=bool)
    else:
        risk = np.where(n_acc > 0, n_bad / np.maximum(n_acc, 1), 1.0)
        n_obs, defined = np.maximum(n_acc, 1.0), n_acc > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        p = compute_hoeffding_bentkus_p_value(risk.ravel(), n_obs.astype(float).ravel(), risk_level,
                                              binary=True)[:, 0].reshape(risk.shape)
    rej = defined & (np.nan_to_num(p, nan=1.0) <= delta)
    # walk from each start j: the last index of the run of rejections beginning at j (-1 if j is not rejected)
    last = np.full(rej.shape, -1)
    for j in range(G - 1, -1, -1):
        nxt = last[:, j + 1] if j + 1 < G else np.full(len(rej), -1)
        last[:, j] = np.where(rej[:, j], np.where(nxt >= 0, nxt, j), -1)
    reached = np.take_along_axis(n_acc, np.maximum(last, 0), axis=1)
    gain = np.where(last >= 0, reached / n_cal, 0.0).sum(0)
    start = int(np.argmax(gain))  # first maximum = strictest among ties
    return grid[start:]


def _paired(a: ArrayLike, b: ArrayLike, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Two arrays of one length, flattened, without the pairs where either is NaN (unknown)."""
    x = np.asarray(a, dtype=float).reshape(-1)
    y = np.asarray(b, dtype=float).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{what} differ in length: {x.shape} vs {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


class _Scores:
    """predict_proba-like wrapper MAPIE calls with X = precomputed scores (column 1 = P(acceptable))."""

    def __call__(self, scores: ArrayLike) -> np.ndarray:
        s = np.asarray(scores, dtype=float).reshape(-1)
        return np.column_stack([1.0 - s, s])


def calibrate_threshold(scores: ArrayLike, labels: ArrayLike, risk_level: float, delta: float, min_samples: int = 1,
                        grid: ArrayLike | None = None, fwer: str = "holm", n_starts: int = 1,
                        train: tuple[ArrayLike, ArrayLike] | None = None,
                        risk_measure: str = ACCEPTED_ANSWERS) -> ThresholdResult:
    """Certify the lowest threshold on `grid` whose risk (`risk_measure`, see the module docstring) is <= risk_level
    with probability >= 1 - delta.

    scores: confidence in [0, 1]; labels: 1/True = acceptable answer. Fewer than `min_samples` labels -> uncertified.
    grid: candidate thresholds, chosen without the calibration labels (default: 0.00, 0.01, ..., 0.99).
    fwer: "holm" (Bonferroni-Holm over the grid) or "fixed_sequence" (the grid sorted from strict to loose, tested
    in that order at delta / n_starts per branch, `n_starts` equally spaced branch starts).
    train: optional (scores, labels) of TRAINING answers for this (task, tier); with fwer="fixed_sequence" and no
    grid, the sequence is `ordered_grid(train..., n_cal=len(scores))`.
    Returns the threshold with n, n_accepted and the empirical risk (in the chosen measure) on the calibration data."""
    from mapie.risk_control import BinaryClassificationController, recall

    if not 0 < risk_level < 1 or not 0 < delta < 1:
        raise ValueError(f"risk_level and delta must be in (0, 1); got {risk_level}, {delta}")
    s, y = _paired(scores, labels, "scores and labels")
    s, y = np.clip(s, 0.0, 1.0), y.astype(int)
    n = int(len(s))
    if n < max(min_samples, 1):
        return ThresholdResult(None, n, 0, None, False)
    if fwer not in FWER_METHODS:
        raise ValueError(f"fwer must be one of {FWER_METHODS}; got {fwer!r}")
    _check_measure(risk_measure)
    if grid is None and train is not None and fwer == "fixed_sequence":
        grid = ordered_grid(train[0], train[1], n, risk_level, delta, risk_measure=risk_measure)
    grid = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=float).reshape(-1)
    if fwer == "fixed_sequence":
        # The order is part of the procedure: strict (high threshold, fewest accepted) first, then looser.
        grid = np.unique(grid)[::-1]
        procedure = _fixed_sequence(max(1, min(int(n_starts), len(grid))))
    else:
        procedure = _holm_without_empty_sets()
    if risk_measure == ALL_REQUESTS:
        # Among certified thresholds MAPIE keeps the one maximising recall, i.e. the lowest (most accepted).
        risk = dict(risk=_accepted_and_unacceptable(), target_level=float(risk_level), best_predict_param_choice=recall)
    else:
        risk = dict(risk="precision", target_level=float(1.0 - risk_level))
    controller = BinaryClassificationController(
        predict_function=_Scores(), confidence_level=float(1.0 - delta), list_predict_params=grid,
        fwer_method=procedure, **risk,
    )
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # all-0/1 score warnings, empty accepted sets at high thresholds
        controller.calibrate(s, y)
    thr = controller.best_predict_param
    if thr is None:
        return ThresholdResult(None, n, 0, None, False)
    acc = s >= thr
    n_acc = int(acc.sum())
    emp: float | None
    if risk_measure == ALL_REQUESTS:
        emp = float((acc & (y == 0)).mean())
    else:
        emp = float(1.0 - y[acc].mean()) if n_acc else None
    return ThresholdResult(float(thr), n, n_acc, emp, True)


def calibrate_cascade(task_ids: ArrayLike, start: ArrayLike, scores: ArrayLike, labels: ArrayLike, n_tasks: int,
                      risk_level: ArrayLike, delta: ArrayLike, min_samples: int, max_escalations: int,
                      tier_up: _cascade.Flags | None = None, grid: ArrayLike | None = None, *,
                      grids: Sequence[Sequence[ArrayLike | None]] | None = None, fwer: str = "holm",
                      n_starts: int = 1, train: tuple[ArrayLike, ArrayLike, ArrayLike] | None = None,
                      skip_uncertified: bool = True, risk_measure: str = ACCEPTED_ANSWERS,
                      chains: ArrayLike | None = None) -> list[list[ThresholdResult]]:
    """Sequential calibration over the cascade: result[task][tier].

    Arrays over calibration queries: task_ids (n,), start (n,) start tier from the router's start rule,
    scores (n, K) confidence of each tier's answer, labels (n, K) 1 = acceptable (NaN = unknown).
    Tier k of a task is calibrated only on the queries that would reach it at run time: their plan (start tier,
    the task's chain, tiers that are down or, with skip_uncertified, have no certified threshold for the task,
    escalation limit: `cascade.attempt_plan`, as `cascade.simulate_cascade` and the server use it) contains k, and
    the already-fixed thresholds of the tiers tried before k reject them. While k itself is calibrated it is taken
    as usable (if it ends uncertified it is skipped, and the queries reaching it do not matter). A chain's end (the
    reference when `chains` is None) is never thresholded: it always answers; tiers off a task's chain stay
    uncertified for it.
    risk_level, delta: scalars, or (n_tasks, K) arrays per (task, tier) (e.g. from `floor_risk_levels`); a risk
    level <= 0 certifies nothing for that (task, tier).
    chains: optional (n_tasks, K) bool chain membership per task (`chains.learn_chains`); None = every tier.
    grid: one candidate grid for every (task, tier); grids: per-(task, tier) grids, grids[t][k] (array or None =
    `grid`), e.g. `training_grid` of training-split scores. fwer, n_starts: see `calibrate_threshold`.
    train: optional (task_ids, scores (m, K), labels (m, K)) of router-TRAINING queries (disjoint from these); with
    fwer="fixed_sequence" each (task, tier) without a grid gets `ordered_grid` from that task's training answers."""
    task_ids = np.asarray(task_ids, dtype=int)
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=float)
    n, K = scores.shape
    start = np.asarray(start, dtype=int)
    alpha = np.broadcast_to(np.asarray(risk_level, dtype=float), (n_tasks, K))
    dlt = np.broadcast_to(np.asarray(delta, dtype=float), (n_tasks, K))
    ch = np.ones((n_tasks, K), dtype=bool) if chains is None else np.asarray(chains, dtype=bool)
    end = np.atleast_1d(_cascade.chain_ends(ch))  # ch is (n_tasks, K): one end per task
    usable = np.ones((n_tasks, K), dtype=bool)  # tiers not yet calibrated count as usable (see docstring)
    thresholds = np.full((n_tasks, K), np.nan)
    out: list[list[ThresholdResult]] = [[ThresholdResult(None, 0, 0, None, False)] * K for _ in range(n_tasks)]
    rejected_so_far = np.ones(n, dtype=bool)  # not accepted by any earlier tier
    for k in range(K):
        plan = _cascade.attempt_plan(start, K, max_escalations, tier_up,
                                     usable[task_ids] if skip_uncertified and n else None,
                                     None if chains is None else ch[task_ids])
        reach = plan[:, k] & rejected_so_far
        for t in range(n_tasks):
            if not ch[t, k]:
                usable[t, k] = False
                continue
            m = reach & (task_ids == t)
            if k == end[t]:
                m &= ~np.isnan(labels[:, k])
                out[t][k] = ThresholdResult(None, int(m.sum()), int(m.sum()), None, False)
                continue
            if not alpha[t, k] > 0:  # the floor left this tier no room: it accepts nothing
                out[t][k] = ThresholdResult(None, int(m.sum()), 0, None, False)
                usable[t, k] = False
                continue
            g = grids[t][k] if grids is not None and grids[t][k] is not None else grid
            tr = None
            if train is not None:
                mt = np.asarray(train[0], dtype=int) == t
                tr = (np.asarray(train[1], dtype=float)[mt, k], np.asarray(train[2], dtype=float)[mt, k])
            res = calibrate_threshold(scores[m, k], labels[m, k], float(alpha[t, k]), float(dlt[t, k]), min_samples,
                                      g, fwer, n_starts, tr, risk_measure)
            out[t][k] = res
            if res.threshold is not None:
                thresholds[t, k] = res.threshold
            usable[t, k] = res.threshold is not None
        thr = thresholds[task_ids, k]
        accepted = reach & ~np.isnan(thr) & (np.nan_to_num(scores[:, k], nan=-1.0) >= np.nan_to_num(thr, nan=2.0))
        rejected_so_far &= ~accepted
    return out


# ------------------------------------------------------------------------------------------- the quality floor


def _betting_log_capital(x: ArrayLike, m: ArrayLike, delta: float, seed: int = 0) -> np.ndarray:
    """max_t log K_t(m) for each candidate mean m of the one-sided hedged-capital betting test (below)."""
    x = np.clip(np.asarray(x, dtype=float).reshape(-1), 0.0, 1.0)
    m = np.atleast_1d(np.asarray(m, dtype=float))
    n = len(x)
    if n == 0:
        return np.zeros(len(m))
    x = x[np.random.default_rng(seed).permutation(n)]
    i = np.arange(1, n + 1)
    mu = (0.5 + np.cumsum(x)) / (i + 1)
    var = (0.25 + np.cumsum((x - mu) ** 2)) / (i + 1)
    var_prev = np.concatenate([[0.25], var[:-1]])
    lam = np.sqrt(2 * np.log(1 / delta) / (n * var_prev))
    lam_m = np.minimum(lam[None, :], 0.5 / np.maximum(m[:, None], 1e-12))
    log_capital: np.ndarray = np.cumsum(np.log1p(lam_m * (x[None, :] - m[:, None])), axis=1).max(axis=1)
    return log_capital


def betting_lower(x: ArrayLike, delta: float, grid: int = 2000, seed: int = 0) -> float:
    """One-sided lower confidence bound at level 1 - delta on the mean of i.i.d. x in [0, 1]: the hedged-capital
    betting bound of Waudby-Smith & Ramdas (2023, JRSS-B, "Estimating means of bounded random variables by
    betting"), one-sided. For each candidate mean m the capital prod_i (1 + lam_i (x_i - m)) is a non-negative
    supermartingale when the mean is <= m (lam_i >= 0 predictable, <= 1/(2m)), so by Ville's inequality it ever
    reaches 1/delta with probability <= delta; the bound is the smallest m never rejected. lam_i is their
    predictable plug-in sqrt(2 log(1/delta) / (n sigma_{i-1}^2)). Adapts to the variance (much tighter than
    Hoeffding for paired differences that are mostly 0). The bets are sequential, so the data are first put in a
    fixed pseudo-random order (seed `seed`, independent of their values): a sorted input (e.g. rows grouped by
    source) would otherwise break the i.i.d. order the bound needs."""
    if not len(np.asarray(x).reshape(-1)):
        return 0.0
    m = np.linspace(0.0, 1.0, grid + 1)[1:]  # candidate means (m = 0 is never rejected)
    rejected = _betting_log_capital(x, m, delta, seed) >= np.log(1 / delta)
    # rejection is monotone in m up to the truncation; the bound is the largest m below which every m is rejected
    if not rejected[0]:
        return 0.0
    return float(m[np.argmin(rejected) - 1]) if not rejected.all() else float(m[-1])


def floor_p_value(routed: ArrayLike, reference: ArrayLike, floor: float, delta: float, seed: int = 0) -> float:
    """p-value of H0 "E[routed] < floor x E[reference]" (the quality ratio against always-reference is below the
    floor) from paired labels (1 = acceptable) of the same random-sample requests: what the cascade answered under
    one fixed setting, and what the reference answered. d_i = routed_i - floor x reference_i lies in [-floor, 1];
    the betting test of `betting_lower` on (d_i + floor) / (1 + floor) against the mean floor / (1 + floor), i.e.
    E[d] = 0; p = min(1, 1 / max_t K_t) (Ville). delta only tunes the bets (lam_i), as in `betting_lower`."""
    y, r = _paired(routed, reference, "routed and reference labels")
    if not len(y):
        return 1.0
    x = ((y >= 0.5).astype(float) - floor * (r >= 0.5) + floor) / (1.0 + floor)
    log_k = float(_betting_log_capital(x, floor / (1.0 + floor), delta, seed)[0])
    return float(min(1.0, np.exp(-max(log_k, 0.0))))


@dataclass(frozen=True)
class LevelCertificate:
    """`certify_level`'s outcome: which setting of a strict-to-loose sequence holds a quality floor."""

    index: int | None  # the loosest setting certified (None: not even the strictest one)
    p_values: list[float]
    n: int  # paired calibration labels
    quality_ratio: float | None  # routed / reference quality on the calibration sample at `index`

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def certify_level(routed: ArrayLike, reference: ArrayLike, floor: float, delta: float) -> LevelCertificate:
    """Learn-then-Test for a quality floor over a sequence of cascade settings (docs/guarantee.md, "The quality
    floor"): routed is (n, T), column j the labels (1 = acceptable, NaN = unknown) of what the cascade answers the
    n calibration requests under setting j, settings ordered from strict (answers close to the reference's) to
    loose (cheaper); reference is (n,) the reference's labels. Each setting is tested with `floor_p_value`, walked
    by MAPIE's fixed-sequence procedure at level delta (it stops at the first setting not certified). With
    probability >= 1 - delta the setting returned has E[routed] >= floor x E[reference] on new traffic from the
    same distribution. The sequence must be fixed without the calibration labels (e.g. one confidence level for
    every cheaper tier, from strict to loose)."""
    if not 0 < floor <= 1 or not 0 < delta < 1:
        raise ValueError(f"floor must be in (0, 1] and delta in (0, 1); got {floor}, {delta}")
    Y = np.asarray(routed, dtype=float)
    if Y.ndim != 2:
        raise ValueError(f"routed must be (n, settings); got shape {Y.shape}")
    r = np.asarray(reference, dtype=float).reshape(-1)
    if len(r) != len(Y):
        raise ValueError(f"routed has {len(Y)} rows and reference {len(r)}")
    p = [floor_p_value(Y[:, j], r, floor, delta) for j in range(Y.shape[1])]
    ok = _fixed_sequence(1).run(np.asarray(p), delta) if p else np.zeros(0, dtype=int)
    j = int(ok.max()) if len(ok) else None
    keep = ~np.isnan(r)
    ratio = None
    if j is not None:
        both = keep & ~np.isnan(Y[:, j])
        qr = float((r[both] >= 0.5).mean()) if both.any() else 0.0
        ratio = float((Y[both, j] >= 0.5).mean() / qr) if qr > 0 else None
    return LevelCertificate(j, p, int(keep.sum()), ratio)


# The level family's settings, strict to loose: one confidence level for every cheaper tier of a task's chain. Fixed
# before any data is seen, as `certify_level`'s sequence must be.
LEVELS = np.round(np.linspace(1.0, 0.0, 51), 3)


def certify_floor_levels(start: ArrayLike, scores: ArrayLike, labels: ArrayLike, chains: ArrayLike | None, floor: float,
                         delta: float, max_escalations: int,
                         levels: Sequence[float] | np.ndarray = LEVELS) -> tuple[float | None, LevelCertificate]:
    """A quality floor for a group of requests (one task, or a policy's traffic mix): the loosest confidence level
    (one threshold for every cheaper tier of each request's chain) certified by `certify_level` to keep the group's
    quality ratio against always-reference >= floor, with probability >= 1 - delta.

    start (n,), scores (n, K), labels (n, K) (1 = acceptable, NaN = unknown; the last column is the reference's),
    chains (n, K) bool: the calibration requests of the group, as the cascade would route them. The sequence tested
    is always-reference first, then `levels` (strict to loose). Returns (level, certificate); level None = not even
    the strictest level holds the floor: serve the group from the reference (the certificate's index is 0 when
    always-reference itself was certified, None when nothing was)."""
    lab = np.asarray(labels, dtype=float)
    n, K = lab.shape
    cols = [lab[:, -1]]
    for v in levels:
        r = _cascade.simulate_cascade(start, scores, lab, np.zeros((n, K)), np.full((n, K), float(v)),
                                      max_escalations, chains=chains)
        cols.append(r.quality)
    cert = certify_level(np.column_stack(cols) if n else np.zeros((0, len(cols))), lab[:, -1], floor, delta)
    level = None if cert.index in (None, 0) else float(np.asarray(levels)[cert.index - 1])
    return level, cert


def thresholds_table(results: list[list[ThresholdResult]]) -> np.ndarray:
    """(n_tasks, K) array of thresholds, NaN where uncertified (for `cascade.simulate_cascade`)."""
    return np.array([[np.nan if r.threshold is None else r.threshold for r in row] for row in results], dtype=float)
