"""Difficulty-aware router: shared query embedding + learned task embedding -> MLP -> one head per tier.

Head k predicts P(tier k's answer is acceptable | query, task). Trained as in the RouteNLP paper on quality signals
(binary cross-entropy on labelled (query, tier) outcomes) plus preference pairs (tier a's answer judged at least as
good as tier b's: pairwise logistic loss on the two heads' logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

WEIGHTS = "router.pt"
META = "router.json"
MIN_HOLDOUT = 100  # held-out queries below which `fit` trains for the full epoch count (too noisy to stop on)


class _Net(nn.Module):
    def __init__(self, input_dim: int, n_tasks: int, n_tiers: int, task_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.task_embedding = nn.Embedding(n_tasks, task_dim)
        self.trunk = nn.Sequential(
            nn.Linear(input_dim + task_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        )
        # One linear head per tier, stored as the rows of one matrix (same maths, one matmul).
        self.heads = nn.Linear(hidden, n_tiers)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.heads(self.trunk(torch.cat([x, self.task_embedding(task_ids)], dim=1)))
        return logits


class DifficultyRouter:
    """Per-tier acceptance predictor. Construct with tier and task names (cheapest tier first)."""

    def __init__(self, tier_names: list[str], task_names: list[str], input_dim: int = 384, task_dim: int = 16,
                 hidden: int = 128, dropout: float = 0.1):
        if not tier_names or not task_names:
            raise ValueError("DifficultyRouter needs at least one tier and one task")
        self.tier_names = list(tier_names)
        self.task_names = list(task_names)
        self.input_dim, self.task_dim, self.hidden, self.dropout = input_dim, task_dim, hidden, dropout
        self.net = _Net(input_dim, len(task_names), len(tier_names), task_dim, hidden, dropout)
        self.net.eval()
        self.history: list[float] = []  # mean training loss per epoch
        self.epochs_used: int | None = None  # set by fit

    def task_index(self, task: str) -> int | None:
        """Index of `task`, or None if the router was not trained on it."""
        try:
            return self.task_names.index(task)
        except ValueError:
            return None

    def fit(self, embeddings: np.ndarray, task_ids: np.ndarray, quality: np.ndarray, pairs: np.ndarray | None = None,
            epochs: int = 30, seed: int = 0, lr: float = 2e-3, batch_size: int = 256, pair_weight: float = 1.0,
            weight_decay: float = 1e-4, progress: bool = False, holdout: float = 0.15,
            patience: int = 3) -> "DifficultyRouter":
        """Train. `quality` (n, n_tiers) in [0, 1], NaN = unknown (masked out of the BCE). `pairs` (m, 3) int rows
        (query index, tier a, tier b): a's answer is at least as good as b's on that query.

        `epochs` is a ceiling: a seeded `holdout` share of the queries (when it holds at least MIN_HOLDOUT of them)
        is kept out, the epoch count that minimises its BCE is found (stopping `patience` epochs after the best),
        and the router is then trained on every query for that many epochs (`self.epochs_used`). Why: per-query
        difficulty is a weak signal next to the task's base rate (MMLU-Pro: a 30-epoch MLP scored a held-out log
        loss of 0.77 against 0.635 for the per-task base rates; stopped early, 0.630), so a fixed epoch count overfits
        and the start rule then ranks tiers by noise."""
        x, t, q, p = self._inputs(embeddings, task_ids, quality, pairs)
        n = len(x)
        n_held = int(round(holdout * n))
        perm = np.random.default_rng(seed + 7919).permutation(n)
        held, kept = np.sort(perm[:n_held]), np.sort(perm[n_held:])
        # a held-out share with no known outcome has no loss to stop on
        if n_held >= MIN_HOLDOUT and epochs > 1 and not np.isnan(q[held]).all():
            new_index = np.full(n, -1)
            new_index[kept] = np.arange(len(kept))
            pk = p[new_index[p[:, 0]] >= 0]
            pk = np.column_stack([new_index[pk[:, 0]], pk[:, 1], pk[:, 2]])
            probe = DifficultyRouter(self.tier_names, self.task_names, self.input_dim, self.task_dim, self.hidden,
                                     self.dropout)
            losses = probe._train(x[kept], t[kept], q[kept], pk, epochs, seed, lr, batch_size, pair_weight,
                                  weight_decay, False, patience, held=(x[held], t[held], q[held]))
            epochs = int(np.argmin(losses)) + 1
        self._train(x, t, q, p, epochs, seed, lr, batch_size, pair_weight, weight_decay, progress)
        self.epochs_used = epochs
        return self

    def _inputs(self, embeddings: np.ndarray, task_ids: np.ndarray, quality: np.ndarray,
                pairs: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The training arrays, typed and checked."""
        x = np.asarray(embeddings, dtype=np.float32)
        t = np.asarray(task_ids, dtype=np.int64)
        q = np.asarray(quality, dtype=np.float32)
        n = len(x)
        if x.shape != (n, self.input_dim):
            raise ValueError(f"embeddings must be (n, {self.input_dim}), got {x.shape}")
        if t.shape != (n,) or q.shape != (n, len(self.tier_names)):
            raise ValueError(f"task_ids must be ({n},) and quality ({n}, {len(self.tier_names)}); got {t.shape}, {q.shape}")
        if n and (t.min() < 0 or t.max() >= len(self.task_names)):
            raise ValueError("task_ids out of range")
        p = np.zeros((0, 3), dtype=np.int64) if pairs is None or len(pairs) == 0 else np.asarray(pairs, dtype=np.int64)
        if p.ndim != 2 or p.shape[1] != 3:
            raise ValueError("pairs must be (m, 3): query index, better-or-equal tier, other tier")
        if len(p) and (p[:, 0].min() < 0 or p[:, 0].max() >= n):
            raise ValueError("pairs name a query index out of range")
        return x, t, q, p

    def _train(self, x: np.ndarray, t: np.ndarray, q: np.ndarray, p: np.ndarray,
               epochs: int, seed: int, lr: float, batch_size: int, pair_weight: float, weight_decay: float,
               progress: bool, patience: int = 0,
               held: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> list[float]:
        """The training loop; with `held` (embeddings, task ids, quality), the held-out BCE after each epoch (the
        loop stops `patience` epochs after its minimum)."""
        n = len(x)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        X, T = torch.from_numpy(x), torch.from_numpy(t)
        known = ~np.isnan(q)
        Q, M = torch.from_numpy(np.nan_to_num(q)), torch.from_numpy(known.astype(np.float32))
        # Pairs are grouped by query so a minibatch of queries brings its pairs along.
        pair_rows = p[np.argsort(p[:, 0], kind="stable")] if len(p) else p
        pair_start = np.searchsorted(pair_rows[:, 0], np.arange(n + 1)) if len(p) else None
        opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        bce = nn.BCEWithLogitsLoss(reduction="none")
        epochs_iter = range(epochs)
        if progress:
            from tqdm import tqdm

            epochs_iter = tqdm(epochs_iter, desc="router fit", unit="epoch")
        held_losses: list[float] = []
        self.net.train()
        for _ in epochs_iter:
            perm = rng.permutation(n)
            total, batches = 0.0, 0
            for s in range(0, n, batch_size):
                idx = perm[s : s + batch_size]
                it = torch.from_numpy(idx)
                logits = self.net(X[it], T[it])
                m = M[it]
                loss = (bce(logits, Q[it]) * m).sum() / m.sum().clamp(min=1.0)
                if pair_start is not None:
                    sel = np.concatenate([pair_rows[pair_start[i] : pair_start[i + 1]] for i in idx])
                    if len(sel):
                        pos = {int(v): j for j, v in enumerate(idx)}
                        rows = torch.tensor([pos[int(v)] for v in sel[:, 0]])
                        diff = logits[rows, torch.from_numpy(sel[:, 1])] - logits[rows, torch.from_numpy(sel[:, 2])]
                        loss = loss + pair_weight * nn.functional.softplus(-diff).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
                batches += 1
            self.history.append(total / max(batches, 1))
            if held is not None:
                held_losses.append(self._held_out_loss(*held))
                if len(held_losses) - 1 - int(np.argmin(held_losses)) >= patience:
                    break
                self.net.train()
        self.net.eval()
        return held_losses

    def _held_out_loss(self, x: np.ndarray, t: np.ndarray, q: np.ndarray) -> float:
        """Mean BCE over the known (query, tier) outcomes of held-out queries."""
        self.net.eval()
        with torch.inference_mode():  # the arrays were typed by `_inputs`
            logits = self.net(torch.from_numpy(x), torch.from_numpy(t))
        qq = torch.from_numpy(q)
        known = ~torch.isnan(qq)
        return float(nn.functional.binary_cross_entropy_with_logits(logits[known], qq[known]))

    def predict_proba(self, embeddings: np.ndarray, task_ids: np.ndarray) -> np.ndarray:
        """(n, n_tiers) float32: predicted acceptance of each tier's answer."""
        x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1, self.input_dim))
        t = torch.from_numpy(np.asarray(task_ids, dtype=np.int64).reshape(-1))
        with torch.inference_mode():
            return torch.sigmoid(self.net(x, t)).numpy()

    def save(self, directory: str | Path) -> None:
        """Write router.pt (state_dict) and router.json (tier/task names, dims) into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), d / WEIGHTS)
        meta = {"tier_names": self.tier_names, "task_names": self.task_names, "input_dim": self.input_dim,
                "task_dim": self.task_dim, "hidden": self.hidden, "dropout": self.dropout}
        (d / META).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "DifficultyRouter":
        """Inverse of save(); loads weights only (weights_only=True), never pickled code."""
        d = Path(directory)
        meta = json.loads((d / META).read_text())
        r = cls(meta["tier_names"], meta["task_names"], meta["input_dim"], meta["task_dim"], meta["hidden"],
                meta.get("dropout", 0.1))
        r.net.load_state_dict(torch.load(d / WEIGHTS, map_location="cpu", weights_only=True))
        r.net.eval()
        return r
