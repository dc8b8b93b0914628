"""Serving: a validated request through the router, with no HTTP in it (the routes are server.py's).

Completion: protocol -> task -> decision (encode + heads + start rule) -> plan -> the cascade engine (or, for a
one-tier streamed plan, the tier's stream passed through) -> a `Reply` with x-routenlp-* headers -> the routing
event to the event log (off the hot path) and, for explored or escalated requests, labels by agreement with the
reference tier (judge, shadow call). Feedback: a client's label, logged, and applied when a labeller sent it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from routenlp.api.common import parse_duration
from routenlp.api.routingpolicy import Task

from .artifacts import RouterArtifact
from .auth import Caller
from .clients import UpstreamError, UpstreamResult
from .confidence import ConfidenceSet
from .engine import Observer, Outcome, Plan, classify, make_plan, redacted_message, tier_body, tier_path
from .events import LABELLER, FeedbackEvent, LabelSource, RoutingEvent, RoutingOutcome, TierAttempt, label_acceptable
from .openai_api import answer_text, resolve_task, sse_events, stream_delta_text, structured_agree, usage
from .protocol import (ApiError, FeedbackAck, ModelCard, ModelList, ParsedRequest, Readiness, parse_chat,
                       parse_completion, parse_feedback)
from .state import RouterState

log = logging.getLogger("routenlp.router")

GENERATION_AGREEMENT = 0.85  # cosine similarity of answer embeddings that counts as agreeing with the reference


@dataclass
class Arrival:
    """A request as it reached the router, before its body was read."""

    request_id: str
    task_header: str | None  # X-RouteNLP-Task
    path: str
    client: str | None  # the authenticated client's name (client keys), recorded in the routing event
    arrived: float = field(default_factory=time.time)  # unix time
    t_start: float = field(default_factory=time.perf_counter)


@dataclass
class Reply:
    """What a completion answers: a JSON body, or server-sent events (`chunks`)."""

    headers: dict[str, str]
    body: dict[str, Any] | None = None
    chunks: AsyncGenerator[bytes, None] | None = None


@dataclass
class Routing:
    """One request on its way through the router: what every step needs."""

    arrival: Arrival
    req: ParsedRequest
    task: str
    art: RouterArtifact | None

    @property
    def request_id(self) -> str:
        return self.arrival.request_id

    @property
    def version(self) -> str | None:
        return self.art.version if self.art else None

    @property
    def confidence(self) -> ConfidenceSet:
        return self.art.confidence if self.art else ConfidenceSet()


class ServingObserver(Observer):
    """The engine's side effects in one router: Prometheus metrics and the version's rollout figures."""

    def __init__(self, state: RouterState, version: str | None):
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


def _is_structured(task: Task) -> bool:
    return str(getattr(task.kind, "value", task.kind)) == "structured"


def _client_fault(result: UpstreamResult, tier: str) -> ApiError:
    """The chain end said the request is invalid: a 4xx with the provider's message redacted, never its body."""
    msg = redacted_message(result)
    return ApiError(result.status, f"the {tier} tier rejected the request (HTTP {result.status})"
                    + (f": {msg}" if msg else ""))


def _strip_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    body = dict(body)
    body["choices"] = [{k: v for k, v in c.items() if k != "logprobs"} | {"logprobs": None}
                       for c in body.get("choices", []) if isinstance(c, dict)]
    return body


def _headers(tier: str, escalations: int, score: float | None, version: str | None) -> dict[str, str]:
    return {"x-routenlp-tier": tier, "x-routenlp-escalations": str(escalations),
            "x-routenlp-confidence": "" if score is None else f"{score:.4f}",
            "x-routenlp-router-version": version or "none"}


async def _chunks(parts: Iterable[bytes]) -> AsyncGenerator[bytes, None]:
    for part in parts:
        yield part


class RouterServing:
    """Runs completions and feedback through one router's state (the OpenAI-compatible API's behaviour)."""

    def __init__(self, state: RouterState):
        self.s = state

    # ---- completions ---------------------------------------------------------------------------------------------
    async def completion(self, kind: str, raw: Any, arrival: Arrival) -> Reply:
        """Answer a /v1/chat/completions (`kind` "chat") or /v1/completions ("completions") body."""
        s, cfg = self.s, self.s.config
        req = parse_chat(raw) if kind == "chat" else parse_completion(raw)
        task = resolve_task(cfg, arrival.task_header, req.metadata_task, req.body.get("model"), arrival.path,
                            req.query)
        r = Routing(arrival, req, task, s.artifact_for(arrival.request_id))
        deadline = s.engine.clock() + parse_duration(cfg.cascade.request_deadline)
        plan = await self._plan(r)
        if not plan.tiers:
            raise ApiError(503, "every tier is unavailable; retry later", headers={"Retry-After": str(s.retry_after())})
        if req.stream and len(plan.tiers) == 1:
            return await self._passthrough_stream(r, plan, deadline)
        out = await s.engine.run(req, task, _is_structured(s.tasks[task]), plan, r.confidence, deadline,
                                 ServingObserver(s, r.version))
        return self._respond(r, plan, out)

    async def _plan(self, r: Routing) -> Plan:
        """The decision (predicted acceptance, thresholds in force) and the tiers it plans to try."""
        s, cfg = self.s, self.s.config
        t_dec = time.perf_counter()
        prior = await s.decide(r.art, r.task, r.req.query)
        thresholds = [s.threshold(r.art, r.task, t) for t in s.tier_names]
        s.metrics.decision_seconds.labels(cfg.policy).observe(time.perf_counter() - t_dec)
        # The exploration sample is drawn here, by the router, never from a value the client chooses (a chosen
        # request id would let a client pick which requests count as a random sample). Explored requests try
        # uncertified tiers and tiers off the task's chain, to collect the random labels recalibration needs.
        explore = s.rng.random() < cfg.shadow_sample_rate
        return make_plan(prior, s.start_rule(r.task, r.art), thresholds, s.tiers_up(), cfg.cascade.max_escalations,
                         explore, s.chain(r.art, r.task), cheapest_first=s.prefer_cheaper)

    def _respond(self, r: Routing, plan: Plan, out: Outcome) -> Reply:
        """Record the request, start its labelling, and answer (JSON, or the answer re-framed as SSE)."""
        s, cfg = self.s, self.s.config
        if out.client_fault is not None:
            raise _client_fault(out.client_fault, s.tier_names[plan.end])
        if out.body is None:
            self._record(r, out.attempts, None, "error", False, plan.explore)
            if out.deadline_exceeded:
                raise ApiError(504, "no tier answered within the policy's requestDeadline")
            raise ApiError(503, "no tier could answer; retry later", headers={"Retry-After": str(s.retry_after())})
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
        headers = {**_headers(final_tier, out.escalations, out.score, r.version), "x-request-id": r.request_id}
        body = out.body if r.req.wants_logprobs else _strip_logprobs(out.body)
        if not r.req.stream:
            return Reply(headers, body)
        return Reply(headers, chunks=_chunks(sse_events(r.req.kind, body, r.request_id)))

    def _record(self, r: Routing, attempts: list[TierAttempt], final_tier: str | None, outcome: RoutingOutcome,
                shadow: bool, explored: bool = False) -> RoutingEvent:
        s = self.s
        latency = time.perf_counter() - r.arrival.t_start
        s.metrics.request_seconds.labels(s.config.policy).observe(latency)
        event = RoutingEvent(request_id=r.request_id, time=r.arrival.arrived, policy=s.config.policy, task=r.task,
                             query=r.req.query, router_version=r.version, attempts=attempts, final_tier=final_tier,
                             escalations=max(len(attempts) - 1, 0), outcome=outcome,
                             cost_usd=sum(a.cost_usd for a in attempts), latency_ms=latency * 1000, shadow=shadow,
                             explored=explored, client=r.arrival.client)
        s.remember(event)
        s.log_event(event)
        return event

    # ---- one tier, streamed through ----------------------------------------------------------------------------
    async def _passthrough_stream(self, r: Routing, plan: Plan, deadline: float) -> Reply:
        """One tier in the plan: stream its answer through as it is generated. A tier that fails before the first
        byte falls back to the engine (the answer then comes re-framed as SSE); one that fails mid-stream ends the
        stream with an OpenAI-style error event."""
        s, k, req = self.s, plan.tiers[0], r.req
        tier, client = s.config.tiers[k], s.clients[k]
        observer = ServingObserver(s, r.version)
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
                raise _client_fault(res, tier.name)
            s.engine.book_fault(k, res)
            observer.tier_error(tier.name)
            attempt.error, upstream = f"HTTP {res.status}", None
        if upstream is None:  # nothing streamed yet: the rest of the portfolio answers through the engine
            fallback = Plan(plan.prior, plan.start, s.engine.fallback_tiers({k}), plan.thresholds, plan.end,
                            plan.explore)
            out = await s.engine.run(req, r.task, _is_structured(s.tasks[r.task]), fallback, r.confidence, deadline,
                                     observer)
            out.attempts.insert(0, attempt)
            return self._respond(r, plan, out)
        headers = {**_headers(tier.name, 0, None, r.version), "x-request-id": r.request_id}
        return Reply(headers, chunks=self._relay(r, plan, upstream, attempt, observer))

    async def _relay(self, r: Routing, plan: Plan, upstream: aiohttp.ClientResponse, attempt: TierAttempt,
                     observer: ServingObserver) -> AsyncGenerator[bytes, None]:
        """The tier's SSE lines as they come; then the attempt is recorded (a client gone mid-stream: not)."""
        s, k = self.s, plan.tiers[0]
        tier, client = s.config.tiers[k], s.clients[k]
        parts = []
        try:
            async for line in client.stream_lines(upstream):
                parts.append(stream_delta_text(r.req.kind, line))
                yield line
            client.breaker.success()
        except UpstreamError as e:
            observer.tier_error(tier.name)
            attempt.error = str(e)
            err = ApiError(502, "the tier stopped answering mid-stream; retry the request").body()
            err["error"]["type"] = "upstream_error"
            yield b"data: " + json.dumps(err).encode() + b"\n\n"
        finally:
            upstream.release()
        latency = time.perf_counter() - r.arrival.t_start
        observer.tier_latency(tier.name, latency)
        attempt.response, attempt.latency_ms = "".join(parts), latency * 1000
        attempt.accepted = attempt.error is None and k == plan.end
        if attempt.error is None:
            s.metrics.requests.labels(s.config.policy, r.task, tier.name, "accepted").inc()
            s.figures.answered(r.version, False, False, 0.0)  # streamed through: no confidence score, no usage
        outcome: RoutingOutcome = "error" if attempt.error else ("accepted" if k == plan.end else "fallback")
        self._record(r, [attempt], None if attempt.error else tier.name, outcome, False, plan.explore)

    # ---- labels by agreement with the reference tier ---------------------------------------------------------------
    async def _agree(self, task: str, answer: str | None, reference: str) -> bool:
        spec = self.s.tasks[task]
        if answer is None:
            return False
        if _is_structured(spec):
            return structured_agree(answer, reference, spec.answers)
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

    # ---- feedback ----------------------------------------------------------------------------------------------------
    def admit_feedback(self, caller: Caller) -> None:
        """The caller's feedback rate (before its body is read): a 429 when over it."""
        try:
            self.s.feedback_gate.admit_client(caller)
        except ApiError:
            self.s.metrics.feedback_refused.labels(self.s.config.policy, "rate_limited").inc()
            raise

    def feedback(self, raw: Any, caller: Caller) -> FeedbackAck:
        """Attach a label to an answered request: {"request_id", "accepted": bool | "score": 0..1, "tier"?}. Every
        label is logged (the trainer joins it under the shared precedence); only an authenticated labeller's label of
        a request this router remembers moves its thresholds now (auth.py, events.resolve_label)."""
        s, policy = self.s, self.s.config.policy
        body = parse_feedback(raw, s.tier_names)
        try:
            s.feedback_gate.admit_request_id(body.request_id, caller)
        except ApiError:
            s.metrics.feedback_refused.labels(policy, "request_cap").inc()
            raise
        fb = FeedbackEvent(request_id=body.request_id, time=time.time(), tier=body.tier, accepted=body.accepted,
                           score=body.score, source="user", labeller=caller.labeller, client=caller.client)
        s.log_event(fb)
        event = s.recent.get(body.request_id)
        if caller.labeller is None:
            s.metrics.feedback_not_applied.labels(policy, "unauthenticated").inc()
        elif event is None:
            s.metrics.feedback_not_applied.labels(policy, "unknown_request").inc()
        else:
            t, ok = body.tier or event.final_tier, label_acceptable(fb)
            if t and s.add_label(event, t, ok, LABELLER):
                s.metrics.feedback.labels(policy, event.task, t, str(ok).lower()).inc()
        return FeedbackAck(known_request=event is not None, trusted=caller.labeller is not None)

    # ---- about the router ----------------------------------------------------------------------------------------
    def models(self) -> ModelList:
        """The tasks (the names clients route by) and the tiers."""
        cfg = self.s.config
        return ModelList(data=[ModelCard(id=t.name, routenlp_task=True) for t in cfg.tasks]
                         + [ModelCard(id=t.name, routenlp_tier=True) for t in cfg.tiers])

    def readiness(self) -> Readiness:
        s = self.s
        up = s.tiers_up()
        # A router that cannot write its event log loses labels and the trainer's data: out of rotation until it can.
        log_ok = s.events is not None and s.events.healthy
        return Readiness(ready=s.ready and any(up) and log_ok, encoder=s.batcher is not None,
                         router_version=s.stable.version if s.stable else None, tiers_up=dict(zip(s.tier_names, up)),
                         event_log="ok" if log_ok else (s.events.failing if s.events else None) or "not running")
