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

Knobs: (quality_target, alpha) is the configured policy (the headline: --quality-target, --risk). (LEVEL, chain set,
start rule, level) is the level family the operating points at quality ratios 0.95/0.97/0.99 sweep on calibration
data: one confidence level for every cheaper tier of each task's chain, a start rule being a quality target or a cost
weight (`cascade.StartRule`). (FLOOR, f) is the certified quality floor f (`floor_plan`; no sweep).
"""

from __future__ import annotations

import numpy as np

from routenlp.router.cascade import StartRule, simulate_cascade, start_tiers
from routenlp.router.conformal import ALL_REQUESTS, LEVELS, calibrate_cascade, thresholds_table
from routenlp.router.floor import (
    CHAIN_SETS, COST_WEIGHT, COST_WEIGHTS, QUALITY_TARGETS, chain_sets, choose, frontier, start_rule,
    training_curves,
)

from .baselines import Method, Split
from .features import out_of_fold

LEVEL = "level"  # knob (LEVEL, chain set, start rule, level): one confidence level for every cheaper chain tier
FLOOR = "floor"  # knob (FLOOR, f): the certified quality floor f (no sweep; `floor_plan`)


def rule_label(rule) -> float | str:
    """A swept start rule as reports show it: the quality target, or "costWeight=w"."""
    return f"{COST_WEIGHT}={rule[1]:g}" if isinstance(rule, tuple) else rule


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
                 quality_targets=None, levels=None, task_of=None, fwer: str = "fixed_sequence",
                 risk_measure: str = ALL_REQUESTS, floor_scope: str = "policy", confidence_scope: str = "tier",
                 cost_weights=None, router_holdout: float = 0.15):
        self.risk, self.delta, self.quality_target = risk, delta, quality_target
        self.router_holdout = router_holdout  # the DifficultyRouter's early-stopping share (0: fixed epochs)
        self.fwer, self.risk_measure = fwer, risk_measure
        self.floor_scope, self.confidence_scope = floor_scope, confidence_scope
        self.min_samples, self.epochs, self.folds = min_calibration_samples, epochs, folds
        self.quality_targets = list(QUALITY_TARGETS) if quality_targets is None else list(quality_targets)
        weights = COST_WEIGHTS if cost_weights is None else list(cost_weights)
        self.start_rules = self.quality_targets + [(COST_WEIGHT, float(w)) for w in weights]
        self.levels = LEVELS if levels is None else np.asarray(levels, dtype=float)  # strict to loose
        # The operating points sweep the level family; the headline is the configured policy (per-tier alpha).
        self.knobs = [(LEVEL, cs, rule, float(v)) for cs in CHAIN_SETS for rule in self.start_rules
                      for v in self.levels]
        self.default = (quality_target, risk)
        self.knobs.append(self.default)
        # task_of: optional (n,) task ids overriding the outcome table's (the shift study pools tasks).
        self.task_of = task_of

    # -------------------------------------------------------------------------------- fitting (train split only)

    def _tasks(self, s: Split) -> tuple[np.ndarray, list[str]]:
        if self.task_of is not None:
            t = np.asarray(self.task_of)
            return t, [f"task{i}" for i in range(int(t.max()) + 1)]
        return s.outcomes.tasks, s.outcomes.task_names

    def fit(self, s: Split, progress: bool = False):
        from routenlp.router.confidence import fit_confidence_set
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
                         seed=s.seed, holdout=self.router_holdout)

        prior_oof = out_of_fold(
            lambda a, b: new_router(a).predict_proba(s.X[tr[b]], tasks[tr[b]]), len(tr), self.folds, s.seed)
        self.router = new_router(np.arange(len(tr)))
        self.prior = np.zeros((s.outcomes.n, len(s.tiers)))
        self.prior[tr] = prior_oof
        rest = np.setdiff1d(np.arange(s.outcomes.n), tr)
        self.prior[rest] = self.router.predict_proba(s.X[rest], tasks[rest])
        # Confidence per tier, pooled over tasks (`fit_confidence_set`, as the trainer fits it; `confidence_scope
        # ="task"`: one model per (task, tier)), on out-of-fold features of the training split. Every non-reference
        # tier gets one: a chain's end is not thresholded, but is a cheaper tier of the global chain.
        Qfull = s.Q[:, s.tiers]
        feats = {"prior": self.prior, "answer_score": s.scores}
        groups = [[t] for t in names] if self.confidence_scope == "task" else None
        rows = np.zeros(s.outcomes.n, dtype=bool)
        rows[tr] = True
        self.confidence = fit_confidence_set(feats, (Qfull >= 0.5).astype(float), tasks, names, tier_names,
                                             groups=groups, rows=rows)
        self.conf = np.ones((s.outcomes.n, len(s.tiers)))  # reference column unused (never thresholded)
        for t, tname in enumerate(names):
            m = np.flatnonzero(tasks == t)
            for k, tier in enumerate(tier_names[:-1]):
                self.conf[m, k] = self.confidence.score_many(
                    tname, tier, {"prior": self.prior[m, k], "answer_score": s.scores[m, k]})
        # The chain sets of the level family (`floor.CHAIN_SETS`).
        self.chain_sets = chain_sets(self.chains, Qt, tasks[tr], s.global_chain)
        # Each tier's mean cost per request of a task over the reference's (the cost-weighted start rules' costs).
        C = s.C[np.ix_(tr, s.tiers)]
        ref_cost = max(float(C[:, -1].mean()), 1e-12)
        self.relative_cost = np.array([C[tasks[tr] == t].mean(0) if (tasks[tr] == t).any() else C.mean(0)
                                       for t in range(len(names))]) / ref_cost
        self._thr: dict = {}
        self._curves: dict | None = None  # `_train_curves`, filled on first use
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

    def start_rule(self, idx: np.ndarray, rule) -> StartRule:
        """The `cascade.StartRule` of a swept start rule (a quality target, or (COST_WEIGHT, w)) on rows idx."""
        return start_rule(rule, self.relative_cost[self.tasks[idx]])

    def _level_plan(self, chain_set: str, idx: np.ndarray, rule, level: float):
        """(start, thresholds per row, chains per row) of the level family on rows idx: every cheaper tier of the
        task's chain accepts an answer whose confidence is at least `level`."""
        ch = self.chain_sets[chain_set][self.tasks[idx]]
        thr = np.full((len(idx), len(self.s.tiers)), float(level))
        return start_tiers(self.prior[idx], self.start_rule(idx, rule), chain=ch), thr, ch

    def _run_level(self, idx, chain_set: str, rule, level: float):
        s = self.s
        start, thr, ch = self._level_plan(chain_set, idx, rule, level)
        return simulate_cascade(start, self.conf[idx], s.Q[np.ix_(idx, s.tiers)], s.C[np.ix_(idx, s.tiers)], thr,
                                max_escalations=len(s.tiers) - 1, chains=ch)

    def _train_curves(self) -> dict:
        """(chain set, start rule) -> (E[y], E[y r], cost) over the training split at each level (strict to loose;
        y = the routed answer acceptable, r = the reference's), computed once per seed: every floor reads them."""
        if self._curves is None:
            tr = self.s.train

            def run(cs, rule, v):
                x = self._run_level(tr, cs, rule, v)
                return (x.quality >= 0.5).astype(float), x.cost

            ref = (self.s.Q[tr, self.s.outcomes.reference] >= 0.5).astype(float)
            self._curves = training_curves(run, CHAIN_SETS, self.start_rules, self.levels, ref)
        return self._curves

    def floor_plan(self, floor: float, cal_idx: np.ndarray | None = None) -> dict:
        """The certified quality floor (docs/guarantee.md, "The quality floor"): `floor.frontier` orders every
        setting (chain set, start rule, level) of the level family on the TRAINING split (out-of-fold confidences;
        no calibration label is read), `floor.choose` certifies along it on the calibration split and takes the
        cheapest certified setting, as the trainer does (`retrain.calibrate`). Scope "policy": one setting for the
        traffic mix; scope "task": one per task, on the task's own requests."""
        s = self.s
        cal_idx = s.cal if cal_idx is None else cal_idx
        er = float((s.Q[s.train, s.outcomes.reference] >= 0.5).mean())
        n_group = len(cal_idx) / (1 if self.floor_scope == "policy" else max(len(self.task_names), 1))
        seq = frontier(self._train_curves(), self.levels, er, floor, n_group)
        groups = ([np.arange(len(cal_idx))] if self.floor_scope == "policy"
                  else [np.flatnonzero(self.tasks[cal_idx] == t) for t in range(len(self.task_names))])
        plan: list = [None] * len(self.task_names)  # per task: (chain set, start rule, level) or None = reference
        certs = []
        for g in groups:
            rows = cal_idx[g]
            runs = [self._run_level(rows, x.chain_set, x.start_rule, x.level) for x in seq]
            chosen, c = choose(seq, np.column_stack([(r.quality >= 0.5).astype(float) for r in runs])
                               if runs else np.zeros((len(rows), 0)), [r.cost.mean() for r in runs],
                               self._labels(rows)[:, -1], floor, self.delta)
            certs.append(c)
            for t in np.unique(self.tasks[rows]):
                plan[t] = None if chosen is None else (chosen.chain_set, chosen.start_rule, chosen.level)
        return {"plan": plan, "certificates": certs}

    def _run_plan(self, idx: np.ndarray, plan: list):
        """The cascade on rows idx under a per-task plan ((chain set, start rule, level) or None = reference)."""
        s = self.s
        K = len(s.tiers)
        n = len(idx)
        start, thr, ch = np.full(n, K - 1), np.ones((n, K)), np.tile(np.eye(K, dtype=bool)[-1], (n, 1))
        for t, p in enumerate(plan):
            m = np.flatnonzero(self.tasks[idx] == t)
            if p is not None and len(m):
                start[m], thr[m], ch[m] = self._level_plan(p[0], idx[m], p[1], p[2])
        return simulate_cascade(start, self.conf[idx], s.Q[np.ix_(idx, s.tiers)], s.C[np.ix_(idx, s.tiers)], thr,
                                max_escalations=K - 1, chains=ch)

    def thresholds(self, knob, cal_idx=None):
        """Threshold table for a knob (qt, alpha); for (FLOOR, f): `floor_plan`. Cached per calibration sample."""
        cal_idx = self.s.cal if cal_idx is None else cal_idx
        key = (knob, hash(np.asarray(cal_idx).tobytes()))
        if key not in self._thr:
            self._thr[key] = (self.floor_plan(knob[1], cal_idx) if knob[0] == FLOOR
                              else self.calibrate(cal_idx, *knob))
        return self._thr[key]

    def simulate(self, idx: np.ndarray, knob, thr: np.ndarray | None = None):
        s = self.s
        K = len(s.tiers)
        if knob[0] == LEVEL:
            return self._run_level(idx, *knob[1:])
        if knob[0] == FLOOR:
            return self._run_plan(idx, self.thresholds(knob)["plan"])
        if thr is None:
            thr = self.thresholds(knob)
        ch = self.chains[self.tasks[idx]]
        start = start_tiers(self.prior[idx], knob[0], chain=ch)
        return simulate_cascade(start, self.conf[idx], s.Q[np.ix_(idx, s.tiers)], s.C[np.ix_(idx, s.tiers)],
                                thr[self.tasks[idx]], max_escalations=K - 1, chains=ch)

    def run(self, idx, knob):
        r = self.simulate(idx, knob)
        return r.cost, r.quality
