"""The live demo that `routenlp up -f examples/local --demo` ends with: BANKING77 test queries through the router.

1. Warm-up / calibration phase: labelled queries go through the router with its exploration sample raised to all
   traffic (`shadowSampleRate` 1 via the router's config hot reload; restored afterwards), so the uncalibrated
   cheaper tiers are tried; for each answer the demo POSTs /v1/feedback with the gold label (accepted = the answer
   names the gold intent). The router escalates uncertified answers to the reference tier and labels each cheaper
   attempt by agreement with the reference answer; once `cascade.minCalibrationSamples` labels exist its periodic
   recalibration (every `cascade.recalibrationInterval`) certifies conformal thresholds. The demo waits until every
   label of the phase is in the router's windows and a recalibration has run over all of them (so the threshold
   does not depend on which part of the phase a periodic recalibration happened to see).
2. Demo queries (other test queries), one row each: which tier answered, escalations, confidence, correct?, cost;
   each query is also sent straight to the reference tier to measure the always-reference baseline (quality + cost).
3. Summary: quality vs always-reference, cost vs always-reference, escalation rate, tier shares.

The reference tier of the local portfolio is an oracle-quality stand-in for a frontier model: its quality is an upper
bound, its price a frontier model's list price.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass

import aiohttp

from . import banking77 as b77


@dataclass
class Row:
    query: str
    gold: str
    answer: str
    tier: str
    escalations: int
    confidence: str
    correct: bool
    cost_usd: float
    reference_correct: bool | None = None
    reference_cost_usd: float | None = None
    latency_ms: float = 0.0


def router_state(app):
    """The in-process router's state (its routing events give each request's total cost over all tiers tried)."""
    from routenlp.router import server

    key = getattr(server, "STATE", "state")
    return app[key]


@contextlib.asynccontextmanager
async def calibration_phase(rt):
    """Explore with all traffic while it lasts: the router skips cheaper tiers that have no certified threshold except
    on its exploration (shadow) sample, `shadowSampleRate` of the requests. A calibration phase sets that rate to 1
    through the router's own config hot reload (router.yaml), then restores the policy's rate."""
    from routenlp.router.config import RouterConfig

    path = rt.state_dir / "router.yaml"
    original = path.read_text()
    cfg = RouterConfig.load(path)
    state = router_state(rt.app)

    async def switch(text: str, rate: float):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        deadline = time.monotonic() + 30
        while state.config.shadow_sample_rate != rate:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router did not reload {path} (shadowSampleRate {rate})")
            await asyncio.sleep(0.2)

    cfg.shadow_sample_rate = 1.0
    await switch(cfg.dump_yaml(), 1.0)
    try:
        yield
    finally:
        await switch(original, yaml_rate(original))


def yaml_rate(text: str) -> float:
    import yaml

    return float((yaml.safe_load(text) or {}).get("shadowSampleRate", 0.0))


def parse_metric(text: str, name: str, **labels) -> dict[str, float]:
    """{tier: value} of a Prometheus gauge filtered by labels (tiny parser, enough for our own /metrics)."""
    out = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        m = re.match(rf"{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if not m:
            continue
        lab = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1)))
        if all(lab.get(k) == v for k, v in labels.items()):
            out[lab.get("tier", "")] = float(m.group(2))
    return out


def summarize(rows: list[Row]) -> dict:
    n = len(rows)
    if n == 0:
        return {"n": 0}
    acc = sum(r.correct for r in rows) / n
    ref_rows = [r for r in rows if r.reference_correct is not None]
    ref_acc = sum(r.reference_correct for r in ref_rows) / len(ref_rows) if ref_rows else float("nan")
    cost = sum(r.cost_usd for r in rows)
    ref_cost = sum(r.reference_cost_usd or 0.0 for r in rows)
    shares: dict[str, float] = {}
    for r in rows:
        shares[r.tier] = shares.get(r.tier, 0) + 1 / n
    return {
        "n": n, "accuracy": acc, "reference_accuracy": ref_acc,
        "quality_ratio": acc / ref_acc if ref_acc else float("nan"),
        "cost_usd": cost, "reference_cost_usd": ref_cost,
        "cost_reduction": 1 - cost / ref_cost if ref_cost else float("nan"),
        "escalation_rate": sum(r.escalations > 0 for r in rows) / n,
        "tier_share": shares,
        "mean_latency_ms": sum(r.latency_ms for r in rows) / n,
    }


def format_row(r: Row, width: int = 44) -> str:
    q = r.query if len(r.query) <= width else r.query[: width - 1] + "…"
    return (f"{q:<{width}} {r.tier:<18} {r.escalations:>3} {r.confidence or '-':>7} "
            f"{'yes' if r.correct else 'NO':>4} {r.cost_usd * 1e6:>9.1f} {(r.reference_cost_usd or 0) * 1e6:>9.1f}")


HEADER = (f"{'query':<44} {'tier':<18} {'esc':>3} {'conf':>7} {'ok?':>4} {'cost µ$':>9} {'ref µ$':>9}")


async def ask(session: aiohttp.ClientSession, router_url: str, task: str, ex: b77.Example, label_list) -> dict:
    t0 = time.perf_counter()
    async with session.post(f"{router_url}/v1/chat/completions", headers={"X-RouteNLP-Task": task},
                            json={"model": task, "messages": b77.messages(ex.text, label_list),
                                  "max_tokens": 16, "temperature": 0}) as r:
        body = await r.json()
        if r.status != 200:
            raise RuntimeError(f"router answered {r.status}: {json.dumps(body)[:300]}")
        h = r.headers
        answer = body["choices"][0]["message"]["content"] or ""
        return {"answer": answer, "tier": h.get("x-routenlp-tier", "?"),
                "escalations": int(h.get("x-routenlp-escalations", "0")),
                "confidence": h.get("x-routenlp-confidence", ""), "request_id": h.get("x-request-id"),
                "correct": b77.normalize_label(answer, label_list) == ex.label,
                "latency_ms": (time.perf_counter() - t0) * 1000}


async def ask_reference(session, tier, ex: b77.Example, label_list) -> tuple[bool, float]:
    """Always-reference baseline: the same request sent straight to the reference tier; (correct, cost)."""
    async with session.post(f"{tier.base_url}/chat/completions",
                            json={"model": tier.served_model_name, "messages": b77.messages(ex.text, label_list),
                                  "max_tokens": 16, "temperature": 0}) as r:
        body = await r.json()
        answer = body["choices"][0]["message"]["content"] or ""
        u = body.get("usage", {})
        return (b77.normalize_label(answer, label_list) == ex.label,
                tier.cost.usd(u.get("prompt_tokens", 0), u.get("completion_tokens", 0)))


def expected_labels(state, request_ids: list[str], tiers: list[str]) -> dict[str, int]:
    """Random-sample labels the router will hold per cheaper tier for these requests: one per attempt that reached the
    tier on the exploration sample or without a threshold (the ones its calibration window takes)."""
    from routenlp.router.events import random_sample_label

    n = dict.fromkeys(tiers, 0)
    for rid in request_ids:
        ev = state.recent.get(rid)
        for att in ev.attempts if ev is not None else ():
            if att.tier in n and att.error is None and att.score is not None and random_sample_label(ev, att):
                n[att.tier] += 1
    return n


async def wait_calibrated(session, router_url: str, policy: str, task: str, tiers: list[str], state,
                          request_ids: list[str], timeout: float):
    """Wait until every label of the calibration phase is in the router's windows, then for a recalibration that
    started after that (two more runs of `routenlp_recalibrations_total`: the next may have snapshotted the windows
    just before), so the thresholds read are those of the whole phase, not of whatever part of it a periodic
    recalibration happened to see. Returns (calibrated, samples, threshold) per tier from /metrics (partial on
    timeout)."""
    deadline = time.monotonic() + timeout
    want = expected_labels(state, request_ids, tiers)
    while any(len(state.window.get((task, t), ())) < k for t, k in want.items()) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)

    async def metrics():
        async with session.get(f"{router_url}/metrics") as r:
            return await r.text()

    runs = parse_metric(await metrics(), "routenlp_recalibrations_total", policy=policy).get("", 0.0)
    while True:
        text = await metrics()
        if parse_metric(text, "routenlp_recalibrations_total", policy=policy).get("", 0.0) >= runs + 2 \
                or time.monotonic() > deadline:
            cal = parse_metric(text, "routenlp_calibrated", policy=policy, task=task)
            samples = parse_metric(text, "routenlp_calibration_samples", policy=policy, task=task)
            thr = parse_metric(text, "routenlp_threshold", policy=policy, task=task)
            return cal, samples, thr
        await asyncio.sleep(0.5)


async def run_demo(rt, warmup: int = 150, queries: int = 30, seed: int = 0, concurrency: int = 4,
                   out=print) -> dict:
    """Run the demo against a started LocalRuntime; prints as it goes and returns the summary (also written to
    <state-dir>/demo.json)."""
    from tqdm import tqdm

    from routenlp.api import parse_duration

    policy = rt.policy
    task = next((t for t in policy.spec.tasks if t.name == b77.TASK), None)
    if task is None:
        raise RuntimeError(f"the demo needs a task named {b77.TASK!r} in RoutingPolicy {policy.metadata.name}")
    label_list = list(task.labels) or list(b77.labels())
    ref = rt.plans[-1]
    cheaper = [p.name for p in rt.plans[:-1]]
    exs = b77.sample("test", warmup + queries, seed=seed)
    warm, demo = exs[:warmup], exs[warmup:]
    url = rt.router_url
    t_all = time.monotonic()
    out(f"\n=== RouteNLP live demo: BANKING77 intent detection through policy {policy.metadata.name} ===")
    out(f"tiers (cheapest first): {', '.join(p.name for p in rt.plans)}; reference = {ref.name}"
        + (" (an oracle-quality stand-in for a frontier model)" if ref.standin == "banking77-oracle" else ""))
    c = policy.spec.cascade
    out(f"cascade: riskLevel {c.risk_level}, delta {c.delta}, minCalibrationSamples {c.min_calibration_samples}, "
        f"maxEscalations {c.max_escalations}")

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # 1. warm-up with feedback
        out(f"\n[1/3] calibration phase: {len(warm)} labelled test queries through the router (exploring every tier), "
            "gold label sent as feedback")
        sem = asyncio.Semaphore(concurrency)
        warm_rows = []
        bar = tqdm(total=len(warm), desc="warm-up", unit="query")

        async def one(ex):
            async with sem:
                res = await ask(session, url, task.name, ex, label_list)
                async with session.post(f"{url}/v1/feedback", json={"request_id": res["request_id"],
                                                                     "accepted": res["correct"]}) as r:
                    if r.status != 202:
                        raise RuntimeError(f"/v1/feedback answered {r.status}: {await r.text()}")
                warm_rows.append(res)
                bar.update(1)

        t0 = time.monotonic()
        async with calibration_phase(rt):
            await asyncio.gather(*(one(ex) for ex in warm))
        bar.close()
        esc = sum(r["escalations"] > 0 for r in warm_rows) / max(len(warm_rows), 1)
        out(f"calibration phase done in {time.monotonic() - t0:.0f} s; escalation rate {esc:.0%} "
            "(uncalibrated tiers escalate)")
        interval = parse_duration(c.recalibration_interval)
        cal, samples, thr = await wait_calibrated(session, url, policy.metadata.name, task.name, cheaper,
                                                  router_state(rt.app), [r["request_id"] for r in warm_rows],
                                                  timeout=min(3 * interval + 30, 150))
        for t in cheaper:
            state = (f"threshold {thr.get(t):.3f} certified" if cal.get(t) == 1.0
                     else "no threshold certified (always escalates)")
            out(f"  {t:<18} labels {int(samples.get(t, 0)):>4}  {state}")

        # 2. demo queries, live
        out(f"\n[2/3] {len(demo)} new test queries (each also sent straight to {ref.name} for the baseline)")
        out(HEADER)
        rows = []
        for ex in demo:
            res = await ask(session, url, task.name, ex, label_list)
            ref_ok, ref_cost = await ask_reference(session, ref, ex, label_list)
            ev = router_state(rt.app).recent.get(res["request_id"])
            row = Row(ex.text, ex.label, res["answer"], res["tier"], res["escalations"], res["confidence"],
                      res["correct"], ev.cost_usd if ev else float("nan"), ref_ok, ref_cost, res["latency_ms"])
            rows.append(row)
            out(format_row(row))

    s = summarize(rows)
    out(f"\n[3/3] summary over {s['n']} demo queries")
    out(f"  quality: {s['accuracy']:.1%} correct vs {s['reference_accuracy']:.1%} always-{ref.name} "
        f"(quality ratio {s['quality_ratio']:.3f})")
    out(f"  cost:    ${s['cost_usd']:.6f} vs ${s['reference_cost_usd']:.6f} always-{ref.name} "
        f"(cost reduction {s['cost_reduction']:.1%})")
    out(f"  escalation rate {s['escalation_rate']:.0%}; answered by: "
        + ", ".join(f"{k} {v:.0%}" for k, v in sorted(s["tier_share"].items(), key=lambda kv: -kv[1]))
        + f"; mean latency {s['mean_latency_ms']:.0f} ms")
    s["warmup"] = {"n": len(warm_rows), "escalation_rate": esc,
                   "accuracy": sum(r["correct"] for r in warm_rows) / max(len(warm_rows), 1)}
    s["calibration"] = {t: {"labels": samples.get(t, 0), "certified": cal.get(t) == 1.0,
                            "threshold": thr.get(t) if cal.get(t) == 1.0 else None} for t in cheaper}
    s["seconds"] = time.monotonic() - t_all
    s["rows"] = [asdict(r) for r in rows]
    (rt.state_dir / "demo.json").write_text(json.dumps(s, indent=1))
    out(f"demo took {s['seconds']:.0f} s; details in {rt.state_dir / 'demo.json'}")
    return s
