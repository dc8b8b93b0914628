"""Baselines of the routing benchmark, and the oracle. Every method is fitted on the router-training split only;
settings (knobs) are chosen on the calibration split only.

A method has `knobs` (its settings, from cheap to dear or the other way: order does not matter), `fit(split)` and
`run(idx, knob) -> (cost per query, quality per query)` over any query indices. `default` is the knob reported as
its headline; None means "the operating point at quality ratio 0.97 chosen on calibration data".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .outcomes import Outcomes


@dataclass
class Split:
    """One seed's data: outcomes, query embeddings, split indices, cascade tiers and answer scores."""

    outcomes: Outcomes
    X: np.ndarray  # (n, d) query embeddings (L2-normalised)
    train: np.ndarray
    cal: np.ndarray
    test: np.ndarray
    seed: int
    tiers: list[int]  # model indices of the portfolio's tiers, cheapest first, last = reference
    scores: np.ndarray | None = None  # (n, K) answer scorer P(acceptable) per tier; train rows out-of-fold
    chains: np.ndarray | None = None  # (n_tasks, K) per-task chains over `tiers` (learnt on train); None = all
    global_chain: np.ndarray | None = None  # (K,) the one cost/quality Pareto chain of all tasks (FrugalGPT's)

    @property
    def Q(self) -> np.ndarray:
        return self.outcomes.quality

    @property
    def C(self) -> np.ndarray:
        return self.outcomes.cost


def _pick(s: Split, idx: np.ndarray, choice: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(idx)
    return s.C[rows, choice], s.Q[rows, choice]


class Method:
    name = "method"
    knobs: list = [None]
    default = None

    def fit(self, s: Split) -> "Method":
        self.s = s
        return self

    def run(self, idx: np.ndarray, knob) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class AlwaysModel(Method):
    """Always the same model (the reference, or the cheapest)."""

    def __init__(self, name: str, which: str):
        self.name, self.which = name, which
        self.knobs, self.default = [None], None

    def run(self, idx, knob=None):
        s = self.s
        j = s.outcomes.reference if self.which == "reference" else int(np.argmin(s.C[s.train].mean(0)))
        return _pick(s, idx, np.full(len(idx), j))


class BestSingle(Method):
    """Per task, one model chosen on train: the cheapest whose train quality >= knob x the best train quality of
    that task (knob 1.0 = the best model per task, the headline)."""

    name = "best_single"

    def __init__(self):
        self.knobs = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 1.0]
        self.default = 1.0

    def fit(self, s):
        super().fit(s)
        tr = s.train
        self.task_q = np.zeros((len(s.outcomes.task_names), s.Q.shape[1]))
        self.mean_c = s.C[tr].mean(0)
        for t in range(len(s.outcomes.task_names)):
            m = tr[s.outcomes.tasks[tr] == t]
            self.task_q[t] = s.Q[m].mean(0) if len(m) else s.Q[tr].mean(0)
        return self

    def model_for(self, task: int, knob: float) -> int:
        q = self.task_q[task]
        ok = np.flatnonzero(q >= knob * q.max() - 1e-12)
        return int(ok[np.argmin(self.mean_c[ok])])

    def run(self, idx, knob):
        tasks = self.s.outcomes.tasks[idx]
        lut = np.array([self.model_for(t, knob) for t in range(len(self.task_q))])
        return _pick(self.s, idx, lut[tasks])


class RandomMix(Method):
    """Random routing: each query goes to the reference with probability p, else to the cheapest model. The
    headline p matches a given cost (RouteNLP's test cost), set with `match_cost`."""

    name = "random"

    def __init__(self):
        self.knobs = list(np.round(np.linspace(0, 1, 21), 3))
        self.default = None

    def fit(self, s):
        super().fit(s)
        self.u = np.random.default_rng(s.seed + 7).random(s.outcomes.n)
        self.cheap = int(np.argmin(s.C[s.train].mean(0)))
        return self

    def run(self, idx, knob):
        s = self.s
        choice = np.where(self.u[idx] < knob, s.outcomes.reference, self.cheap)
        return _pick(s, idx, choice)

    def match_cost(self, idx, cost: float) -> float:
        """p whose expected mean cost on `idx` equals `cost`."""
        c_cheap = self.s.C[idx, self.cheap].mean()
        c_ref = self.s.C[idx, self.s.outcomes.reference].mean()
        return float(np.clip((cost - c_cheap) / (c_ref - c_cheap), 0, 1)) if c_ref > c_cheap else 0.0


LAMBDAS = [0.0] + list(np.round(np.geomspace(0.002, 5.0, 30), 5))


class UtilityRouter(Method):
    """Shared rule of the kNN and MF routers: pick argmax_m  q_hat(m) - lambda x c_hat(m) / c_ref, where q_hat is
    the predicted quality and c_hat the model's mean train cost per task (knob = lambda)."""

    def __init__(self):
        self.knobs, self.default = LAMBDAS, None

    def fit(self, s):
        super().fit(s)
        nt = len(s.outcomes.task_names)
        tr = s.train
        self.c_hat = np.zeros((nt, s.C.shape[1]))
        for t in range(nt):
            m = tr[s.outcomes.tasks[tr] == t]
            self.c_hat[t] = s.C[m].mean(0) if len(m) else s.C[tr].mean(0)
        self.c_ref = s.C[tr, s.outcomes.reference].mean()
        self._cache: dict = {}
        return self

    def predict_quality(self, idx) -> np.ndarray:
        raise NotImplementedError

    def run(self, idx, knob):
        key = hash(np.asarray(idx).tobytes())
        if key not in self._cache:
            self._cache[key] = self.predict_quality(idx)
        qh = self._cache[key]
        util = qh - knob * self.c_hat[self.s.outcomes.tasks[idx]] / self.c_ref
        # Ties (e.g. lambda = 0 and equal predictions) go to the cheaper model: models are sorted cheapest first.
        return _pick(self.s, idx, np.argmax(util + 1e-9 * -np.arange(util.shape[1]), axis=1))


class KNNRouter(UtilityRouter):
    """RouterBench-style kNN router: q_hat(m) = mean quality of model m on the k nearest training queries
    (cosine similarity of MiniLM embeddings)."""

    name = "knn"

    def __init__(self, k: int = 40):
        super().__init__()
        self.k = k

    def predict_quality(self, idx):
        s = self.s
        Xtr = s.X[s.train]
        out = np.zeros((len(idx), s.Q.shape[1]))
        for a in range(0, len(idx), 1024):  # bounded memory
            sims = s.X[idx[a : a + 1024]] @ Xtr.T
            same = idx[a : a + 1024, None] == s.train[None, :]
            sims[same] = -np.inf  # a training query is not its own neighbour
            nn = np.argpartition(-sims, self.k, axis=1)[:, : self.k]
            out[a : a + 1024] = s.Q[s.train[nn]].mean(1)
        return out


class MFRouter(UtilityRouter):
    """RouteLLM-style matrix-factorisation router: P(model m acceptable on query x) =
    sigmoid(<v_m, W x + u_task> + b_m), trained with binary cross-entropy on the training outcomes (all models at
    once; latent dimension `dim`)."""

    name = "mf"

    def __init__(self, dim: int = 32, epochs: int = 60, lr: float = 3e-3, weight_decay: float = 1e-4):
        super().__init__()
        self.dim, self.epochs, self.lr, self.wd = dim, epochs, lr, weight_decay

    def fit(self, s):
        super().fit(s)
        import torch

        torch.manual_seed(s.seed)
        X = torch.from_numpy(s.X[s.train].astype(np.float32))
        T = torch.from_numpy(s.outcomes.tasks[s.train].astype(np.int64))
        Y = torch.from_numpy((s.Q[s.train] >= 0.5).astype(np.float32))
        m = Y.shape[1]
        self.W = torch.nn.Linear(X.shape[1], self.dim, bias=False)
        self.U = torch.nn.Embedding(len(s.outcomes.task_names), self.dim)
        self.V = torch.nn.Embedding(m, self.dim)
        self.b = torch.nn.Parameter(torch.zeros(m))
        params = list(self.W.parameters()) + list(self.U.parameters()) + list(self.V.parameters()) + [self.b]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.wd)
        gen = torch.Generator().manual_seed(s.seed)
        for _ in range(self.epochs):
            perm = torch.randperm(len(X), generator=gen)
            for a in range(0, len(X), 256):
                it = perm[a : a + 256]
                logits = self._logits(X[it], T[it])
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, Y[it])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return self

    def _logits(self, X, T):
        z = self.W(X) + self.U(T)  # (b, dim)
        return z @ self.V.weight.T + self.b

    def predict_quality(self, idx):
        import torch

        with torch.inference_mode():
            X = torch.from_numpy(self.s.X[idx].astype(np.float32))
            T = torch.from_numpy(self.s.outcomes.tasks[idx].astype(np.int64))
            return torch.sigmoid(self._logits(X, T)).numpy()


class FrugalCascade(Method):
    """FrugalGPT-style cascade over one chain for all tasks (the cost/quality Pareto set of train): the answer scorer (`features.AnswerScorer`) scores each
    tier's recorded answer; a non-reference tier's answer is accepted iff its score >= tau (one tau for all tiers,
    tuned on calibration data; no guarantee). Simulated with the router's `cascade.simulate_cascade`."""

    name = "frugalgpt"

    def __init__(self):
        self.knobs = list(np.round(np.linspace(0.0, 1.0, 41), 3))
        self.default = None

    def run(self, idx, knob):
        from routenlp.router.cascade import simulate_cascade

        s = self.s
        K = len(s.tiers)
        thr = np.full(K, float(knob))
        res = simulate_cascade(np.zeros(len(idx), dtype=int), s.scores[idx], s.Q[np.ix_(idx, s.tiers)],
                               s.C[np.ix_(idx, s.tiers)], thr[None, :], max_escalations=K - 1,
                               chains=s.global_chain)
        return res.cost, res.quality


class Oracle(Method):
    """The limit: the cheapest model whose answer is acceptable; if none is, the cheapest model."""

    name = "oracle"

    def run(self, idx, knob=None):
        s = self.s
        Q, C = s.Q[idx], s.C[idx]
        ok = Q >= 0.5
        masked = np.where(ok, C, np.inf)
        choice = np.where(ok.any(1), np.argmin(masked, axis=1), np.argmin(C, axis=1))
        return _pick(s, idx, choice)
