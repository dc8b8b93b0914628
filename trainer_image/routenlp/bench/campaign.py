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
from dataclasses import dataclass, field, replace
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
    # matched quality: every router version (before, after, control) is recalibrated for this quality ratio, the
    # policy's binding quality floor (RoutingPolicy tasks[].qualityFloor, one certified confidence level), so the arms'
    # cost reductions are compared at one quality level; the policy's risk_level figures stay as a secondary column
    quality_floor: float = 0.95
    rounds: int = 1
    round_queries: int = 0  # fresh queries logged before each later round (0: log_queries)
    budget_split: str = "cost"  # the pair budget over the top clusters: by their failures' cost, or equal
    # a later round's adapter: "continue" the previous adapter on this round's pairs (what the operator runs), or
    # "union": a fresh adapter on this round's pairs plus every earlier round's (same steps), to measure which is better
    adapter_rounds: str = "continue"


# 60 steps: at 30 the adapter's loss was still ~0.9 and its held-out cluster accuracy sometimes stayed 0 (flaky e2e)
SMALL = Settings(log_queries=240, heldout_queries=60, probe=120, method="kmeans", max_clusters=8, min_cluster_size=10,
                 top_clusters=3, samples_per_cluster=30, outside_holdout=20, steps=60, learning_rate=2e-3,
                 risk_level=0.2, delta=0.2, quality_floor=0.8)  # 0.8 = 1 - its riskLevel: 60 held-out queries


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


def oracle_usage(query: str, label: str) -> tuple[int, int]:
    """(input, output) tokens the oracle stand-in bills for one query, as a frontier model would."""
    from routenlp.local import banking77 as b77

    return b77.approx_tokens(SYSTEM_PROMPT) + 4 + b77.approx_tokens(query), b77.approx_tokens(label)


class OraclePort:
    """The reference tier of the campaign bench, in process: the oracle stand-in answers each query with its gold
    label (no frontier model runs here), with the token counts a frontier model would bill."""

    def __init__(self, gold: dict[str, str]):
        from routenlp.router.clients import CircuitBreaker

        self.gold, self.breaker = gold, CircuitBreaker()

    async def post(self, path: str, body: dict, timeout: float | None = None):
        from routenlp.router.clients import UpstreamResult

        query = body["messages"][-1]["content"]
        label = self.gold[query]
        prompt_tokens, completion_tokens = oracle_usage(query, label)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        answer = {"choices": [{"message": {"role": "assistant", "content": label}}], "usage": usage}
        return UpstreamResult(200, answer, "", 0.0)


def route(queries: list[Any], student: Any, student_model: str, artifact: Any, encoder: Any, writer: Any = None,
          quality_target: float = 0.9, label: str = "route", concurrency: int = 8,
          quality_floor: float | None = None) -> dict[str, Any]:
    """Route `queries` (BANKING77 examples) through the portfolio student -> reference with the router's cascade
    engine (router/engine.py: the code that serves), the student on its real vLLM server.

    Every query is on the exploration sample (the bench labels every attempt against the reference), so an
    uncertified student is still tried and escalates: artifact None (no router version yet) makes the first log
    fully labelled. Requests start as the served router starts them (`RouterState.start_rule`): by the rule a
    version's floor plan was certified with when it was certified for `quality_floor` (the policy's task floor in
    force), else by `quality_target`; the floor's thresholds hold only with that rule."""
    import asyncio

    import numpy as np
    from tqdm import tqdm

    from routenlp.api.modeltier import TierCost
    from routenlp.router.clients import TierClient
    from routenlp.router.confidence import ConfidenceSet
    from routenlp.api.router_config import TierEndpoint
    from routenlp.router.encoder import encoder_for
    from routenlp.router.engine import CascadeEngine, TierInfo, make_plan
    from routenlp.router.floor import served_rule, start_rule
    from routenlp.router.events import FeedbackEvent, RoutingEvent
    from routenlp.router.protocol import parse_chat
    from routenlp.trainer.distill import messages_for
    from routenlp.trainer.evaluate import matches

    texts = [q.text for q in queries]
    prior = None
    if artifact is not None and artifact.router is not None:
        t = artifact.router.task_index(TASK) or 0
        x = encoder_for(artifact.encoder, encoder).encode(texts)  # the variant the version was fitted on
        prior = artifact.router.predict_proba(x, np.full(len(texts), t))
    floor = None if quality_floor is None else ("task", quality_floor)
    rule = served_rule(artifact.metadata if artifact is not None else None, TASK, floor, quality_target)
    cal = artifact.calibration.get(TASK, STUDENT) if artifact is not None and artifact.calibration else None
    confidence = artifact.confidence if artifact is not None else ConfidenceSet()
    costs = {k: TierCost(input_per_million=i, output_per_million=o) for k, (i, o) in PRICES.items()}
    student_tier = TierEndpoint(name=STUDENT, served_model_name=student_model, base_url=student,
                                cost=costs[STUDENT], timeout_seconds=120)
    tiers = [TierInfo(STUDENT, student_model, costs[STUDENT]), TierInfo(REFERENCE, "banking77-oracle",
                                                                        costs[REFERENCE])]

    async def run_all():
        ports = [TierClient(student_tier, max_connections=concurrency), OraclePort({q.text: q.label for q in queries})]
        engine = CascadeEngine(tiers, ports)
        gate = asyncio.Semaphore(concurrency)

        async def one(i):
            req = parse_chat({"messages": messages_for(SYSTEM_PROMPT, texts[i]), "temperature": 0, "max_tokens": 20})
            plan = make_plan(None if prior is None else prior[i], start_rule(rule, None), [cal, None], [True, True],
                             1, explore=True)
            async with gate:
                return await engine.run(req, TASK, True, plan, confidence)

        try:
            tasks = [asyncio.ensure_future(one(i)) for i in range(len(texts))]
            for f in tqdm(asyncio.as_completed(tasks), total=len(tasks), desc=f"{label}: {student_model}",
                          unit="req", leave=False):
                await f
            return [t.result() for t in tasks]
        finally:
            await ports[0].close()

    outcomes = asyncio.run(run_all())
    total = {"cost": 0.0, "reference_cost": 0.0, "correct": 0, "student_answered": 0, "student_tried": 0}
    signals = []
    now = time.time()
    for i, (q, out) in enumerate(zip(queries, outcomes)):
        rid = uuid.uuid4().hex
        total["reference_cost"] += cost(REFERENCE, *oracle_usage(q.text, q.label))
        first = out.attempts[0] if out.attempts else None
        if first is not None and first.tier == STUDENT:
            total["student_tried"] += 1
            if first.error is None:
                signals.append({"request_id": rid, "task": TASK, "query": q.text, "tier": STUDENT,
                                "model": student_model, "answer": first.response or "", "target": q.label,
                                "acceptable": matches(first.response or "", q.label),
                                "token_logprobs": list(out.logprobs.get(STUDENT) or [])})
        final = None if out.final is None else tiers[out.final].name
        answer = out.answers.get(final, "") if final else ""
        event_cost = sum(a.cost_usd for a in out.attempts)
        total["cost"] += event_cost
        total["correct"] += bool(final) and matches(answer or "", q.label)
        total["student_answered"] += final == STUDENT
        if writer is not None:
            writer.submit(RoutingEvent(request_id=rid, time=now + i * 1e-3, policy="banking77", task=TASK,
                                       query=q.text, router_version=getattr(artifact, "version", None),
                                       attempts=out.attempts, final_tier=final, escalations=out.escalations,
                                       outcome=out.outcome, cost_usd=event_cost, shadow=True, explored=True))
            if first is not None and first.tier == STUDENT and first.error is None:  # shadow label vs the reference
                writer.submit(FeedbackEvent(request_id=rid, time=now + i * 1e-3 + 1e-4, tier=STUDENT,
                                            accepted=matches(first.response or "", q.label), source="shadow",
                                            reference_response=q.label))
    n = len(queries)
    return {
        "queries": n,
        "quality": round(total["correct"] / n, 4),
        "quality_ratio": round(total["correct"] / n, 4),  # the oracle stand-in is always right: ratio = accuracy
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


MODES = ("targeted", "untargeted")


@dataclass
class Bench:
    """What the stages of one bench run share: settings, the work folder, the running vLLM server, timings."""

    s: Settings
    work: Path
    server: Any
    model: Path
    encoder: Any
    timings: Timings
    quiet: bool
    tag: str
    held_q: list[Any]

    def stage(self, args: list[str], name: str) -> dict[str, Any]:
        return stage(args, self.timings, name, self.quiet, self.s.threads)

    def policy(self, risk_level: float) -> list[str]:
        """The policy flags retrain and calibrate share."""
        s = self.s
        return ["--events", str(self.work / "events"), "--artifact-dir", str(self.work / "router-artifacts"),
                "--teacher-tier", REFERENCE, "--tiers", STUDENT, REFERENCE, "--quality-target", str(s.quality_target),
                "--risk-level", str(risk_level), "--risk-measure", s.risk_measure, "--delta", str(s.delta),
                "--max-escalations", "1", "--system-prompt", SYSTEM_PROMPT]

    def at_floor(self, base_version: str, signals: Path, name: str) -> tuple[str, dict[str, Any]]:
        """The same router weights recalibrated for the bench's quality floor (RoutingPolicy tasks[].qualityFloor:
        the binding floor, one certified confidence level): every arm is judged at this one quality level."""
        version = f"{base_version}-floor"
        m = self.stage(["calibrate", *self.policy(self.s.risk_level), "--risk-measure", ALL_REQUESTS,
                        "--quality-floors", json.dumps({TASK: self.s.quality_floor}), "--signals", str(signals),
                        "--base-version", base_version, "--version", version,
                        "--out", str(self.work / f"calibrate-{base_version}")], f"calibrate_{name}")
        return version, m

    def route(self, queries: list[Any], model_name: str, artifact_dir: Path | None, version: str | None, label: str,
              writer: Any = None) -> dict[str, Any]:
        from routenlp.router.artifacts import load_artifact

        t0 = time.perf_counter()
        art = load_artifact(artifact_dir, version) if version else None
        # the bench's policy has the quality floor in force: a version certified for it starts requests by its
        # certified rule; the policy-risk versions carry no floor certificate and start by qualityTarget
        out = route(queries, self.server.base_url, model_name, art, self.encoder, writer, self.s.quality_target, label,
                    quality_floor=self.s.quality_floor)
        self.timings.add(f"route_{label}", t0)
        return out


def _suffix(round_: int) -> str:
    """Names of round 1 are those a single-round bench always had; later rounds add -rN."""
    return "" if round_ == 1 else f"-r{round_}"


def arm_round(b: Bench, mode: str, round_: int, cluster_dir: Path, previous: dict[str, Any] | None) -> dict[str, Any]:
    """One round of one arm: distill (continuing the arm's previous adapter, or on the union of rounds) -> load into
    the running server -> evaluate (against the previous adapter) -> retrain (the policy's risk level) -> recalibrate
    for the quality floor -> publish -> route the held-out traffic with both router versions."""
    s, work = b.s, b.work
    sfx = _suffix(round_)
    key = f"{mode}{sfx.replace('-', '_')}"
    name = f"b77-{mode}{sfx}"
    ddir = work / f"distill-{mode}{sfx}"
    init: list[str] = []
    if previous and s.adapter_rounds == "union":
        init = ["--replay", str(previous["train"][-1])]  # the previous round's pairs hold every earlier round's
    elif previous:
        init = ["--init-adapter", str(previous["adapter_dir"])]
    d = b.stage(["distill", "--clusters", str(cluster_dir), "--out", str(ddir), "--base-model", str(b.model),
                 "--adapter-name", name, "--mode", mode, "--top-clusters", str(s.top_clusters),
                 "--samples-per-cluster", str(s.samples_per_cluster), "--budget-split", s.budget_split,
                 "--outside-holdout", str(s.outside_holdout), "--system-prompt", SYSTEM_PROMPT, "--r", str(s.r),
                 "--alpha", str(s.alpha), "--steps", str(s.steps), "--batch-size", str(s.batch_size),
                 "--learning-rate", str(s.learning_rate), "--seed", str(s.seed), "--checkpoint-every", "20", "--quiet",
                 "--top-layers", str(s.top_layers), "--target-modules", *s.target_modules, *init], f"distill_{key}")
    t0 = time.perf_counter()
    b.server.load_lora(name, ddir / "adapter")  # into the RUNNING server
    b.timings.add(f"load_adapter_{key}", t0)
    ev = b.stage(["evaluate", "--distill", str(ddir), "--out", str(work / f"evaluate-{mode}{sfx}"), "--student-url",
                  b.server.base_url, "--student-model", previous["model"] if previous else "smollm2-135m",
                  "--adapter-model", name], f"evaluate_{key}")
    # the adapter trained on every earlier round's pairs too: none of them may be probed
    exclude = work / f"exclude-{mode}{sfx}.jsonl"
    exclude.write_text("".join(p.read_text() for p in [*(previous or {}).get("train", []), ddir / "train.jsonl"]))
    version = f"v{round_ + 1}-{mode}-{b.tag}"
    rt = b.stage(["retrain", *b.policy(s.risk_level), "--probe", str(s.probe), "--student-tier", STUDENT,
                  "--seed", str(s.seed), "--student-url", b.server.base_url, "--student-model", name, "--version",
                  version, "--exclude", str(exclude), "--out", str(work / f"retrain-{mode}{sfx}-{b.tag}")],
                 f"retrain_{key}")
    floor_version, fl = b.at_floor(version, work / f"retrain-{mode}{sfx}-{b.tag}" / "signals.jsonl", key)
    pub = work / "published"
    pb = b.stage(["publish", "--out", str(work / f"publish-{mode}{sfx}-{b.tag}"), "--adapter", str(ddir / "adapter"),
                  "--adapter-name", name, "--adapter-to", (pub / "adapters").as_uri(), "--router-version",
                  str(work / "router-artifacts" / floor_version), "--router-to", (pub / "router").as_uri()],
                 f"publish_{key}")
    at_floor = b.route(b.held_q, name, pub / "router", floor_version, key)
    at_policy = b.route(b.held_q, name, work / "router-artifacts", version, f"{key}_policy")
    for r in (at_floor, at_policy):
        r.pop("_signals")
    return {"round": round_, "adapter": name, "model": name, "adapter_dir": ddir / "adapter",
            "train": [*(previous or {}).get("train", []), ddir / "train.jsonl"], "version": floor_version,
            "at_floor": at_floor, "at_policy": at_policy, "distill": d["metrics"], "evaluate": ev["metrics"],
            "thresholds": {"policy": rt["metrics"]["thresholds"], "floor": fl["metrics"]["thresholds"]},
            "publish": pb["metrics"]}


def log_round(b: Bench, mode: str, round_: int, queries: list[Any], previous: dict[str, Any]) -> Path:
    """Fresh traffic routed by the arm's previous round (its floor router version and adapter), logged; then the
    failures logged under that router version are clustered for this round."""
    from routenlp.router.eventlog import EventLogWriter

    sfx = _suffix(round_)
    events = b.work / f"events-{mode}{sfx}"
    shutil.rmtree(events, ignore_errors=True)
    writer = EventLogWriter(events)
    b.route(queries, previous["model"], b.work / "published" / "router", previous["version"],
            f"log_{mode}{sfx.replace('-', '_')}", writer)
    writer.close()
    out = b.work / f"cluster-{mode}{sfx}"
    s = b.s
    b.stage(["cluster", "--events", str(events), "--out", str(out), "--teacher-tier", REFERENCE, "--student-tier",
             STUDENT, "--router-version", previous["version"], "--method", s.method, "--max-clusters",
             str(s.max_clusters), "--min-cluster-size", str(s.min_cluster_size), "--top-clusters", str(s.top_clusters),
             "--seed", str(s.seed)], f"cluster_{mode}{sfx.replace('-', '_')}")
    return out


def compare(before: dict[str, Any], after: dict[str, Any], control: dict[str, Any]) -> dict[str, Any]:
    """Targeted versus untargeted cost gains over `before`. The ratio needs a control that saved something: below
    1 % of the reference cost it would be noise over noise, so the paired difference in points (the same held-out
    queries in both arms) is the figure then."""
    g_after = after["cost_reduction"] - before["cost_reduction"]
    g_control = control["cost_reduction"] - before["cost_reduction"]
    return {"gain_targeted": round(g_after, 4), "gain_untargeted": round(g_control, 4),
            "improvement_ratio": round(g_after / g_control, 3) if g_control >= 0.01 else None,
            "paired_difference_points": round(100 * (after["cost_reduction"] - control["cost_reduction"]), 2),
            "quality_ratio": {"targeted": after["quality_ratio"], "untargeted": control["quality_ratio"]}}


def run_campaign(s: Settings, work: Path, progress: bool = True, server: Any = None) -> dict[str, Any]:
    """Run the campaign in `work`. `server`: a running `VLLMServer` of SmolLM2-135M with runtime LoRA loading (the
    e2e tests share one); None starts one here and stops it at the end."""
    from routenlp.local import banking77 as b77
    from routenlp.local.models import ensure_model
    from routenlp.local.vllm import LoRAOptions, VLLMServer
    from routenlp.router.encoder import Encoder
    from routenlp.router.eventlog import EventLogWriter
    from routenlp.trainer.manifest import write_json_atomic, write_jsonl

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
    # later rounds log fresh traffic (the same queries for both arms), never a query logged before
    used = {q.text for q in log_q}
    round_q: dict[int, list[Any]] = {}
    for r in range(2, s.rounds + 1):
        round_q[r] = sample_traffic([e for e in train if e.text not in used], s.round_queries or s.log_queries, rng,
                                    s.traffic_skew, ranking)
        used |= {q.text for q in round_q[r]}
    events = work / "events"

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
    b = Bench(s, work, server, Path(model), encoder, timings, quiet, tag, held_q)
    rounds: list[dict[str, Any]] = []
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

        # 2. router v1 from the log (the base student's signals were recorded while logging), at both levels
        v1 = b.stage(["retrain", *b.policy(s.risk_level), "--probe", str(s.probe), "--student-tier", STUDENT,
                      "--seed", str(s.seed), "--signals", str(work / "signals-base.jsonl"), "--version", f"v1-{tag}",
                      "--student-model", "smollm2-135m", "--out", str(work / f"retrain-v1-{tag}")], "retrain_v1")
        v1_floor, v1_fl = b.at_floor(f"v1-{tag}", work / "signals-base.jsonl", "v1")
        v1_thresholds = {"v1": v1["metrics"]["thresholds"], "v1_floor": v1_fl["metrics"]["thresholds"]}
        before = {"at_floor": b.route(held_q, "smollm2-135m", work / "router-artifacts", v1_floor, "before"),
                  "at_policy": b.route(held_q, "smollm2-135m", work / "router-artifacts", f"v1-{tag}",
                                       "before_policy")}
        for r in before.values():
            r.pop("_signals")

        # 3. cluster the escalation failures of the log
        b.stage(["cluster", "--events", str(events), "--out", str(work / "cluster"), "--teacher-tier", REFERENCE,
                 "--student-tier", STUDENT, "--method", s.method, "--max-clusters", str(s.max_clusters),
                 "--min-cluster-size", str(s.min_cluster_size), "--top-clusters", str(s.top_clusters),
                 "--seed", str(s.seed)], "cluster")

        # 4. rounds: each arm learns from the failures of its own previous round
        previous: dict[str, Any] = {m: None for m in MODES}
        for r in range(1, s.rounds + 1):
            this: dict[str, Any] = {"round": r}
            for mode in MODES:
                cdir = work / "cluster" if r == 1 else log_round(b, mode, r, round_q[r], previous[mode])
                this[mode] = arm_round(b, mode, r, cdir, previous[mode])
                this[mode]["clusters"] = cluster_figures(cdir, s.top_clusters)
                previous[mode] = this[mode]
            rounds.append(this)
            # each finished round's figures reach --work at once: a crash or a stop in a later round keeps them
            partial = report(s, b, logged, log_q, before, rounds, v1_thresholds, time.perf_counter() - t_all)
            write_json_atomic(work / "report.json", {**partial, "rounds_completed": r, "complete": r == s.rounds})
    finally:
        if own_server:
            t0 = time.perf_counter()
            server.stop()
            timings.add("vllm_stop", t0)
    return report(s, b, logged, log_q, before, rounds, v1_thresholds, time.perf_counter() - t_all)


def cluster_figures(cdir: Path, top: int) -> dict[str, Any]:
    c = json.loads((cdir / "clusters.json").read_text())
    total = c.get("total_cost_usd") or 0.0
    return {"k": c["clustering"].get("k"), "failures": c["failures"], "cost_cover_80": c.get("cost_cover_80"),
            "top_cost_share": round(sum(x["cost_usd"] for x in c["clusters"][:top]) / total, 4) if total else None,
            "top": [{k: x[k] for k in ("id", "size", "cost_usd", "escalation_rate", "examples")}
                    for x in c["clusters"][:top]]}


def report(s: Settings, b: Bench, logged: dict[str, Any], log_q: list[Any], before: dict[str, Any],
           rounds: list[dict[str, Any]], v1_thresholds: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The bench's JSON: the matched-quality (floor) comparison first, per round; the policy-risk one as secondary."""
    arm_keys = ("distill", "evaluate", "thresholds", "clusters")

    def figures(level: str) -> list[dict[str, Any]]:
        return [{"round": x["round"], "after": x["targeted"][level], "control": x["untargeted"][level],
                 **compare(before[level], x["targeted"][level], x["untargeted"][level])} for x in rounds]

    floor, policy = figures("at_floor"), figures("at_policy")
    last, first = rounds[-1], rounds[0]
    return {
        "workload": {"data": "BANKING77 (CC BY 4.0)", "log_queries": s.log_queries, "heldout_queries": s.heldout_queries,
                     "round_queries": s.round_queries or s.log_queries, "log_from": "train split",
                     "heldout_from": "test split",
                     "intent_mix": "uniform sample" if s.traffic_skew <= 0 else f"Zipf({s.traffic_skew}) over intents",
                     "distinct_intents": {"log": len({q.label for q in log_q}),
                                          "heldout": len({q.label for q in b.held_q})}},
        "portfolio": {STUDENT: "SmolLM2-135M-Instruct on vLLM (CPU), LoRA adapters loaded at runtime",
                      REFERENCE: "banking77-oracle: oracle-quality stand-in for a frontier model (gold labels)",
                      "prices_usd_per_million": {k: {"input": v[0], "output": v[1]} for k, v in PRICES.items()}},
        "settings": s.__dict__,
        "quality_floor": s.quality_floor,
        "log": {k: v for k, v in logged.items() if not k.startswith("_")},
        # matched quality: every router version recalibrated for the quality floor
        "before": before["at_floor"],
        "after": last["targeted"]["at_floor"],
        "control": last["untargeted"]["at_floor"],
        "improvement_ratio": floor[-1]["improvement_ratio"],
        "paired_difference_points": floor[-1]["paired_difference_points"],
        "meets_floor": {"before": before["at_floor"]["quality_ratio"] >= s.quality_floor,
                        **{m: last[m]["at_floor"]["quality_ratio"] >= s.quality_floor for m in MODES}},
        "rounds": [{"round": f["round"], "at_floor": {k: v for k, v in f.items() if k not in ("after", "control")},
                    "at_policy_risk": {k: v for k, v in p.items() if k not in ("after", "control")},
                    **{m: {"at_floor": x[m]["at_floor"], "at_policy_risk": x[m]["at_policy"],
                           **{k: x[m][k] for k in arm_keys}} for m in MODES}}
                   for f, p, x in zip(floor, policy, rounds)],
        # secondary: the routers as the policy's own risk level calibrates them (the earlier definition)
        "at_policy_risk": {"risk_level": s.risk_level, "before": before["at_policy"],
                           "after": last["targeted"]["at_policy"], "control": last["untargeted"]["at_policy"],
                           "improvement_ratio": policy[-1]["improvement_ratio"],
                           "paired_difference_points": policy[-1]["paired_difference_points"]},
        "cost_improvement": {"targeted": floor[-1]["gain_targeted"], "untargeted": floor[-1]["gain_untargeted"]},
        "clusters": first["targeted"]["clusters"],
        "per_cluster_student_accuracy": {
            m: {"before": first[m]["evaluate"]["per_cluster_before"],
                "after": first[m]["evaluate"]["per_cluster_after"]} for m in MODES},
        "evaluation": {m: {k: first[m]["evaluate"][k] for k in
                           ("passed", "quality_before", "quality_after", "quality_gain", "outside_before",
                            "outside_after", "regression", "reasons")} for m in MODES},
        "distill": {m: {k: first[m]["distill"].get(k) for k in
                        ("train_pairs", "pairs_per_cluster", "steps", "loss_first", "loss_last", "seconds_per_step")}
                    for m in MODES},
        "thresholds": v1_thresholds,
        "stage_seconds": b.timings.seconds,
        "total_seconds": round(seconds, 1),
        "machine": {"cpus": os.cpu_count()},
        "command": "routenlp bench campaign",
    }


def plot_rounds(r: dict[str, Any], path: Path) -> Path:
    """Cost reduction and quality ratio per round for both arms (round 0: router v1, the base student), with the
    quality floor every router version was calibrated for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [0] + [x["round"] for x in r["rounds"]]
    fig, (ax_cost, ax_q) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("targeted", "o-"), ("untargeted", "s--")):
        cost = [r["before"]["cost_reduction"]] + [x[mode]["at_floor"]["cost_reduction"] for x in r["rounds"]]
        qual = [r["before"]["quality_ratio"]] + [x[mode]["at_floor"]["quality_ratio"] for x in r["rounds"]]
        ax_cost.plot(xs, cost, style, label=mode)
        ax_q.plot(xs, qual, style, label=mode)
    ax_q.axhline(r["quality_floor"], color="grey", lw=1, ls=":", label=f"floor {r['quality_floor']}")
    ax_cost.set(xlabel="round", ylabel="cost reduction vs always-reference", xticks=xs)
    ax_q.set(xlabel="round", ylabel="held-out quality ratio", xticks=xs)
    for ax in (ax_cost, ax_q):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"routenlp bench campaign: routers calibrated for quality floor {r['quality_floor']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(r: dict[str, Any]) -> str:
    floor = r["quality_floor"]
    out = [f"routers calibrated for quality floor {floor} (matched quality):", "",
           "| run | quality ratio | cost reduction | student share |", "| --- | --- | --- | --- |",
           f"| before (router v1, base student) | {r['before']['quality_ratio']:.3f} | "
           f"{r['before']['cost_reduction']:.3f} | {r['before']['student_share']:.3f} |"]
    for x in r["rounds"]:
        for mode in MODES:
            f = x[mode]["at_floor"]
            out.append(f"| round {x['round']} {mode} | {f['quality_ratio']:.3f} | {f['cost_reduction']:.3f} | "
                       f"{f['student_share']:.3f} |")
    out.append("")
    for x in r["rounds"]:
        for level in ("at_floor", "at_policy_risk"):
            c = x[level]
            ratio = c["improvement_ratio"]
            out.append(f"round {x['round']} {level}: improvement ratio "
                       f"{'n/a (control saved < 1 %)' if ratio is None else ratio}, targeted - untargeted "
                       f"{c['paired_difference_points']:+.2f} points  [paper claims >= 2]")
    out += ["", "per-cluster student accuracy on held-out cluster queries, round 1 (before -> after):"]
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
    p.add_argument("--plot", help="PNG of cost and quality per round (default: campaign-rounds.png in --work)")
    p.add_argument("--steps", type=int, help="override LoRA steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage (0: torch's default)")
    p.add_argument("--rounds", type=int, help="campaign rounds of both arms (default 1)")
    p.add_argument("--round-queries", type=int, help="fresh queries logged before each later round")
    p.add_argument("--quality-floor", type=float,
                   help="quality ratio every router version is recalibrated for (default 0.95; --small 0.8)")
    p.add_argument("--budget-split", choices=("cost", "equal"), help="pair budget over the top clusters")
    p.add_argument("--adapter-rounds", choices=("continue", "union"),
                   help="a later round continues the previous adapter (default) or trains a fresh one on every "
                        "round's pairs")
    p.add_argument("--top-clusters", type=int, help="clusters distilled (clustering.topClusters)")
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
    s = replace(SMALL if args.small else Settings())
    s.threads = args.threads
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    s.seed = args.seed
    for name in ("steps", "risk_level", "risk_measure", "delta", "quality_target", "probe", "traffic_skew", "rounds",
                 "round_queries", "quality_floor", "budget_split", "top_clusters", "adapter_rounds"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if not 1 <= s.rounds <= 10:
        p.error(f"--rounds: between 1 and 10, got {s.rounds}")
    if not 0 < s.quality_floor < 1:
        p.error(f"--quality-floor: a quality ratio between 0 and 1, got {s.quality_floor}")
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        result = run_campaign(s, work, progress=not args.json)
        plot = Path(args.plot) if args.plot else work / "campaign-rounds.png"
    else:
        with tempfile.TemporaryDirectory(prefix="routenlp-campaign-") as tmp:
            result = run_campaign(s, Path(tmp), progress=not args.json)
        plot = Path(args.plot) if args.plot else None
    if plot is not None:
        result["plot"] = str(plot_rounds(result, plot))
    result["command"] = "routenlp bench campaign " + " ".join(a for a in argv if a != "--json")
    print(json.dumps(result, default=str) if args.json else table(result))
    return 0
