"""The router: an OpenAI-compatible gateway doing difficulty-aware routing and conformal cascading.

`routenlp router --config FILE [--host H] [--port P]`. Endpoints: POST /v1/chat/completions, /v1/completions
(streaming SSE too), GET /v1/models, /healthz, /readyz, /metrics, /routenlp/rollout (per-version figures the
operator reads: see rollout.py), POST /v1/feedback.

Request path: validate -> task -> decision (encode + heads + start rule) -> cascade over tiers (logprob confidence,
conformal thresholds, escalation, open circuits skipped) -> response with x-routenlp-* headers -> routing event to the
event log (off the hot path). Labels (feedback, shadow calls to the reference tier, and comparisons with the reference
after escalation) feed online recalibration every cascade.recalibrationInterval.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import math
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from routenlp.api.common import parse_duration
from routenlp.api.router_config import RouterConfig
from routenlp.api.routingpolicy import RiskMeasure

from . import cascade
from .artifacts import Calibration, RouterArtifact, latest_version, load_artifact
from .auth import FeedbackGate, KeyDir, auth_middleware, caller_of
from .clients import TierClient, UpstreamError, UpstreamResult
from .conformal import ThresholdResult, calibrate_threshold
from .confidence import ConfidenceSet
from .decision_cache import DecisionCache
from .encoder import EncoderPool, EncoderSpec, shared_encoder_for
from .engine import (CascadeEngine, Observer, Outcome, Plan, certified, classify, make_plan, redacted_message,
                     tier_body, tier_path)
from .eventlog import EventLogWriter, labelled_attempts, read_events
from .events import (JUDGE, LABELLER, FeedbackEvent, LabelSource, RoutingEvent, RoutingOutcome, TierAttempt,
                     label_acceptable, random_sample_label)
from .figures import RolloutFigures
from .figures_store import ADOPT_SECONDS, SAVE_SECONDS, FiguresStore
from .metrics import RouterMetrics
from .openai_api import (ApiError, ParsedRequest, answer_text, parse_chat, parse_completion, parse_json_body,
                         resolve_task, sse_events, stream_delta_text, structured_agree, usage)
from .window import AttemptLabels, LabelWindow

log = logging.getLogger("routenlp.router")

MAX_BODY_BYTES = 1 << 20
BODY_READ_SECONDS = 30.0  # the whole request body must arrive within this
BODY_ENCODINGS = ("identity", "gzip", "deflate")  # Content-Encodings aiohttp decodes
RELOAD_SECONDS = float(os.environ.get("ROUTENLP_RELOAD_SECONDS", "2"))
GENERATION_AGREEMENT = 0.85  # cosine similarity of answer embeddings that counts as agreeing with the reference
RECENT_REQUESTS = 20_000  # request id -> event kept in memory for feedback and shadow labels
WARM_SEGMENTS = 16  # event-log segments read at start-up to refill the calibration window
BOOTSTRAP_VERSION = "none"  # served before any router artifact exists

def shared_encoder(path: str | None):
    """One fp32 torch MiniLM per folder per process (loading takes seconds)."""
    return shared_encoder_for(EncoderSpec(), path)


def _is_structured(task) -> bool:
    return str(getattr(task.kind, "value", task.kind)) == "structured"


class RouterState:
    """Everything one router process holds: config, artifacts (stable + canary), thresholds, clients, metrics."""

    def __init__(self, config: RouterConfig, config_path: str | None = None, encoder=None):
        self.config = config
        self.config_path = config_path
        self._config_mtime = os.path.getmtime(config_path) if config_path else None
        self.metrics = RouterMetrics()
        self.figures = RolloutFigures(risk_measure=RiskMeasure(config.cascade.risk_measure).value)
        self.figures_store = FiguresStore(config.event_log_dir)  # the figures outlive this process
        self.tier_names = [t.name for t in config.tiers]
        self.K = len(self.tier_names)
        self.tasks = {t.name: t for t in config.tasks}
        self.clients = [TierClient(t) for t in config.tiers]
        self.engine = CascadeEngine(config.tiers, self.clients)
        self.rng = random.Random()  # the exploration sample (seeded from the OS: clients cannot predict it)
        self.encoder = encoder
        self.batcher = None  # embeds answers for generation agreement (fp32 MiniLM, whatever the versions use)
        self.encoders = EncoderPool(config.encoder_path, encoder)  # each version's queries in its own encoder space
        self.decisions = DecisionCache(counters=(self.metrics.decision_cache_hits.labels(config.policy),
                                                 self.metrics.decision_cache_misses.labels(config.policy)))
        self.events: EventLogWriter | None = None
        self.stable: RouterArtifact | None = None
        self.canary: RouterArtifact | None = None
        # Online calibration of the stable version: (task, tier) -> window of (score, acceptable) over random-sample
        # labels, and of acceptable over labels of accepted answers (one label per attempt: see window.py).
        self.window: dict[tuple[str, str], LabelWindow[tuple[float, bool]]] = {}
        self.violations: dict[tuple[str, str], LabelWindow[bool]] = {}
        self.attempt_labels = AttemptLabels(RECENT_REQUESTS * self.K)  # the label in force per attempt (precedence)
        self.online: dict[tuple[str, str], ThresholdResult] = {}
        auth = config.auth
        self.labellers = KeyDir(auth.labellers_dir) if auth.labellers_dir else None
        self.client_keys = KeyDir(auth.client_keys_dir) if auth.client_keys_dir else None
        self.feedback_gate = FeedbackGate()
        self.recent: collections.OrderedDict[str, RoutingEvent] = collections.OrderedDict()
        self.prefer_cheaper = False  # the operator's budget switch (config.state_path), re-read in the background
        self._state_text: str | None = None
        self.ready = False
        self.background: list[asyncio.Task] = []

    # ---- artifacts and thresholds -------------------------------------------------------------------------------
    def load_versions(self) -> None:
        """(Re)load the stable and canary versions named by the config (stable None = newest)."""
        rv = self.config.router
        stable_name = rv.current or latest_version(rv.artifact_dir)
        if stable_name is None and self.stable is None:
            # No trained router yet: no priors (start at the cheapest tier), fallback confidence, no thresholds
            # until online calibration certifies some (conservative escalation, routenlp_calibrated 0).
            self.stable = RouterArtifact(BOOTSTRAP_VERSION, None, ConfidenceSet(), None, {})
        if stable_name and (self.stable is None or self.stable.version != stable_name):
            new = load_artifact(rv.artifact_dir, stable_name)
            self.encoders.load(new.encoder)  # its encoder is ready before the version serves
            if self.stable is not None:
                self.window.clear()  # labels were scored by the old version's confidence models
                self.online.clear()
            self.stable = new
            log.info("router version %s loaded (stable)", stable_name)
        canary_name = rv.canary if rv.canary_percent > 0 else None
        if canary_name != (self.canary.version if self.canary else None):
            canary = load_artifact(rv.artifact_dir, canary_name) if canary_name else None
            if canary is not None:
                self.encoders.load(canary.encoder)
            self.canary = canary
        self.figures.set_versions(self.stable.version if self.stable else None,
                                  self.canary.version if self.canary else None)
        self.figures.chains = {a.version: {t: self.chain_names(a, t) for t in self.tasks}
                               for a in (self.stable, self.canary) if a is not None}
        self.metrics.version_info.clear()
        if self.stable:
            self.metrics.version_info.labels(self.config.policy, self.stable.version, "stable").set(1)
        if self.canary:
            self.metrics.version_info.labels(self.config.policy, self.canary.version, "canary").set(1)
        self.publish_thresholds()

    def artifact_for(self, request_id: str) -> RouterArtifact | None:
        rv = self.config.router
        if self.canary is not None and cascade.canary_bucket(request_id) < rv.canary_percent:
            return self.canary
        return self.stable

    def threshold(self, art: RouterArtifact | None, task: str, tier: str) -> ThresholdResult | None:
        """Threshold in force: online recalibration (stable version) wins over the artifact's calibration, which is
        used only if calibrated for the policy's risk measure at a risk level no higher than the policy's, on the
        chain in force for the task (thresholds fitted on another chain saw other requests) and, for a task under a
        quality floor, certified for that floor."""
        if art is not None and art is self.stable and (task, tier) in self.online:
            return self.online[(task, tier)]
        cal: Calibration | None = art.calibration if art is not None else None
        c = self.config.cascade
        if (cal is None or cal.risk_level > c.risk_level or cal.delta > c.delta
                or cal.risk_measure != RiskMeasure(c.risk_measure).value):
            return None
        if self.chain_names(art, task) != _calibrated_chain(art, task, self.tier_names):
            return None
        if self.floor(task) is not None and not self.floor_certified(art, task):
            return None
        return cal.get(task, tier)

    def floor(self, task: str) -> tuple[str, float] | None:
        """The quality floor a task is under: ("task", its qualityFloor), else ("policy", cascade.qualityFloor)."""
        own, policy = self.tasks[task].quality_floor, self.config.cascade.quality_floor
        if own is not None:
            return "task", own
        return ("policy", policy) if policy is not None else None

    def floor_certified(self, art: RouterArtifact | None, task: str) -> bool:
        """The artifact's thresholds for the task were certified for the floor in force, at the same scope (metadata
        `floor_certificates`, written by the trainer's certify_floor_levels)."""
        meta = art.metadata if art is not None else {}
        cert = meta.get("floor_certificates", {}).get(task) or {}
        return (cert.get("scope"), cert.get("floor")) == self.floor(task)

    def chain_names(self, art: RouterArtifact | None, task: str) -> list[str]:
        """The task's chain: pinned in the RoutingPolicy (`tasks[].chain`), else learnt by the trainer (the
        artifact's `chains`), else every tier."""
        pinned = self.tasks[task].chain
        return list(pinned) if pinned else _calibrated_chain(art, task, self.tier_names)

    def chain(self, art: RouterArtifact | None, task: str) -> list[bool] | None:
        """The task's chain as a mask over the portfolio (None: every tier)."""
        names = self.chain_names(art, task)
        return None if names == self.tier_names else [t in names for t in self.tier_names]

    def publish_thresholds(self) -> None:
        p = self.config.policy
        for task in self.tasks:
            self.metrics.risk_level.labels(p, task).set(self.config.cascade.risk_level)
            for tier in self.tier_names[:-1]:
                value = certified(self.threshold(self.stable, task, tier))
                self.metrics.calibrated.labels(p, task, tier).set(0 if value is None else 1)
                self.metrics.threshold.labels(p, task, tier).set(math.nan if value is None else value)
                w = self.window.get((task, tier))
                self.metrics.labels.labels(p, task, tier).set(len(w) if w else 0)
                rate = self.observed_risk(task, tier, value)
                if rate is not None:
                    self.metrics.violation_rate.labels(p, task, tier).set(rate)

    def observed_risk(self, task: str, tier: str, threshold: float | None) -> float | None:
        """The policy's risk measure on labelled traffic (None: no labels yet). `acceptedAnswers`: the unacceptable
        share of labelled accepted answers. `allRequests`: on the random-sample labels of the calibration window
        (requests that reached the tier), the share the threshold in force accepts and that are unacceptable."""
        if RiskMeasure(self.config.cascade.risk_measure) == RiskMeasure.ALL_REQUESTS:
            w = self.window.get((task, tier))
            if not w:
                return None
            return sum(1 for s, ok in w if threshold is not None and s >= threshold and not ok) / len(w)
        v = self.violations.get((task, tier))
        return 1 - sum(v) / len(v) if v else None

    def add_label(self, event: RoutingEvent, tier: str, acceptable: bool, trust: int = JUDGE) -> bool:
        """Record a label for one attempt (online calibration of the stable version, violation gauge, rollout
        figures) if it takes the place of the attempt's label in force under the precedence shared with the trainer
        (`events.resolve_label`; `trust`: events.JUDGE for the router's own labels, LABELLER for an authenticated
        labeller's). Returns whether it was taken."""
        att = next((a for a in event.attempts if a.tier == tier), None)
        if att is None:
            return False
        taken, conflict = self.attempt_labels.offer(event.request_id, tier, trust, acceptable)
        if conflict:
            self.metrics.label_conflicts.labels(self.config.policy, "replaced" if taken else "kept").inc()
        if not taken:
            return False
        # Only labels that are a random sample of the attempts reaching the tier keep the calibration unbiased.
        sampled = att.score is not None and random_sample_label(event, att)
        if tier != self.tier_names[-1]:
            self.figures.label(event.router_version, acceptable, att.accepted, sampled,  # canary labels count too
                              attempt=(event.request_id, tier))
        if self.stable is None or event.router_version != self.stable.version:
            return True
        key, size = (event.task, tier), self.config.cascade.calibration_window
        if att.accepted:
            self.violations.setdefault(key, LabelWindow(size)).put(event.request_id, acceptable)
        if sampled and att.score is not None:  # random_sample_label holds only scored attempts
            self.window.setdefault(key, LabelWindow(size)).put(event.request_id, (att.score, acceptable))
        return True

    def label_snapshot(self) -> dict[tuple[str, str], list]:
        """Copy of the calibration windows (taken on the event loop, which is the only writer)."""
        return {k: list(w) for k, w in list(self.window.items())}

    def recalibrate(self, snapshot: dict[tuple[str, str], list] | None = None) -> None:
        """Recompute the stable version's thresholds from the labelled window (enough labels only)."""
        c = self.config.cascade
        for (task, tier), w in (self.label_snapshot() if snapshot is None else snapshot).items():
            # A floor certifies the task's whole cascade against the reference (one level for every cheaper tier, on
            # requests labelled at every tier): per-tier windows cannot recertify it; the trainer does.
            if tier == self.tier_names[-1] or len(w) < c.min_calibration_samples or self.floor(task) is not None:
                continue
            s, y = np.array([x[0] for x in w]), np.array([x[1] for x in w], dtype=float)
            measure = RiskMeasure(c.risk_measure).value
            # allRequests' risk only grows as the threshold falls, so the fixed grid walked from strict to loose is a
            # valid fixed sequence with no training data; acceptedAnswers' is not monotone there: Holm over the grid.
            fwer = "fixed_sequence" if measure == RiskMeasure.ALL_REQUESTS.value else "holm"
            self.online[(task, tier)] = calibrate_threshold(s, y, c.risk_level, c.delta, c.min_calibration_samples,
                                                            fwer=fwer, risk_measure=measure)
        self.publish_thresholds()
        self.metrics.recalibrations.labels(self.config.policy).inc()

    def warm_from_log(self) -> int:
        """Refill the calibration window from labels already in the event log (e.g. after a restart), under the
        same precedence as online labels: untrusted labels (old unauthenticated feedback included) stay out."""
        if self.stable is None:
            return 0
        # The newest segments only: a long-lived log can be far larger than the window needs.
        segments = sorted(Path(self.config.event_log_dir).glob("events-*.jsonl"))[-WARM_SEGMENTS:]
        evs = list(read_events(self.config.event_log_dir, since_segment=segments[0].name)) if segments else []
        by_id = {e.request_id: e for e in evs if isinstance(e, RoutingEvent)}
        n = 0
        for la in labelled_attempts(evs):
            ev = by_id.get(la.request_id)
            if ev is not None:
                n += self.add_label(ev, la.tier, la.acceptable, la.trust)
        return n

    def remember(self, event: RoutingEvent) -> None:
        self.recent[event.request_id] = event
        while len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)

    def log_event(self, event) -> None:
        if self.events is not None and not self.events.submit(event):
            pass  # counted by the writer's on_drop callback

    # ---- decision -----------------------------------------------------------------------------------------------
    async def decide(self, art: RouterArtifact | None, task: str, query: str) -> np.ndarray | None:
        """Predicted acceptance per tier (None without a router for this task); the start tier follows from it
        and the task's chain in `engine.make_plan`."""
        router = art.router if art is not None else None
        if art is None or router is None or router.task_index(task) is None:
            return None
        key = self.decisions.key(art.version, task, query)
        probs = self.decisions.get(key)
        if probs is None:
            # Embedded by the encoder variant the version's heads and thresholds were fitted on (artifacts.py).
            vec = await self.encoders.load(art.encoder).encode(query)
            probs = router.predict_proba(vec[None, :], np.array([router.task_index(task)]))[0]
            if router.tier_names != self.tier_names:
                idx = [router.tier_names.index(t) if t in router.tier_names else -1 for t in self.tier_names]
                if min(idx) < 0:
                    return None
                probs = probs[idx]
            self.decisions.put(key, probs)
        return probs

    def load_state(self) -> None:
        """Apply the operator's live switches from `config.state_path` (absent or unreadable: the defaults)."""
        path = self.config.state_path
        try:
            text = Path(path).read_text() if path else ""
        except OSError:
            text = ""
        if text == self._state_text:
            return
        self._state_text = text
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            log.warning("router state %s is not YAML; keeping the defaults", path)
            doc = {}
        cheaper = bool(doc.get("preferCheaper", False)) if isinstance(doc, dict) else False
        if cheaper != self.prefer_cheaper:
            log.info("preferCheaper %s (budget)", "on: every request starts at the cheapest tier" if cheaper else "off")
        self.prefer_cheaper = cheaper
        self.metrics.prefer_cheaper.labels(self.config.policy).set(1 if cheaper else 0)

    async def persist_figures(self, adopt: bool = False, released: bool = False, restore: bool = False) -> None:
        """Write the rollout counters to the event-log volume (figures_store.py), first adding those of this pod's
        previous container (`restore`, at start-up) and of routers that are gone (`adopt`). File work runs off the
        event loop; counting stays on it."""
        store, fig = self.figures_store, self.figures
        try:
            own = await asyncio.to_thread(store.take_own) if restore else None
            if own is not None:
                fig.absorb(own)
            if adopt:
                for snap in await asyncio.to_thread(store.take_orphans):
                    fig.absorb(snap)
            gone = await asyncio.to_thread(store.adopted_meanwhile)
            if gone is not None:
                fig.absorb(gone, sign=-1)
            await asyncio.to_thread(store.write, fig.snapshot(), released)
        except OSError as e:  # a full or read-only volume must not take the router down; the figures stay in memory
            log.warning("rollout figures not persisted: %s", e)

    def tiers_up(self) -> list[bool]:
        up = self.engine.tiers_up()
        for name, u in zip(self.tier_names, up):
            self.metrics.tier_up.labels(self.config.policy, name).set(1 if u else 0)
        return up

    def retry_after(self) -> int:
        return max(1, math.ceil(min(c.breaker.retry_after() for c in self.clients)))


STATE = web.AppKey("routenlp_state", RouterState)


def _calibrated_chain(art: RouterArtifact | None, task: str, tier_names: list[str]) -> list[str]:
    """The chain the artifact's router and thresholds were fitted on for `task` (metadata `chains`; every tier for
    artifacts without chains, or whose chain names a tier this portfolio does not have)."""
    names = (art.metadata.get("chains") or {}).get(task) if art is not None else None
    if not names or any(n not in tier_names for n in names):
        return list(tier_names)
    return [t for t in tier_names if t in names]


# ---- HTTP ---------------------------------------------------------------------------------------------------------
def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> web.Response:
    return web.json_response(ApiError(status, message, param).body(), status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    except web.HTTPException as e:
        if e.status >= 400:
            return _error(e.status, e.reason or "error")
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error(500, "internal router error")


async def _read_json(request: web.Request):
    """The request body as JSON (`openai_api.parse_json_body`); 4xx for what a client got wrong: too large (413),
    an encoding aiohttp does not decode (415) or a body it cannot decode (400), sent too slowly (408)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in BODY_ENCODINGS:  # aiohttp passes other encodings through undecoded
        raise ApiError(415, f"Content-Encoding {encoding!r} is not supported; send {', '.join(BODY_ENCODINGS)}")
    try:
        async with asyncio.timeout(BODY_READ_SECONDS):  # a slow upload must not hold a connection forever
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes") from None
    except web.RequestPayloadError:
        raise ApiError(400, f"request body could not be decoded (Content-Encoding {encoding})") from None
    except TimeoutError:
        raise ApiError(408, f"request body not received within {BODY_READ_SECONDS:g} s") from None
    return parse_json_body(raw)


def _strip_logprobs(body: dict) -> dict:
    body = dict(body)
    body["choices"] = [{k: v for k, v in c.items() if k != "logprobs"} | {"logprobs": None}
                       for c in body.get("choices", []) if isinstance(c, dict)]
    return body


class ServerObserver(Observer):
    """The engine's side effects in one router: Prometheus metrics and the version's rollout figures."""

    def __init__(self, state: "RouterState", version: str | None):
        self.s, self.version = state, version

    def tier_latency(self, tier: str, seconds: float) -> None:
        self.s.metrics.tier_seconds.labels(self.s.config.policy, tier).observe(seconds)

    def tier_error(self, tier: str) -> None:
        self.s.metrics.upstream_errors.labels(self.s.config.policy, tier).inc()

    def spent(self, task: str, tier: str, usd: float) -> None:
        self.s.metrics.cost.labels(self.s.config.policy, task, tier).inc(usd)
        self.s.figures.spent(self.version, usd)

    def escalated(self, task: str, from_tier: str, to_tier: str) -> None:
        self.s.metrics.escalations.labels(self.s.config.policy, task, from_tier, to_tier).inc()


def _client_fault(result: UpstreamResult, tier: str) -> web.Response:
    """The chain end said the request is invalid: a 4xx with the provider's message redacted, never its body."""
    msg = redacted_message(result)
    text = f"the {tier} tier rejected the request (HTTP {result.status})" + (f": {msg}" if msg else "")
    return _error(result.status, text)


@dataclass
class Routing:
    """One request on its way through the router: what every step of the handler needs."""

    http: web.Request
    req: ParsedRequest
    task: str
    request_id: str
    art: RouterArtifact | None
    client: str | None  # the authenticated client's name (client keys), recorded in the routing event
    arrived: float = field(default_factory=time.time)  # unix time
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def version(self) -> str | None:
        return self.art.version if self.art else None

    @property
    def confidence(self) -> ConfidenceSet:
        return self.art.confidence if self.art else ConfidenceSet()


class Handlers:
    def __init__(self, state: RouterState):
        self.s = state

    async def completion(self, request: web.Request, kind: str) -> web.StreamResponse:
        s, cfg = self.s, self.s.config
        t_start, arrived = time.perf_counter(), time.time()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex  # shape checked by the middleware
        raw = await _read_json(request)
        req = parse_chat(raw) if kind == "chat" else parse_completion(raw)
        task = resolve_task(cfg, request.headers.get("x-routenlp-task"), req.metadata_task, req.body.get("model"),
                            request.path, req.query)
        r = Routing(request, req, task, request_id, s.artifact_for(request_id), caller_of(request).client, arrived,
                    t_start)
        deadline = s.engine.clock() + parse_duration(cfg.cascade.request_deadline)

        t_dec = time.perf_counter()
        prior = await s.decide(r.art, task, req.query)
        thresholds = [s.threshold(r.art, task, t) for t in s.tier_names]
        s.metrics.decision_seconds.labels(cfg.policy).observe(time.perf_counter() - t_dec)
        # The exploration sample is drawn here, by the router, never from a value the client chooses (a chosen
        # request id would let a client pick which requests count as a random sample). Explored requests try
        # uncertified tiers and tiers off the task's chain, to collect the random labels recalibration needs.
        explore = s.rng.random() < cfg.shadow_sample_rate
        plan = make_plan(prior, s.tasks[task].quality_target, thresholds, s.tiers_up(), cfg.cascade.max_escalations,
                         explore, s.chain(r.art, task), cheapest_first=s.prefer_cheaper)
        if not plan.tiers:
            return _error(503, "every tier is unavailable; retry later", headers={"Retry-After": str(s.retry_after())})
        if req.stream and len(plan.tiers) == 1:
            return await self._passthrough_stream(r, plan, deadline)
        out = await s.engine.run(req, task, _is_structured(s.tasks[task]), plan, r.confidence, deadline,
                                 ServerObserver(s, r.version))
        return await self._respond(r, plan, out)

    async def _respond(self, r: Routing, plan: Plan, out: Outcome) -> web.StreamResponse:
        """Record the request and answer the client (JSON, or the answer re-framed as SSE)."""
        s, cfg = self.s, self.s.config
        if out.client_fault is not None:
            return _client_fault(out.client_fault, s.tier_names[plan.end])
        if out.body is None:
            self._record(r, out.attempts, None, "error", False, plan.explore)
            if out.deadline_exceeded:
                return _error(504, "no tier answered within the policy's requestDeadline")
            return _error(503, "no tier could answer; retry later", headers={"Retry-After": str(s.retry_after())})
        assert out.final is not None  # a body came from some tier
        final_tier = s.tier_names[out.final]
        # An explored request that reached the reference is judged below; one answered cheaper gets a shadow call.
        shadow = final_tier != s.tier_names[-1] and plan.explore
        event = self._record(r, out.attempts, final_tier, out.outcome, shadow, plan.explore)
        s.metrics.requests.labels(cfg.policy, r.task, final_tier, out.outcome).inc()
        last = out.attempts[-1]
        ref_cost = cfg.tiers[-1].cost.usd(last.input_tokens, last.output_tokens)
        s.metrics.reference_cost.labels(cfg.policy, r.task).inc(ref_cost)
        first_ok = len(out.attempts) == 1 and out.outcome == "accepted" and final_tier != s.tier_names[-1]
        s.figures.answered(r.version, first_ok, out.escalations > 0, ref_cost)
        reference = s.tier_names[-1]
        if reference in out.answers and len(out.answers) > 1:
            asyncio.get_running_loop().create_task(self._judge(event, out.answers[reference] or "", "judge"))
        if shadow:
            asyncio.get_running_loop().create_task(self._shadow(event, r.req))

        headers = {**self._headers(final_tier, out.escalations, out.score, r.version), "x-request-id": r.request_id}
        body = out.body if r.req.wants_logprobs else _strip_logprobs(out.body)
        if not r.req.stream:
            return web.json_response(body, headers=headers)
        resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(r.http)
        for chunk in sse_events(r.req.kind, body, r.request_id):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    def _headers(self, tier: str, escalations: int, score: float | None, version: str | None) -> dict:
        return {"x-routenlp-tier": tier, "x-routenlp-escalations": str(escalations),
                "x-routenlp-confidence": "" if score is None else f"{score:.4f}",
                "x-routenlp-router-version": version or "none"}

    def _record(self, r: Routing, attempts: list[TierAttempt], final_tier: str | None, outcome: RoutingOutcome,
                shadow: bool, explored: bool = False) -> RoutingEvent:
        s = self.s
        latency = time.perf_counter() - r.t_start
        s.metrics.request_seconds.labels(s.config.policy).observe(latency)
        event = RoutingEvent(request_id=r.request_id, time=r.arrived, policy=s.config.policy, task=r.task,
                             query=r.req.query, router_version=r.version, attempts=attempts, final_tier=final_tier,
                             escalations=max(len(attempts) - 1, 0), outcome=outcome,
                             cost_usd=sum(a.cost_usd for a in attempts), latency_ms=latency * 1000, shadow=shadow,
                             explored=explored, client=r.client)
        s.remember(event)
        s.log_event(event)
        return event

    async def _agree(self, task: str, answer: str | None, reference: str) -> bool:
        spec = self.s.tasks[task]
        if answer is None:
            return False
        if _is_structured(spec):
            return structured_agree(answer, reference, spec.labels)
        batcher = self.s.batcher
        assert batcher is not None  # set at start-up, before any request
        a, b = await asyncio.gather(batcher.encode(answer), batcher.encode(reference))
        return float(np.dot(a, b)) >= GENERATION_AGREEMENT

    async def _judge(self, event: RoutingEvent, reference: str, source: LabelSource) -> None:
        """Label each cheaper attempt of `event` by agreement with the reference tier's answer."""
        s = self.s
        try:
            for att in event.attempts:
                if att.tier == s.tier_names[-1] or att.error is not None:
                    continue
                ok = await self._agree(event.task, att.response, reference)
                s.log_event(FeedbackEvent(request_id=event.request_id, time=time.time(), tier=att.tier, accepted=ok,
                                          source=source, reference_response=reference if source == "shadow" else None))
                if s.add_label(event, att.tier, ok):  # a labeller's label of this attempt outranks the judge's
                    s.metrics.feedback.labels(s.config.policy, event.task, att.tier, str(ok).lower()).inc()
        except Exception:  # labels are best effort; never disturb serving
            log.exception("labelling request %s failed", event.request_id)

    async def _shadow(self, event: RoutingEvent, req: ParsedRequest) -> None:
        """Ask the reference tier too (after answering) and label the attempts by agreement with it."""
        s = self.s
        ref = s.config.tiers[-1]
        client = s.clients[-1]
        if not client.breaker.allow():
            return
        try:
            res = await client.post(tier_path(req.kind), tier_body(req, ref.served_model_name))
        except UpstreamError:
            return
        if classify(res, is_end=True) != "answer":
            return
        client.breaker.success()
        in_tok, out_tok = usage(res.body)
        s.metrics.cost.labels(s.config.policy, event.task, ref.name).inc(ref.cost.usd(in_tok, out_tok))
        s.figures.spent(event.router_version, ref.cost.usd(in_tok, out_tok))
        await self._judge(event, answer_text(req.kind, res.body) or "", "shadow")

    async def _passthrough_stream(self, r: Routing, plan: Plan, deadline: float) -> web.StreamResponse:
        """One tier in the plan: stream its answer through as it is generated. A tier that fails before the first
        byte falls back to the engine (the answer then comes re-framed as SSE); one that fails mid-stream ends the
        stream with an OpenAI-style error event."""
        s, k, req = self.s, plan.tiers[0], r.req
        tier, client = s.config.tiers[k], s.clients[k]
        observer = ServerObserver(s, r.version)
        prior = None if plan.prior is None else float(plan.prior[k])
        attempt = TierAttempt(tier=tier.name, model=tier.served_model_name, predicted=prior)
        upstream = None
        try:
            upstream = await client.open_stream(tier_path(req.kind), tier_body(req, tier.served_model_name, True),
                                                timeout=max(deadline - s.engine.clock(), 0.001))
        except UpstreamError as e:
            observer.tier_error(tier.name)
            attempt.error = str(e)
        if upstream is not None and upstream.status >= 300:
            res = UpstreamResult.read(upstream.status, await upstream.text(), upstream.headers.get("Retry-After"), 0.0)
            upstream.release()
            if classify(res, is_end=k == plan.end) == "client_fault":
                return _client_fault(res, tier.name)
            s.engine.book_fault(k, res)
            observer.tier_error(tier.name)
            attempt.error, upstream = f"HTTP {res.status}", None
        if upstream is None:  # nothing streamed yet: the rest of the portfolio answers through the engine
            fallback = Plan(plan.prior, plan.start, s.engine.fallback_tiers({k}), plan.thresholds, plan.end,
                            plan.explore)
            out = await s.engine.run(req, r.task, _is_structured(s.tasks[r.task]), fallback, r.confidence, deadline,
                                     observer)
            out.attempts.insert(0, attempt)
            return await self._respond(r, plan, out)
        headers = self._headers(tier.name, 0, None, r.version)
        headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-request-id": r.request_id})
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(r.http)
        parts = []
        try:
            async for line in client.stream_lines(upstream):
                parts.append(stream_delta_text(req.kind, line))
                await resp.write(line)
            client.breaker.success()
        except UpstreamError as e:
            observer.tier_error(tier.name)
            attempt.error = str(e)
            err = ApiError(502, "the tier stopped answering mid-stream; retry the request").body()
            err["error"]["type"] = "upstream_error"
            await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
        finally:
            upstream.release()
        await resp.write_eof()
        latency = time.perf_counter() - r.t_start
        observer.tier_latency(tier.name, latency)
        attempt.response, attempt.latency_ms = "".join(parts), latency * 1000
        attempt.accepted = attempt.error is None and k == plan.end
        if attempt.error is None:
            s.metrics.requests.labels(s.config.policy, r.task, tier.name, "accepted").inc()
            s.figures.answered(r.version, False, False, 0.0)  # streamed through: no confidence score, no usage
        outcome: RoutingOutcome = "error" if attempt.error else ("accepted" if k == plan.end else "fallback")
        self._record(r, [attempt], None if attempt.error else tier.name, outcome, False, plan.explore)
        return resp

    async def chat(self, request):
        return await self.completion(request, "chat")

    async def completions(self, request):
        return await self.completion(request, "completions")

    async def models(self, request):
        s = self.s
        data = [{"id": t.name, "object": "model", "owned_by": "routenlp", "routenlp_task": True} for t in s.config.tasks]
        data += [{"id": t.name, "object": "model", "owned_by": "routenlp", "routenlp_tier": True} for t in s.config.tiers]
        return web.json_response({"object": "list", "data": data})

    async def healthz(self, request):
        return web.json_response({"status": "ok"})

    async def readyz(self, request):
        s = self.s
        up = s.tiers_up()
        # A router that cannot write its event log loses labels and the trainer's data: out of rotation until it can.
        log_ok = s.events is not None and s.events.healthy
        ok = s.ready and any(up) and log_ok
        body = {"ready": ok, "encoder": s.batcher is not None, "router_version": s.stable.version if s.stable else None,
                "tiers_up": dict(zip(s.tier_names, up)),
                "event_log": "ok" if log_ok else (s.events.failing if s.events else None) or "not running"}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(self, request):
        self.s.tiers_up()
        return web.Response(body=generate_latest(self.s.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def rollout(self, request):
        """Per-version figures since each version was first served (see rollout.py): the operator's input."""
        return web.json_response(self.s.figures.answer())

    async def feedback(self, request):
        """Attach a label to an answered request: {"request_id", "accepted": bool | "score": 0..1, "tier"?}. Every
        label is logged (the trainer joins it under the shared precedence); only an authenticated labeller's label of
        a request this router remembers moves its thresholds now (auth.py, events.resolve_label)."""
        s, policy = self.s, self.s.config.policy
        caller = caller_of(request)
        try:
            s.feedback_gate.admit_client(caller)
        except ApiError:
            s.metrics.feedback_refused.labels(policy, "rate_limited").inc()
            raise
        raw = await _read_json(request)
        if not isinstance(raw, dict):
            raise ApiError(400, "request body must be a JSON object")
        rid = raw.get("request_id")
        if not isinstance(rid, str) or not rid or len(rid) > 200:
            raise ApiError(400, "'request_id' must be a non-empty string", "request_id")
        accepted, score, tier = raw.get("accepted"), raw.get("score"), raw.get("tier")
        if accepted is not None and not isinstance(accepted, bool):
            raise ApiError(400, "'accepted' must be a boolean", "accepted")
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1):
            raise ApiError(400, "'score' must be a number in [0, 1]", "score")
        if accepted is None and score is None:
            raise ApiError(400, "give 'accepted' (boolean) or 'score' (0..1)", "accepted")
        if tier is not None and (not isinstance(tier, str) or tier not in s.tier_names):
            raise ApiError(400, f"'tier' must be one of {', '.join(s.tier_names)}", "tier")
        try:
            s.feedback_gate.admit_request_id(rid, caller)
        except ApiError:
            s.metrics.feedback_refused.labels(policy, "request_cap").inc()
            raise
        fb = FeedbackEvent(request_id=rid, time=time.time(), tier=tier, accepted=accepted,
                           score=None if score is None else float(score), source="user", labeller=caller.labeller,
                           client=caller.client)
        s.log_event(fb)
        event = s.recent.get(rid)
        if caller.labeller is None:
            s.metrics.feedback_not_applied.labels(policy, "unauthenticated").inc()
        elif event is None:
            s.metrics.feedback_not_applied.labels(policy, "unknown_request").inc()
        else:
            t, ok = tier or event.final_tier, label_acceptable(fb)
            if t and s.add_label(event, t, ok, LABELLER):
                s.metrics.feedback.labels(policy, event.task, t, str(ok).lower()).inc()
        return web.json_response({"status": "recorded", "known_request": event is not None,
                                  "trusted": caller.labeller is not None}, status=202)


async def _background(state: RouterState) -> None:
    """Hot reload (config file, artifact dir, the operator's state file) and periodic recalibration."""
    interval = parse_duration(state.config.cascade.recalibration_interval)
    last_recal = last_save = last_adopt = time.monotonic()
    while True:
        await asyncio.sleep(RELOAD_SECONDS)
        now = time.monotonic()
        if now - last_save >= SAVE_SECONDS:
            last_save = now
            # Routers that went away while this one runs leave snapshots too: look for them now and then.
            adopt = now - last_adopt >= ADOPT_SECONDS
            if adopt:
                last_adopt = now
            await state.persist_figures(adopt=adopt)
        try:
            if state.config_path:
                m = os.path.getmtime(state.config_path)
                if m != state._config_mtime:
                    new = RouterConfig.load(state.config_path)
                    state._config_mtime = m
                    state.config.router = new.router  # only the version choice is reloaded live
                    state.config.shadow_sample_rate = new.shadow_sample_rate
            await asyncio.to_thread(state.load_versions)
        except Exception:
            log.exception("router artifact reload failed; keeping the versions in use")
        state.load_state()
        if time.monotonic() - last_recal >= interval:
            last_recal = time.monotonic()
            try:
                await asyncio.to_thread(state.recalibrate, state.label_snapshot())
            except Exception:
                log.exception("recalibration failed; keeping the thresholds in force")


def import_encoder_modules() -> None:
    """Import torch and transformers' encoder classes on the calling (main) thread, before encoders load in worker
    threads. transformers resolves its classes lazily, on first use, and a package's first import running in two
    threads at once can hand one of them a half-initialised module (`cannot import name 'AutoModel'`, `Could not
    import module 'BertModel'`: 4 of 8 fresh processes of tests/unit/router/test_import_race.py's scenario without
    this, 0 of 8 with it)."""
    import torch  # noqa: F401
    from transformers import AutoModel, AutoTokenizer, BertModel  # noqa: F401  (MiniLM is a BertModel)


def build_app(config: RouterConfig, config_path: str | None = None, encoder=None,
              admin_host: str = "0.0.0.0") -> web.Application:
    """The router as an aiohttp application. `encoder`: an Encoder-like object used for the embedding space it gives
    (default: for each router version, the encoder variant it names, from the config's encoder_path; shared per
    process). With `config.admin_port`, `/metrics` and `/routenlp/*` are served only there (on `admin_host`), by a
    second listener this app starts and stops; it checks no client keys (the NetworkPolicy keeps clients off it)."""
    if encoder is None:  # encoders will load in worker threads
        import_encoder_modules()
    state = RouterState(config, config_path, encoder)
    failed_auth = state.metrics.auth_failures.labels(config.policy).inc
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[
        errors_middleware, auth_middleware(state.labellers, state.client_keys, on_failure=failed_auth)])
    app[STATE] = state
    admin = web.Application(middlewares=[errors_middleware]) if config.admin_port else app
    admin_runner: list[web.AppRunner] = []
    h = Handlers(state)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_get("/v1/models", h.models)
    app.router.add_post("/v1/feedback", h.feedback)
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/readyz", h.readyz)
    admin.router.add_get("/metrics", h.metrics)
    admin.router.add_get("/routenlp/rollout", h.rollout)

    async def on_startup(app):
        state.batcher = await asyncio.to_thread(state.encoders.load, EncoderSpec())
        state.encoder = state.batcher.encoder
        state.events = EventLogWriter(config.event_log_dir,
                                      on_drop=state.metrics.event_log_dropped.labels(config.policy).inc,
                                      on_replace=state.metrics.event_log_replaced.labels(config.policy).inc)
        if state.labellers is None:
            log.warning("no labellers configured (auth.labellersDir): /v1/feedback is logged for the trainer but never "
                        "moves a threshold; only the router's own judge labels calibrate")
        if admin is not app:
            admin_runner.append(web.AppRunner(admin, access_log=None))
            await admin_runner[0].setup()
            await web.TCPSite(admin_runner[0], admin_host, config.admin_port).start()
            log.info("admin endpoints (/metrics, /routenlp/*) on %s:%d", admin_host, config.admin_port)
        try:
            state.load_state()
            await asyncio.to_thread(state.load_versions)
            await asyncio.to_thread(state.warm_from_log)
            state.recalibrate()
        except FileNotFoundError as e:
            log.warning("router artifact missing (%s): starting at the cheapest tier, escalating conservatively", e)
            if state.stable is None:
                state.stable = RouterArtifact(BOOTSTRAP_VERSION, None, ConfidenceSet(), None, {})
            state.figures.set_versions(state.stable.version, state.canary.version if state.canary else None)
            state.publish_thresholds()
        await state.persist_figures(adopt=True, restore=True)
        state.tiers_up()
        state.background.append(asyncio.get_running_loop().create_task(_background(state)))
        state.ready = True

    async def on_cleanup(app):
        for t in state.background:
            t.cancel()
        for r in admin_runner:
            await r.cleanup()
        if state.ready:
            await state.persist_figures(released=True)  # a clean shutdown: the next router adopts them at once
        for c in state.clients:
            await c.close()
        if state.events is not None:
            await asyncio.to_thread(state.events.close)
        state.encoders.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main(argv: list[str] | None = None) -> int:
    """`routenlp router --config FILE [--host H] [--port P]`."""
    ap = argparse.ArgumentParser(prog="routenlp router", description="Run the RouteNLP router (OpenAI-compatible).")
    ap.add_argument("--config", required=True, help="router config YAML (RouterConfig)")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .encoder import configure_threads

    configure_threads()
    try:
        config = RouterConfig.load(args.config)
    except FileNotFoundError:
        print(f"routenlp router: config file {args.config} not found", file=sys.stderr)
        return 2
    except Exception as e:  # pydantic ValidationError names the field
        print(f"routenlp router: invalid config {args.config}: {e}", file=sys.stderr)
        return 2
    web.run_app(build_app(config, config_path=args.config, admin_host=args.host), host=args.host, port=args.port,
                access_log=None)
    return 0
