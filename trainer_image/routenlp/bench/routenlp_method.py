"""RouteNLP in the benchmark, built from the router's own code (routenlp.router), not a copy:

1. `difficulty.DifficultyRouter` is trained on the router-training split (per-tier acceptance, with preference
   pairs derived from the outcomes: tier a's answer acceptable and tier b's not).
2. The answer confidence of a tier = `confidence.fit_confidence` per (task, tier) over two features: `prior` (the
   router's predicted acceptance of that tier) and `answer_score` (the offline answer scorer, which stands in for
   token logprobs). It is fitted on out-of-fold router priors and scorer outputs of the training split, so it never
   sees the calibration data.
3. Each task has its own chain over the portfolio (`Split.chains`, `chains.learn_chains` on the training split,
   as the trainer learns them): the task's cost/quality Pareto set, ending at its best tier.
   Start tier = `cascade.start_tiers(prior, quality_target, chain=...)`; thresholds per (task, tier) =
   `conformal.calibrate_cascade` (MAPIE Learn-then-Test) on the calibration split at risk level alpha, confidence
   1 - delta, for the risk measure `risk_measure` (default `allRequests`: the share of the task's requests reaching
   the tier that get an unacceptable answer accepted there; `acceptedAnswers`: the error rate among accepted
   answers); by default fixed-sequence testing over a sequence learnt on the TRAINING split's confidences and labels
   (`conformal.ordered_grid`; `fwer="holm"`: Bonferroni-Holm over the fixed 0.00..0.99 grid); test =
   `cascade.simulate_cascade` with those thresholds (tiers with no certified threshold for a task are skipped, and
   calibration uses the same plans).

Knob = (quality_target, alpha). The headline is the configured (--quality-target, --risk); the operating points at
quality ratios 0.95/0.97/0.99 sweep the grid on calibration data. Knob (FLOOR, f) is the certified quality floor:
no sweep, `calibrate_floor` derives every (task, tier)'s alpha and delta from f (`conformal.certify_floor`).
"""

from __future__ import annotations

import numpy as np

from routenlp.router.cascade import simulate_cascade, start_tiers
from routenlp.router.conformal import (ACCEPTED_ANSWERS, ALL_REQUESTS, calibrate_cascade, certify_floor,
                                       thresholds_table, training_grid)

from .baselines import Method, Split
from .features import out_of_fold

QUALITY_TARGETS = [0.0, 0.97, 1.0]
FLOOR = "floor"  # knob (FLOOR, f): calibrated for the quality floor f (no sweep)
# Risk levels swept for the operating points, per risk measure. Under `allRequests` alpha is a share of all
# requests reaching the tier, up to the tier's own error rate (accepting everything); the steps are fine where the
# 0.95-0.99 operating points sit (alpha of a few points) and coarse above. 3 x 20 settings: each is one
# `calibrate_cascade` per seed, the bulk of the benchmark's time once chains have several tiers.
RISKS = {ACCEPTED_ANSWERS: [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5],
         ALL_REQUESTS: [0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.12, 0.14, 0.17, 0.2,
                        0.25, 0.3, 0.35, 0.4, 0.5]}


def preference_pairs(quality: np.ndarray) -> np.ndarray:
    """(query, a, b) rows where tier a's answer is acceptable and tier b's is not."""
    ok = quality >= 0.5
    rows = []
    K = quality.shape[1]
    for a in range(K):
        for b in range(K):
            if a != b:
                q = np.flatnonzero(ok[:, a] & ~ok[:, b])
                rows.append(np.column_stack([q, np.full(len(q), a), np.full(len(q), b)]))
    return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), dtype=np.int64)


class RouteNLP(Method):
    name = "routenlp"

    def __init__(self, risk: float = 0.05, delta: float = 0.1, quality_target: float = 0.97,
                 min_calibration_samples: int = 10, epochs: int = 30, folds: int = 3,
                 quality_targets=None, risks=None, task_of=None, fwer: str = "fixed_sequence",
                 risk_measure: str = ALL_REQUESTS, floor_quality_target: float = 0.0):
        self.risk, self.delta, self.quality_target = risk, delta, quality_target
        # Start rule under a floor: 0 = every request tries its chain's cheapest certified tier first, so the
        # cheaper tiers see (and spend their alpha on) all the task's traffic.
        self.floor_quality_target = floor_quality_target
        self.fwer, self.risk_measure = fwer, risk_measure
        self.min_samples, self.epochs, self.folds = min_calibration_samples, epochs, folds
        qts = QUALITY_TARGETS if quality_targets is None else quality_targets
        rs = RISKS[risk_measure] if risks is None else risks
        self.knobs = [(qt, r) for qt in qts for r in rs]
        if (quality_target, risk) not in self.knobs:
            self.knobs.append((quality_target, risk))
        self.default = (quality_target, risk)
        # task_of: optional (n,) task ids overriding the outcome table's (the shift study pools tasks).
        self.task_of = task_of

    # -------------------------------------------------------------------------------- fitting (train split only)

    def _tasks(self, s: Split) -> tuple[np.ndarray, list[str]]:
        if self.task_of is not None:
            t = np.asarray(self.task_of)
            return t, [f"task{i}" for i in range(int(t.max()) + 1)]
        return s.outcomes.tasks, s.outcomes.task_names

    def fit(self, s: Split, progress: bool = False):
        from routenlp.router.confidence import ConfidenceSet, fit_confidence
        from routenlp.router.difficulty import DifficultyRouter

        super().fit(s)
        tasks, names = self._tasks(s)
        self.tasks, self.task_names = tasks, names
        K = len(s.tiers)
        # Chains per task (the shift study pools tasks into one: every tier).
        self.chains = (s.chains if s.chains is not None and self.task_of is None
                       else np.ones((len(names), K), dtype=bool))
        tier_names = [s.outcomes.models[j] for j in s.tiers]
        tr = s.train
        Qt = s.Q[np.ix_(tr, s.tiers)]

        def new_router(rows):
            r = DifficultyRouter(tier_names, names, input_dim=s.X.shape[1])
            return r.fit(s.X[tr[rows]], tasks[tr[rows]], Qt[rows], preference_pairs(Qt[rows]), epochs=self.epochs,
                         seed=s.seed)

        prior_oof = out_of_fold(
            lambda a, b: new_router(a).predict_proba(s.X[tr[b]], tasks[tr[b]]), len(tr), self.folds, s.seed)
        self.router = new_router(np.arange(len(tr)))
        self.prior = np.zeros((s.outcomes.n, len(s.tiers)))
        self.prior[tr] = prior_oof
        rest = np.setdiff1d(np.arange(s.outcomes.n), tr)
        self.prior[rest] = self.router.predict_proba(s.X[rest], tasks[rest])
        # Confidence per (task, tier) on out-of-fold features of the training split (every non-reference tier: a
        # chain's end is not thresholded, but becomes a cheaper tier when the floor falls back to the reference).
        models: dict = {}
        for t, tname in enumerate(names):
            m = tasks[tr] == t
            for k, tier in enumerate(tier_names[:-1]):
                feats = {"prior": prior_oof[m, k], "answer_score": s.scores[tr[m], k]}
                cm = fit_confidence(feats, (Qt[m, k] >= 0.5).astype(float))
                if cm is not None:
                    models.setdefault(tname, {})[tier] = cm
        self.confidence = ConfidenceSet(models)
        self.conf = np.ones((s.outcomes.n, len(s.tiers)))  # reference column unused (never thresholded)
        for t, tname in enumerate(names):
            m = np.flatnonzero(tasks == t)
            for k, tier in enumerate(tier_names[:-1]):
                self.conf[m, k] = self.confidence.score_many(
                    tname, tier, {"prior": self.prior[m, k], "answer_score": s.scores[m, k]})
        self._thr: dict = {}
        return self

    # -------------------------------------------------------------------------------- calibration and running

    def _labels(self, idx) -> np.ndarray:
        s = self.s
        return (s.Q[np.ix_(idx, s.tiers)] >= 0.5).astype(float)

    def calibrate(self, cal_idx: np.ndarray, quality_target: float, risk: float) -> np.ndarray:
        """(n_tasks, K) threshold table from `conformal.calibrate_cascade` on `cal_idx`."""
        s = self.s
        K = len(s.tiers)
        ch = self.chains[self.tasks[cal_idx]]
        start = start_tiers(self.prior[cal_idx], quality_target, chain=ch)
        tr = s.train
        train = (self.tasks[tr], self.conf[tr], self._labels(tr))
        res = calibrate_cascade(self.tasks[cal_idx], start, self.conf[cal_idx], self._labels(cal_idx),
                                len(self.task_names), risk, self.delta, self.min_samples, max_escalations=K - 1,
                                fwer=self.fwer, train=train if self.fwer == "fixed_sequence" else None,
                                risk_measure=self.risk_measure, chains=self.chains)
        return thresholds_table(res)

    def calibrate_floor(self, cal_idx: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray, list]:
        """The certified floor: per task, `certify_floor` on the calibration labels (the chain may gain the reference
        as its end), then `calibrate_cascade` at those per-(task, tier) alphas and deltas under allRequests, along
        fixed sequences that do not depend on alpha (training-score quantiles, strict to loose), so a smaller alpha
        can only give a stricter threshold (docs/guarantee.md, "The quality floor").
        Returns (thresholds (n_tasks, K), chains (n_tasks, K), per-task FloorRiskLevels)."""
        s = self.s
        K, nt = len(s.tiers), len(self.task_names)
        lab = self._labels(cal_idx)
        tc = self.tasks[cal_idx]
        chains, alphas, deltas, info = np.zeros((nt, K), bool), np.zeros((nt, K)), np.zeros((nt, K)), []
        for t in range(nt):
            chains[t], alphas[t], deltas[t], r = certify_floor(floor, self.delta, lab[tc == t], self.chains[t])
            info.append(r)
        tr = s.train
        grids = [[training_grid(self.conf[tr[self.tasks[tr] == t], k]) for k in range(K)] for t in range(nt)]
        start = start_tiers(self.prior[cal_idx], self.floor_quality_target, chain=chains[tc])
        res = calibrate_cascade(tc, start, self.conf[cal_idx], lab, nt, alphas, np.where(deltas > 0, deltas, 0.5),
                                self.min_samples, max_escalations=K - 1, grids=grids, fwer="fixed_sequence",
                                risk_measure=ALL_REQUESTS, chains=chains)
        return thresholds_table(res), chains, info

    def thresholds(self, knob, cal_idx=None):
        """Threshold table for a knob; for (FLOOR, f): (thresholds, chains, info) of `calibrate_floor`."""
        cal_idx = self.s.cal if cal_idx is None else cal_idx
        key = (knob, hash(np.asarray(cal_idx).tobytes()))
        if key not in self._thr:
            self._thr[key] = (self.calibrate_floor(cal_idx, knob[1]) if knob[0] == FLOOR
                              else self.calibrate(cal_idx, *knob))
        return self._thr[key]

    def simulate(self, idx: np.ndarray, knob, thr: np.ndarray | None = None):
        s = self.s
        K = len(s.tiers)
        chains, qt = self.chains, knob[0]
        if thr is None:
            thr = self.thresholds(knob)
            if knob[0] == FLOOR:
                thr, chains, _ = thr
                qt = self.floor_quality_target
        ch = chains[self.tasks[idx]]
        start = start_tiers(self.prior[idx], qt, chain=ch)
        return simulate_cascade(start, self.conf[idx], s.Q[np.ix_(idx, s.tiers)], s.C[np.ix_(idx, s.tiers)],
                                thr[self.tasks[idx]], max_escalations=K - 1, chains=ch)

    def run(self, idx, knob):
        r = self.simulate(idx, knob)
        return r.cost, r.quality
