"""`routenlp bench router [--json] [--vllm] [--encoder-variant V]`: the router's hot path.

Measures, in one run:
- routing decision latency (`RouterState.decide` + threshold lookup: the server's own code, decision cache included)
  p50/p99 with 1 client and with 32 concurrent clients (micro-batching), decisions/s at 32 and the cache hit rate, on
  two query mixes: no repeats (every query distinct after the cache's normalisation: BANKING77 test+train) and a
  repeat mix (BANKING77 test queries drawn with replacement from `--repeat-pool`; the share that repeats is reported);
- proxy overhead, no repeats: the same chat requests sent directly to the upstream and through the router
  (interleaved, one client), latency percentiles of both and the difference; requests/s through the router with 32
  clients.
Upstream: a fast fake OpenAI-compatible server in a child process (default), or a real vLLM server with
SmolLM2-135M (`--vllm`). The router runs as `routenlp router --config` in a child process, as deployed. The router
artifact is an untrained DifficultyRouter of the production shape (latency does not depend on the weights) naming the
encoder variant measured. The report names the CPU (`lscpu` model, AVX2/AVX-512) and any ISA cap in the environment
(`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` caps torch; ONNX Runtime ignores it).
Queries: BANKING77 (the copy that ships with routenlp.local).
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


def cpu_info() -> dict:
    """`lscpu` model name and the vector ISAs the kernels can use, plus any ISA cap set in the environment (speed figures
    are meaningless without them). ONNX Runtime picks its kernels from cpuid and ignores these caps."""
    model, flags = "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"})
        for line in out.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.SubprocessError):
        pass
    return {"cpu_model": model, "avx2": "avx2" in flags, "avx512": "avx512f" in flags,
            "avx512_vnni": "avx512_vnni" in flags,
            "isa_cap": {k: os.environ[k] for k in ISA_CAP_VARS if os.environ.get(k)}}


ISA_CAP_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def _queries(n: int) -> tuple[list[str], str]:
    """n distinct queries (after the decision cache's normalisation): BANKING77 test, then train, shuffled (seed 0)."""
    from routenlp.local import banking77
    from routenlp.router.decision_cache import normalise

    texts = [e.text for e in banking77.load_split("test")] + [e.text for e in banking77.load_split("train")]
    distinct = list({normalise(t): t for t in texts}.values())
    if n > len(distinct):
        raise ValueError(f"{n} distinct queries asked, BANKING77 has {len(distinct)}: measure fewer decisions")
    random.Random(0).shuffle(distinct)
    return distinct[:n], "BANKING77 test+train, distinct after normalisation"


def repeat_mix(n: int, pool: int, seed: int = 1) -> list[str]:
    """n BANKING77 test queries drawn with replacement from the first `pool` (shuffled, seed 0)."""
    from routenlp.local import banking77

    texts = [e.text for e in banking77.load_split("test")]
    random.Random(0).shuffle(texts)
    rng = random.Random(seed)
    return [rng.choice(texts[:pool]) for _ in range(n)]


def repeat_share(queries: list[str]) -> float:
    """Share of decisions whose (task, normalised query) came earlier in the list, tasks alternating as `_decisions`
    sends them: the hit rate an unbounded cache would get."""
    from routenlp.router.decision_cache import normalise

    seen: set[tuple[str, str]] = set()
    repeats = 0
    for i, q in enumerate(queries):
        k = (TASKS[i % 2], normalise(q))
        repeats += k in seen
        seen.add(k)
    return repeats / len(queries) if queries else 0.0


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


def _write_setup(tmp: Path, upstream_url: str, model_name: str, spec):
    from routenlp.router.artifacts import Calibration, save_artifact
    from routenlp.router.conformal import ThresholdResult
    from routenlp.api.router_config import RouterConfig
    from routenlp.router.difficulty import DifficultyRouter

    import torch

    torch.manual_seed(0)
    tiers = ["small", "medium", "reference"]
    res = ThresholdResult(0.5, 1000, 600, 0.01, True)
    save_artifact(tmp / "artifacts", "bench", DifficultyRouter(tiers, TASKS),
                  calibration=Calibration(0.05, 0.1, tasks={t: {"small": res, "medium": res} for t in TASKS}),
                  encoder=spec)
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
    return path, config


# ---- decision latency (in process, the server's own code) ------------------------------------------------------------
async def _decisions(state, warm: list[str], single_q: list[str], concurrent_q: list[str]) -> dict:
    """Decision latency through `RouterState.decide` + the threshold lookups, as the server's request path runs them
    (decision cache included), with 1 client and with 32; the cache's hit rate in each phase."""
    art = state.stable
    cache = state.decisions

    async def decide(q: str, task: str) -> float:
        t0 = time.perf_counter()
        await state.decide(art, task, q)
        _ = [state.threshold(art, task, t) for t in state.tier_names]
        return time.perf_counter() - t0

    for q in warm:
        await decide(q, "intent")
    cache.clear()  # warm-up queries are never measured: they must not turn into hits
    c0 = time.process_time()
    single = [await decide(q, TASKS[i % 2]) for i, q in enumerate(single_q)]
    cpu_single = (time.process_time() - c0) / max(len(single), 1)
    hit_single = cache.hit_rate
    cache.clear()

    lat: list[float] = []
    it = iter(enumerate(concurrent_q))

    async def client():
        for i, q in it:
            lat.append(await decide(q, TASKS[i % 2]))

    batcher = state.encoders.load(art.encoder)
    b0 = batcher.batches
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(client() for _ in range(32)))
    wall = time.perf_counter() - t0
    cpu_32 = (time.process_time() - c0) / max(len(lat), 1)
    return {"decision_p50_ms": _pct(single, 50), "decision_p99_ms": _pct(single, 99),
            "decision_p50_ms_at_32": _pct(lat, 50), "decision_p99_ms_at_32": _pct(lat, 99),
            "decisions_per_s_at_32": len(lat) / wall,
            "mean_batch_at_32": cache.misses / max(batcher.batches - b0, 1),  # encoded queries per forward pass
            # CPU time per decision (all threads): what the machine's load does not change much
            "decision_cpu_ms_single": cpu_single * 1000, "decision_cpu_ms_per_query_at_32": cpu_32 * 1000,
            "cache_hit_rate_single": hit_single, "cache_hit_rate_at_32": cache.hit_rate}


async def _decision_mixes(config, distinct: list[str], n_warm: int, n_single: int, n_concurrent: int,
                          repeat_pool: int) -> dict:
    """The no-repeat mix (every query distinct) and the repeat mix (drawn with replacement), one router state."""
    from routenlp.router.encoder import configure_threads
    from routenlp.router.server import RouterState

    configure_threads()  # as `routenlp router` does
    state = RouterState(config)
    await asyncio.to_thread(state.load_versions)  # loads the encoder variant the artifact names
    try:
        warm, rest = distinct[:n_warm], distinct[n_warm:]
        out = await _decisions(state, warm, rest[:n_single], rest[n_single:n_single + n_concurrent])
        single_r, concurrent_r = repeat_mix(n_single, repeat_pool, seed=1), repeat_mix(n_concurrent, repeat_pool, seed=2)
        rep = await _decisions(state, [], single_r, concurrent_r)
        out.update({f"repeat_{k}": v for k, v in rep.items()})
        out.update({"repeat_pool": repeat_pool, "repeat_share_single": repeat_share(single_r),
                    "repeat_share_at_32": repeat_share(concurrent_r)})
        return out
    finally:
        state.encoders.close()


# ---- proxy overhead (HTTP, router in a child process) ----------------------------------------------------------------
async def _proxy(queries: list[str], direct_url: str, router_url: str, model: str, n_pairs: int, n_load: int,
                 max_tokens: int) -> dict:
    """No repeats through the router: warm-up, pairs and load each take their own slice of the distinct `queries`."""
    import aiohttp

    warm, pairs, loaded = queries[:10], queries[10:10 + n_pairs], queries[10 + n_pairs:10 + n_pairs + n_load]

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

        for q in warm:  # warm-up both paths
            await call(direct_url, body(q, model))
            await call(router_url, body(q, "intent"))
        direct, routed = [], []
        for i, q in enumerate(pairs):
            # alternate which goes first so drift and caching hit both equally
            if i % 2:
                direct.append(await call(direct_url, body(q, model)))
                routed.append(await call(router_url, body(q, "intent")))
            else:
                routed.append(await call(router_url, body(q, "intent")))
                direct.append(await call(direct_url, body(q, model)))

        async def load(url, model_name) -> float:
            it = iter(loaded)

            async def client():
                for q in it:
                    await call(url, body(q, model_name))

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(32)))
            return len(loaded) / (time.perf_counter() - t0)

        rps_direct = await load(direct_url, model)
        rps_router = await load(router_url, "intent")
        async with http.get(router_url.removesuffix("/v1") + "/metrics") as r:
            metrics = await r.text()
    diff = np.asarray(routed) - np.asarray(direct)
    return {"direct_p50_ms": _pct(direct, 50), "direct_p99_ms": _pct(direct, 99),
            "routed_p50_ms": _pct(routed, 50), "routed_p99_ms": _pct(routed, 99),
            "proxy_overhead_p50_ms": _pct(routed, 50) - _pct(direct, 50),
            "proxy_overhead_p99_ms": _pct(routed, 99) - _pct(direct, 99),
            "paired_overhead_p50_ms": _pct(diff, 50), "paired_overhead_p99_ms": _pct(diff, 99),
            "requests_per_s": rps_router, "requests_per_s_direct": rps_direct,
            "proxy_cache_hit_rate": _hit_rate(metrics)}


def _hit_rate(metrics_text: str) -> float | None:
    """The router's decision-cache hit rate from its /metrics page."""
    n = {"hits": 0.0, "misses": 0.0}
    for line in metrics_text.splitlines():
        for k in n:
            if line.startswith(f"routenlp_decision_cache_{k}_total{{"):
                n[k] += float(line.rsplit(" ", 1)[1])
    total = n["hits"] + n["misses"]
    return n["hits"] / total if total else None


def run(use_vllm: bool, n_single: int, n_concurrent: int, n_pairs: int, n_load: int, max_tokens: int,
        variant: str | None = None, repeat_pool: int = 300, progress=print) -> dict:
    from routenlp.router.encoder import EncoderSpec, default_variant, serving_spec

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = EncoderSpec(variant or default_variant())
    queries, source = _queries(max(20 + n_single + n_concurrent, 10 + n_pairs + n_load))
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
            cfg_path, config = _write_setup(tmp, upstream, model, spec)
            progress(f"measuring routing decisions ({spec.variant}; 1 and 32 clients; no-repeat and repeat mixes) ...")
            result = asyncio.run(_decision_mixes(config, queries, 20, n_single, n_concurrent, repeat_pool))
            rport = _free_port()
            env = {**os.environ, "ROUTENLP_RELOAD_SECONDS": "3600"}
            procs.append(subprocess.Popen([sys.executable, "-m", "routenlp.cli.main", "router", "--config",
                                           str(cfg_path), "--host", "127.0.0.1", "--port", str(rport), "--log-level",
                                           "WARNING"], env=env, stdout=sys.stderr))  # stdout: the report
            _wait_http(f"http://127.0.0.1:{rport}/readyz", 120, procs[-1])
            progress("measuring proxy overhead and requests/s (no repeats) ...")
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
    result.update({"encoder_variant": spec.variant, "encoder_runtime_variant": serving_spec(spec).variant,
                   "encoder_max_tokens": spec.max_tokens, **cpu_info(),
                   "tier_model": tier_model, "cores": os.cpu_count(), "queries": source,
                   "repeat_queries": f"BANKING77 test queries drawn with replacement from {repeat_pool}",
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


def _ms(r: dict, a: str, b: str) -> str:
    return f"{r[a]:.2f} / {r[b]:.2f}"


def _pct_str(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def main(argv: list[str]) -> int:
    from routenlp.router.encoder import VARIANTS, default_variant

    ap = argparse.ArgumentParser(prog="routenlp bench router", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--vllm", action="store_true", help="upstream: a real vLLM server with SmolLM2-135M")
    ap.add_argument("--encoder-variant", choices=sorted(VARIANTS), default=None,
                    help="encoder variant the bench router version names (default: what retrain uses, "
                         f"{default_variant()})")
    ap.add_argument("--decisions", type=int, default=300, help="decisions measured at 1 client")
    ap.add_argument("--decisions-32", type=int, default=1500, help="decisions measured at 32 clients")
    ap.add_argument("--repeat-pool", type=int, default=300,
                    help="repeat mix: BANKING77 test queries drawn with replacement from this many")
    ap.add_argument("--pairs", type=int, default=None, help="direct/routed request pairs (default 300, vLLM 60)")
    ap.add_argument("--load", type=int, default=None, help="requests at 32 clients (default 1000, vLLM 128)")
    ap.add_argument("--max-tokens", type=int, default=8)
    args = ap.parse_args(argv)
    pairs = args.pairs or (60 if args.vllm else 300)
    load = args.load or (128 if args.vllm else 1000)
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    r = run(args.vllm, args.decisions, args.decisions_32, pairs, load, args.max_tokens, args.encoder_variant,
            args.repeat_pool, progress=say)
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    cap = ", ".join(f"{k}={v}" for k, v in r["isa_cap"].items()) or "none"
    rows = [("CPU (lscpu) / AVX2 / AVX-512", f"{r['cpu_model']} / {'yes' if r['avx2'] else 'no'} / "
             f"{'yes' if r['avx512'] else 'no'}"), ("ISA cap (torch, oneDNN, MKL; not ONNX Runtime)", cap),
            ("encoder variant (runs as)", f"{r['encoder_variant']} ({r['encoder_runtime_variant']}), "
             f"{r['encoder_max_tokens']} tokens"),
            ("no repeats: decision p50 / p99, 1 client (ms)", _ms(r, "decision_p50_ms", "decision_p99_ms")),
            ("no repeats: decision p50 / p99, 32 clients (ms)", _ms(r, "decision_p50_ms_at_32", "decision_p99_ms_at_32")),
            ("no repeats: decisions/s at 32 clients", f"{r['decisions_per_s_at_32']:.0f} "
             f"(mean batch {r['mean_batch_at_32']:.1f}; cache hits {_pct_str(r['cache_hit_rate_at_32'])})"),
            ("no repeats: CPU ms per decision, 1 client / 32 clients",
             _ms(r, "decision_cpu_ms_single", "decision_cpu_ms_per_query_at_32")),
            (f"repeat mix ({_pct_str(r['repeat_share_single'])} / {_pct_str(r['repeat_share_at_32'])} repeats): "
             "decision p50 / p99, 1 client (ms)", _ms(r, "repeat_decision_p50_ms", "repeat_decision_p99_ms")),
            ("repeat mix: decisions/s at 32 clients; cache hit rate 1 / 32 clients",
             f"{r['repeat_decisions_per_s_at_32']:.0f}; {_pct_str(r['repeat_cache_hit_rate_single'])} / "
             f"{_pct_str(r['repeat_cache_hit_rate_at_32'])}"),
            ("direct p50 / p99 (ms)", _ms(r, "direct_p50_ms", "direct_p99_ms")),
            ("through router p50 / p99 (ms)", _ms(r, "routed_p50_ms", "routed_p99_ms")),
            ("proxy overhead p50 / p99, no repeats (ms)", _ms(r, "proxy_overhead_p50_ms", "proxy_overhead_p99_ms")),
            ("requests/s at 32 clients, router / direct", f"{r['requests_per_s']:.0f} / {r['requests_per_s_direct']:.0f}"),
            ("upstream", r["tier_model"]), ("cores", str(r["cores"])), ("queries", r["queries"]),
            ("repeat queries", r["repeat_queries"]),
            ("load average (1 min) at the end", str(r["load_average_1m_at_end"]))]
    w = max(len(a) for a, _ in rows)
    print("| metric | value |\n| --- | --- |")
    for a, b in rows:
        print(f"| {a:<{w}} | {b} |")
    return 0
