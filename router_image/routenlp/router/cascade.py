"""Cascade decisions, as pure functions shared by the server (one query) and the offline benchmark (arrays).

Tiers are the portfolio's, ordered cheapest first; the last column is the policy's reference tier. A task's
**chain** is the subset of tiers its requests may use, as a bool membership mask over the K tiers (`chains.py`
learns it); its **end** (highest-index member) always answers, as the reference does when the chain is every tier.
`chain=None` means every tier (the chain ends at the reference).

Rules:
- start tier (`StartRule`, `start_tiers`): by default the cheapest chain member whose predicted acceptance is at
  least quality_target x the chain end's; with a cost weight, the chain member of highest predicted acceptance minus
  cost_weight x its cost relative to the reference. No prediction -> the chain's first member.
- usable tiers: a cheaper tier with no certified threshold for the task can only escalate (it accepts nothing), so
  calling it costs money for nothing; the plan skips it (`usable`), the chain end is always usable. The server
  lets its exploration (shadow) sample try such tiers anyway, to collect labels.
- attempt plan: chain members from the start tier upwards, skipping tiers whose circuit is open or that are not
  usable, at most 1 + max_escalations attempts; when a limit >= 1 cuts the plan short, the last allowed attempt
  goes to the highest tier still up in the plan (the chain end when it is up), so an answer is either accepted by a
  threshold or comes from the chain end. When the chain end is down and it is not the last tier, the highest tier
  of the portfolio above it that is up (the reference when it is up) is appended as the last attempt; its answer is
  a "fallback" (it is not the task's end and has no threshold for the task).
- accept: the chain end always answers; a cheaper tier's answer is accepted iff its threshold is certified and
  score >= threshold; otherwise escalate to the next tier of the plan. The last attempt of a plan answers anyway
  ("fallback" when it is not the chain end and was not accepted).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# Per-tier flags given as a list or a (K,) array (circuit state, usable tiers, chain membership).
Flags = Sequence[bool] | np.ndarray


def _chain_rows(chain: ArrayLike | None, n: int, K: int) -> np.ndarray:
    """(n, K) bool membership; None -> every tier. A row with no member is an error (a chain must end somewhere)."""
    if chain is None:
        return np.ones((n, K), dtype=bool)
    c = np.broadcast_to(np.asarray(chain, dtype=bool), (n, K))
    if n and not c.any(axis=1).all():
        raise ValueError("a chain needs at least one tier")
    return c


def chain_ends(chain: ArrayLike) -> np.ndarray | np.signedinteger[Any]:
    """Index of each chain's end (highest member) for a (K,) or (n, K) bool mask: (n,) ends, or one numpy integer."""
    c = np.asarray(chain, dtype=bool)
    ends: np.ndarray | np.signedinteger[Any] = c.shape[-1] - 1 - np.argmax(c[..., ::-1], axis=-1)
    return ends


@dataclass(frozen=True)
class StartRule:
    """Where a request starts on its task's chain, from the router's predicted acceptance p of each tier.

    cost_weight None (the default): the cheapest chain member with p >= quality_target x p(chain end).
    cost_weight w: the chain member maximising p - w x relative_cost (ties to the cheaper tier), relative_cost being
    each tier's expected cost of a request over the reference's ((K,), or (n, K) per request): expected utility, the
    rule of RouterBench-style routers, which a portfolio whose prices lie close together needs (cheapest-adequate
    starts there pay for many failed attempts). w = 0 starts at the most likely acceptable tier."""

    quality_target: float | np.ndarray = 0.97  # an (n,) array: one target per request
    cost_weight: float | None = None
    relative_cost: tuple[float, ...] | np.ndarray | None = None

    def starts(self, p: np.ndarray, ch: np.ndarray) -> np.ndarray:
        """(n,) start tiers for (n, K) predictions p and (n, K) chain rows ch."""
        n, K = p.shape
        if self.cost_weight is None:
            rows = np.arange(n)
            end = chain_ends(ch) if n else np.zeros(0, dtype=int)
            need = np.asarray(self.quality_target, dtype=float).reshape(-1) * p[rows, end]
            ok = (p >= need[:, None]) & ch
            ok[rows, end] = True  # the chain end always qualifies
            first_ok: np.ndarray = ok.argmax(axis=1)
            return first_ok
        if self.relative_cost is None:
            raise ValueError("a cost-weighted start rule needs each tier's relative cost")
        cost = np.broadcast_to(np.asarray(self.relative_cost, dtype=float), (n, K))
        utility = np.where(ch, p - self.cost_weight * cost, -np.inf) - 1e-9 * np.arange(K)  # ties: cheaper
        best: np.ndarray = utility.argmax(axis=1)
        return best


def start_tiers(predicted: ArrayLike, rule: StartRule | float | np.ndarray, usable: ArrayLike | None = None,
                chain: ArrayLike | None = None) -> np.ndarray:
    """(n,) start tier for (n, K) predicted acceptance; rule: a `StartRule`, or a quality target (scalar or (n,)).

    chain: optional (K,) or (n, K) bool membership (default: every tier, ending with the reference = last column).
    usable: optional (K,) or (n, K) bool (see `usable_tiers`); the start then moves up to the first usable chain
    member at or above the rule's start, which is exactly where `plan_for` with the same `usable` would begin (so
    calibration, which skips in the plan, and callers that move the start agree)."""
    p = np.asarray(predicted, dtype=float)
    if p.ndim == 1:
        p = p[None, :]
    n, K = p.shape
    ch = _chain_rows(chain, n, K)
    rule = rule if isinstance(rule, StartRule) else StartRule(quality_target=rule)
    start = rule.starts(p, ch)
    if usable is None:
        return start
    rows = np.arange(n)
    u = np.broadcast_to(np.asarray(usable, dtype=bool), p.shape) & ch
    u[rows, chain_ends(ch) if n else np.zeros(0, dtype=int)] = True
    u &= np.arange(K)[None, :] >= start[:, None]
    first_usable: np.ndarray = u.argmax(axis=1)
    return first_usable


def usable_tiers(thresholds: ArrayLike) -> np.ndarray:
    """Bool array shaped like `thresholds` (NaN/None = uncertified): True where the tier may accept, i.e. it has a
    certified threshold, or it is the reference (last) tier, which always answers. (With chains, `plan_for` and
    `attempt_plan` also count each chain's end as usable.)"""
    u: np.ndarray = ~np.isnan(np.array(thresholds, dtype=float))  # numpy reads None as NaN here
    u[..., -1] = True
    return u


def start_tier(predicted: ArrayLike | None, rule: StartRule | float, chain: ArrayLike | None = None) -> int:
    """Start tier of one query (see `start_tiers`); None (no router artifact) -> the chain's first member."""
    if predicted is None:
        return 0 if chain is None else int(np.argmax(np.asarray(chain, dtype=bool)))
    return int(start_tiers(np.asarray(predicted)[None, :], rule, chain=chain)[0])


def plan_for(start: int, n_tiers: int, max_escalations: int, tier_up: Flags | None = None, usable: Flags | None = None,
             chain: Flags | None = None) -> list[int]:
    """Tiers to try, in order, for one query (may be empty when every candidate tier is down).

    usable: optional (K,) bool; False = skip this tier (it cannot accept); the chain end is always usable.
    chain: optional (K,) bool membership (default every tier). Only chain members are tried; when the chain end is
    down and is not the last tier, the highest tier above it that is up is tried last (a fallback answer)."""
    up = [True] * n_tiers if tier_up is None else [bool(u) for u in tier_up]
    use = [True] * n_tiers if usable is None else [bool(u) for u in usable]
    members = list(range(n_tiers)) if chain is None else [k for k, c in enumerate(chain) if c]
    if not members:
        raise ValueError("a chain needs at least one tier")
    end = members[-1]
    use[end] = True  # the chain end always answers
    cands = [k for k in members if k >= start and up[k] and use[k]]
    if not up[end]:
        above = [k for k in range(end + 1, n_tiers) if up[k]]
        cands += above[-1:]  # a chain that ends below the reference borrows the best tier that is up
    if not cands:
        # No usable tier from the start up is available: an up-but-uncertified tier still beats no answer (fallback).
        above = [k for k in members if k >= start and up[k]]
        if above:
            return above[-1:]
        # Everything from the start tier up is down: fall back to the highest cheaper member that is up.
        lower = [k for k in members if k < start and up[k]]
        return lower[-1:] if lower else []
    if max_escalations <= 0:
        return cands[:1]
    if len(cands) > 1 + max_escalations:
        cands = cands[:max_escalations] + [cands[-1]]
    return cands


def attempt_plan(start: ArrayLike, n_tiers: int, max_escalations: int, tier_up: Flags | None = None,
                 usable: ArrayLike | None = None, chain: ArrayLike | None = None) -> np.ndarray:
    """(n, K) bool: tier k is in query i's plan (`plan_for` vectorised over start tiers).

    usable: optional (K,) or (n, K) bool per query (e.g. `usable_tiers(thr_table)[task_ids]`); chain: optional
    (K,) or (n, K) bool membership per query (e.g. `chains[task_ids]`)."""
    start = np.asarray(start, dtype=int)
    n = len(start)
    out = np.zeros((n, n_tiers), dtype=bool)
    use = np.ones((n, n_tiers), dtype=bool) if usable is None else np.broadcast_to(
        np.asarray(usable, dtype=bool), (n, n_tiers))
    ch = _chain_rows(chain, n, n_tiers)
    key = (np.column_stack([start, use.astype(int), ch.astype(int)]) if n
           else np.zeros((0, 2 * n_tiers + 1), dtype=int))
    combos, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    for i, row in enumerate(combos):
        cols = plan_for(int(row[0]), n_tiers, max_escalations, tier_up, row[1:n_tiers + 1].astype(bool),
                        None if chain is None else row[n_tiers + 1:].astype(bool))
        if cols:
            out[np.ix_(inverse == i, cols)] = True
    return out


def accept(score: float | None, threshold: float | None, is_end: bool) -> bool:
    """Accept a tier's answer? The chain's end always; otherwise only above a certified threshold."""
    if is_end:
        return True
    if threshold is None or score is None or math.isnan(score) or math.isnan(threshold):
        return False
    return score >= threshold


def canary_bucket(request_id: str) -> int:
    """Stable bucket 0..99 of a request id (same id -> same router version, across replicas and restarts)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big") % 100


@dataclass
class CascadeResult:
    """Per-query outcome of `simulate_cascade` (arrays of length n)."""

    tier: np.ndarray  # tier whose answer is returned (-1: no tier available)
    cost: np.ndarray  # summed cost of every tier called
    quality: np.ndarray  # quality of the returned answer
    escalations: np.ndarray  # tiers tried after the first
    accepted: np.ndarray  # returned answer accepted by a threshold or from the reference (False = fallback)
    latency: np.ndarray | None = None  # summed latency when latencies are given
    called: np.ndarray | None = None  # (n, K) which tiers were called (the requests that reached each tier)

    def summary(self) -> dict[str, float | list[float]]:
        """Means over the queries (quality, cost, escalations, acceptance) and the share answered by each tier."""
        n = max(len(self.tier), 1)
        tiers = np.bincount(self.tier[self.tier >= 0], minlength=int(self.tier.max(initial=0)) + 1) / n
        return {"quality": float(np.nanmean(self.quality)) if len(self.quality) else float("nan"),
                "cost": float(self.cost.sum()), "mean_escalations": float(self.escalations.mean()) if n else 0.0,
                "accepted_rate": float(self.accepted.mean()) if len(self.accepted) else 0.0,
                "tier_share": tiers.tolist()}


def simulate_cascade(start: ArrayLike, scores: ArrayLike, quality: ArrayLike, costs: ArrayLike, thresholds: ArrayLike,
                     max_escalations: int, tier_up: Flags | None = None, latencies: ArrayLike | None = None,
                     skip_uncertified: bool = True, chains: ArrayLike | None = None) -> CascadeResult:
    """Run the cascade offline over recorded outcomes, vectorised over queries.

    start (n,) int; scores, quality, costs (n, K) per query and tier (cost: what calling that tier costs for that
    query); thresholds (n, K) per query (e.g. `thr_table[task_ids]`), NaN = uncertified (accepts nothing).
    skip_uncertified: uncertified non-reference tiers are not called (as the server does outside its exploration
    sample); False calls them and escalates (the old behaviour, which costs more than always-reference).
    chains: optional (K,) or (n, K) bool chain membership per query (e.g. `chains[task_ids]`); None = every tier.
    Returns the tier answered, cost paid (all tiers called), quality obtained, escalations, acceptance."""
    scores = np.asarray(scores, dtype=float)
    n, K = scores.shape
    quality = np.asarray(quality, dtype=float)
    costs = np.asarray(costs, dtype=float)
    thr = np.asarray(thresholds, dtype=float)
    if thr.shape != (n, K):
        thr = np.broadcast_to(thr, (n, K))
    usable = usable_tiers(thr) if skip_uncertified else None
    plan = attempt_plan(np.asarray(start, dtype=int), K, max_escalations, tier_up, usable, chains)
    end = chain_ends(_chain_rows(chains, n, K)) if n else np.zeros(0, dtype=int)
    # Position of each tier in its plan, and the last tier of each plan.
    last = np.where(plan.any(1), K - 1 - np.argmax(plan[:, ::-1], axis=1), -1)
    done = np.zeros(n, dtype=bool)
    tier = np.full(n, -1)
    cost = np.zeros(n)
    lat = np.zeros(n) if latencies is not None else None
    tried = np.zeros(n, dtype=int)
    acc_out = np.zeros(n, dtype=bool)
    called = np.zeros((n, K), dtype=bool)
    ok_score = np.nan_to_num(scores, nan=-np.inf) >= np.nan_to_num(thr, nan=np.inf)
    for k in range(K):
        call = plan[:, k] & ~done
        cost += np.where(call, costs[:, k], 0.0)
        if lat is not None:
            lat += np.where(call, np.asarray(latencies, dtype=float)[:, k], 0.0)
        tried += call
        called[:, k] = call
        accepted_k = call & ((end == k) | ok_score[:, k])
        finish = call & (accepted_k | (last == k))
        tier[finish] = k
        acc_out[finish] = accepted_k[finish]
        done |= finish
    qual = np.full(n, np.nan)
    has = tier >= 0
    qual[has] = quality[np.flatnonzero(has), tier[has]]
    return CascadeResult(tier, cost, qual, np.maximum(tried - 1, 0), acc_out, lat, called)
