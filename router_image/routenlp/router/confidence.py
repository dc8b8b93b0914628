"""Answer confidence: a small calibrated model per (task, tier) mapping answer features to P(answer acceptable).

`fit_confidence_set` fits one model per tier over a GROUP of tasks (by default all tasks of one kind: structured or
generation, whose features mean different things) and serves it for each task of the group: measured on MMLU-Pro
(docs/bench-routing.md), models pooled over tasks rank answers across tasks better than per-(task, tier) models
fitted on a few hundred answers each, and one confidence level then means the same in every task.

Features (any subset may be present; absent ones are NaN):
- mean_logprob, min_logprob: over the answer's tokens (vLLM returns them);
- label_prob: probability of the whole answer for structured tasks (exp of the summed token logprobs);
- prior: the difficulty router's predicted acceptance of that tier;
- answer_score: an external answer scorer's output (offline benchmarks without logprobs).
The model is a logistic regression on the features present when it was fitted (missing values imputed with the
training mean), stored as plain numbers in JSON. Without a fitted model, `fallback_score` (geometric mean of the
answer signals) is used; it is monotone in each feature, which is all the thresholds need. Fit it on data disjoint
from the conformal calibration data, or the guarantee does not hold; and compute features the same way offline and
online (`answer_features` with the task's kind), since thresholds hold only for the scores they were calibrated on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATURES = ("mean_logprob", "min_logprob", "label_prob", "prior", "answer_score")


def answer_features(token_logprobs: list[float] | None, structured: bool, prior: float | None) -> dict[str, float]:
    """Features of one answer from its token logprobs (None when the tier returned none)."""
    f = {name: math.nan for name in FEATURES}
    lps = [float(x) for x in (token_logprobs or []) if x is not None and math.isfinite(float(x))]
    if lps:
        f["mean_logprob"] = sum(lps) / len(lps)
        f["min_logprob"] = min(lps)
        if structured:
            f["label_prob"] = math.exp(max(sum(lps), -700.0))
    if prior is not None:
        f["prior"] = float(prior)
    return f


def fallback_score(features: dict[str, float]) -> float:
    """Geometric mean of the answer's own signals present: exp(mean_logprob), label_prob, answer_score. The router
    prior is used only when the answer carries none of them, so a score computed offline without priors equals the
    one served (thresholds must be calibrated on the very scores they are applied to). NaN if nothing is present."""
    parts = []
    if not _missing(features.get("mean_logprob")):
        parts.append(math.exp(features["mean_logprob"]))
    for name in ("label_prob", "answer_score"):
        v = features.get(name)
        if v is not None and not math.isnan(v):
            parts.append(min(max(v, 1e-12), 1.0))
    if not parts and not _missing(features.get("prior")):
        parts.append(min(max(features["prior"], 1e-12), 1.0))
    if not parts:
        return math.nan
    return float(math.exp(sum(math.log(max(p, 1e-12)) for p in parts) / len(parts)))


def _missing(v: float | None) -> bool:
    return v is None or math.isnan(v)


@dataclass
class ConfidenceModel:
    """Logistic regression over the named features (coefficients as plain floats)."""

    features: list[str]
    coef: list[float]
    intercept: float
    means: list[float]
    scales: list[float]
    n: int = 0

    def score_many(self, feats: dict[str, np.ndarray]) -> np.ndarray:
        """P(acceptable) for arrays of features (missing names or NaN entries -> training mean)."""
        n = len(next(iter(feats.values()))) if feats else 0
        z = np.full(n, self.intercept, dtype=float)
        for name, w, mu, sd in zip(self.features, self.coef, self.means, self.scales):
            x = np.asarray(feats.get(name, np.full(n, np.nan)), dtype=float)
            z += w * (np.where(np.isnan(x), mu, x) - mu) / sd
        p: np.ndarray = 1.0 / (1.0 + np.exp(-z))
        return p

    def score(self, features: dict[str, float]) -> float:
        """P(acceptable) for one answer."""
        z = self.intercept
        for name, w, mu, sd in zip(self.features, self.coef, self.means, self.scales):
            x = features.get(name, math.nan)
            z += w * ((mu if x is None or math.isnan(x) else x) - mu) / sd
        return 1.0 / (1.0 + math.exp(-max(min(z, 700.0), -700.0)))

    def to_json(self) -> dict[str, Any]:
        return {"features": self.features, "coef": self.coef, "intercept": self.intercept, "means": self.means,
                "scales": self.scales, "n": self.n}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ConfidenceModel":
        return cls(list(d["features"]), [float(c) for c in d["coef"]], float(d["intercept"]),
                   [float(m) for m in d["means"]], [float(s) for s in d["scales"]], int(d.get("n", 0)))


def fit_confidence(features: dict[str, np.ndarray], labels: np.ndarray, min_samples: int = 30,
                   C: float = 1.0) -> ConfidenceModel | None:
    """Fit one (task, tier) model on the features present (not all NaN). None when too few samples or one class."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels, dtype=float)
    keep = ~np.isnan(y)
    y = y[keep].astype(int)
    if len(y) < min_samples or len(np.unique(y)) < 2:
        return None
    names = [k for k in FEATURES if k in features and not np.all(np.isnan(np.asarray(features[k], float)[keep]))]
    if not names:
        return None
    cols, means, scales = [], [], []
    for k in names:
        x = np.asarray(features[k], dtype=float)[keep]
        mu = float(np.nanmean(x))
        sd = float(np.nanstd(x)) or 1.0
        cols.append((np.where(np.isnan(x), mu, x) - mu) / sd)
        means.append(mu)
        scales.append(sd)
    lr = LogisticRegression(C=C, max_iter=1000).fit(np.column_stack(cols), y)
    return ConfidenceModel(names, [float(c) for c in lr.coef_[0]], float(lr.intercept_[0]), means, scales, len(y))


@dataclass
class ConfidenceSet:
    """The models of every (task, tier); `score` falls back to `fallback_score` where none was fitted."""

    models: dict[str, dict[str, ConfidenceModel]] = field(default_factory=dict)

    def get(self, task: str, tier: str) -> ConfidenceModel | None:
        return self.models.get(task, {}).get(tier)

    def score(self, task: str, tier: str, features: dict[str, float]) -> float:
        m = self.get(task, tier)
        return m.score(features) if m is not None else fallback_score(features)

    def score_many(self, task: str, tier: str, feats: dict[str, np.ndarray]) -> np.ndarray:
        m = self.get(task, tier)
        if m is not None:
            return m.score_many(feats)
        n = len(next(iter(feats.values())))
        return np.array([fallback_score({k: float(v[i]) for k, v in feats.items()}) for i in range(n)])

    def to_json(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {task: {tier: m.to_json() for tier, m in tiers.items()} for task, tiers in self.models.items()}

    @classmethod
    def from_json(cls, d: dict[str, dict[str, dict[str, Any]]]) -> "ConfidenceSet":
        return cls({task: {tier: ConfidenceModel.from_json(m) for tier, m in tiers.items()} for task, tiers in d.items()})


def fit_confidence_set(features: dict[str, np.ndarray], labels: np.ndarray, task_ids: np.ndarray, tasks: list[str],
                       tiers: list[str], groups: list[list[str]] | None = None, min_samples: int = 30,
                       rows: np.ndarray | None = None) -> ConfidenceSet:
    """One `fit_confidence` model per (group of tasks, tier), served for every task of the group.

    features: name -> (n, K) arrays (NaN = absent); labels: (n, K) acceptability (NaN = unknown); task_ids: (n,)
    indices into tasks; tiers: the K tier names (the last, the reference, is never thresholded: no model);
    groups: task names pooled together (default: all tasks in one group; a task in no group gets its own model);
    rows: optional (n,) bool, the rows to fit on (the rest are ignored)."""
    y = np.asarray(labels, dtype=float)
    tid = np.asarray(task_ids)
    fit_rows = np.ones(len(tid), dtype=bool) if rows is None else np.asarray(rows, dtype=bool)
    grouped = [list(g) for g in (groups if groups is not None else [list(tasks)]) if g]
    seen = {t for g in grouped for t in g}
    grouped += [[t] for t in tasks if t not in seen]
    conf = ConfidenceSet()
    for group in grouped:
        member = fit_rows & np.isin(tid, [tasks.index(t) for t in group if t in tasks])
        for k, tier in enumerate(tiers[:-1]):
            m = member & ~np.isnan(y[:, k])
            model = fit_confidence({n: np.asarray(v)[m, k] for n, v in features.items()}, y[m, k],
                                   min_samples=min_samples)
            if model is not None:
                for t in group:
                    conf.models.setdefault(t, {})[tier] = model
    return conf
