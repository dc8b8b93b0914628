"""`routenlp bench router [--json] [--vllm]`: the router's hot path.

Measures, in one run:
- routing decision latency (encode + heads + start rule + threshold lookup: the same code the server runs) p50/p99
  with 1 client and with 32 concurrent clients (micro-batching), and decisions/s at 32;
- proxy overhead: the same chat requests sent directly to the upstream and through the router (interleaved, one
  client), latency percentiles of both and the difference; requests/s through the router with 32 clients.
Upstream: a fast fake OpenAI-compatible server in a child process (default), or a real vLLM server with
SmolLM2-135M (`--vllm`). The router runs as `routenlp router --config` in a child process, as deployed. The router
artifact is an untrained DifficultyRouter of the production shape (latency does not depend on the weights).
Queries: BANKING77 test questions from the shared data folder (synthetic ones if it is absent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _queries(n: int) -> tuple[list[str], str]:
    from .data import shared_data_dir

    path = shared_data_dir() / "banking77" / "test.csv"
    if path.is_file():
        import csv

        with open(path, newline="") as f:
            rows = [r["text"] for r in csv.DictReader(f)]
        random.Random(0).shuffle(rows)
        return (rows * (n // len(rows) + 1))[:n], "banking77/test.csv"
    words = "card refund transfer pin account balance fee exchange rate top up cash withdrawal".split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) + "?" for _ in range(n)], "synthetic"


# ---- fake upstream (child process) ---------------------------------------------------------------------------------
def serve_fake(port: int) -> None:
    """A fast fake vLLM: fixed short answer with token logprobs and usage (no model work)."""
    from aiohttp import web

    async def chat(request):
        body = await request.json()
        content = [{"token": "refund", "logprob": -0.05, "top_logprobs": []}] if body.get("logprobs") else None
        return web.json_response({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "refund"},
                         "logprobs": {"content": content} if content else None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}})

    async def health(request):
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def _pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q)) if len(xs) else float("nan")


# ---- artifact + config ---------------------------------------------------------------------------------------------
TASKS = ["intent", "chat"]


def _write_setup(tmp: Path, upstream_url: str, model_name: str):
    from routenlp.router.artifacts import Calibration, save_artifact
    from routenlp.router.conformal import ThresholdResult
    from routenlp.router.config import RouterConfig
    from routenlp.router.difficulty import DifficultyRouter

    import torch

    torch.manual_seed(0)
    tiers = ["small", "medium", "reference"]
    res = ThresholdResult(0.5, 1000, 600, 0.01, True)
    save_artifact(tmp / "artifacts", "bench", DifficultyRouter(tiers, TASKS),
                  calibration=Calibration(0.05, 0.1, tasks={t: {"small": res, "medium": res} for t in TASKS}))
    # One tier (the reference): every request makes exactly one upstream call, so the router-vs-direct difference
    # is the router's own cost (decision + proxying), not extra model calls.
    config = RouterConfig.model_validate({
        "policy": "bench",
        "tiers": [{"name": "reference", "servedModelName": model_name, "baseUrl": upstream_url,
                   "cost": {"inputPerMillion": 1, "outputPerMillion": 2}, "timeoutSeconds": 120}],
        "tasks": [{"name": t} for t in TASKS], "defaultTask": "intent",
        "cascade": {"maxEscalations": 0},
        "router": {"artifactDir": str(tmp / "artifacts"), "current": "bench"},
        "eventLogDir": str(tmp / "events"),
    })
    path = tmp / "router.yaml"
    path.write_text(config.dump_yaml())
    return path


# ---- decision latency (in process, the server's own code) ------------------------------------------------------------
async def _decisions(queries: list[str], artifact_dir: Path, n_single: int, n_concurrent: int) -> dict:
    from routenlp.router import cascade
    from routenlp.router.artifacts import load_artifact
    from routenlp.router.encoder import MicroBatcher, configure_threads
    from routenlp.router.server import shared_encoder

    configure_threads()  # as `routenlp router` does

    art = load_artifact(artifact_dir, "bench")
    router = art.router
    batcher = MicroBatcher(shared_encoder(None))
    tiers = router.tier_names

    async def decide(q: str, task: str) -> float:
        t0 = time.perf_counter()
        vec = await batcher.encode(q)
        probs = router.predict_proba(vec[None, :], np.array([router.task_index(task)]))[0]
        start = cascade.start_tier(probs, 0.97)
        _ = [art.calibration.get(task, t) for t in tiers[start:]]
        return time.perf_counter() - t0

    for q in queries[:20]:  # warm-up
        await decide(q, "intent")
    c0 = time.process_time()
    single = [await decide(q, TASKS[i % 2]) for i, q in enumerate(queries[:n_single])]
    cpu_single = (time.process_time() - c0) / max(len(single), 1)

    lat: list[float] = []
    it = iter(queries[:n_concurrent])

    async def client(i):
        for q in it:
            lat.append(await decide(q, TASKS[i % 2]))

    b0 = batcher.batches
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client(i) for i in range(32)))
    wall = time.perf_counter() - t0
    cpu_32 = (time.process_time() - c0) / max(len(lat), 1)
    out = {"decision_p50_ms": _pct(single, 50), "decision_p99_ms": _pct(single, 99),
           "decision_p50_ms_at_32": _pct(lat, 50), "decision_p99_ms_at_32": _pct(lat, 99),
           "decisions_per_s_at_32": len(lat) / wall, "mean_batch_at_32": len(lat) / max(batcher.batches - b0, 1),
           # CPU time per decision (all threads): what the machine's load does not change much
           "decision_cpu_ms_single": cpu_single * 1000, "decision_cpu_ms_per_query_at_32": cpu_32 * 1000}
    batcher.close()
    return out


# ---- proxy overhead (HTTP, router in a child process) ----------------------------------------------------------------
async def _proxy(queries: list[str], direct_url: str, router_url: str, model: str, n_pairs: int, n_load: int,
                 max_tokens: int) -> dict:
    import aiohttp

    def body(q, model_name):
        return {"model": model_name, "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                "temperature": 0}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        async def call(url, payload) -> float:
            t0 = time.perf_counter()
            async with http.post(url + "/chat/completions", json=payload) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{url}: HTTP {r.status}")
            return time.perf_counter() - t0

        for q in queries[:10]:  # warm-up both paths
            await call(direct_url, body(q, model))
            await call(router_url, body(q, "intent"))
        direct, routed = [], []
        for i, q in enumerate(queries[:n_pairs]):
            # alternate which goes first so drift and caching hit both equally
            if i % 2:
                direct.append(await call(direct_url, body(q, model)))
                routed.append(await call(router_url, body(q, "intent")))
            else:
                routed.append(await call(router_url, body(q, "intent")))
                direct.append(await call(direct_url, body(q, model)))

        async def load(url, model_name) -> float:
            it = iter(queries[:n_load])

            async def client():
                for q in it:
                    await call(url, body(q, model_name))

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(32)))
            return n_load / (time.perf_counter() - t0)

        rps_direct = await load(direct_url, model)
        rps_router = await load(router_url, "intent")
    diff = np.asarray(routed) - np.asarray(direct)
    return {"direct_p50_ms": _pct(direct, 50), "direct_p99_ms": _pct(direct, 99),
            "routed_p50_ms": _pct(routed, 50), "routed_p99_ms": _pct(routed, 99),
            "proxy_overhead_p50_ms": _pct(routed, 50) - _pct(direct, 50),
            "proxy_overhead_p99_ms": _pct(routed, 99) - _pct(direct, 99),
            "paired_overhead_p50_ms": _pct(diff, 50), "paired_overhead_p99_ms": _pct(diff, 99),
            "requests_per_s": rps_router, "requests_per_s_direct": rps_direct}


def run(use_vllm: bool, n_single: int, n_concurrent: int, n_pairs: int, n_load: int, max_tokens: int,
        progress=print) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    queries, source = _queries(max(n_single, n_concurrent, n_pairs, n_load) + 50)
    procs: list[subprocess.Popen] = []
    vllm = None
    with tempfile.TemporaryDirectory(prefix="routenlp-bench-router-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            if use_vllm:
                from routenlp.local.models import ensure_model
                from routenlp.local.vllm import VLLMServer

                progress("starting vLLM (SmolLM2-135M) ...")
                model = "smollm2-135m"
                vllm = VLLMServer(ensure_model(model), model, scratch_dir=tmp / "vllm").start()
                upstream = vllm.base_url
                tier_model = f"{model} (vLLM {'CPU' if not _has_gpu() else 'GPU'})"
            else:
                port = _free_port()
                model = "fake"
                procs.append(subprocess.Popen([sys.executable, "-c",
                                               f"from routenlp.bench.router import serve_fake; serve_fake({port})"]))
                upstream = f"http://127.0.0.1:{port}/v1"
                _wait_http(f"http://127.0.0.1:{port}/health", 60, procs[-1])
                tier_model = "fake OpenAI-compatible server (child process, no model work)"
            cfg = _write_setup(tmp, upstream, model)
            rport = _free_port()
            env = {**os.environ, "ROUTENLP_RELOAD_SECONDS": "3600"}
            procs.append(subprocess.Popen([sys.executable, "-m", "routenlp.cli.main", "router", "--config", str(cfg),
                                           "--host", "127.0.0.1", "--port", str(rport), "--log-level", "WARNING"],
                                          env=env, stdout=sys.stderr))  # stdout is the report (--json: one object)
            _wait_http(f"http://127.0.0.1:{rport}/readyz", 120, procs[-1])
            progress("measuring routing decisions (1 and 32 clients) ...")
            result = asyncio.run(_decisions(queries, tmp / "artifacts", n_single, n_concurrent))
            progress("measuring proxy overhead and requests/s ...")
            result.update(asyncio.run(_proxy(queries, upstream, f"http://127.0.0.1:{rport}/v1", model, n_pairs,
                                             n_load, max_tokens)))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
            if vllm is not None:
                vllm.stop()
    result.update({"tier_model": tier_model, "cores": os.cpu_count(), "queries": source,
                   "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                   "n_decisions_single": n_single, "n_decisions_at_32": n_concurrent, "n_pairs": n_pairs,
                   "n_load": n_load, "max_tokens": max_tokens})
    return result


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="routenlp bench router", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--vllm", action="store_true", help="upstream: a real vLLM server with SmolLM2-135M")
    ap.add_argument("--decisions", type=int, default=300, help="decisions measured at 1 client")
    ap.add_argument("--decisions-32", type=int, default=1500, help="decisions measured at 32 clients")
    ap.add_argument("--pairs", type=int, default=None, help="direct/routed request pairs (default 300, vLLM 60)")
    ap.add_argument("--load", type=int, default=None, help="requests at 32 clients (default 1000, vLLM 128)")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    pairs = args.pairs or (60 if args.vllm else 300)
    load = args.load or (128 if args.vllm else 1000)
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    r = run(args.vllm, args.decisions, args.decisions_32, pairs, load, args.max_tokens, progress=say)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    rows = [("decision p50 / p99, 1 client (ms)", f"{r['decision_p50_ms']:.2f} / {r['decision_p99_ms']:.2f}"),
            ("decision p50 / p99, 32 clients (ms)", f"{r['decision_p50_ms_at_32']:.2f} / {r['decision_p99_ms_at_32']:.2f}"),
            ("decisions/s at 32 clients", f"{r['decisions_per_s_at_32']:.0f} (mean batch {r['mean_batch_at_32']:.1f})"),
            ("CPU ms per decision, 1 client / 32 clients",
             f"{r['decision_cpu_ms_single']:.2f} / {r['decision_cpu_ms_per_query_at_32']:.2f}"),
            ("direct p50 / p99 (ms)", f"{r['direct_p50_ms']:.2f} / {r['direct_p99_ms']:.2f}"),
            ("through router p50 / p99 (ms)", f"{r['routed_p50_ms']:.2f} / {r['routed_p99_ms']:.2f}"),
            ("proxy overhead p50 / p99 (ms)", f"{r['proxy_overhead_p50_ms']:.2f} / {r['proxy_overhead_p99_ms']:.2f}"),
            ("requests/s at 32 clients, router / direct", f"{r['requests_per_s']:.0f} / {r['requests_per_s_direct']:.0f}"),
            ("upstream", r["tier_model"]), ("cores", str(r["cores"])), ("queries", r["queries"]),
            ("load average (1 min) at the end", str(r["load_average_1m_at_end"]))]
    w = max(len(a) for a, _ in rows)
    print("| metric | value |\n| --- | --- |")
    for a, b in rows:
        print(f"| {a:<{w}} | {b} |")
    return 0
