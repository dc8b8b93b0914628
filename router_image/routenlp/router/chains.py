"""Per-task tier chains (pure functions): which of the portfolio's tiers a task's requests may use.

The portfolio is ordered cheapest first, the reference last. A task's chain is a bool membership mask over those K
tiers; the cascade (`cascade.py`) starts somewhere on it, escalates along it, and its **end** (highest-index member)
always answers. `learn_chains` takes each task's cost/quality Pareto set on TRAINING data, so a task can go straight
to its specialist and skip tiers that are dearer without being better for it; the end is the task's best tier, which
may be cheaper than the reference (gemini-1.5-flash beats gemini-1.5-pro on MMLU-Pro math). Quality ratios stay
defined against always-reference (docs/guarantee.md). Artifacts and the RoutingPolicy carry chains as
{task: [tier names, cheapest first]} (`chains_to_names` / `chains_from_names`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .cascade import chain_ends


# The default margin of `learn_chains` for the trainer and the benchmark alike (`--chain-min-gain-se`).
MIN_GAIN_SE = 1.0


def learn_chains(quality: ArrayLike, cost: ArrayLike, task_ids: ArrayLike, n_tasks: int, min_gain: float = 0.0,
                 min_gain_se: float = 0.0) -> np.ndarray:
    """(n_tasks, K) bool chains from training outcomes: per task, the tiers (in portfolio order, cheapest first) whose
    mean quality on that task beats the chain's previous member by more than `min_gain` + `min_gain_se` standard
    errors of the paired per-query difference (0, 0: the plain cost/quality Pareto set; the SE term does not apply to
    the reference, the last tier, which joins whenever it is better); the last of them (the task's best tier, the
    cheapest among ties) is the chain's end. The SE term keeps out a tier that is better than
    the cheaper ones only by the noise of a few hundred training queries: every member costs every request that
    escalates past the tiers below it.

    quality (n, K) in [0, 1] (NaN = unknown), cost (n, K) per (query, tier) over the portfolio's tiers, whose
    columns must already be sorted by cost (the cascade walks them in index order; `cost` is only checked for
    that); task_ids (n,). A task without training rows gets the pooled chain of all tasks."""
    q = np.asarray(quality, dtype=float)
    c = np.asarray(cost, dtype=float)
    t = np.asarray(task_ids, dtype=int)
    if q.ndim != 2 or q.shape != c.shape or len(t) != len(q):
        raise ValueError(f"quality {q.shape}, cost {c.shape} and task_ids ({len(t)},) must agree")
    mc = np.nanmean(c, axis=0) if len(c) else np.zeros(q.shape[1])
    if len(c) and np.any(np.diff(mc) < -1e-12 * max(1.0, float(np.nanmax(mc)))):
        raise ValueError(f"portfolio tiers must be sorted cheapest first (mean costs {np.round(mc, 8).tolist()})")
    pooled = _pareto(q)
    out = np.zeros((n_tasks, q.shape[1]), dtype=bool)
    for task in range(n_tasks):
        rows = q[t == task]
        out[task] = _pareto(rows, min_gain, min_gain_se) if len(rows) else pooled
    return out


def _pareto(q: np.ndarray, min_gain: float = 0.0, min_gain_se: float = 0.0) -> np.ndarray:
    K = q.shape[1]
    member = np.zeros(K, dtype=bool)
    if not len(q):
        member[-1] = True
        return member
    mq = np.nan_to_num(np.nanmean(q, axis=0), nan=-np.inf)
    last = None
    for k in range(K):
        if last is None:
            ok = mq[k] > -np.inf
        else:
            d = q[:, k] - q[:, last]
            d = d[~np.isnan(d)]
            se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
            # the reference (last tier) only needs to be better: a chain ends below it only where a cheaper tier is
            # at least as good on the task's training queries
            ok = mq[k] > mq[last] + min_gain + (min_gain_se * se if k < K - 1 else 0.0)
        if ok:
            member[k] = True
            last = k
    return member


def chains_to_names(chains: ArrayLike, tier_names: list[str], task_names: list[str]) -> dict[str, list[str]]:
    """(n_tasks, K) mask -> {task: [tier names, cheapest first]} (artifacts, RoutingPolicy status, reports)."""
    c = np.asarray(chains, dtype=bool)
    if c.shape != (len(task_names), len(tier_names)):
        raise ValueError(f"chains {c.shape} do not match {len(task_names)} tasks x {len(tier_names)} tiers")
    return {task: [tier_names[k] for k in np.flatnonzero(c[i])] for i, task in enumerate(task_names)}


def chains_from_names(mapping: dict[str, list[str]] | None, tier_names: list[str], task_names: list[str],
                      default: ArrayLike | None = None) -> np.ndarray:
    """{task: [tier names]} -> (n_tasks, K) mask. Tasks the mapping leaves out get `default` ((K,) mask; None =
    every tier). Raises ValueError naming an unknown task or tier, an empty chain, or a chain not in portfolio
    order (a chain is walked cheapest first, so its names must follow the portfolio's order)."""
    K = len(tier_names)
    base = np.ones(K, dtype=bool) if default is None else np.asarray(default, dtype=bool)
    out = np.tile(base, (len(task_names), 1))
    index = {name: k for k, name in enumerate(tier_names)}
    for task, names in (mapping or {}).items():
        if task not in task_names:
            raise ValueError(f"chain for unknown task {task!r} (tasks: {', '.join(task_names)})")
        if not names:
            raise ValueError(f"chain of task {task!r} is empty")
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ValueError(f"chain of task {task!r}: unknown tiers {unknown} (tiers: {', '.join(tier_names)})")
        ks = [index[n] for n in names]
        if ks != sorted(set(ks)):
            raise ValueError(f"chain of task {task!r} must list distinct tiers cheapest first, in the portfolio's "
                             f"order ({', '.join(tier_names)}); got {names}")
        row = np.zeros(K, dtype=bool)
        row[ks] = True
        out[task_names.index(task)] = row
    return out


def chain_end_names(chains: ArrayLike, tier_names: list[str], task_names: list[str]) -> dict[str, str]:
    """{task: name of its chain's end} (the tier that always answers for it)."""
    ends = chain_ends(np.asarray(chains, dtype=bool))
    return {task: tier_names[int(e)] for task, e in zip(task_names, np.atleast_1d(ends))}
