"""`routenlp bench routing TABLE`: cost/quality of RouteNLP against baselines on a labelled outcome table.

For each seed: queries are split per task into router-train / calibration / test (default 50/25/25 %); every method
is fitted on train, tuned or calibrated on calibration, and measured on test. See docs/bench-routing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

from routenlp.router.cascade import chain_ends
from routenlp.router.chains import MIN_GAIN_SE, chains_to_names, learn_chains
from routenlp.router.conformal import ACCEPTED_ANSWERS, ALL_REQUESTS, RISK_MEASURES

from . import metrics as M
from .baselines import (AlwaysModel, BestSingle, FrugalCascade, KNNRouter, MFRouter, Oracle, RandomMix, Split)
from .features import AnswerScorer, EmbeddingCache, hashed_ngrams, out_of_fold, response_tail, scorer_features
from .data import shared_data_dir
from .outcomes import OutcomeError, Outcomes, load_outcomes, pareto_tiers, portfolio_tiers
from .routenlp_method import FLOOR, RouteNLP, rule_label

METHODS = ("always_reference", "always_cheapest", "best_single", "random", "knn", "mf", "frugalgpt", "routenlp",
           "oracle")
TARGETS = (0.95, 0.97, 0.99)
# What the violation rate counts, per risk measure (the quantity the guarantee bounds).
MEASURE_TEXT = {
    ACCEPTED_ANSWERS: "test rate of unacceptable answers among the answers accepted below the "
                       "reference tier, per (task, tier), pooled",
    ALL_REQUESTS: "test share of the requests reaching a non-reference tier that got an unacceptable answer "
                   "accepted there, per (task, tier), pooled",
}


# ------------------------------------------------------------------------------------------------ splits, scores


def split_indices(tasks: np.ndarray, seed: int, train_frac: float, cal_frac: float):
    """Per-task random split (each task keeps its share in every split)."""
    rng = np.random.default_rng(seed)
    tr, ca, te = [], [], []
    for t in np.unique(tasks):
        idx = rng.permutation(np.flatnonzero(tasks == t))
        a = int(round(train_frac * len(idx)))
        b = a + int(round(cal_frac * len(idx)))
        tr.append(idx[:a])
        ca.append(idx[a:b])
        te.append(idx[b:])
    return tuple(np.sort(np.concatenate(x)) for x in (tr, ca, te))


def stratified_subsample(idx: np.ndarray, tasks: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices of `idx`, each task keeping its share (rounded; at least one per task present)."""
    if size >= len(idx):
        return idx
    rng = np.random.default_rng(seed)
    out = []
    ts = tasks[idx]
    for t in np.unique(ts):
        pool = idx[ts == t]
        k = max(1, int(round(size * len(pool) / len(idx))))
        out.append(rng.choice(pool, size=min(k, len(pool)), replace=False))
    return np.sort(np.concatenate(out))


class ResponseEmbeddings:
    """Embeddings of each model's response tail (`hash` or `minilm`, see features.py), computed the first time a
    model needs them."""

    def __init__(self, outcomes: Outcomes, cache: EmbeddingCache, progress: bool, kind: str = "hash"):
        self.o, self.cache, self.progress, self.kind = outcomes, cache, progress, kind
        self._emb: dict = {}

    def __call__(self, j: int):
        if j not in self._emb:
            if self.o.responses is None:
                raise OutcomeError(f"{self.o.name}: cascades need the `response` field (the answer scorer reads it)")
            if self.kind == "minilm":
                self._emb[j] = self.cache.embed([response_tail(r) for r in self.o.responses[j]],
                                                progress=self.progress)
            else:
                self._emb[j] = hashed_ngrams(self.o.responses[j])
        return self._emb[j]


def answer_scores(s: Split, resp_emb: ResponseEmbeddings, tasks: np.ndarray, n_tasks: int, train: np.ndarray,
                  folds: int = 3) -> np.ndarray:
    """(n, K) P(acceptable) of each tier's answer: scorer fitted on `train` (train rows out-of-fold); 1 for the
    reference column (never thresholded)."""
    o = s.outcomes
    out = np.ones((o.n, len(s.tiers)))
    for k, j in enumerate(s.tiers[:-1]):
        F = scorer_features(s.X, resp_emb(j), o.responses[j], tasks, n_tasks)
        y = o.quality[:, j]
        oof = out_of_fold(lambda a, b: AnswerScorer().fit(F[train[a]], y[train[a]]).predict(F[train[b]]),
                          len(train), folds, s.seed)
        full = AnswerScorer().fit(F[train], y[train])
        out[:, k] = full.predict(F)
        out[train, k] = oof
    return out


# ------------------------------------------------------------------------------------------------ one seed


def choose_tiers(o: Outcomes, train: np.ndarray, args) -> tuple[list[int], np.ndarray | None, np.ndarray]:
    """(portfolio model indices cheapest first ending with the reference, per-task chains over them or None, the
    global Pareto chain over them), all from the TRAINING split. Per-task chains (`--chains per-task`, default) are
    `chains.learn_chains`, the code the trainer uses; the portfolio is every tier some task's chain or the global
    Pareto chain uses. `--chains global`: one Pareto chain for every task (the old behaviour)."""
    ref = o.reference
    if args.tiers:
        tiers = [o.models.index(t) for t in args.tiers]
        glob = tiers
    else:
        glob = pareto_tiers(o.quality[train], o.cost[train], ref)
        tiers = glob if args.chains == "global" else portfolio_tiers(o.cost[train], ref)
    if args.chains == "global":
        return tiers, None, np.ones(len(tiers), dtype=bool)
    try:
        ch = learn_chains(o.quality[np.ix_(train, tiers)], o.cost[np.ix_(train, tiers)], o.tasks[train],
                          len(o.task_names), min_gain_se=args.chain_min_gain_se)
    except ValueError as exc:
        raise OutcomeError(f"--tiers: {exc}") from None
    keep = ch.any(0) | np.isin(tiers, glob)
    keep[-1] = True
    tiers = [j for j, k in zip(tiers, keep) if k]
    return tiers, ch[:, keep], np.isin(tiers, glob)


def quality_ratio_se(q: np.ndarray, q_ref: np.ndarray) -> tuple[float, float]:
    """Test quality ratio mean(q) / mean(q_ref) over the same queries, and its standard error (delta method on the
    paired per-query values: sd(q - r q_ref) / (sqrt(n) mean(q_ref)))."""
    q, q_ref = np.asarray(q, dtype=float), np.asarray(q_ref, dtype=float)
    r = M.quality_ratio(float(np.mean(q)), float(np.mean(q_ref)))
    if len(q) < 2 or not np.mean(q_ref) > 0:
        return r, float("nan")
    return r, float(np.std(q - r * q_ref, ddof=1) / np.sqrt(len(q)) / np.mean(q_ref))


def floor_point(m, s: Split, floor: float, cal_pts, cal_ref_q: float, ref_c: float) -> dict:
    """A method at a quality floor, on test: RouteNLP calibrated for the floor (no sweep); every other method at its
    cheapest setting whose CALIBRATION quality ratio reaches the floor (none: it serves always-reference). Held =
    test quality ratio >= floor - 2 standard errors of the test estimate."""
    o, test = s.outcomes, s.test
    if isinstance(m, RouteNLP):
        c, q = m.run(test, (FLOOR, floor))
        reached = True
    else:
        i = M.operating_point(cal_pts, cal_ref_q, floor)
        reached = i is not None
        c, q = m.run(test, m.knobs[i]) if reached else (o.cost[test, o.reference], o.quality[test, o.reference])
    r, se = quality_ratio_se(q, o.quality[test, o.reference])
    return {"cost_reduction": M.cost_reduction(float(np.mean(c)), ref_c), "quality_ratio": r, "se": se,
            "held": bool(r >= floor - 2 * se) if np.isfinite(se) else bool(r >= floor), "reached": reached}


def evaluate_method(m, s: Split, ref_c: float, ref_q: float, cal_ref_q: float, c_lo: float,
                    floors=()) -> dict:
    """Test points over the knobs, AIQ, operating points chosen on calibration, the headline, the floors."""
    test_pts, cal_pts = [], []
    for knob in m.knobs:
        c, q = m.run(s.test, knob)
        test_pts.append((float(c.mean()), float(np.nanmean(q))))
        c, q = m.run(s.cal, knob)
        cal_pts.append((float(c.mean()), float(np.nanmean(q))))
    # Operating points: chosen on calibration data; None when no setting reaches the target there.
    at = {}
    for tgt in TARGETS:
        i = M.operating_point(cal_pts, cal_ref_q, tgt)
        at[f"{tgt:.2f}"] = None if i is None else M.cost_reduction(test_pts[i][0], ref_c)
        at[f"{tgt:.2f}_quality_ratio"] = None if i is None else M.quality_ratio(test_pts[i][1], ref_q)
    if m.default is not None:
        hi = m.knobs.index(m.default)
    else:  # headline of a tunable baseline: its 0.97 operating point, else its best-quality setting
        hi = M.operating_point(cal_pts, cal_ref_q, 0.97)
        if hi is None:
            hi = max(range(len(cal_pts)), key=lambda i: (cal_pts[i][1], -cal_pts[i][0]))
    return {
        "cost_reduction": M.cost_reduction(test_pts[hi][0], ref_c),
        "quality_ratio": M.quality_ratio(test_pts[hi][1], ref_q),
        "aiq": M.aiq(test_pts, c_lo, ref_c),
        "cost_reduction_at": at,
        "knob": _jsonable(m.knobs[hi]),
        "curve": [(c / ref_c, q / ref_q) for c, q in test_pts],
        "floor": {f"{f:.2f}": floor_point(m, s, f, cal_pts, cal_ref_q, ref_c) for f in floors},
    }


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def measured_violations(r, tasks: np.ndarray, n_tiers: int, risk: float, args, chains=None) -> dict:
    """`metrics.violations` of a simulated cascade (`cascade.CascadeResult`) in the run's risk measure; `chains`
    (n_tasks, K): answers of each task's chain end are outside the guarantee (never thresholded)."""
    ends = None if chains is None else chain_ends(np.asarray(chains)[tasks])
    return M.violations(r.tier, r.accepted, r.quality, tasks, n_tiers, risk, called=r.called,
                        risk_measure=args.risk_measure, ends=ends)


def run_seed(o: Outcomes, X: np.ndarray, resp: ResponseEmbeddings, seed: int, args, bar=None,
             where: dict | None = None) -> dict:
    """One seed's results. `where["step"]` names the step in progress (what failed, if it raises)."""
    where = {} if where is None else where

    def step(msg):
        where["step"] = msg
        if bar is not None:
            bar.set_postfix_str(f"seed {seed}: {msg}")

    step("split and chains")
    train, cal, test = split_indices(o.tasks, seed, args.train_frac, args.cal_frac)
    tiers, chains, global_chain = choose_tiers(o, train, args)
    s = Split(o, X, train, cal, test, seed, tiers, chains=chains, global_chain=global_chain)

    step("answer scorer")
    s.scores = answer_scores(s, resp, o.tasks, len(o.task_names), train)
    ref = o.reference
    ref_c, ref_q = o.cost[test, ref].mean(), o.quality[test, ref].mean()
    cal_ref_q = o.quality[cal, ref].mean()
    cheapest = int(np.argmin(o.cost[train].mean(0)))
    c_lo = o.cost[test, cheapest].mean()
    methods = {
        "always_reference": AlwaysModel("always_reference", "reference"),
        "always_cheapest": AlwaysModel("always_cheapest", "cheapest"),
        "best_single": BestSingle(), "knn": KNNRouter(), "mf": MFRouter(), "frugalgpt": FrugalCascade(),
        "routenlp": RouteNLP(risk=args.risk, delta=args.delta, quality_target=args.quality_target,
                             min_calibration_samples=args.min_calibration_samples, epochs=args.epochs,
                             fwer=args.fwer, risk_measure=args.risk_measure, floor_scope=args.floor_scope,
                             confidence_scope=args.confidence_scope, router_holdout=args.router_holdout),
        "random": RandomMix(), "oracle": Oracle(),
    }
    names = [o.models[j] for j in tiers]
    out: dict = {"seed": seed, "tiers": names, "methods": {},
                 "chains": None if chains is None else chains_to_names(chains, names, o.task_names),
                 "global_chain": [n for n, g in zip(names, global_chain) if g]}
    for name in ("always_reference", "always_cheapest", "best_single", "knn", "mf", "frugalgpt", "routenlp",
                 "random", "oracle"):
        step(name)
        m = methods[name].fit(s)
        if name == "random":  # matched to RouteNLP's headline test cost
            rn_cost = (1 - out["methods"]["routenlp"]["cost_reduction"]) * ref_c
            m.default = m.match_cost(test, rn_cost)
            m.knobs = sorted(set(m.knobs) | {m.default})
        out["methods"][name] = evaluate_method(m, s, ref_c, ref_q, cal_ref_q, c_lo, args.floor)
    rn: RouteNLP = methods["routenlp"]
    r = rn.simulate(test, rn.default)
    v = measured_violations(r, rn.tasks[test], len(tiers), args.risk, args, rn.chains)
    out["routenlp"] = {
        "violation_rate": v["violation_rate"], "cells_over_risk": v["cells_over_risk"],
        "unacceptable_share": v["unacceptable_share"], "accepted_below_reference": v["accepted_below_reference"],
        "escalation_rate": float((r.escalations > 0).mean()), "calls_per_query": float(1 + r.escalations.mean()),
        # by tier NAME: the portfolio can differ between seeds
        "tier_share": dict(zip(names, (np.bincount(r.tier[r.tier >= 0], minlength=len(tiers)) / len(test)).tolist())),
    }
    for f in args.floor:
        fp = rn.thresholds((FLOOR, f))
        out["routenlp"].setdefault("floor", {})[f"{f:.2f}"] = {
            "plan": {t: (None if p is None else {"chain_set": p[0], "start_rule": rule_label(p[1]), "level": p[2]})
                     for t, p in zip(rn.task_names, fp["plan"])},
            "certificates": [{"index": c.index, "n": c.n, "calibration_quality_ratio": c.quality_ratio}
                             for c in fp["certificates"]]}
    # Violation study: fixed alphas, calibration subsamples of the calibration split.
    step("violation study")
    study = []
    for alpha in args.alphas:
        for size in args.cal_sizes:
            sub = stratified_subsample(cal, rn.tasks, size, seed + size)
            thr = rn.calibrate(sub, args.study_quality_target, alpha)
            rr = rn.simulate(test, (args.study_quality_target, alpha), thr)
            vv = measured_violations(rr, rn.tasks[test], len(tiers), alpha, args, rn.chains)
            study.append({"alpha": alpha, "cal_size": int(len(sub)), "requested_size": size,
                          "violation_rate": vv["violation_rate"], "cells_over_risk": vv["cells_over_risk"],
                          "accepted_below_reference": vv["accepted_below_reference"],
                          "cost_reduction": M.cost_reduction(rr.cost.mean(), ref_c),
                          "quality_ratio": M.quality_ratio(np.nanmean(rr.quality), ref_q)})
    out["violation_study"] = study
    if args.shift and len(o.task_names) >= 2:
        step("shift study")
        out["shift"] = shift_study(o, X, resp, s, seed, args)
    return out


def shift_study(o: Outcomes, X, resp, s: Split, seed: int, args) -> dict:
    """Calibrate on half of the tasks (source), test on the others (target); tasks pooled into one (the router has
    never seen the target tasks). `static`: thresholds from the source calibration data only. `recalibrated`:
    thresholds recalibrated on the first `--shift-window` labelled target queries (online recalibration from
    feedback), then tested on the target test split. Router, scorer and confidence are trained on source only."""
    rng = np.random.default_rng(seed + 1000)
    names = rng.permutation(len(o.task_names))
    src_tasks = set(names[: len(names) // 2].tolist())
    is_src = np.array([t in src_tasks for t in o.tasks])
    train, cal = s.train[is_src[s.train]], s.cal[is_src[s.cal]]
    tgt_cal, tgt_test = s.cal[~is_src[s.cal]], s.test[~is_src[s.test]]
    pooled = np.zeros(o.n, dtype=int)
    ss = Split(o, X, train, cal, tgt_test, seed, s.tiers)
    ss.scores = answer_scores(ss, resp, pooled, 1, train)
    rn = RouteNLP(risk=args.risk, delta=args.delta, quality_target=args.quality_target,
                  min_calibration_samples=args.min_calibration_samples, epochs=args.epochs, task_of=pooled,
                  fwer=args.fwer, risk_measure=args.risk_measure, router_holdout=args.router_holdout).fit(ss)
    ref_c, ref_q = o.cost[tgt_test, o.reference].mean(), o.quality[tgt_test, o.reference].mean()
    window = np.random.default_rng(seed + 2000).permutation(tgt_cal)[: args.shift_window]
    out = {"source_tasks": sorted(o.task_names[t] for t in src_tasks), "window": int(len(window))}
    for mode, cal_idx in (("static", cal), ("recalibrated", window)):
        thr = rn.calibrate(cal_idx, args.study_quality_target, args.shift_risk)
        r = rn.simulate(tgt_test, (args.study_quality_target, args.shift_risk), thr)
        v = measured_violations(r, pooled[tgt_test], len(s.tiers), args.shift_risk, args)
        out[mode] = {"violation_rate": v["violation_rate"], "accepted_below_reference": v["accepted_below_reference"],
                     "cost_reduction": M.cost_reduction(r.cost.mean(), ref_c),
                     "quality_ratio": M.quality_ratio(np.nanmean(r.quality), ref_q)}
    return out


# ------------------------------------------------------------------------------------------------ aggregation


def _finite(x):
    """NaN/inf (an undefined rate, an unreached target) -> None, so the output is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _or0(x):
    """A target a method cannot reach on calibration data counts as no saving (it must answer with the reference)."""
    return 0.0 if x is None else x


def _floor_plans(plans: list[dict]) -> dict:
    """RouteNLP's certified floor plans over seeds: how often each chain set / start rule was used (per task and
    seed) and how many seeds served every task from the reference."""
    used = [p for plan in plans for p in plan.values() if p is not None]
    return {"chain_sets": dict(Counter(p["chain_set"] for p in used)),
            "start_rules": dict(Counter(str(p["start_rule"]) for p in used)),
            "reference_only_seeds": sum(all(p is None for p in plan.values()) for plan in plans)}


def aggregate(o: Outcomes, per_seed: list[dict], args, wall_s: float) -> dict:
    """Means and CIs over the seeds that finished. Tiers and chains can differ between seeds (learnt on each
    seed's train split): everything per tier is aggregated by tier NAME."""
    used = {t for p in per_seed for t in p["tiers"]}
    tiers = [m for m in o.models if m in used]
    res: dict = {"dataset": o.name, "n_queries": o.n, "dropped_queries": o.dropped, "models": o.models,
                 "reference": o.models[o.reference], "seeds": len(per_seed), "seed_ids": [p["seed"] for p in per_seed],
                 "prices": args.prices_label, "chains_mode": args.chains,
                 "tiers": tiers, "tiers_per_seed": [p["tiers"] for p in per_seed],
                 "chains_per_seed": [p.get("chains") for p in per_seed],
                 "global_chain_per_seed": [p.get("global_chain") for p in per_seed],
                 "split": {"train": args.train_frac, "calibration": args.cal_frac,
                           "test": round(1 - args.train_frac - args.cal_frac, 4)},
                 "methods": {}, "wall_s": round(wall_s, 1), "study_quality_target": args.study_quality_target,
                 "floors": list(args.floor), "delta": args.delta}
    for name in METHODS:
        runs = [p["methods"][name] for p in per_seed]
        cr, cr_ci = M.mean_ci([r["cost_reduction"] for r in runs])
        qr, qr_ci = M.mean_ci([r["quality_ratio"] for r in runs])
        aiq, aiq_ci = M.mean_ci([r["aiq"] for r in runs])
        at, at_ci, at_q, reached = {}, {}, {}, {}
        for tgt in TARGETS:
            key = f"{tgt:.2f}"
            at[key], at_ci[key] = M.mean_ci([r["cost_reduction_at"][key] for r in runs])
            at_q[key] = M.mean_ci([r["cost_reduction_at"][key + "_quality_ratio"] for r in runs])[0]
            reached[key] = sum(r["cost_reduction_at"][key] is not None for r in runs)
        res["methods"][name] = {"cost_reduction": cr, "cost_reduction_ci": cr_ci, "quality_ratio": qr,
                                "quality_ratio_ci": qr_ci, "aiq": aiq, "aiq_ci": aiq_ci, "cost_reduction_at": at,
                                "cost_reduction_at_ci": at_ci, "quality_ratio_at": at_q,
                                "target_reached_seeds": reached,
                                "curve": runs[0]["curve"], "floor": {}}
        for key in runs[0].get("floor", {}):
            pts = [r["floor"][key] for r in runs]
            cr_f, ci_f = M.mean_ci([x["cost_reduction"] for x in pts])
            res["methods"][name]["floor"][key] = {
                "cost_reduction": cr_f, "cost_reduction_ci": ci_f,
                "quality_ratio": M.mean_ci([x["quality_ratio"] for x in pts])[0],
                "held_seeds": sum(x["held"] for x in pts), "reached_seeds": sum(x["reached"] for x in pts),
                "min_quality_ratio": min(x["quality_ratio"] for x in pts)}
    rn = [p["routenlp"] for p in per_seed]
    vr, vr_ci = M.mean_ci([r["violation_rate"] for r in rn])
    vr_ci = [max(0.0, vr_ci[0]), min(1.0, vr_ci[1])] if np.isfinite(vr) else vr_ci
    res["routenlp"] = {"risk": args.risk, "risk_measure": args.risk_measure, "delta": args.delta,
                       "quality_target": args.quality_target,
                       "violation_rate": vr, "violation_rate_ci": vr_ci,
                       "escalation_rate": M.mean_ci([r["escalation_rate"] for r in rn])[0],
                       "calls_per_query": M.mean_ci([r["calls_per_query"] for r in rn])[0],
                       "accepted_below_reference": M.mean_ci([r["accepted_below_reference"] for r in rn])[0],
                       "cells_over_risk": M.mean_ci([r["cells_over_risk"] for r in rn])[0],
                       "tier_share": {t: float(np.mean([r["tier_share"].get(t, 0.0) for r in rn])) for t in tiers},
                       "floor_plans": {k: _floor_plans([r["floor"][k]["plan"] for r in rn]) for k in rn[0].get("floor", {})}}
    res["oracle"] = res["methods"]["oracle"]
    # Margins of RouteNLP over each non-oracle baseline at quality ratio 0.97 (per-seed differences).
    margins = {}
    for name in METHODS:
        if name in ("routenlp", "oracle"):
            continue
        d = [_or0(p["methods"]["routenlp"]["cost_reduction_at"]["0.97"]) - _or0(p["methods"][name]["cost_reduction_at"]["0.97"])
             for p in per_seed]
        m, ci = M.mean_ci(d)
        margins[name] = {"margin": m, "ci": ci}
    res["routenlp"]["margin_at_0.97"] = margins
    gap = [p["methods"]["oracle"]["cost_reduction"] - _or0(p["methods"]["routenlp"]["cost_reduction_at"]["0.97"])
           for p in per_seed]
    res["routenlp"]["oracle_gap_at_0.97"] = dict(zip(("gap", "ci"), M.mean_ci(gap)))
    study = []
    for i, cell in enumerate(per_seed[0]["violation_study"]):
        vals = [p["violation_study"][i] for p in per_seed]
        row = {"alpha": cell["alpha"], "cal_size": cell["requested_size"],
               "cal_size_used": int(np.mean([v["cal_size"] for v in vals]))}
        for k in ("violation_rate", "cells_over_risk", "accepted_below_reference", "cost_reduction", "quality_ratio"):
            row[k], row[k + "_ci"] = M.mean_ci([v[k] for v in vals])
        row["seeds_with_acceptance"] = sum(v["violation_rate"] is not None for v in vals)
        for k in ("violation_rate_ci",):  # a rate lives in [0, 1]
            row[k] = [max(0.0, row[k][0]), min(1.0, row[k][1])] if np.isfinite(row[k][0]) else row[k]
        row["within"] = (None if row["seeds_with_acceptance"] == 0
                         else bool(row["violation_rate_ci"][0] <= cell["alpha"]))
        study.append(row)
    res["violation_study"] = study
    if all("shift" in p for p in per_seed):
        sh = {}
        for mode in ("static", "recalibrated"):
            sh[mode] = {}
            for k in ("violation_rate", "accepted_below_reference", "cost_reduction", "quality_ratio"):
                sh[mode][k], sh[mode][k + "_ci"] = M.mean_ci([p["shift"][mode][k] for p in per_seed])
            ci = sh[mode]["violation_rate_ci"]
            if np.isfinite(ci[0]):
                sh[mode]["violation_rate_ci"] = [max(0.0, ci[0]), min(1.0, ci[1])]
        sh["window"] = per_seed[0]["shift"]["window"]
        sh["risk"] = args.shift_risk
        sh["source_tasks_per_seed"] = [p["shift"]["source_tasks"] for p in per_seed]
        res["shift"] = sh
    return res


# ------------------------------------------------------------------------------------------------ output


def _pct(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.1f}%"


def _num3(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


def _ci(ci) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def markdown(res: dict) -> str:
    L = [f"### {res['dataset']}: {res['n_queries']} queries, {len(res['models'])} models, reference "
         f"`{res['reference']}`, {res['seeds']} seeds",
         "",
         f"Prices: {res['prices']}. Portfolio tiers (chosen on each seed's train split, union over seeds): "
         f"{', '.join('`' + t + '`' for t in res['tiers'])}; chains: {res['chains_mode']}. "
         f"Dropped queries: {res['dropped_queries']}. Wall time: {res['wall_s']} s."
         + ("" if not res.get("failed_seeds") else
            f" **Failed seeds: {', '.join(str(f['seed']) for f in res['failed_seeds'])}** (see results.json).")]
    L += chains_markdown(res) + [
         "",
         "| method | cost reduction [95% CI] | quality ratio | AIQ | cost red. @Q>=0.95 | @0.97 [95% CI] | @0.99 | "
         "test quality ratio @0.97 |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in METHODS:
        m = res["methods"][name]
        at, ci = m["cost_reduction_at"], m["cost_reduction_at_ci"]
        n = res["seeds"]

        def cell(key, with_ci=False):
            k = m["target_reached_seeds"][key]
            if k == 0:
                return "unreached"
            txt = _pct(at[key]) + (f" {_ci(ci[key])}" if with_ci else "")
            return txt + ("" if k == n else f" ({k}/{n} seeds)")

        L.append(f"| {name} | {_pct(m['cost_reduction'])} {_ci(m['cost_reduction_ci'])} | {_num3(m['quality_ratio'])} | "
                 f"{'n/a' if m['aiq'] is None else format(m['aiq'], '.4f')} | {cell('0.95')} | {cell('0.97', True)} | "
                 f"{cell('0.99')} | {_num3(m['quality_ratio_at']['0.97'])} |")
    r = res["routenlp"]
    L += ["", f"RouteNLP headline (risk alpha={r['risk']} ({r['risk_measure']}), delta={r['delta']}, quality target "
          f"{r['quality_target']}): "
          f"violation rate {_pct(r['violation_rate'])} {_ci(r['violation_rate_ci'])}, escalation rate "
          f"{_pct(r['escalation_rate'])}, calls/query {_num3(r['calls_per_query'])}, answers accepted below the "
          f"reference {_pct(r['accepted_below_reference'])}, tier share "
          f"{', '.join(f'{t} {x:.3f}' for t, x in r['tier_share'].items())}.",
          "", "Operating points are chosen on calibration data; `test quality ratio @0.97` is what the 0.97 point "
          "delivered on the test split (mean over the seeds that reached it), so a point below 0.970 there missed the "
          "target out of sample.",
          ""] + floor_markdown(res) + [
          "Margin of RouteNLP's cost reduction at quality ratio >= 0.97 over each baseline (per-seed differences):",
          "", "| baseline | margin [95% CI] |", "| --- | --- |"]
    for name, mg in r["margin_at_0.97"].items():
        L.append(f"| {name} | {_pct(mg['margin'])} {_ci(mg['ci'])} |")
    g = r["oracle_gap_at_0.97"]
    L += ["", f"Gap to the oracle's cost reduction: {_pct(g['gap'])} {_ci(g['ci'])}.", "",
          f"Violation study ({MEASURE_TEXT[r['risk_measure']]}; start rule quality target "
          f"{res['study_quality_target']}):", "",
          "| alpha | calibration size | violation rate [95% CI] | <= alpha within CI | cells over alpha | "
          "accepted below ref. | cost reduction | quality ratio |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in res["violation_study"]:
        within = {None: "vacuous (nothing accepted)", True: "yes", False: "NO"}[v["within"]]
        n_acc = v["seeds_with_acceptance"]
        L.append(f"| {v['alpha']} | {v['cal_size']} ({v['cal_size_used']}) | {_pct(v['violation_rate'])} "
                 f"{_ci(v['violation_rate_ci'])} ({n_acc}/{res['seeds']} seeds accept) | {within} | {_pct(v['cells_over_risk'])} | "
                 f"{_pct(v['accepted_below_reference'])} | {_pct(v['cost_reduction'])} | {_num3(v['quality_ratio'])} |")
    if "shift" in res:
        sh = res["shift"]
        L += ["", f"Shift study (calibrate on half of the tasks, test on the others; alpha={sh['risk']}; online "
              f"recalibration window {sh['window']} labelled target queries):", "",
              "| thresholds | violation rate [95% CI] | accepted below ref. | cost reduction | quality ratio |",
              "| --- | --- | --- | --- | --- |"]
        for mode in ("static", "recalibrated"):
            x = sh[mode]
            L.append(f"| {mode} | {_pct(x['violation_rate'])} {_ci(x['violation_rate_ci'])} | "
                     f"{_pct(x['accepted_below_reference'])} | {_pct(x['cost_reduction'])} | {_num3(x['quality_ratio'])} |")
    return "\n".join(L) + "\n"


def chains_markdown(res: dict) -> list[str]:
    """The per-task chains of the first seed, and how many seeds learnt the same ones."""
    chains = res.get("chains_per_seed") or []
    if not chains or chains[0] is None:
        return []
    same = sum(c == chains[0] for c in chains)
    rows = [f"| {task} | {' -> '.join(tiers)} |" for task, tiers in chains[0].items()]
    return ["", f"Per-task chains learnt on train (seed {res['seed_ids'][0]}; {same}/{len(chains)} seeds learnt the "
            "same chains for every task):", "", "| task | chain (cheapest first; the last tier always answers) |",
            "| --- | --- |"] + rows


def floor_markdown(res: dict) -> list[str]:
    """Certified-floor table: per method and floor, test cost reduction and the share of seeds that held it."""
    if not res.get("floors"):
        return []
    n = res["seeds"]
    keys = [f"{f:.2f}" for f in res["floors"]]
    L = [f"Quality floor (certified mode; delta = {res['delta']}): RouteNLP is calibrated for the floor "
         "(`RouteNLP.floor_plan`: the level family's chain set and start rule chosen on the training split, the level certified by `conformal.certify_level` on the calibration split; no sweep); every other method uses its cheapest setting whose calibration "
         "quality ratio reaches the floor (always-reference when none does). *Held* = test quality ratio >= floor - 2 "
         "standard errors of the test estimate.", "",
         "| method | " + " | ".join(f"floor {k}: cost reduction [95% CI] | test quality ratio (min) | held" for k in keys)
         + " |", "| --- |" + " --- | --- | --- |" * len(keys)]
    for name in METHODS:
        f = res["methods"][name]["floor"]
        cells = []
        for k in keys:
            x = f[k]
            cells.append(f"{_pct(x['cost_reduction'])} {_ci(x['cost_reduction_ci'])} | {_num3(x['quality_ratio'])} "
                         f"({_num3(x['min_quality_ratio'])}) | {x['held_seeds']}/{n}")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    plans = res["routenlp"].get("floor_plans") or {}
    if plans:
        L += ["", "RouteNLP's floor plans (chosen on each seed's training split): " + "; ".join(
            f"floor {k}: chain sets {p['chain_sets']}, start rules {p['start_rules']} (per task and seed), "
            f"{p['reference_only_seeds']} seed(s) served by the reference alone" for k, p in plans.items()) + "."]
    return L + [""]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="routenlp bench routing", description=__doc__.splitlines()[0])
    ap.add_argument("table", help="outcome table (.jsonl/.csv/.parquet; see docs/bench-routing.md)")
    ap.add_argument("--prices", default=None,
                    help="price table for rows without cost_usd, or `self-hosted`: every row's cost from its tokens, "
                    "models with params_b in the price table (--price-table) priced by GPU time (outcomes.py), the "
                    "others at list price")
    ap.add_argument("--price-table", default=None,
                    help="prices.yaml for --prices self-hosted (default <shared data>/prices.yaml)")
    ap.add_argument("--chains", choices=("per-task", "global"), default="per-task",
                    help="RouteNLP's tier chains: each task's cost/quality Pareto set on train (default) or one "
                    "Pareto chain for all tasks")
    ap.add_argument("--chain-min-gain-se", type=float, default=MIN_GAIN_SE,
                    help="a tier joins a task's chain only if it beats the previous member on that task's training "
                    "queries by more than this many standard errors (chains.learn_chains; 0 = plain Pareto set)")
    ap.add_argument("--floor", default="",
                    help="certified quality floors, comma-separated (e.g. 0.97): RouteNLP calibrated for each floor "
                    "(no sweep) and 'target held' reported per method")
    ap.add_argument("--floor-scope", choices=("policy", "task"), default="policy",
                    help="what RouteNLP certifies under --floor: the quality ratio over the traffic mix (policy, "
                    "RoutingPolicy cascade.qualityFloor; 'target held' is judged on it) or each task's own "
                    "(task, tasks[].qualityFloor)")
    ap.add_argument("--confidence-scope", choices=("tier", "task"), default="tier",
                    help="RouteNLP's answer-confidence models: one per tier pooled over tasks (default, as the "
                    "trainer fits them) or one per (task, tier)")
    ap.add_argument("--frontier", default=None, help="reference model (default: highest mean cost)")
    ap.add_argument("--tiers", default=None, help="comma-separated cascade tiers, cheapest first, ending with the "
                    "reference (default: the cost/quality Pareto set on train)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--train-frac", type=float, default=0.5)
    ap.add_argument("--cal-frac", type=float, default=0.25)
    ap.add_argument("--risk", type=float, default=0.05, help="RouteNLP risk level alpha (headline)")
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--quality-target", type=float, default=0.97)
    ap.add_argument("--min-calibration-samples", type=int, default=10)
    ap.add_argument("--risk-measure", choices=RISK_MEASURES, default=ALL_REQUESTS,
                    help="what RouteNLP's risk level bounds per (task, tier) (RoutingPolicy cascade.riskMeasure; "
                    "docs/guarantee.md)")
    ap.add_argument("--fwer", choices=("fixed_sequence", "holm"), default="fixed_sequence",
                    help="RouteNLP's Learn-then-Test FWER procedure: fixed-sequence testing over a sequence learnt on "
                    "the training split (default) or Bonferroni-Holm over the fixed 0.00..0.99 grid")
    ap.add_argument("--study-quality-target", type=float, default=0.0,
                    help="start rule of the violation study (default 0: every query reaches the cheapest tier, so "
                    "each (task, tier) gets the whole calibration sample)")
    ap.add_argument("--alphas", default="0.01,0.05,0.10,0.20,0.30",
                    help="risk levels of the violation study (0.2/0.3 added: on hard data nothing below is certified)")
    ap.add_argument("--cal-sizes", default="100,500,1000")
    ap.add_argument("--no-shift", dest="shift", action="store_false", help="skip the shift study")
    ap.add_argument("--shift-window", type=int, default=500)
    ap.add_argument("--shift-risk", type=float, default=0.2, help="risk level of the shift study")
    ap.add_argument("--response-features", choices=("hash", "minilm"), default="hash",
                    help="answer-scorer embedding of the response text (default hash: hashed word n-grams)")
    ap.add_argument("--epochs", type=int, default=30,
                    help="most router training epochs (early stopping on held-out training queries picks fewer)")
    ap.add_argument("--router-holdout", type=float, default=0.15,
                    help="share of the router's training queries held out to pick the epoch count (0: train for "
                    "--epochs; the ablation in docs/bench-routing.md)")
    ap.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    ap.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/routenlp/bench)")
    ap.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    ap.add_argument("--out", default=None, help="write results.json, report.md and PNG plots here")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the per-seed results an earlier run of the same command left in --out/seeds (a run "
                    "that was stopped keeps every seed it finished)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args.alphas = [float(x) for x in str(args.alphas).split(",") if x]
        args.cal_sizes = [int(x) for x in str(args.cal_sizes).split(",") if x]
    except ValueError:
        print("routenlp bench routing: --alphas and --cal-sizes take comma-separated numbers", file=sys.stderr)
        return 2
    if not (0 < args.train_frac < 1 and 0 < args.cal_frac < 1 and args.train_frac + args.cal_frac < 1):
        print("routenlp bench routing: --train-frac and --cal-frac must be in (0, 1) and sum below 1", file=sys.stderr)
        return 2
    if not 0 <= args.router_holdout < 1:
        print("routenlp bench routing: --router-holdout must be in [0, 1)", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("routenlp bench routing: --seeds must be >= 1", file=sys.stderr)
        return 2
    args.tiers = [t.strip() for t in args.tiers.split(",")] if args.tiers else None
    try:
        args.floor = [float(x) for x in str(args.floor).split(",") if x.strip()]
    except ValueError:
        print("routenlp bench routing: --floor takes comma-separated numbers", file=sys.stderr)
        return 2
    if any(not 0 < f <= 1 for f in args.floor):
        print("routenlp bench routing: --floor values must be in (0, 1]", file=sys.stderr)
        return 2
    t0 = time.time()
    # The models here are small: one thread each is ~10x faster than two threads on a busy 2-core machine.
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        return _run(args, t0)


def _run(args, t0) -> int:
    self_hosted = args.prices == "self-hosted"
    args.prices_label = "self-hosted (GPU time per token from params_b; list prices for API models)" if self_hosted \
        else "list prices"
    try:
        prices = (args.price_table or shared_data_dir() / "prices.yaml") if self_hosted else args.prices
        o = load_outcomes(args.table, prices, args.frontier, self_hosted=self_hosted)
        if args.tiers:
            unknown = [t for t in args.tiers if t not in o.models]
            if unknown:
                raise OutcomeError(f"--tiers: unknown models {unknown} (models: {', '.join(o.models)})")
            if args.tiers[-1] != o.models[o.reference]:
                raise OutcomeError(f"--tiers must end with the reference model {o.models[o.reference]!r}")
        print(f"{o.name}: {o.n} queries x {len(o.models)} models ({o.dropped['missing_some_model']} queries dropped: "
              f"missing some model; {o.cost_from_tokens} costs from tokens x prices); reference "
              f"{o.models[o.reference]}", file=sys.stderr)
        cache = EmbeddingCache(args.cache_dir)
        X = cache.embed(o.queries, progress=args.progress)
        resp = ResponseEmbeddings(o, cache, args.progress, args.response_features)
    except OutcomeError as exc:
        print(f"routenlp bench routing: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    out = Path(args.out) if args.out else None
    if out:
        (out / "seeds").mkdir(parents=True, exist_ok=True)
    per_seed, failed = [], []
    bar = tqdm(range(args.seeds), desc="seeds", unit="seed", file=sys.stderr, disable=not args.progress)
    for seed in bar:
        done = out / "seeds" / f"seed-{seed}.json" if out else None
        if args.resume and done is not None and done.is_file():  # finished by an earlier run of the same command
            per_seed.append(json.loads(done.read_text()))
            continue
        where: dict = {}
        try:
            p = run_seed(o, X, resp, seed, args, bar, where)
        except Exception as exc:  # noqa: BLE001 - one seed's failure must not lose the others' work
            what = {"seed": seed, "step": where.get("step", "?"), "error": f"{type(exc).__name__}: {exc}"}
            failed.append(what)
            print(f"routenlp bench routing: seed {seed} failed in step {what['step']!r}: {what['error']}",
                  file=sys.stderr)
            if out:
                (out / "seeds" / f"seed-{seed}.error.txt").write_text(traceback.format_exc())
            continue
        per_seed.append(p)
        if out:  # written as each seed finishes: a later crash keeps it
            (out / "seeds" / f"seed-{seed}.json").write_text(json.dumps(_finite(p), allow_nan=False))
    if not per_seed:
        print(f"routenlp bench routing: every seed failed ({len(failed)}); nothing to aggregate", file=sys.stderr)
        if out:
            (out / "results.json").write_text(json.dumps({"failed_seeds": failed}, indent=2))
        return 1
    res = _finite(aggregate(o, per_seed, args, time.time() - t0))
    res["failed_seeds"] = failed
    if out:
        (out / "results.json").write_text(json.dumps(res, indent=2, allow_nan=False))
        from .plots import plot_all

        pngs = plot_all(res, out)
        md = markdown(res) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
        (out / "report.md").write_text(md)
    if args.json:
        print(json.dumps(res, allow_nan=False))
    else:
        print(markdown(res))
    return 1 if failed else 0
