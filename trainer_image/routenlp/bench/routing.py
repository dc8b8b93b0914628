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
from pathlib import Path

import numpy as np

from routenlp.router.conformal import ACCEPTED_ANSWERS, ALL_REQUESTS, RISK_MEASURES

from . import metrics as M
from .baselines import (AlwaysModel, BestSingle, FrugalCascade, KNNRouter, MFRouter, Oracle, RandomMix, Split)
from .features import AnswerScorer, EmbeddingCache, hashed_ngrams, out_of_fold, response_tail, scorer_features
from .outcomes import OutcomeError, Outcomes, load_outcomes, pareto_tiers
from .routenlp_method import RouteNLP

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


def evaluate_method(m, s: Split, ref_c: float, ref_q: float, cal_ref_q: float, c_lo: float) -> dict:
    """Test points over the knobs, AIQ, operating points chosen on calibration, the headline."""
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
    }


def _jsonable(x):
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def measured_violations(r, tasks: np.ndarray, n_tiers: int, risk: float, args) -> dict:
    """`metrics.violations` of a simulated cascade (`cascade.CascadeResult`) in the run's risk measure."""
    return M.violations(r.tier, r.accepted, r.quality, tasks, n_tiers, risk, called=r.called,
                        risk_measure=args.risk_measure)


def run_seed(o: Outcomes, X: np.ndarray, resp: ResponseEmbeddings, seed: int, args, bar=None) -> dict:
    train, cal, test = split_indices(o.tasks, seed, args.train_frac, args.cal_frac)
    tiers = ([o.models.index(t) for t in args.tiers] if args.tiers
             else pareto_tiers(o.quality[train], o.cost[train], o.reference))
    if tiers[-1] != o.reference:
        raise OutcomeError(f"--tiers must end with the reference model {o.models[o.reference]!r}")
    s = Split(o, X, train, cal, test, seed, tiers)

    def step(msg):
        if bar is not None:
            bar.set_postfix_str(f"seed {seed}: {msg}")

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
                             fwer=args.fwer, risk_measure=args.risk_measure),
        "random": RandomMix(), "oracle": Oracle(),
    }
    out: dict = {"tiers": [o.models[j] for j in tiers], "methods": {}}
    for name in ("always_reference", "always_cheapest", "best_single", "knn", "mf", "frugalgpt", "routenlp",
                 "random", "oracle"):
        step(name)
        m = methods[name].fit(s)
        if name == "random":  # matched to RouteNLP's headline test cost
            rn_cost = (1 - out["methods"]["routenlp"]["cost_reduction"]) * ref_c
            m.default = m.match_cost(test, rn_cost)
            m.knobs = sorted(set(m.knobs) | {m.default})
        out["methods"][name] = evaluate_method(m, s, ref_c, ref_q, cal_ref_q, c_lo)
    rn: RouteNLP = methods["routenlp"]
    r = rn.simulate(test, rn.default)
    v = measured_violations(r, rn.tasks[test], len(tiers), args.risk, args)
    out["routenlp"] = {
        "violation_rate": v["violation_rate"], "cells_over_risk": v["cells_over_risk"],
        "unacceptable_share": v["unacceptable_share"], "accepted_below_reference": v["accepted_below_reference"],
        "escalation_rate": float((r.escalations > 0).mean()), "calls_per_query": float(1 + r.escalations.mean()),
        "tier_share": np.bincount(r.tier, minlength=len(tiers)).astype(float).tolist(),
    }
    out["routenlp"]["tier_share"] = [x / len(test) for x in out["routenlp"]["tier_share"]]
    # Violation study: fixed alphas, calibration subsamples of the calibration split.
    step("violation study")
    study = []
    for alpha in args.alphas:
        for size in args.cal_sizes:
            sub = stratified_subsample(cal, rn.tasks, size, seed + size)
            thr = rn.calibrate(sub, args.study_quality_target, alpha)
            rr = rn.simulate(test, (args.study_quality_target, alpha), thr)
            vv = measured_violations(rr, rn.tasks[test], len(tiers), alpha, args)
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
                  fwer=args.fwer, risk_measure=args.risk_measure).fit(ss)
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


def aggregate(o: Outcomes, per_seed: list[dict], args, wall_s: float) -> dict:
    res: dict = {"dataset": o.name, "n_queries": o.n, "dropped_queries": o.dropped, "models": o.models,
                 "reference": o.models[o.reference], "seeds": len(per_seed),
                 "tiers": per_seed[0]["tiers"], "split": {"train": args.train_frac, "calibration": args.cal_frac,
                                                          "test": round(1 - args.train_frac - args.cal_frac, 4)},
                 "methods": {}, "wall_s": round(wall_s, 1), "study_quality_target": args.study_quality_target}
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
                                "curve": runs[0]["curve"]}
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
                       "tier_share": np.mean([r["tier_share"] for r in rn], axis=0).tolist()}
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
         f"Cascade tiers (chosen on train): {', '.join('`' + t + '`' for t in res['tiers'])}. "
         f"Dropped queries: {res['dropped_queries']}. Wall time: {res['wall_s']} s.",
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
          f"reference {_pct(r['accepted_below_reference'])}, tier share {[round(x, 3) for x in r['tier_share']]}.",
          "", "Operating points are chosen on calibration data; `test quality ratio @0.97` is what the 0.97 point "
          "delivered on the test split (mean over the seeds that reached it), so a point below 0.970 there missed the "
          "target out of sample.",
          "", "Margin of RouteNLP's cost reduction at quality ratio >= 0.97 over each baseline (per-seed differences):",
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="routenlp bench routing", description=__doc__.splitlines()[0])
    ap.add_argument("table", help="outcome table (.jsonl/.csv/.parquet; see docs/bench-routing.md)")
    ap.add_argument("--prices", default=None, help="price table for rows without cost_usd")
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
    ap.add_argument("--epochs", type=int, default=30, help="router training epochs")
    ap.add_argument("--threads", type=int, default=1, help="torch/BLAS threads (default 1)")
    ap.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/routenlp/bench)")
    ap.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    ap.add_argument("--out", default=None, help="write results.json, report.md and PNG plots here")
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
    if args.seeds < 1:
        print("routenlp bench routing: --seeds must be >= 1", file=sys.stderr)
        return 2
    args.tiers = [t.strip() for t in args.tiers.split(",")] if args.tiers else None
    t0 = time.time()
    # The models here are small: one thread each is ~10x faster than two threads on a busy 2-core machine.
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        return _run(args, t0)


def _run(args, t0) -> int:
    try:
        o = load_outcomes(args.table, args.prices, args.frontier)
        if args.tiers:
            unknown = [t for t in args.tiers if t not in o.models]
            if unknown:
                raise OutcomeError(f"--tiers: unknown models {unknown} (models: {', '.join(o.models)})")
        print(f"{o.name}: {o.n} queries x {len(o.models)} models ({o.dropped['missing_some_model']} queries dropped: "
              f"missing some model; {o.cost_from_tokens} costs from tokens x prices); reference "
              f"{o.models[o.reference]}", file=sys.stderr)
        cache = EmbeddingCache(args.cache_dir)
        X = cache.embed(o.queries, progress=args.progress)
        resp = ResponseEmbeddings(o, cache, args.progress, args.response_features)
        from tqdm import tqdm

        bar = tqdm(range(args.seeds), desc="seeds", unit="seed", file=sys.stderr, disable=not args.progress)
        per_seed = [run_seed(o, X, resp, seed, args, bar) for seed in bar]
    except OutcomeError as exc:
        print(f"routenlp bench routing: {exc}", file=sys.stderr)
        return 2
    res = _finite(aggregate(o, per_seed, args, time.time() - t0))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2, allow_nan=False))
        from .plots import plot_all

        pngs = plot_all(res, out)
        md = markdown(res) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
        (out / "report.md").write_text(md)
    if args.json:
        print(json.dumps(res, allow_nan=False))
    else:
        print(markdown(res))
    return 0
