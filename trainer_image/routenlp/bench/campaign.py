"""`routenlp bench campaign`: a real distillation campaign on BANKING77, targeted versus untargeted.

Portfolio (local, real where it can be):
- `student`: SmolLM2-135M-Instruct served by a real vLLM CPU server (LoRA runtime loading on), answering for real;
- `reference`: `banking77-oracle`, an ORACLE-QUALITY STAND-IN FOR A FRONTIER MODEL (it answers each BANKING77 query
  with its gold label; no frontier model runs here), priced at a frontier model's list price.

Loop: log traffic (train split) through the cascade with the decision code of `routenlp.router` (difficulty router
start tier, confidence, conformal thresholds; events written with the router's `EventLogWriter`) -> router v1 from
the log (`routenlp train retrain`) -> route the held-out traffic (test split): BEFORE -> `train cluster` ->
`train distill` (peft LoRA on CPU) -> load the adapter into the RUNNING vLLM server -> `train evaluate` ->
`train retrain` (router v2 with the student+adapter's quality signals, MAPIE thresholds) -> `train publish` ->
route the same held-out traffic again: AFTER. The control repeats distill..route with `--mode untargeted` (the same
number of pairs and steps, drawn at random from all escalation failures): CONTROL.

Every stage runs as its CLI (`python -m routenlp.cli.main train STAGE ...`, as a Job would) and is timed.
Figures: cost_reduction = 1 - cost / cost(always reference); quality_ratio = accuracy / accuracy(always reference)
on the held-out traffic; improvement_ratio = (after - before) / (control - before) cost reductions (None when the
control improved nothing: the ratio is then unbounded and we do not print a number).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routenlp.router.conformal import ALL_REQUESTS, RISK_MEASURES

STUDENT, REFERENCE = "student", "reference"
TASK = "banking77-intent"
# Short instruction: training cost on CPU grows with prompt length (the 77-label list would make each step ~15x
# slower); the student learns the label vocabulary from the teacher's answers instead.
SYSTEM_PROMPT = "Classify the online-banking customer query by intent. Answer with the intent label only."
# USD per million tokens. Reference: gemini-1.5-pro-002 list price (shared/data/prices.yaml), the frontier model the
# oracle stands in for. Student: a self-hosted 135M model, priced like the example portfolio's small tier.
PRICES = {STUDENT: (0.02, 0.04), REFERENCE: (1.25, 5.00)}


@dataclass
class Settings:
    log_queries: int = 1000
    heldout_queries: int = 400
    probe: int = 500
    # hdbscan: on this log kmeans' silhouette picks k=6 broad clusters whose top 5 hold 91% of the failures (targeted
    # would equal untargeted); hdbscan finds dense, narrow topics (top-up failed, verify identity, ...) plus noise
    method: str = "hdbscan"
    max_clusters: int = 20
    min_cluster_size: int = 12
    top_clusters: int = 5
    samples_per_cluster: int = 60
    outside_holdout: int = 60
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 2e-3
    r: int = 16
    alpha: int = 32
    # adapters on every projection of the top 8 of SmolLM2's 30 layers: backprop stops there (2.3 s/step instead of
    # 5.4 s/step on one busy core, measured), and the MLP projections give the small adapter room for 77 labels
    top_layers: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    threads: int = 1
    # start rule (RoutingPolicy task qualityTarget): try the student where its predicted acceptance is at least 0.1
    # of the reference's. A student call costs ~1/60 of a reference call, so trying it is worth it well below even
    # odds; the conformal threshold, not the start rule, holds quality. (0.5 sent no held-out query to a student
    # that is right on 20 % of traffic, so nothing could be calibrated or saved; measured in docs/campaign.md.)
    quality_target: float = 0.1
    risk_level: float = 0.1
    # allRequests: at most risk_level of the requests that reach the student get an unacceptable answer accepted
    # there, i.e. the student costs each task at most risk_level of quality (docs/guarantee.md)
    risk_measure: str = ALL_REQUESTS
    delta: float = 0.1
    seed: int = 0
    # intent mix of the traffic: 0 = drawn uniformly from the BANKING77 split (its intents are near-uniform);
    # s > 0 = Zipf(s) popularity over the intents (a random ranking per seed, shared by log and held-out traffic),
    # as production customer-service traffic is concentrated on few intents (`sample_traffic`)
    traffic_skew: float = 0.0


# 60 steps: at 30 the adapter's loss was still ~0.9 and its held-out cluster accuracy sometimes stayed 0 (flaky e2e)
SMALL = Settings(log_queries=240, heldout_queries=60, probe=120, method="kmeans", max_clusters=8, min_cluster_size=10,
                 top_clusters=3, samples_per_cluster=30, outside_holdout=20, steps=60, learning_rate=2e-3,
                 risk_level=0.2, delta=0.2)


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, t0: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 2)


def cost(tier: str, input_tokens: int, output_tokens: int) -> float:
    i, o = PRICES[tier]
    return (input_tokens * i + output_tokens * o) / 1e6


# ------------------------------------------------------------------------------------------- traffic


def sample_traffic(examples, n: int, rng: random.Random, skew: float, ranking: list[str]) -> list[Any]:
    """n distinct examples. skew 0: a uniform sample. skew > 0: the intent of each draw follows Zipf(skew) over
    `ranking` (P(rank r) proportional to 1 / r**skew), then an unused example of that intent is drawn; an intent with
    none left is skipped, so the result stays n distinct examples while the split has them."""
    examples = list(examples)
    if skew <= 0:
        return rng.sample(examples, n)
    by_label: dict[str, list[Any]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    for pool in by_label.values():
        rng.shuffle(pool)
    labels = [lab for lab in ranking if by_label.get(lab)]
    weights = [1.0 / (r + 1) ** skew for r in range(len(labels))]
    out: list[Any] = []
    while len(out) < min(n, len(examples)):
        lab = rng.choices(labels, weights)[0]
        if by_label[lab]:
            out.append(by_label[lab].pop())
    return out


# ------------------------------------------------------------------------------------------- routing (pure-ish)


def route(queries: list[Any], student: Any, student_model: str, artifact: Any, encoder: Any, writer: Any = None,
          quality_target: float = 0.9, label: str = "route") -> dict[str, Any]:
    """Route `queries` (BANKING77 examples) through the cascade student -> reference with the router's decision code.

    artifact None = no router version yet: every query starts at the student and, with no certified threshold,
    escalates (the conservative default), which is what makes the first log fully labelled."""
    import numpy as np

    from routenlp.local import banking77 as b77
    from routenlp.router.cascade import accept, start_tiers
    from routenlp.router.confidence import answer_features
    from routenlp.router.events import FeedbackEvent, RoutingEvent, TierAttempt
    from routenlp.trainer.client import chat_many
    from routenlp.trainer.distill import messages_for
    from routenlp.trainer.evaluate import matches
    from tqdm import tqdm

    texts = [q.text for q in queries]
    if artifact is not None and artifact.router is not None:
        t = artifact.router.task_index(TASK) or 0
        pred = artifact.router.predict_proba(encoder.encode(texts), np.full(len(texts), t))
        start = start_tiers(pred, quality_target)
    else:
        pred, start = None, np.zeros(len(texts), dtype=int)
    to_student = [i for i in range(len(texts)) if start[i] == 0]
    answers = dict(zip(to_student, chat_many(
        student, student_model, [messages_for(SYSTEM_PROMPT, texts[i]) for i in to_student], max_tokens=20,
        progress=lambda it, total: tqdm(it, total=total, desc=f"{label}: {student_model}", unit="req", leave=False))))
    thr = None
    if artifact is not None and artifact.calibration is not None:
        res = artifact.calibration.get(TASK, STUDENT)
        thr = res.threshold if res is not None else None
    ref_in = b77.approx_tokens(SYSTEM_PROMPT) + 4
    total = {"cost": 0.0, "reference_cost": 0.0, "correct": 0, "reference_correct": 0, "student_answered": 0,
             "student_tried": len(to_student), "escalations": 0}
    signals = []
    now = time.time()
    for i, q in enumerate(queries):
        rid = uuid.uuid4().hex
        attempts = []
        final = None
        in_tok, out_tok = ref_in + b77.approx_tokens(q.text), b77.approx_tokens(q.label)
        ref_cost = cost(REFERENCE, in_tok, out_tok)
        total["reference_cost"] += ref_cost
        total["reference_correct"] += 1  # the oracle stand-in answers the gold label
        if i in answers:
            a = answers[i]
            prior = None if pred is None else float(pred[i, 0])
            feats = answer_features(a.token_logprobs, True, prior)
            score = (artifact.confidence.score(TASK, STUDENT, feats) if artifact is not None
                     else float("nan"))
            ok = not a.error and accept(score, thr, False)
            attempts.append(TierAttempt(tier=STUDENT, model=student_model, predicted=prior, score=score,
                                        threshold=thr, accepted=ok, response=a.text, input_tokens=a.input_tokens,
                                        output_tokens=a.output_tokens,
                                        cost_usd=cost(STUDENT, a.input_tokens, a.output_tokens), error=a.error))
            signals.append({"request_id": rid, "task": TASK, "query": q.text, "tier": STUDENT, "model": student_model,
                            "answer": a.text, "target": q.label, "acceptable": matches(a.text, q.label),
                            "token_logprobs": a.token_logprobs})
            if ok:
                final = (STUDENT, a.text)
        if final is None:
            attempts.append(TierAttempt(tier=REFERENCE, model="banking77-oracle", accepted=True, response=q.label,
                                        input_tokens=in_tok, output_tokens=out_tok, cost_usd=ref_cost))
            final = (REFERENCE, q.label)
        ev_cost = sum(a.cost_usd for a in attempts)
        total["cost"] += ev_cost
        total["correct"] += matches(final[1], q.label)
        total["student_answered"] += final[0] == STUDENT
        total["escalations"] += len(attempts) - 1
        if writer is not None:
            writer.submit(RoutingEvent(request_id=rid, time=now + i * 1e-3, policy="banking77", task=TASK,
                                       query=q.text, router_version=getattr(artifact, "version", None),
                                       attempts=attempts, final_tier=final[0], escalations=len(attempts) - 1,
                                       cost_usd=ev_cost, shadow=True, explored=True))
            if attempts[0].tier == STUDENT:  # shadow label: the student's answer compared with the reference's
                writer.submit(FeedbackEvent(request_id=rid, time=now + i * 1e-3 + 1e-4, tier=STUDENT,
                                            accepted=matches(attempts[0].response, q.label), source="shadow",
                                            reference_response=q.label))
    n = len(queries)
    return {
        "queries": n,
        "quality": round(total["correct"] / n, 4),
        "quality_ratio": round((total["correct"] / n) / (total["reference_correct"] / n), 4),
        "cost_usd": round(total["cost"], 6),
        "reference_cost_usd": round(total["reference_cost"], 6),
        "cost_reduction": round(1 - total["cost"] / total["reference_cost"], 4),
        "student_share": round(total["student_answered"] / n, 4),
        "student_tried": total["student_tried"],
        "router_version": getattr(artifact, "version", None),
        "student_model": student_model,
        "_signals": signals,
    }


# ------------------------------------------------------------------------------------------------ stages (CLI)


def stage(args: list[str], timings: Timings, name: str, quiet: bool, threads: int = 0) -> dict[str, Any]:
    """Run `routenlp train ...` as a subprocess (as a Job would) and return its manifest.

    threads: torch/OpenMP threads of the stage (0: its default). On a machine shared with other busy processes one
    thread is several times faster than two spinning OpenMP threads (17 s vs 2.3 s per LoRA step, measured)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "routenlp.cli.main", "train", *args]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL if quiet else None, text=True,
                          env=env)
    timings.add(name, t0)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0:
        raise RuntimeError(f"`routenlp train {' '.join(args[:1])}` failed (exit {proc.returncode}): {summary}")
    return json.loads(Path(summary["manifest"]).read_text())


def run_campaign(s: Settings, work: Path, progress: bool = True, server: Any = None) -> dict[str, Any]:
    """Run the campaign in `work`. `server`: a running `VLLMServer` of SmolLM2-135M with runtime LoRA loading (the
    e2e tests share one); None starts one here and stops it at the end."""
    import numpy as np

    from routenlp.local import banking77 as b77
    from routenlp.local.models import ensure_model
    from routenlp.local.vllm import LoRAOptions, VLLMServer
    from routenlp.router.artifacts import load_artifact
    from routenlp.router.encoder import Encoder
    from routenlp.router.eventlog import EventLogWriter
    from routenlp.trainer.manifest import write_jsonl

    quiet = not progress
    timings = Timings()
    # router versions are immutable: name them after the settings, so a rerun with another policy makes new ones
    tag = hashlib.sha256(json.dumps(s.__dict__, sort_keys=True, default=str).encode()).hexdigest()[:6]
    t_all = time.perf_counter()
    rng = random.Random(s.seed)
    train = b77.load_split("train")
    intents = sorted({e.label for e in train})
    # intent popularity order (used when skewed), from its own generator so the uniform sample does not change
    ranking = random.Random(f"intents-{s.seed}").sample(intents, len(intents))
    log_q = sample_traffic(train, s.log_queries, rng, s.traffic_skew, ranking)
    held_q = sample_traffic(b77.load_split("test"), s.heldout_queries, rng, s.traffic_skew, ranking)
    events, artifacts, pub = work / "events", work / "router-artifacts", work / "published"

    t0 = time.perf_counter()
    model = ensure_model("smollm2-135m", quiet=quiet)
    encoder = Encoder()
    timings.add("prepare_models", t0)
    t0 = time.perf_counter()
    own_server = server is None
    if own_server:
        server = VLLMServer(model, "smollm2-135m", lora=LoRAOptions(max_lora_rank=s.r, max_loras=2),
                            scratch_dir=work / "vllm")
        server.start()
    timings.add("vllm_start", t0)
    try:
        server.chat("warm up", max_tokens=4)

        # 1. traffic before any router version: every student answer escalates and is shadow-labelled
        t0 = time.perf_counter()
        if (work / "log.json").is_file():  # a rerun in the same --work: the log is an input, keep it
            logged = json.loads((work / "log.json").read_text())
            timings.seconds["log_traffic (reused)"] = logged.get("seconds")
        else:
            shutil.rmtree(events, ignore_errors=True)
            writer = EventLogWriter(events)
            logged = route(log_q, server.base_url, "smollm2-135m", None, encoder, writer, s.quality_target, "log")
            writer.close()
            write_jsonl(work / "signals-base.jsonl", logged.pop("_signals"))
            timings.add("log_traffic", t0)
            logged["seconds"] = timings.seconds["log_traffic"]
            (work / "log.json").write_text(json.dumps(logged))

        common = ["--events", str(events), "--artifact-dir", str(artifacts), "--teacher-tier", REFERENCE,
                  "--tiers", STUDENT, REFERENCE, "--quality-target", str(s.quality_target), "--risk-level",
                  str(s.risk_level), "--risk-measure", s.risk_measure, "--delta", str(s.delta), "--max-escalations",
                  "1", "--system-prompt", SYSTEM_PROMPT, "--probe", str(s.probe), "--student-tier", STUDENT,
                  "--seed", str(s.seed)]
        # 2. router v1 from the log (the base student's signals were recorded while logging)
        v1 = stage(["retrain", *common, "--signals", str(work / "signals-base.jsonl"), "--version", f"v1-{tag}",
                    "--student-model", "smollm2-135m", "--out", str(work / f"retrain-v1-{tag}")],
                   timings, "retrain_v1", quiet, s.threads)
        t0 = time.perf_counter()
        before = route(held_q, server.base_url, "smollm2-135m", load_artifact(artifacts, f"v1-{tag}"), encoder,
                       quality_target=s.quality_target, label="before")
        before.pop("_signals")
        timings.add("route_before", t0)

        # 3. cluster the escalation failures
        cl = stage(["cluster", "--events", str(events), "--out", str(work / "cluster"), "--teacher-tier", REFERENCE,
                    "--student-tier", STUDENT, "--method", s.method, "--max-clusters", str(s.max_clusters), "--min-cluster-size",
                    str(s.min_cluster_size), "--top-clusters", str(s.top_clusters), "--seed", str(s.seed)],
                   timings, "cluster", quiet, s.threads)

        runs = {}
        for mode in ("targeted", "untargeted"):
            name = f"b77-{mode}"
            d = stage(["distill", "--clusters", str(work / "cluster"), "--out", str(work / f"distill-{mode}"),
                       "--base-model", str(model), "--adapter-name", name, "--mode", mode, "--top-clusters",
                       str(s.top_clusters), "--samples-per-cluster", str(s.samples_per_cluster), "--outside-holdout",
                       str(s.outside_holdout), "--system-prompt", SYSTEM_PROMPT, "--r", str(s.r), "--alpha",
                       str(s.alpha), "--steps", str(s.steps), "--batch-size", str(s.batch_size), "--learning-rate",
                       str(s.learning_rate), "--seed", str(s.seed), "--checkpoint-every", "20", "--quiet",
                       "--top-layers", str(s.top_layers), "--target-modules", *s.target_modules],
                      timings, f"distill_{mode}", quiet, s.threads)
            t0 = time.perf_counter()
            server.load_lora(name, work / f"distill-{mode}" / "adapter")  # into the RUNNING server
            timings.add(f"load_adapter_{mode}", t0)
            ev = stage(["evaluate", "--distill", str(work / f"distill-{mode}"), "--out", str(work / f"evaluate-{mode}"),
                        "--student-url", server.base_url, "--student-model", "smollm2-135m", "--adapter-model", name],
                       timings, f"evaluate_{mode}", quiet, s.threads)
            version = f"v2-{mode}-{tag}"
            rt = stage(["retrain", *common, "--student-url", server.base_url, "--student-model", name, "--version",
                        version, "--exclude", str(work / f"distill-{mode}" / "train.jsonl"),
                        "--out", str(work / f"retrain-{mode}-{tag}")],
                       timings, f"retrain_{mode}", quiet, s.threads)
            pb = stage(["publish", "--out", str(work / f"publish-{mode}-{tag}"), "--adapter",
                        str(work / f"distill-{mode}" / "adapter"), "--adapter-name", name, "--adapter-to",
                        (pub / "adapters").as_uri(), "--router-version", str(artifacts / version), "--router-to",
                        (pub / "router").as_uri()], timings, f"publish_{mode}", quiet, s.threads)
            t0 = time.perf_counter()
            after = route(held_q, server.base_url, name, load_artifact(pub / "router", version), encoder,
                          quality_target=s.quality_target, label=mode)
            after.pop("_signals")
            timings.add(f"route_{mode}", t0)
            runs[mode] = {"distill": d["metrics"], "evaluate": ev["metrics"], "retrain": rt["metrics"],
                          "publish": pb["metrics"], "route": after}
    finally:
        if own_server:
            t0 = time.perf_counter()
            server.stop()
            timings.add("vllm_stop", t0)

    def gain(r: dict[str, Any]) -> float:
        return r["cost_reduction"] - before["cost_reduction"]

    after, control = runs["targeted"]["route"], runs["untargeted"]["route"]
    ratio = round(gain(after) / gain(control), 3) if gain(control) > 1e-9 else None
    clusters = json.loads((work / "cluster" / "clusters.json").read_text())
    return {
        "workload": {"data": "BANKING77 (CC BY 4.0)", "log_queries": s.log_queries, "heldout_queries": s.heldout_queries,
                     "log_from": "train split", "heldout_from": "test split",
                     "intent_mix": "uniform sample" if s.traffic_skew <= 0 else f"Zipf({s.traffic_skew}) over intents",
                     "distinct_intents": {"log": len({q.label for q in log_q}),
                                          "heldout": len({q.label for q in held_q})}},
        "portfolio": {STUDENT: "SmolLM2-135M-Instruct on vLLM (CPU), LoRA adapters loaded at runtime",
                      REFERENCE: "banking77-oracle: oracle-quality stand-in for a frontier model (gold labels)",
                      "prices_usd_per_million": {k: {"input": v[0], "output": v[1]} for k, v in PRICES.items()}},
        "settings": s.__dict__,
        "log": {k: v for k, v in logged.items() if not k.startswith("_")},
        "before": before,
        "after": after,
        "control": control,
        "improvement_ratio": ratio,
        "cost_improvement": {"targeted": round(gain(after), 4), "untargeted": round(gain(control), 4)},
        "clusters": {"k": clusters["clustering"].get("k"), "failures": clusters["failures"],
                     "top": [{k: c[k] for k in ("id", "size", "cost_usd", "escalation_rate", "examples")}
                             for c in clusters["clusters"][: s.top_clusters]]},
        "per_cluster_student_accuracy": {
            mode: {"before": runs[mode]["evaluate"]["per_cluster_before"],
                   "after": runs[mode]["evaluate"]["per_cluster_after"]} for mode in runs},
        "evaluation": {mode: {k: runs[mode]["evaluate"][k] for k in
                              ("passed", "quality_before", "quality_after", "quality_gain", "outside_before",
                               "outside_after", "regression", "reasons")} for mode in runs},
        "distill": {mode: {k: runs[mode]["distill"].get(k) for k in
                           ("train_pairs", "steps", "loss_first", "loss_last", "seconds_per_step")} for mode in runs},
        "thresholds": {f"v1-{tag}": v1["metrics"]["thresholds"],
                       **{f"v2-{m}-{tag}": runs[m]["retrain"]["thresholds"] for m in runs}},
        "stage_seconds": timings.seconds,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "machine": {"cpus": os.cpu_count()},
        "command": "routenlp bench campaign",
    }


def table(r: dict[str, Any]) -> str:
    rows = [("before (router v1, base student)", r["before"]), ("after (targeted adapter, router v2)", r["after"]),
            ("control (untargeted adapter)", r["control"])]
    out = ["| run | quality ratio | cost reduction | student share |", "| --- | --- | --- | --- |"]
    out += [f"| {n} | {x['quality_ratio']:.3f} | {x['cost_reduction']:.3f} | {x['student_share']:.3f} |" for n, x in rows]
    ratio = r["improvement_ratio"]
    out += ["", f"improvement ratio (targeted / untargeted cost improvement): "
            f"{'n/a (control improved nothing)' if ratio is None else ratio}  [paper claims >= 2]", "",
            "per-cluster student accuracy on held-out cluster queries (before -> after):"]
    for mode, pc in r["per_cluster_student_accuracy"].items():
        out.append(f"  {mode}: " + ", ".join(f"c{c}: {pc['before'][c]:.2f}->{pc['after'].get(c, 0):.2f}"
                                             for c in pc["before"]))
    out += ["", "stage seconds: " + ", ".join(f"{k} {v}" for k, v in r["stage_seconds"].items()),
            f"total: {r['total_seconds']} s", "",
            "reference tier = banking77-oracle, an oracle-quality stand-in for a frontier model (gold labels)"]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="routenlp bench campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--small", action="store_true", help="the short variant (used by the e2e test)")
    p.add_argument("--work", help="working directory (default: a temporary one, removed afterwards)")
    p.add_argument("--steps", type=int, help="override LoRA steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage (0: torch's default)")
    p.add_argument("--risk-level", type=float, help="policy riskLevel (alpha) of the student tier's threshold")
    p.add_argument("--risk-measure", choices=RISK_MEASURES,
                   help="policy riskMeasure: what riskLevel bounds (default allRequests)")
    p.add_argument("--delta", type=float, help="policy delta: the guarantee holds with probability >= 1 - delta")
    p.add_argument("--quality-target", type=float, help="task qualityTarget of the router's start rule")
    p.add_argument("--traffic-skew", type=float,
                   help="Zipf exponent of the intent mix (default 0: a uniform sample of the split)")
    p.add_argument("--probe", type=int, help="logged queries the retrained student is probed on")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    s = SMALL if args.small else Settings()
    s.threads = args.threads
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    s.seed = args.seed
    for name in ("steps", "risk_level", "risk_measure", "delta", "quality_target", "probe", "traffic_skew"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        result = run_campaign(s, work, progress=not args.json)
    else:
        with tempfile.TemporaryDirectory(prefix="routenlp-campaign-") as tmp:
            result = run_campaign(s, Path(tmp), progress=not args.json)
    result["command"] = "routenlp bench campaign " + " ".join(a for a in argv if a != "--json")
    print(json.dumps(result, default=str) if args.json else table(result))
    return 0
