"""`routenlp train retrain` and `routenlp train calibrate`: a new router version for the changed student tier.

retrain: the student tier (now serving the adapter, `--student-model`) is probed on logged queries that have a
teacher answer: each answer is scored against the teacher's (normalised exact match = "acceptable") and its token
logprobs are kept. These quality signals replace the student tier's column; other cheap tiers keep their labels from
the log (feedback events); the teacher is the reference (its own answers are acceptable by definition: quality here
is agreement with the teacher). The difficulty router (`routenlp.router.difficulty`) is trained on one split, then
`calibrate` runs on the other, which holds only requests of the router's exploration sample (`calibration_rows`:
the rest are escalated requests, a biased sample; they train but never calibrate).

calibrate: per (task, tier) confidence models (`routenlp.router.confidence`, fitted on the training split) and
conformal thresholds (`routenlp.router.conformal.calibrate_cascade`, MAPIE Learn-then-Test, on the held-out
calibration split only, so the guarantee holds) are computed and written with the router as a new immutable version
(`routenlp.router.artifacts.save_artifact`) that routers hot-reload. `routenlp train calibrate` alone recalibrates an
existing version on new signals (same router weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from routenlp.router.conformal import ACCEPTED_ANSWERS, ALL_REQUESTS, RISK_MEASURES
from routenlp.router.encoder import DEFAULT_VARIANT, VARIANTS, EncoderSpec, default_variant

from .evaluate import matches
from .manifest import Stage, StageError, local_path, print_summary, read_jsonl, write_jsonl


def split_of(request_id: str, cal_fraction: float) -> str:
    """'cal' or 'fit', stable per request id (the same request lands in the same split on every rerun)."""
    bucket = int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=4).digest(), "big") % 1000
    return "cal" if bucket < cal_fraction * 1000 else "fit"


def calibration_rows(rows: list[dict[str, Any]], cal_fraction: float) -> np.ndarray:
    """Bool per row: in the calibration split (its id's hash bucket, stable across reruns) and a random-sample request
    (`random_sample`); every other row may train the router and the confidence models."""
    return np.array([split_of(r["request_id"], cal_fraction) == "cal" and bool(r.get("random_sample")) for r in rows],
                    dtype=bool)


def logged_rows(events: list[Any], teacher_tier: str) -> list[dict[str, Any]]:
    """One row per logged request with a teacher answer: its query, task, the teacher's answer, the labels the log
    holds for other tiers ({tier: acceptable}) and `random_sample`: the request was on the router's exploration
    sample (picked by a hash of its id before any tier answered). Only those rows may calibrate: the other requests
    with a teacher answer are there because the cascade escalated them, a sample biased towards hard queries."""
    from routenlp.router.eventlog import labelled_attempts

    labels: dict[str, dict[str, bool]] = {}
    for la in labelled_attempts(events):
        labels.setdefault(la.request_id, {})[la.tier] = la.acceptable
    shadow = {e.request_id: e.reference_response for e in events if e.type == "feedback" and e.reference_response}
    rows = []
    for ev in events:
        if ev.type != "request":
            continue
        answer = next((a.response for a in ev.attempts if a.tier == teacher_tier and a.response and not a.error), None)
        answer = answer or shadow.get(ev.request_id)
        if answer:
            rows.append({"request_id": ev.request_id, "task": ev.task, "query": ev.query, "target": answer,
                         "labels": labels.get(ev.request_id, {}), "random_sample": bool(ev.explored or ev.shadow)})
    return rows


def probe(rows: list[dict[str, Any]], url: str, model: str, system_prompt: str, tier: str,
          concurrency: int = 8) -> list[dict[str, Any]]:
    """The student's answers to `rows` with token logprobs, scored against the teacher's answers."""
    from tqdm import tqdm

    from .client import chat_many
    from .distill import messages_for

    answers = chat_many(url, model, [messages_for(system_prompt, r["query"]) for r in rows], concurrency=concurrency,
                        progress=lambda it, total: tqdm(it, total=total, desc=f"probe {model}", unit="req"))
    errors = [a.error for a in answers if a.error]
    if len(errors) > len(rows) // 10:
        raise StageError(f"--student-url: {len(errors)} of {len(rows)} probe calls failed, e.g. {errors[0]}")
    return [{"request_id": r["request_id"], "task": r["task"], "query": r["query"], "tier": tier, "model": model,
             "answer": a.text, "target": r["target"], "acceptable": matches(a.text, r["target"]),
             "token_logprobs": a.token_logprobs}
            for r, a in zip(rows, answers) if not a.error]


def quality_matrix(rows: list[dict[str, Any]], signals: list[dict[str, Any]], tiers: list[str], teacher_tier: str,
                   ) -> np.ndarray:
    """(n, K) acceptability in [0, 1], NaN = unknown. Signals override the log's labels for their tier."""
    idx = {r["request_id"]: i for i, r in enumerate(rows)}
    q = np.full((len(rows), len(tiers)), np.nan)
    for i, r in enumerate(rows):
        for k, t in enumerate(tiers):
            if t == teacher_tier:
                q[i, k] = 1.0
            elif t in r["labels"]:
                q[i, k] = float(r["labels"][t])
    signalled = {s["tier"] for s in signals}
    for k, t in enumerate(tiers):
        if t in signalled:
            q[:, k] = np.nan  # the tier changed: its old labels describe another model
    for s in signals:
        if s["request_id"] in idx:
            q[idx[s["request_id"]], tiers.index(s["tier"])] = float(s["acceptable"])
    return q


def calibrate(router: Any, rows: list[dict[str, Any]], signals: list[dict[str, Any]], q: np.ndarray,
              x: np.ndarray, tiers: list[str], cal_fraction: float, quality_target: float, risk_level: float,
              delta: float, max_escalations: int, min_samples: int, generation_tasks: frozenset[str] = frozenset(),
              risk_measure: str = ACCEPTED_ANSWERS, pinned_chains: dict[str, list[str]] | None = None,
              quality_floors: dict[str, float] | None = None, cost_weights: dict[str, float] | None = None,
              relative_costs: list[float] | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """(ConfidenceSet fitted on the fit split, Calibration from the cal split, metrics).

    Thresholds: fixed-sequence Learn-then-Test along an order learnt on the fit split's scores and labels (disjoint
    from the calibration split, as fixed-sequence validity needs; docs/guarantee.md), along each task's chain: the
    policy's pinned chain, else the task's cost/quality Pareto set on the fit split (`chains.learn_chains`; tiers are
    given cheapest first). Tasks under a quality floor (their own, or the policy's "*" over the others) get the
    cheapest plan certified for it instead (`floor_plan`: chain set, start rule and one confidence level).
    metrics["chains"] and metrics["floor_certificates"] are what the router reads from the artifact's metadata
    (`routing_metadata`).
    Requests start as the router starts them: a task with a cost weight (RoutingPolicy tasks[].costWeight) by the
    cost-weighted rule over `relative_costs` (one per tier, the reference's 1), the others by quality_target."""
    from routenlp.router.artifacts import Calibration
    from routenlp.router.cascade import chain_ends, start_tiers
    from routenlp.router.confidence import FEATURES, answer_features, fit_confidence_set
    from routenlp.router.chains import MIN_GAIN_SE, chains_from_names, chains_to_names, learn_chains
    from routenlp.router.floor import COST_WEIGHT, start_rule
    from routenlp.router.conformal import ThresholdResult, calibrate_cascade

    tasks = sorted({r["task"] for r in rows})
    task_ids = np.array([tasks.index(r["task"]) for r in rows])
    # Only requests of the exploration sample calibrate (the guarantee needs a random sample of the traffic).
    cal = calibration_rows(rows, cal_fraction)
    fit = ~cal
    in_bucket = np.array([split_of(r["request_id"], cal_fraction) == "cal" for r in rows])
    feats = {name: np.full((len(rows), len(tiers)), np.nan) for name in FEATURES}
    idx = {r["request_id"]: i for i, r in enumerate(rows)}
    for s in signals:
        i = idx.get(s["request_id"])
        if i is None:
            continue
        # Features exactly as the server computes them: structured tasks score the label probability.
        structured = rows[i]["task"] not in generation_tasks
        f = answer_features(s.get("token_logprobs"), structured, None)
        for name in FEATURES:
            feats[name][i, tiers.index(s["tier"])] = f[name]
    # One confidence model per tier for the tasks of one kind (their features mean the same): pooled, as measured
    # better than per-(task, tier) models on a few hundred answers each (confidence.fit_confidence_set).
    kinds = [[t for t in tasks if t not in generation_tasks], [t for t in tasks if t in generation_tasks]]
    conf = fit_confidence_set(feats, q, task_ids, tasks, tiers, groups=kinds, min_samples=min_samples, rows=fit)
    scores = np.full((len(rows), len(tiers)), np.nan)
    for t, task in enumerate(tasks):
        for k, tier in enumerate(tiers):
            m = task_ids == t
            scores[m, k] = conf.score_many(task, tier, {n: feats[n][m, k] for n in FEATURES})
    scores[:, -1] = 1.0
    pred = router.predict_proba(x, np.array([router.task_index(r["task"]) or 0 for r in rows]))
    # Tiers come cheapest first: their order stands in for cost when learning each task's Pareto chain.
    order = np.tile(np.arange(len(tiers), dtype=float), (int(fit.sum()), 1))
    chains = learn_chains(q[fit], order, task_ids[fit], len(tasks), min_gain_se=MIN_GAIN_SE)
    pinned = {t: c for t, c in (pinned_chains or {}).items() if t in tasks}
    if pinned:  # the policy's pinned chains win; the other tasks keep their learnt one
        try:
            mask = chains_from_names(pinned, tiers, tasks)
        except ValueError as exc:
            raise StageError(f"--chains: {exc}") from None
        for t, task in enumerate(tasks):
            if task in pinned:
                chains[t] = mask[t]
    if relative_costs is not None and len(relative_costs) != len(tiers):
        raise StageError(f"--relative-costs: {len(relative_costs)} given, one per tier needed ({len(tiers)})")
    start = np.zeros(len(rows), dtype=int)
    for t, task in enumerate(tasks):
        w = (cost_weights or {}).get(task)
        if w is not None and relative_costs is None:
            raise StageError(f"--cost-weights: task {task!r} has a cost weight; --relative-costs must give each "
                             "tier's relative price")
        m = task_ids == t
        start[m] = start_tiers(pred[m], start_rule(quality_target if w is None else (COST_WEIGHT, float(w)),
                                                   relative_costs), chain=chains[t])
    results = calibrate_cascade(task_ids[cal], start[cal], scores[cal], q[cal], len(tasks), risk_level, delta,
                                min_samples, max_escalations, fwer="fixed_sequence",
                                train=(task_ids[fit], scores[fit], q[fit]), risk_measure=risk_measure, chains=chains)
    # Quality floors (docs/guarantee.md, "The quality floor"): each floor group (a task with its own floor; "*":
    # the tasks without one, pooled) gets the cheapest plan (chain set, start rule, one confidence level for the
    # cheaper tiers of its chains) certified on the group's calibration requests (`floor_plan`); none: the group is
    # served by the reference (its chains end there; a pinned chain keeps its tiers, with nothing accepted below
    # its end).
    floors = dict(quality_floors or {})
    groups = [(t, [t], f) for t, f in floors.items() if t in tasks]
    if "*" in floors:
        groups.append(("*", [t for t in tasks if t not in floors], floors["*"]))
    floor_certificates: dict[str, Any] = {}
    is_pinned = np.array([t in pinned for t in tasks])
    for name, members, floor in groups:
        ids = [tasks.index(t) for t in members]
        group = np.isin(task_ids, ids)
        chosen, sets, cert = floor_plan(pred, scores, q, task_ids, chains, is_pinned, fit & group, cal & group,
                                        floor, delta, max_escalations, relative_costs)
        m = cal & group
        for t in ids:
            if chosen is not None:
                chains[t] = sets[chosen.chain_set][t]
            elif tasks[t] not in pinned:
                chains[t] = np.eye(len(tiers), dtype=bool)[-1]
            m_t, end = m & (task_ids == t), int(chain_ends(chains[t]))
            n_t = int(m_t.sum())
            level = None if chosen is None else chosen.level
            for k in range(len(tiers) - 1):  # the reference's entry stays as calibrate_cascade left it
                if level is not None and chains[t, k] and k != end:  # a cheaper chain tier: the certified level
                    results[t][k] = ThresholdResult(level, n_t, int((scores[m_t, k] >= level).sum()), None, True)
                else:
                    results[t][k] = ThresholdResult(None, n_t, 0, None, False)
            floor_certificates[tasks[t]] = {
                "floor": floor, "scope": "task" if name != "*" else "policy", "level": level,
                "start_rule": None if chosen is None else chosen.start_rule_json(),
                "chain_set": None if chosen is None else chosen.chain_set, "certificate": cert.to_json()}
    calibration = Calibration(risk_level, delta, risk_measure=risk_measure,
                              tasks={task: dict(zip(tiers, results[t])) for t, task in enumerate(tasks)})
    metrics = {
        "calibration_queries": int(cal.sum()), "fit_queries": int(fit.sum()),
        "calibration_bucket_not_sampled": int((in_bucket & ~cal).sum()),
        "thresholds": {task: {tier: r.threshold for tier, r in zip(tiers, results[t])} for t, task in enumerate(tasks)},
        "certified": {task: {tier: r.certified for tier, r in zip(tiers, results[t][:-1])} for t, task in enumerate(tasks)},
        "empirical_risk": {task: {tier: r.empirical_risk for tier, r in zip(tiers, results[t][:-1])}
                           for t, task in enumerate(tasks)},
        "student_quality": {tier: _mean(q[:, k]) for k, tier in enumerate(tiers[:-1])},
        "chains": chains_to_names(chains, tiers, tasks),
        "floor_certificates": floor_certificates,
    }
    return conf, calibration, metrics


def floor_plan(pred: np.ndarray, scores: np.ndarray, q: np.ndarray, task_ids: np.ndarray, chains: np.ndarray,
               pinned: np.ndarray, fit: np.ndarray, cal: np.ndarray, floor: float, delta: float,
               max_escalations: int, relative_costs: list[float] | None,
               levels: Any = None) -> tuple[Any, dict[str, np.ndarray], Any]:
    """The floor group's plan (`routenlp.router.floor`, as the routing benchmark searches it): every chain set,
    start rule and confidence level, ordered on the fit rows, certified along that order on the calibration rows
    `cal`. Costs: the tiers' relative prices (cost-weighted start rules are searched only with them); without
    them, tier order stands in for price. levels: the confidence levels searched, strict to loose (default
    conformal.LEVELS). Returns (the chosen FloorSetting or None, the chain sets, certificate)."""
    from routenlp.router.cascade import simulate_cascade, start_tiers
    from routenlp.router.conformal import LEVELS
    from routenlp.router.floor import (
        CHAIN_SETS, chain_sets, choose, frontier, known_mean, start_rule, start_rules, training_curves,
    )

    K = q.shape[1]
    levels = LEVELS if levels is None else levels
    price = (np.asarray(relative_costs, dtype=float) if relative_costs is not None
             else np.arange(1, K + 1, dtype=float) / K)
    sets = chain_sets(chains, q[fit], task_ids[fit], pinned=pinned)

    def run(rows: np.ndarray, cs: str, rule: Any, level: float) -> tuple[np.ndarray, np.ndarray]:
        ch = sets[cs][task_ids[rows]]
        n = int(rows.sum())
        r = simulate_cascade(start_tiers(pred[rows], start_rule(rule, price), chain=ch), scores[rows], q[rows],
                             np.tile(price, (n, 1)), np.full((n, K), level), max_escalations, chains=ch)
        return r.quality, r.cost

    ref = q[fit, -1]
    curves = training_curves(lambda cs, rule, v: run(fit, cs, rule, v), CHAIN_SETS,
                             start_rules(relative_costs is not None), levels, ref)
    seq = frontier(curves, levels, known_mean(ref), floor, float(cal.sum()))
    runs = [run(cal, x.chain_set, x.start_rule, x.level) for x in seq]
    routed = np.column_stack([y for y, _ in runs]) if runs else np.zeros((int(cal.sum()), 0))
    chosen, cert = choose(seq, routed, [float(c.mean()) if len(c) else 0.0 for _, c in runs], q[cal, -1], floor,
                          delta)
    return chosen, sets, cert


def routing_metadata(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the router reads from a version's metadata besides its weights: the chains the thresholds were fitted
    on and the quality floors they were certified for (server.RouterState.chain_names / floor_certified)."""
    return {"chains": metrics["chains"], "floor_certificates": metrics["floor_certificates"]}


def _mean(col: np.ndarray) -> float | None:
    v = col[~np.isnan(col)]
    return round(float(v.mean()), 4) if len(v) else None


def _save_version(artifact_dir: Path, version: str, key: str, router: Any, conf: Any, calibration: Any,
                  meta: dict[str, Any]) -> Path:
    """Save, or reuse the version a crashed earlier run with the same key already wrote (versions are immutable)."""
    from routenlp.router.artifacts import save_artifact

    existing = artifact_dir / version / "metadata.json"
    if existing.is_file():
        if json.loads(existing.read_text()).get("stage_key") == key:
            return existing.parent
        raise StageError(f"--version: router version {version!r} already exists in {artifact_dir} with other inputs")
    return save_artifact(artifact_dir, version, router, conf, calibration, {**meta, "stage_key": key})


def _read(args: argparse.Namespace) -> tuple[list[Any], list[dict[str, Any]]]:
    from routenlp.router.eventlog import read_events

    events = list(read_events(local_path(args.events, "--events")))
    rows = logged_rows(events, args.teacher_tier)
    if not rows:
        raise StageError(f"--events: no request in {args.events} has an answer from teacher tier {args.teacher_tier!r}")
    return events, rows


def _policy_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"tiers": args.tiers, "teacher_tier": args.teacher_tier, "quality_target": args.quality_target,
            "risk_level": args.risk_level, "risk_measure": args.risk_measure, "delta": args.delta,
            "max_escalations": args.max_escalations,
            "min_samples": args.min_samples, "cal_fraction": args.cal_fraction, "system_prompt": args.system_prompt,
            "chains": args.chains, "quality_floors": args.quality_floors, "cost_weights": args.cost_weights,
            "relative_costs": args.relative_costs}


def run_retrain(args: argparse.Namespace) -> dict[str, Any]:
    from routenlp.router.difficulty import DifficultyRouter

    from .cluster import embed

    tiers = args.tiers
    if tiers[-1] != args.teacher_tier or args.student_tier not in tiers:
        raise StageError(f"--tiers: {tiers} must end with --teacher-tier {args.teacher_tier!r} and contain "
                         f"--student-tier {args.student_tier!r}")
    spec = EncoderSpec(getattr(args, "encoder_variant", None) or default_variant())
    params = {**_policy_params(args), "encoder": spec.to_json(), "student_tier": args.student_tier,
              "student_model": args.student_model,
              "student_url": args.student_url, "probe": args.probe, "epochs": args.epochs, "seed": args.seed,
              "version": args.version}
    inputs = {"events": args.events}
    for name in ("signals", "exclude"):
        if getattr(args, name):
            inputs[name] = getattr(args, name)
    st = Stage("retrain", local_path(args.out, "--out"), inputs, params,
               summary_metrics=("version", "requests", "signals", "student_quality", "thresholds"))
    if st.done():
        return st.finish_skipped()
    with st.timed("read"):
        _, rows = _read(args)
    if args.exclude:  # queries the adapter was trained on: probing them would flatter the student and break the
        # exchangeability the conformal guarantee rests on
        seen = {r["request_id"] for r in read_jsonl(local_path(args.exclude, "--exclude"))}
        rows = [r for r in rows if r["request_id"] not in seen]
    if args.signals:
        signals = read_jsonl(local_path(args.signals, "--signals"))
        have = {s["request_id"] for s in signals}
        rows = [r for r in rows if r["request_id"] in have]
    elif args.student_url:
        rng = np.random.default_rng(args.seed)
        rows = [rows[i] for i in sorted(rng.choice(len(rows), size=min(args.probe, len(rows)), replace=False))]
        with st.timed("probe"):
            signals = probe(rows, args.student_url, args.student_model, args.system_prompt, args.student_tier)
    else:
        raise StageError("--student-url or --signals is needed: the student tier's quality signals")
    st.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(st.output("signals", "signals.jsonl"), signals)
    with st.timed("embed"):
        x = embed([r["query"] for r in rows], args.encoder, spec)
    q = quality_matrix(rows, signals, tiers, args.teacher_tier)
    tasks = sorted({r["task"] for r in rows})
    task_ids = np.array([tasks.index(r["task"]) for r in rows])
    fit = ~calibration_rows(rows, args.cal_fraction)
    with st.timed("fit"):
        router = DifficultyRouter(tiers, tasks, input_dim=x.shape[1])
        router.fit(x[fit], task_ids[fit], q[fit], epochs=args.epochs, seed=args.seed)
    with st.timed("calibrate"):
        conf, calibration, m = calibrate(router, rows, signals, q, x, tiers, args.cal_fraction, args.quality_target,
                                         args.risk_level, args.delta, args.max_escalations, args.min_samples,
                                         frozenset(args.generation_tasks), args.risk_measure, args.chains,
                                         args.quality_floors, args.cost_weights, args.relative_costs)
    version = args.version or f"r-{st.key[:12]}"
    meta = {"trained_by": "routenlp train retrain", "student_tier": args.student_tier,
            "student_model": args.student_model, "requests": len(rows), "metrics": m, **routing_metadata(m),
            "router_epochs": router.epochs_used,  # early-stopped on held-out training queries (at most --epochs)
            "encoder": spec.to_json()}  # what the heads and thresholds were fitted on: the router embeds with it
    path = _save_version(local_path(args.artifact_dir, "--artifact-dir"), version, st.key, router, conf, calibration,
                         meta)
    st.metrics.update(version=version, artifact=str(path), requests=len(rows), signals=len(signals),
                      router_loss_last=round(router.history[-1], 5) if router.history else None, **m)
    return st.finish()


def run_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Recalibrate an existing router version on signals (e.g. a later probe or labelled traffic)."""
    from routenlp.router.artifacts import load_artifact

    from .cluster import embed

    params = {**_policy_params(args), "base_version": args.base_version, "version": args.version}
    st = Stage("calibrate", local_path(args.out, "--out"), {"events": args.events, "signals": args.signals}, params,
               summary_metrics=("version", "thresholds"))
    if st.done():
        return st.finish_skipped()
    artifact_dir = local_path(args.artifact_dir, "--artifact-dir")
    base = load_artifact(artifact_dir, args.base_version)
    if base.router is None:
        raise StageError(f"--base-version: router version {base.version!r} has no router weights to calibrate")
    # The base version's heads were fitted on its encoder variant: thresholds are fitted on scores of that variant only.
    spec = base.encoder
    asked = getattr(args, "encoder_variant", None)
    if asked and not EncoderSpec(asked, spec.max_tokens).compatible(spec):
        raise StageError(f"--encoder-variant: {asked} gives other embeddings than {spec.variant}, which router version "
                         f"{base.version!r} was fitted on; retrain for a new variant")
    _, rows = _read(args)
    signals = read_jsonl(local_path(args.signals, "--signals"))
    keep = {s["request_id"] for s in signals}
    rows = [r for r in rows if r["request_id"] in keep]
    x = embed([r["query"] for r in rows], args.encoder, spec)
    tiers = base.router.tier_names
    q = quality_matrix(rows, signals, tiers, args.teacher_tier)
    conf, calibration, m = calibrate(base.router, rows, signals, q, x, tiers, args.cal_fraction, args.quality_target,
                                     args.risk_level, args.delta, args.max_escalations, args.min_samples,
                                     frozenset(args.generation_tasks), args.risk_measure, args.chains,
                                     args.quality_floors, args.cost_weights, args.relative_costs)
    version = args.version or f"c-{st.key[:12]}"
    path = _save_version(artifact_dir, version, st.key, base.router, conf, calibration,
                         {"trained_by": "routenlp train calibrate", "base_version": base.version, "metrics": m,
                          **routing_metadata(m),
                          "encoder": spec.to_json()})
    st.out_dir.mkdir(parents=True, exist_ok=True)
    st.output("calibration", "calibration.json").write_text(json.dumps(calibration.to_json(), indent=1))
    st.metrics.update(version=version, artifact=str(path), **m)
    return st.finish()


def _json_value(text: str, ok: Any, expected: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}")
    return value


def _json_arg(text: str) -> dict:
    return _json_value(text, lambda v: isinstance(v, dict), "a JSON object")


def _costs_arg(text: str) -> list[float]:
    costs = _json_value(text, lambda v: isinstance(v, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v),
        "a JSON list of non-negative numbers")
    return [float(x) for x in costs]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", required=True, help="event log directory (queries and teacher answers)")
    p.add_argument("--out", required=True, help="stage output directory (manifest.json, signals)")
    p.add_argument("--artifact-dir", required=True, help="router artifact directory the new version is written to")
    p.add_argument("--version", help="name of the new router version (default: derived from the inputs)")
    p.add_argument("--teacher-tier", required=True, help="the reference tier (last in the cascade)")
    p.add_argument("--tiers", nargs="+", help="tier names, cheapest first, ending with the teacher tier")
    p.add_argument("--quality-target", type=float, default=0.9, help="RoutingPolicy task qualityTarget")
    p.add_argument("--risk-level", type=float, default=0.1, help="RoutingPolicy riskLevel (alpha)")
    p.add_argument("--risk-measure", choices=RISK_MEASURES, default=ACCEPTED_ANSWERS,
                   help="RoutingPolicy riskMeasure: what riskLevel bounds")
    p.add_argument("--delta", type=float, default=0.1, help="1 - confidence of the conformal guarantee")
    p.add_argument("--max-escalations", type=int, default=2)
    p.add_argument("--chains", type=_json_arg, default=None,
                   help='pinned chains as JSON {"task": ["tier", ...]} (RoutingPolicy tasks[].chain); other tasks get '
                        "their Pareto chain learnt on the fit split")
    p.add_argument("--quality-floors", type=_json_arg, default=None,
                   help='quality floors as JSON {"task": 0.97, "*": 0.95} (RoutingPolicy tasks[].qualityFloor; "*": '
                   'cascade.qualityFloor, over the tasks without their own)')
    p.add_argument("--cost-weights", type=_json_arg, default=None,
                   help='cost-weighted start rules as JSON {"task": 0.2} (RoutingPolicy tasks[].costWeight); other '
                        "tasks start by --quality-target")
    p.add_argument("--relative-costs", type=_costs_arg, default=None,
                   help="each tier's price over the reference's as a JSON list, in --tiers order (what the router "
                        "weighs: routenlp.api.modeltier.relative_costs)")
    p.add_argument("--generation-tasks", nargs="*", default=[],
                   help="tasks of kind generation (free text); all others are scored as structured, as the router does")
    p.add_argument("--min-samples", type=int, default=30, help="labelled answers needed to calibrate a tier")
    p.add_argument("--cal-fraction", type=float, default=0.4, help="share of requests kept for conformal calibration")
    p.add_argument("--system-prompt", default="Answer the customer's request.", help="system message the student is sent")
    p.add_argument("--encoder", help="all-MiniLM-L6-v2 folder (default: the router's)")
    p.add_argument("--encoder-variant", choices=sorted(VARIANTS),
                   help="encoder variant the heads and thresholds are fitted on and the router embeds with (retrain "
                        f"default: $ROUTENLP_ENCODER_VARIANT or {DEFAULT_VARIANT}; calibrate: the base version's)")


def main_retrain(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routenlp train retrain", description=__doc__.split("\n\n")[1])
    _common(p)
    p.add_argument("--student-tier", required=True)
    p.add_argument("--student-model", help="model name the student tier serves (e.g. the adapter's name)")
    p.add_argument("--student-url", help="student tier's OpenAI-compatible base URL (…/v1) to probe")
    p.add_argument("--signals", help="precomputed quality signals JSONL instead of probing")
    p.add_argument("--probe", type=int, default=600, help="logged requests probed")
    p.add_argument("--exclude", help="JSONL with request_id of queries to leave out (distill's train.jsonl)")
    p.add_argument("--epochs", type=int, default=40,
                   help="most router training epochs (fewer when a held-out share of the training queries stops "
                   "improving)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.tiers = args.tiers or [args.student_tier, args.teacher_tier]
    if args.student_url and not args.student_model:
        raise StageError("--student-model: needed with --student-url (the name the student tier serves)")
    print_summary(run_retrain(args))
    return 0


def main_calibrate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routenlp train calibrate", description=__doc__.split("\n\n")[2])
    _common(p)
    p.add_argument("--signals", required=True, help="quality signals JSONL (e.g. retrain's signals.jsonl)")
    p.add_argument("--base-version", help="router version whose weights are kept (default: the newest)")
    print_summary(run_calibrate(p.parse_args(argv)))
    return 0
