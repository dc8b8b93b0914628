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
import hashlib
import json
import logging
import math
import os
import time
import uuid
from pathlib import Path

import numpy as np
import yaml
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from routenlp.api.common import parse_duration
from routenlp.api.routingpolicy import RiskMeasure

from . import cascade
from .artifacts import Calibration, RouterArtifact, latest_version, load_artifact
from .clients import TierClient, UpstreamError
from .config import RouterConfig
from .conformal import ThresholdResult, calibrate_threshold
from .confidence import ConfidenceSet, answer_features
from .eventlog import EventLogWriter, labelled_attempts, read_events
from .events import FeedbackEvent, RoutingEvent, TierAttempt, random_sample_label
from .figures_store import ADOPT_SECONDS, SAVE_SECONDS, FiguresStore
from .metrics import RouterMetrics
from .rollout import RolloutFigures
from .window import LabelWindow
from .openai_api import (ApiError, ParsedRequest, answer_text, parse_chat, parse_completion, resolve_task, sse_events,
                         stream_delta_text, structured_agree, token_logprobs, usage)

log = logging.getLogger("routenlp.router")

MAX_BODY_BYTES = 1 << 20
RELOAD_SECONDS = float(os.environ.get("ROUTENLP_RELOAD_SECONDS", "2"))
GENERATION_AGREEMENT = 0.85  # cosine similarity of answer embeddings that counts as agreeing with the reference
RECENT_REQUESTS = 20_000  # request id -> event kept in memory for feedback and shadow labels
WARM_SEGMENTS = 16  # event-log segments read at start-up to refill the calibration window
BOOTSTRAP_VERSION = "none"  # served before any router artifact exists

_ENCODERS: dict[str, object] = {}


def shared_encoder(path: str | None):
    """One Encoder per folder per process (loading takes seconds)."""
    from .encoder import Encoder, default_encoder_path

    key = path or default_encoder_path()
    if key not in _ENCODERS:
        _ENCODERS[key] = Encoder(key)
    return _ENCODERS[key]


def _is_structured(task) -> bool:
    return str(getattr(task.kind, "value", task.kind)) == "structured"


def _fraction(request_id: str, salt: str) -> float:
    h = hashlib.blake2b((salt + request_id).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


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
        self.encoder = encoder
        self.batcher = None
        self.events: EventLogWriter | None = None
        self.stable: RouterArtifact | None = None
        self.canary: RouterArtifact | None = None
        # Online calibration of the stable version: (task, tier) -> window of (score, acceptable) over random-sample
        # labels, and of acceptable over labels of accepted answers (one label per attempt: see window.py).
        self.window: dict[tuple[str, str], LabelWindow[tuple[float, bool]]] = {}
        self.violations: dict[tuple[str, str], LabelWindow[bool]] = {}
        self.online: dict[tuple[str, str], ThresholdResult] = {}
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
            if self.stable is not None:
                self.window.clear()  # labels were scored by the old version's confidence models
                self.online.clear()
            self.stable = new
            log.info("router version %s loaded (stable)", stable_name)
        canary_name = rv.canary if rv.canary_percent > 0 else None
        if canary_name != (self.canary.version if self.canary else None):
            self.canary = load_artifact(rv.artifact_dir, canary_name) if canary_name else None
        self.figures.set_versions(self.stable.version if self.stable else None,
                                  self.canary.version if self.canary else None)
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
        used only if calibrated for the policy's risk measure at a risk level no higher than the policy's."""
        if art is not None and art is self.stable and (task, tier) in self.online:
            return self.online[(task, tier)]
        cal: Calibration | None = art.calibration if art is not None else None
        c = self.config.cascade
        if (cal is None or cal.risk_level > c.risk_level or cal.delta > c.delta
                or cal.risk_measure != RiskMeasure(c.risk_measure).value):
            return None
        return cal.get(task, tier)

    def publish_thresholds(self) -> None:
        p = self.config.policy
        for task in self.tasks:
            self.metrics.risk_level.labels(p, task).set(self.config.cascade.risk_level)
            for tier in self.tier_names[:-1]:
                r = self.threshold(self.stable, task, tier)
                ok = r is not None and r.certified and r.threshold is not None
                self.metrics.calibrated.labels(p, task, tier).set(1 if ok else 0)
                self.metrics.threshold.labels(p, task, tier).set(r.threshold if ok else math.nan)
                w = self.window.get((task, tier))
                self.metrics.labels.labels(p, task, tier).set(len(w) if w else 0)
                rate = self.observed_risk(task, tier, r.threshold if ok else None)
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

    def add_label(self, event: RoutingEvent, tier: str, acceptable: bool) -> None:
        """Record a label for one attempt of a stable-version request (online calibration + violation gauge)."""
        att = next((a for a in event.attempts if a.tier == tier), None)
        if att is None:
            return
        # Only labels that are a random sample of the attempts reaching the tier keep the calibration unbiased.
        sampled = att.score is not None and random_sample_label(event, att)
        if tier != self.tier_names[-1]:
            self.figures.label(event.router_version, acceptable, att.accepted, sampled,  # canary labels count too
                              attempt=(event.request_id, tier))
        if self.stable is None or event.router_version != self.stable.version:
            return
        key, size = (event.task, tier), self.config.cascade.calibration_window
        if att.accepted:
            self.violations.setdefault(key, LabelWindow(size)).put(event.request_id, acceptable)
        if sampled:
            self.window.setdefault(key, LabelWindow(size)).put(event.request_id, (att.score, acceptable))

    def label_snapshot(self) -> dict[tuple[str, str], list]:
        """Copy of the calibration windows (taken on the event loop, which is the only writer)."""
        return {k: list(w) for k, w in list(self.window.items())}

    def recalibrate(self, snapshot: dict[tuple[str, str], list] | None = None) -> None:
        """Recompute the stable version's thresholds from the labelled window (enough labels only)."""
        c = self.config.cascade
        for (task, tier), w in (self.label_snapshot() if snapshot is None else snapshot).items():
            if tier == self.tier_names[-1] or len(w) < c.min_calibration_samples:
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
        """Refill the calibration window from labels already in the event log (e.g. after a restart)."""
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
                self.add_label(ev, la.tier, la.acceptable)
                n += 1
        return n

    def remember(self, event: RoutingEvent) -> None:
        self.recent[event.request_id] = event
        while len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)

    def log_event(self, event) -> None:
        if self.events is not None and not self.events.submit(event):
            pass  # counted by the writer's on_drop callback

    # ---- decision -----------------------------------------------------------------------------------------------
    async def decide(self, art: RouterArtifact | None, task: str, query: str) -> tuple[np.ndarray | None, int]:
        """Predicted acceptance per tier (None without a router for this task) and the start tier."""
        router = art.router if art is not None else None
        if router is None or router.task_index(task) is None:
            return None, 0
        vec = await self.batcher.encode(query)
        probs = router.predict_proba(vec[None, :], np.array([router.task_index(task)]))[0]
        if router.tier_names != self.tier_names:
            idx = [router.tier_names.index(t) if t in router.tier_names else -1 for t in self.tier_names]
            if min(idx) < 0:
                return None, 0
            probs = probs[idx]
        if self.prefer_cheaper:  # over budget with PreferCheaper: the cheapest tier first, whatever the prior says
            return probs, 0
        return probs, cascade.start_tier(probs, self.tasks[task].quality_target)

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
        up = [not c.breaker.is_open for c in self.clients]
        for name, u in zip(self.tier_names, up):
            self.metrics.tier_up.labels(self.config.policy, name).set(1 if u else 0)
        return up

    def retry_after(self) -> int:
        return max(1, math.ceil(min(c.breaker.retry_after() for c in self.clients)))


STATE = web.AppKey("routenlp_state", RouterState)


# ---- HTTP ---------------------------------------------------------------------------------------------------------
def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> web.Response:
    return web.json_response(ApiError(status, message, param).body(), status=status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status)
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
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None


def _tier_body(req: ParsedRequest, served_model: str, structured: bool) -> dict:
    body = dict(req.body)
    body.pop("metadata", None)
    body["model"] = served_model
    body["stream"] = False
    if req.kind == "chat":
        body["logprobs"] = True
    else:
        body["logprobs"] = max(int(body.get("logprobs") or 0), 1)
    body.pop("stream_options", None)
    return body


def _strip_logprobs(body: dict) -> dict:
    body = dict(body)
    body["choices"] = [{k: v for k, v in c.items() if k != "logprobs"} | {"logprobs": None}
                       for c in body.get("choices", []) if isinstance(c, dict)]
    return body


class Handlers:
    def __init__(self, state: RouterState):
        self.s = state

    async def completion(self, request: web.Request, kind: str) -> web.StreamResponse:
        s, cfg = self.s, self.s.config
        t_start = time.perf_counter()
        arrived = time.time()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if len(request_id) > 200:
            raise ApiError(400, "x-request-id longer than 200 characters")
        raw = await _read_json(request)
        req = parse_chat(raw) if kind == "chat" else parse_completion(raw)
        task = resolve_task(cfg, request.headers.get("x-routenlp-task"), req.metadata_task, req.body.get("model"),
                            request.path, req.query)
        task_spec = s.tasks[task]
        structured = _is_structured(task_spec)
        art = s.artifact_for(request_id)
        version = art.version if art else None
        confidence = art.confidence if art else ConfidenceSet()

        t_dec = time.perf_counter()
        prior, start = await s.decide(art, task, req.query)
        thresholds = [s.threshold(art, task, t) for t in s.tier_names]
        s.metrics.decision_seconds.labels(cfg.policy).observe(time.perf_counter() - t_dec)

        up = s.tiers_up()
        # A cheaper tier with no certified threshold for this task can only escalate, so it is skipped (calling it
        # would cost more than the reference alone), except on the exploration sample: the requests the shadow hash
        # selects still try it, so it keeps collecting the random labels that recalibration needs to certify it.
        explore = _fraction(request_id, "shadow") < cfg.shadow_sample_rate
        usable = [explore or (t is not None and t.certified and t.threshold is not None) for t in thresholds]
        plan = cascade.plan_for(start, s.K, cfg.cascade.max_escalations, up, usable)
        if not plan:
            return _error(503, "every tier is unavailable; retry later", headers={"Retry-After": str(s.retry_after())})

        if req.stream and len(plan) == 1:
            return await self._passthrough_stream(request, req, task, plan[0], prior, art, request_id, arrived, t_start)

        attempts: list[TierAttempt] = []
        answers: dict[str, tuple[dict, str | None]] = {}
        # "fallback" unless a tier's answer clears its threshold: a loop that runs out of tiers after a rejected
        # answer (the later tiers failed) returns that answer as a fallback, not as accepted.
        final_body, final_tier, outcome, final_score = None, None, "fallback", None
        queue_ = list(plan)
        tried: set[int] = set()
        while queue_:
            k = queue_.pop(0)
            tried.add(k)
            client, tier = s.clients[k], cfg.tiers[k]
            if not client.breaker.allow():
                queue_ = queue_ or self._fallback(tried)
                continue
            is_ref = k == s.K - 1
            served = tier.served_model_name
            try:
                res = await client.post("/chat/completions" if kind == "chat" else "/completions",
                                        _tier_body(req, served, structured))
            except UpstreamError as e:
                s.metrics.upstream_errors.labels(cfg.policy, tier.name).inc()
                attempts.append(TierAttempt(tier=tier.name, model=served, error=str(e),
                                            predicted=None if prior is None else float(prior[k])))
                if not queue_:
                    queue_ = self._fallback(tried)
                continue
            s.metrics.tier_seconds.labels(cfg.policy, tier.name).observe(res.latency_s)
            if res.status >= 400:
                # The tier refused the request itself (e.g. too many tokens): the client's mistake, pass it on.
                return web.Response(status=res.status, text=res.text, content_type="application/json",
                                    headers=self._headers(tier.name, len(attempts), None, version))
            choices = res.body.get("choices") if res.body is not None else None
            if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
                # 2xx without an answer: a broken tier, not the client's fault. Count it and move on.
                client.breaker.failure()
                s.metrics.upstream_errors.labels(cfg.policy, tier.name).inc()
                attempts.append(TierAttempt(tier=tier.name, model=served, error="malformed response"))
                if not queue_:
                    queue_ = self._fallback(tried)
                continue
            text = answer_text(kind, res.body)
            in_tok, out_tok = usage(res.body)
            p_k = None if prior is None else float(prior[k])
            feats = answer_features(token_logprobs(kind, res.body), structured, p_k)
            score = confidence.score(task, tier.name, feats)
            score = None if math.isnan(score) else score
            thr = thresholds[k]
            thr_value = thr.threshold if thr is not None and thr.certified else None
            ok = cascade.accept(score, thr_value, is_ref)
            cost = tier.cost.usd(in_tok, out_tok)
            attempts.append(TierAttempt(tier=tier.name, model=served, predicted=p_k, score=score, threshold=thr_value,
                                        accepted=ok, response=text, input_tokens=in_tok, output_tokens=out_tok,
                                        cost_usd=cost, latency_ms=res.latency_s * 1000))
            answers[tier.name] = (res.body, text)
            s.metrics.cost.labels(cfg.policy, task, tier.name).inc(cost)
            s.figures.spent(version, cost)
            final_body, final_tier, final_score = res.body, tier.name, score
            if ok or not queue_:
                outcome = "accepted" if ok else "fallback"
                break
            s.metrics.escalations.labels(cfg.policy, task, tier.name, cfg.tiers[queue_[0]].name).inc()

        if final_body is None:
            self._record(req, task, request_id, arrived, t_start, version, attempts, None, "error", False)
            return _error(503, "no tier could answer; retry later", headers={"Retry-After": str(s.retry_after())})

        escalations = max(len(attempts) - 1, 0)
        # An explored request that reached the reference is judged below; one answered cheaper gets a shadow call.
        shadow = final_tier != s.tier_names[-1] and explore
        event = self._record(req, task, request_id, arrived, t_start, version, attempts, final_tier, outcome, shadow,
                             explore)
        s.metrics.requests.labels(cfg.policy, task, final_tier, outcome).inc()
        ref_cost = cfg.tiers[-1].cost.usd(attempts[-1].input_tokens, attempts[-1].output_tokens)
        s.metrics.reference_cost.labels(cfg.policy, task).inc(ref_cost)
        first_ok = len(attempts) == 1 and outcome == "accepted" and final_tier != s.tier_names[-1]
        s.figures.answered(version, first_ok, escalations > 0, ref_cost)
        if s.tier_names[-1] in answers and len(answers) > 1:
            asyncio.get_running_loop().create_task(self._judge(event, answers[s.tier_names[-1]][1] or "", "judge"))
        if shadow:
            asyncio.get_running_loop().create_task(self._shadow(event, req))

        headers = self._headers(final_tier, escalations, final_score, version)
        headers["x-request-id"] = request_id
        out = final_body if req.wants_logprobs else _strip_logprobs(final_body)
        if req.stream:
            resp = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            for chunk in sse_events(kind, out, request_id):
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        return web.json_response(out, headers=headers)

    def _fallback(self, tried: set[int]) -> list[int]:
        """After a failure with nothing left in the plan: the highest untried tier that is up."""
        up = self.s.tiers_up()
        rest = [k for k in range(self.s.K) if k not in tried and up[k]]
        return rest[-1:]

    def _headers(self, tier: str, escalations: int, score: float | None, version: str | None) -> dict:
        return {"x-routenlp-tier": tier, "x-routenlp-escalations": str(escalations),
                "x-routenlp-confidence": "" if score is None else f"{score:.4f}",
                "x-routenlp-router-version": version or "none"}

    def _record(self, req, task, request_id, arrived, t_start, version, attempts, final_tier, outcome, shadow,
                explored=False):
        s = self.s
        latency = time.perf_counter() - t_start
        s.metrics.request_seconds.labels(s.config.policy).observe(latency)
        event = RoutingEvent(request_id=request_id, time=arrived, policy=s.config.policy, task=task, query=req.query,
                             router_version=version, attempts=attempts, final_tier=final_tier,
                             escalations=max(len(attempts) - 1, 0), outcome=outcome,
                             cost_usd=sum(a.cost_usd for a in attempts), latency_ms=latency * 1000, shadow=shadow,
                             explored=explored)
        s.remember(event)
        s.log_event(event)
        return event

    async def _agree(self, task: str, answer: str | None, reference: str) -> bool:
        spec = self.s.tasks[task]
        if answer is None:
            return False
        if _is_structured(spec):
            return structured_agree(answer, reference, spec.labels)
        a, b = await asyncio.gather(self.s.batcher.encode(answer), self.s.batcher.encode(reference))
        return float(np.dot(a, b)) >= GENERATION_AGREEMENT

    async def _judge(self, event: RoutingEvent, reference: str, source: str) -> None:
        """Label each cheaper attempt of `event` by agreement with the reference tier's answer."""
        s = self.s
        try:
            for att in event.attempts:
                if att.tier == s.tier_names[-1] or att.error is not None:
                    continue
                ok = await self._agree(event.task, att.response, reference)
                s.log_event(FeedbackEvent(request_id=event.request_id, time=time.time(), tier=att.tier, accepted=ok,
                                          source=source, reference_response=reference if source == "shadow" else None))
                s.metrics.feedback.labels(s.config.policy, event.task, att.tier, str(ok).lower()).inc()
                s.add_label(event, att.tier, ok)
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
            res = await client.post("/chat/completions" if req.kind == "chat" else "/completions",
                                    _tier_body(req, ref.served_model_name, False))
        except UpstreamError:
            return
        if res.status >= 400 or res.body is None:
            return
        in_tok, out_tok = usage(res.body)
        s.metrics.cost.labels(s.config.policy, event.task, ref.name).inc(ref.cost.usd(in_tok, out_tok))
        s.figures.spent(event.router_version, ref.cost.usd(in_tok, out_tok))
        await self._judge(event, answer_text(req.kind, res.body) or "", "shadow")

    async def _passthrough_stream(self, request, req, task, k, prior, art, request_id, arrived, t_start):
        """One tier in the plan: stream its answer through as it is generated."""
        s, tier = self.s, self.s.config.tiers[k]
        client = s.clients[k]
        body = dict(req.body)
        body.pop("metadata", None)
        body["model"] = tier.served_model_name
        version = art.version if art else None
        try:
            upstream = await client.open_stream("/chat/completions" if req.kind == "chat" else "/completions", body)
        except UpstreamError as e:
            s.metrics.upstream_errors.labels(s.config.policy, tier.name).inc()
            att = TierAttempt(tier=tier.name, model=tier.served_model_name, error=str(e))
            self._record(req, task, request_id, arrived, t_start, version, [att], None, "error", False)
            return _error(503, "no tier could answer; retry later", headers={"Retry-After": str(s.retry_after())})
        try:
            if upstream.status >= 400:
                text = await upstream.text()
                return web.Response(status=upstream.status, text=text, content_type="application/json")
            headers = self._headers(tier.name, 0, None, version)
            headers.update({"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                            "x-request-id": request_id})
            resp = web.StreamResponse(headers=headers)
            await resp.prepare(request)
            parts = []
            async for line in upstream.content:
                parts.append(stream_delta_text(req.kind, line))
                await resp.write(line)
            await resp.write_eof()
        finally:
            upstream.release()
        latency = time.perf_counter() - t_start
        s.metrics.tier_seconds.labels(s.config.policy, tier.name).observe(latency)
        s.metrics.requests.labels(s.config.policy, task, tier.name, "accepted").inc()
        s.figures.answered(version, False, False, 0.0)  # streamed through: no confidence score, no usage
        att = TierAttempt(tier=tier.name, model=tier.served_model_name,
                          predicted=None if prior is None else float(prior[k]), accepted=k == s.K - 1,
                          response="".join(parts), latency_ms=latency * 1000)
        self._record(req, task, request_id, arrived, t_start, version, [att], tier.name,
                     "accepted" if k == s.K - 1 else "fallback", False)
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
        ok = s.ready and any(up)
        body = {"ready": ok, "encoder": s.batcher is not None, "router_version": s.stable.version if s.stable else None,
                "tiers_up": dict(zip(s.tier_names, up))}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(self, request):
        self.s.tiers_up()
        return web.Response(body=generate_latest(self.s.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def rollout(self, request):
        """Per-version figures since each version was first served (see rollout.py): the operator's input."""
        return web.json_response(self.s.figures.answer())

    async def feedback(self, request):
        """Attach a label to an answered request: {"request_id", "accepted": bool | "score": 0..1, "tier"?}."""
        s = self.s
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
        event = s.recent.get(rid)
        ok = bool(accepted) if accepted is not None else float(score) >= 0.5
        fb = FeedbackEvent(request_id=rid, time=time.time(), tier=tier, accepted=accepted,
                           score=None if score is None else float(score), source="user")
        s.log_event(fb)
        known = event is not None
        if known:
            t = tier or event.final_tier
            s.metrics.feedback.labels(s.config.policy, event.task, t or "", str(ok).lower()).inc()
            if t:
                s.add_label(event, t, ok)
        return web.json_response({"status": "recorded", "known_request": known}, status=202)


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


def build_app(config: RouterConfig, config_path: str | None = None, encoder=None) -> web.Application:
    """The router as an aiohttp application. `encoder`: an Encoder-like object (default: all-MiniLM-L6-v2 from the
    config's encoder_path, shared per process)."""
    from .encoder import MicroBatcher

    state = RouterState(config, config_path, encoder)
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[errors_middleware])
    app[STATE] = state
    h = Handlers(state)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_get("/v1/models", h.models)
    app.router.add_post("/v1/feedback", h.feedback)
    app.router.add_get("/healthz", h.healthz)
    app.router.add_get("/readyz", h.readyz)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/routenlp/rollout", h.rollout)

    async def on_startup(app):
        if state.encoder is None:
            state.encoder = await asyncio.to_thread(shared_encoder, config.encoder_path)
        state.batcher = MicroBatcher(state.encoder)
        state.events = EventLogWriter(config.event_log_dir,
                                      on_drop=lambda: state.metrics.event_log_dropped.labels(config.policy).inc())
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
        if state.ready:
            await state.persist_figures(released=True)  # a clean shutdown: the next router adopts them at once
        for c in state.clients:
            await c.close()
        if state.events is not None:
            await asyncio.to_thread(state.events.close)
        if state.batcher is not None:
            state.batcher.close()

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
        print(f"routenlp router: config file {args.config} not found", file=os.sys.stderr)
        return 2
    except Exception as e:  # pydantic ValidationError names the field
        print(f"routenlp router: invalid config {args.config}: {e}", file=os.sys.stderr)
        return 2
    web.run_app(build_app(config, config_path=args.config), host=args.host, port=args.port, access_log=None)
    return 0
