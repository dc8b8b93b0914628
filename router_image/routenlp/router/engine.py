"""The cascade engine: one request through the tiers, start -> attempt -> score -> accept/escalate.

The server, the local runtime (which runs the server) and the campaign benchmark all route with `CascadeEngine`, so
a benchmark figure is a figure of the code that serves; the routing benchmark's array simulation
(`cascade.simulate_cascade`) is tested equal to it on the same inputs (tests/unit/router/test_engine.py).

What the engine decides, and nothing else: which tiers to call in which order (`make_plan`, from the decision rules
in cascade.py), how to read each tier's reply (`classify`), whether to accept an answer (confidence score against
the conformal threshold in force) and what to return. Side effects (metrics, rollout figures) go to an `Observer`;
the caller writes the routing event and the labels.

Tier faults: a non-2xx reply other than a client fault, a 2xx without an answer, a refused connection or a timeout
is the tier's fault: it is counted on the tier's breaker (429/503 hold it open for the tier's Retry-After) and the
request goes on to the next tier of its plan, or to the highest tier still up. Only the chain end's 400/413/422
(the request itself is invalid: too long, bad parameters) goes back to the client as a 4xx, with the provider's
message redacted (provider bodies never reach clients verbatim). A deadline bounds the whole request across
escalations.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from routenlp.api.modeltier import TierCost

from . import cascade
from .clients import CircuitBreaker, UpstreamError, UpstreamResult
from .confidence import ConfidenceSet, answer_features
from .conformal import ThresholdResult
from .events import RoutingOutcome, TierAttempt
from .openai_api import answer_text, token_logprobs, usage
from .protocol import ParsedRequest

# Statuses of the chain end that mean the request itself is invalid: passed back to the client as a 4xx.
CLIENT_FAULTS = frozenset({400, 413, 422})
# Statuses whose Retry-After holds the tier's breaker open (rate limited, overloaded).
HOLD_STATUSES = frozenset({429, 503})
_SECRETISH = re.compile(r"[A-Za-z0-9_\-+/=]{20,}|(?i:(?:sk|key|bearer|token)[-_ :]*[A-Za-z0-9_\-]{4,})")
MAX_PROVIDER_MESSAGE = 300


def tier_path(kind: str) -> str:
    return "/chat/completions" if kind == "chat" else "/completions"


def tier_body(req: ParsedRequest, served_model: str, stream: bool = False) -> dict[str, Any]:
    """The request as sent to one tier: its model name, our metadata removed, logprobs asked for (the confidence
    score reads them) unless streamed through."""
    body = dict(req.body)
    body.pop("metadata", None)
    body["model"] = served_model
    body["stream"] = stream
    if stream:
        return body
    if req.kind == "chat":
        body["logprobs"] = True
    else:
        body["logprobs"] = max(int(body.get("logprobs") or 0), 1)
    body.pop("stream_options", None)
    return body


def redacted_message(result: UpstreamResult) -> str:
    """A provider's error message fit for our client: its `error.message` (or nothing), cut short, with anything
    that looks like a key or token replaced."""
    msg = ""
    if result.body is not None:
        err = result.body.get("error")
        msg = err.get("message", "") if isinstance(err, dict) else (err if isinstance(err, str) else "")
        if not msg and isinstance(result.body.get("message"), str):
            msg = result.body["message"]
    msg = _SECRETISH.sub("[redacted]", str(msg))[:MAX_PROVIDER_MESSAGE]
    return msg


def has_answer(body: dict[str, Any] | None) -> bool:
    choices = body.get("choices") if body is not None else None
    return isinstance(choices, list) and bool(choices) and isinstance(choices[0], dict)


def classify(result: UpstreamResult, is_end: bool) -> str:
    """'answer' (2xx with a choice), 'client_fault' (the chain end says the request is invalid) or 'tier_fault'
    (anything else: escalate, count on the breaker)."""
    if 200 <= result.status < 300:
        return "answer" if has_answer(result.body) else "tier_fault"
    if is_end and result.status in CLIENT_FAULTS:
        return "client_fault"
    if result.status in CLIENT_FAULTS:
        return "escalate"  # a cheaper tier cannot take this request (e.g. its context is shorter): not its fault
    return "tier_fault"


class TierPort(Protocol):
    """What the engine needs of a tier: `TierClient`, or an in-process stand-in (the campaign bench's oracle)."""

    breaker: CircuitBreaker

    async def post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> UpstreamResult: ...


class TierSpec(Protocol):
    """The parts of a tier's config the engine reads: a `TierEndpoint` of the router config, or a `TierInfo`."""

    @property
    def name(self) -> str: ...

    @property
    def served_model_name(self) -> str: ...

    @property
    def cost(self) -> TierCost: ...


@dataclass(frozen=True)
class TierInfo:
    """A tier given in code (the campaign bench, tests)."""

    name: str
    served_model_name: str
    cost: TierCost


@dataclass
class Plan:
    """The decision for one request, before any tier is called."""

    prior: np.ndarray | None  # predicted acceptance per portfolio tier (None: no router for this task)
    start: int
    tiers: list[int]  # attempt order (portfolio indices)
    thresholds: list[float | None]  # certified threshold per portfolio tier (None: accepts nothing)
    end: int  # the tier that always answers: the task's chain end (the reference without a chain)
    explore: bool = False  # on the exploration sample: uncertified tiers are tried (to collect labels)


def certified(t: ThresholdResult | None) -> float | None:
    return t.threshold if t is not None and t.certified and t.threshold is not None else None


def make_plan(prior: np.ndarray | None, start_rule: float | cascade.StartRule, thresholds: Sequence[ThresholdResult | None],
              up: Sequence[bool], max_escalations: int, explore: bool = False, chain: Sequence[bool] | None = None,
              cheapest_first: bool = False) -> Plan:
    """The attempt plan of one request (`cascade` rules; start_rule: a `cascade.StartRule` or a quality target).
    Uncertified cheaper tiers are skipped, except on the
    exploration sample, which tries every tier of the portfolio from the start up (off the task's chain too), so
    the logs show what each tier could do. cheapest_first: start at the cheapest tier whatever the prior says (the
    budget's PreferCheaper switch)."""
    K = len(thresholds)
    thr = [certified(t) for t in thresholds]
    chain_k = None if chain is None or explore else [bool(c) for c in chain]
    end = K - 1 if chain_k is None else max(k for k in range(K) if chain_k[k])
    kw = {} if chain_k is None else {"chain": chain_k}
    if prior is None or cheapest_first:
        start = 0 if chain_k is None else min(k for k in range(K) if chain_k[k])
    else:
        start = cascade.start_tier(prior, start_rule, **kw)
    usable = [explore or t is not None for t in thr]
    tiers = cascade.plan_for(start, K, max_escalations, list(up), usable, **kw)
    return Plan(prior, start, tiers, thr, end, explore)


@dataclass
class Outcome:
    """What the engine did for one request."""

    attempts: list[TierAttempt] = field(default_factory=list)
    final: int | None = None  # portfolio index of the tier whose answer is returned
    body: dict[str, Any] | None = None  # that tier's response
    outcome: RoutingOutcome = "error"
    score: float | None = None
    answers: dict[str, str | None] = field(default_factory=dict)  # tier name -> answer text, for the judge
    logprobs: dict[str, list[float] | None] = field(default_factory=dict)  # tier name -> the token logprobs scored
    client_fault: UpstreamResult | None = None  # the chain end refused the request as invalid
    deadline_exceeded: bool = False

    @property
    def escalations(self) -> int:
        return max(len(self.attempts) - 1, 0)


class Observer:
    """Side effects of routing (the server's subclass feeds metrics and rollout figures). No-ops here."""

    def tier_latency(self, tier: str, seconds: float) -> None: ...

    def tier_error(self, tier: str) -> None: ...

    def spent(self, task: str, tier: str, usd: float) -> None: ...

    def escalated(self, task: str, from_tier: str, to_tier: str) -> None: ...


class CascadeEngine:
    """Routes requests over a fixed portfolio (tiers cheapest first; `ports[k]` calls tier k)."""

    def __init__(self, tiers: Sequence[TierSpec], ports: Sequence[TierPort],
                 clock: Callable[[], float] = time.monotonic):
        if len(tiers) != len(ports) or not tiers:
            raise ValueError("one port per tier, at least one tier")
        self.tiers, self.ports = list(tiers), ports  # the caller's list: a port swapped there is used here
        self.clock = clock

    def tiers_up(self) -> list[bool]:
        return [not p.breaker.is_open for p in self.ports]

    def fallback_tiers(self, tried: set[int]) -> list[int]:
        """After a failure with nothing left in the plan: the highest untried tier that is up."""
        up = self.tiers_up()
        rest = [k for k in range(len(self.tiers)) if k not in tried and up[k]]
        return rest[-1:]

    def book_fault(self, k: int, result: UpstreamResult) -> None:
        """A tier fault on the breaker (transport errors are booked by the port itself)."""
        breaker = self.ports[k].breaker
        if result.status in HOLD_STATUSES and result.retry_after is not None:
            breaker.hold(result.retry_after)
        else:
            breaker.failure()

    async def run(self, req: ParsedRequest, task: str, structured: bool, plan: Plan, confidence: ConfidenceSet,
                  deadline: float | None = None, observer: Observer | None = None) -> Outcome:
        """Call the plan's tiers in order until one's answer is accepted (or the plan and the fallbacks run out).

        deadline: `clock()` value after which no further tier is called; each call's timeout is cut to it."""
        obs = observer or Observer()
        out = Outcome(outcome="fallback")
        queue = list(plan.tiers)
        tried: set[int] = set()
        while queue:
            k = queue.pop(0)
            tried.add(k)
            tier, port = self.tiers[k], self.ports[k]
            remaining = None if deadline is None else deadline - self.clock()
            if remaining is not None and remaining <= 0:
                out.deadline_exceeded = True
                break
            if not port.breaker.allow():
                queue = queue or self.fallback_tiers(tried)
                continue
            p_k = None if plan.prior is None else float(plan.prior[k])
            is_end = k == plan.end or k == len(self.tiers) - 1
            try:
                res = await port.post(tier_path(req.kind), tier_body(req, tier.served_model_name), timeout=remaining)
            except UpstreamError as e:
                obs.tier_error(tier.name)
                out.attempts.append(TierAttempt(tier=tier.name, model=tier.served_model_name, error=str(e),
                                                predicted=p_k))
                queue = queue or self.fallback_tiers(tried)
                continue
            obs.tier_latency(tier.name, res.latency_s)
            kind = classify(res, is_end)
            if kind == "client_fault":
                port.breaker.success()  # it answered, correctly, that the request is invalid
                out.client_fault, out.outcome = res, "error"
                return out
            if kind != "answer":
                if kind == "tier_fault":
                    self.book_fault(k, res)
                    obs.tier_error(tier.name)
                else:
                    port.breaker.success()
                out.attempts.append(TierAttempt(tier=tier.name, model=tier.served_model_name, predicted=p_k,
                                                error=f"HTTP {res.status}" if res.status >= 300
                                                else "malformed response", latency_ms=res.latency_s * 1000))
                queue = queue or self.fallback_tiers(tried)
                continue
            port.breaker.success()
            text = answer_text(req.kind, res.body)
            in_tok, out_tok = usage(res.body)
            lps = token_logprobs(req.kind, res.body)
            raw = confidence.score(task, tier.name, answer_features(lps, structured, p_k))
            score = None if math.isnan(raw) else raw
            thr = plan.thresholds[k]
            ok = cascade.accept(score, thr, is_end)
            cost = tier.cost.usd(in_tok, out_tok)
            out.attempts.append(TierAttempt(tier=tier.name, model=tier.served_model_name, predicted=p_k, score=score,
                                            threshold=thr, accepted=ok, response=text, input_tokens=in_tok,
                                            output_tokens=out_tok, cost_usd=cost, latency_ms=res.latency_s * 1000))
            out.answers[tier.name], out.logprobs[tier.name] = text, lps
            obs.spent(task, tier.name, cost)
            out.final, out.body, out.score = k, res.body, score
            if ok:
                out.outcome = "accepted"
                return out
            if queue:
                obs.escalated(task, tier.name, self.tiers[queue[0]].name)
        if out.body is None:
            out.outcome = "error"
        return out
