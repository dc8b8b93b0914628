"""The DistillationCampaign state machine, as a pure function of (spec, status, observed Jobs, policy status, now).

Pending -> Clustering -> Distilling -> Evaluating -> RetrainingRouter -> RollingOut -> Succeeded | Failed, with
Proposed instead of RollingOut when autoApply is false. Each Job stage runs as one Job per attempt; a failed attempt
is retried up to spec.maxStageRetries times. A stage's result is the one-line JSON summary its container prints last,
read from the terminated container's message (terminationMessagePolicy FallbackToLogsOnError).

With spec.rounds > 1 a run repeats the loop: RollingOut of round n (< rounds) waits until the canary guard promoted
the round's router version, then Observing waits until the policy's router reports trigger.minFailures escalations
under that version, and round n+1 starts at Clustering (its Jobs cluster the failures logged under round n's version
and continue round n's adapter). A rolled-back round ends the run Failed; the last round ends as a single round does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from routenlp.api import DistillationCampaign, parse_duration
from routenlp.api.common import READY
from routenlp.api.stage import StageResult

from .rollout import parse_time
from .status import condition

Obj = dict[str, Any]

JOB_STAGES = ("Clustering", "Distilling", "Evaluating", "RetrainingRouter")
TERMINAL = ("Succeeded", "Failed", "Proposed")


@dataclass(frozen=True)
class JobResult:
    """One stage Job as observed: Running, Succeeded or Failed, plus the main container's termination message."""

    name: str
    stage: str
    attempt: int
    state: str
    message: str = ""
    seconds: float | None = None
    round: int = 1


@dataclass
class Step:
    """What the handler must do: write `status`, create `create_job` (stage, attempt), emit `events`."""

    status: Obj
    create_job: tuple[str, int] | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    finished: str | None = None  # "Succeeded" / "Failed" when a run ended in this step (metrics)


def parse_summary(message: str) -> Obj:
    """The last line of the message that parses as a JSON object (logs may precede it on FallbackToLogsOnError)."""
    for line in reversed((message or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return {}


def job_result(job: Obj, pods: list[Obj]) -> JobResult:
    """Observe a stage Job and (for its result) its pods' terminated main container."""
    meta, st = job["metadata"], job.get("status") or {}
    lbls = meta.get("labels", {})
    state = "Running"
    for c in st.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet"):
            state = "Succeeded"
        elif c.get("status") == "True" and c.get("type") in ("Failed", "FailureTarget"):
            state = "Failed"
    main = job["spec"]["template"]["spec"]["containers"][0]["name"]
    message = ""
    for p in pods:
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if cs.get("name") == main and term and term.get("message"):
                message = term["message"]
    if state == "Failed" and not message:
        message = "; ".join(c.get("message", "") for c in st.get("conditions") or [] if c.get("type") == "Failed")
    seconds = None
    if st.get("startTime") and st.get("completionTime"):
        seconds = (parse_time(st["completionTime"]) - parse_time(st["startTime"])).total_seconds()
    return JobResult(meta["name"], lbls.get("routenlp.io/stage", ""), int(meta.get("annotations", {}).get(
        "routenlp.io/attempt", 0)) or _attempt_from_name(meta["name"]), state, message, seconds,
        int(lbls.get("routenlp.io/round") or 1))


def _attempt_from_name(name: str) -> int:
    tail = name.rsplit("-a", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 1


def should_start(campaign: DistillationCampaign, status: Obj, observed_run_id: str | None, now: datetime,
                 escalation_rate: float | None, failures: int | None) -> str | None:
    """Why a new run starts now (a reason word), or None. Runs never overlap."""
    phase = status.get("phase")
    if phase not in (None, "Pending", *TERMINAL):
        return None
    trig = campaign.spec.trigger
    last = status.get("lastRunTime")
    if trig.mode == "Manual":
        if not status.get("run"):
            return "Created"
        if trig.run_id and trig.run_id != observed_run_id:
            return "RunIdChanged"
        return None
    if last and (now - parse_time(last)).total_seconds() < parse_duration(trig.cooldown):
        return None
    if trig.mode == "Schedule":
        from croniter import croniter  # lazy: only schedule-triggered campaigns need it

        created = campaign.metadata.model_extra.get("creationTimestamp")
        base = parse_time(last or created or last_or_now(now))
        return "Schedule" if croniter(trig.schedule, base).get_next(datetime) <= now else None
    if trig.mode == "EscalationRate":
        if escalation_rate is None or escalation_rate < trig.escalation_rate_threshold:
            return None
        if failures is not None and failures < trig.min_failures:
            return None
        return "EscalationRate"
    return None


def trigger_waiting(campaign: DistillationCampaign, status: Obj, now: datetime, escalation_rate: float | None,
                    failures: int | None) -> str:
    """Why an automatic run has not started (for the Ready condition while waiting); "" when nothing is holding it."""
    trig = campaign.spec.trigger
    last = status.get("lastRunTime")
    if trig.mode == "Manual":
        return "manual trigger: set spec.trigger.runId to start a run"
    if last:
        left = parse_duration(trig.cooldown) - (now - parse_time(last)).total_seconds()
        if left > 0:
            return f"cooldown {trig.cooldown} after the last run: {int(left)}s left"
    if trig.mode == "EscalationRate":
        policy = campaign.spec.policy_ref
        if escalation_rate is None:
            return f"RoutingPolicy {policy} has no escalation rate from its router yet"
        if escalation_rate < trig.escalation_rate_threshold:
            return (f"escalation rate {escalation_rate:.3f} of RoutingPolicy {policy} below "
                    f"escalationRateThreshold {trig.escalation_rate_threshold}")
        if failures is not None and failures < trig.min_failures:
            return f"{failures} escalation failures observed, minFailures {trig.min_failures}"
    if trig.mode == "Schedule":
        return f"schedule {trig.schedule!r}"
    return ""


def last_or_now(now: datetime) -> str:
    return now.astimezone(timezone.utc).isoformat()


def _stage(status: Obj, stage: str) -> Obj | None:
    return next((s for s in status.get("stages", []) if s["stage"] == stage), None)


def _set_stage(status: Obj, entry: Obj) -> None:
    entry = {k: v for k, v in entry.items() if v is not None}
    stages = [s for s in status.get("stages", []) if s["stage"] != entry["stage"]]
    stages.append(entry)
    order = {s: i for i, s in enumerate((*JOB_STAGES, "RollingOut"))}
    status["stages"] = sorted(stages, key=lambda s: order.get(s["stage"], 99))


def start_run(status: Obj, now: str, reason: str) -> Step:
    st = {**status, "phase": "Clustering", "run": int(status.get("run") or 0) + 1, "lastRunTime": now,
          "stages": [], "clusters": [], "metrics": {}, "adapter": None, "routerVersion": None,
          "round": 1, "rounds": [{"round": 1, "state": "Running"}]}
    _set_stage(st, {"stage": "Clustering", "attempts": 1, "state": "Running", "message": ""})
    return Step(st, ("Clustering", 1), [("Normal", "RunStarted", f"run {st['run']} started ({reason})")])


def start_round(status: Obj, spec_rounds: int, why: str) -> Step:
    """Round n+1 of the run: the previous round's adapter and router version stay in status (they serve) until
    this round's stages replace them."""
    n = int(status.get("round") or 1) + 1
    st = {**status, "phase": "Clustering", "round": n, "stages": [], "clusters": [], "metrics": {},
          "rounds": [*status.get("rounds", []), {"round": n, "state": "Running"}]}
    _set_stage(st, {"stage": "Clustering", "attempts": 1, "state": "Running", "message": ""})
    return Step(st, ("Clustering", 1), [("Normal", "RoundStarted", f"round {n} of {spec_rounds} started: {why}")])


def current_round(status: Obj) -> Obj:
    """The current round's entry in status.rounds (created for a status an older operator wrote)."""
    n = int(status.get("round") or 1)
    rounds = status.setdefault("rounds", [])
    entry = next((r for r in rounds if r.get("round") == n), None)
    if entry is None:
        entry = {"round": n, "state": "Running"}
        rounds.append(entry)
    return entry


def observe_rounds(status: Obj, policy_status: Obj | None) -> None:
    """Copy the policy router's observed figures onto the round whose version they are of (the stable version)."""
    figs = policy_status or {}
    version = figs.get("figuresVersion")
    for r in status.get("rounds") or []:
        if version and r.get("routerVersion") == version:
            for k in ("costReduction", "violationRate"):
                if isinstance(figs.get(k), (int, float)):
                    r[k] = figs[k]


def _next_stage(stage: str) -> str:
    return {"Clustering": "Distilling", "Distilling": "Evaluating", "Evaluating": "RetrainingRouter",
            "RetrainingRouter": "RollingOut"}[stage]


def gate(campaign: DistillationCampaign, metrics: Obj, result: StageResult) -> tuple[bool, str]:
    g = campaign.spec.evaluation
    gain, regression = metrics.get("qualityGain"), metrics.get("regression")
    if gain is None:
        passed = bool(result.passed)
        return passed, "evaluate reported passed" if passed else "evaluate reported no quality figures"
    if gain < g.min_quality_gain:
        return False, f"quality gain {gain:.4f} < minQualityGain {g.min_quality_gain}"
    if regression is not None and regression > g.max_regression:
        return False, f"regression {regression:.4f} > maxRegression {g.max_regression}"
    return True, f"quality gain {gain:.4f} >= {g.min_quality_gain}"


def stage_result(message: str) -> StageResult:
    """A stage's result from its container's message. A summary whose fields do not validate counts as no summary
    (the stage reported nothing the operator can use), never as a failed reconcile."""
    try:
        return StageResult.of(parse_summary(message))
    except ValidationError:
        return StageResult()


def _record(status: Obj, stage: str, result: StageResult, campaign: DistillationCampaign) -> tuple[bool, str]:
    """Fold a stage's result into status; (continue?, message)."""
    if stage == "Clustering":
        raw = result.clusters
        clusters = [{"id": c.id or i, "size": c.size or 0, "costUsd": c.cost_usd or 0.0,
                     **({"escalationRate": c.escalation_rate} if c.escalation_rate is not None else {}),
                     "examples": [str(e)[:200] for e in (c.examples or [])[:3]]}
                    for i, c in enumerate(raw if isinstance(raw, list) else [])]
        count = len(clusters) if isinstance(raw, list) else raw or 0  # the trainer may report a count only
        status["clusters"] = clusters[: campaign.spec.clustering.top_clusters]
        entry = current_round(status)
        if result.failures is not None:
            entry["failures"] = result.failures
        if status["clusters"]:
            entry["targetedCostUsd"] = round(sum(c["costUsd"] for c in status["clusters"]), 8)
        if not count:
            return False, "no clusters of escalation failures to distill"
        return True, f"{count} clusters"
    if stage == "Distilling":
        if result.adapter:
            status["adapter"] = current_round(status)["adapter"] = result.adapter
        return True, f"adapter {result.adapter}" if result.adapter else "distilled"
    if stage == "Evaluating":
        before, after, gain = result.quality_before, result.quality_after, result.quality_gain
        if gain is None and before is not None and after is not None:
            gain = round(after - before, 6)
        m = {"qualityBefore": before, "qualityAfter": after, "qualityGain": gain, "regression": result.regression,
             "teacherQuality": result.teacher_quality}
        status["metrics"] = {k: v for k, v in m.items() if v is not None}
        entry = current_round(status)
        entry.update({k: status["metrics"][k] for k in ("qualityAfter", "qualityGain") if k in status["metrics"]})
        return gate(campaign, status["metrics"], result)
    if stage == "RetrainingRouter":
        version = result.router_version
        entry = current_round(status)
        if result.adapter:
            status["adapter"] = entry["adapter"] = result.adapter
        if version:
            status["routerVersion"] = entry["routerVersion"] = version
        return True, f"router version {version}" if version else "published"
    return True, ""


def advance(campaign: DistillationCampaign, status: Obj, jobs: list[JobResult], now: str,
            policy_router: Obj | None = None, start_reason: str | None = None, policy_status: Obj | None = None) -> Step:
    """One step of the state machine. `jobs`: this run's stage Jobs; `policy_router`: the policy's status.router;
    `policy_status`: the policy's status (its router's observed figures, for rounds)."""
    status = json.loads(json.dumps(status or {}))
    observe_rounds(status, policy_status)
    phase = status.get("phase")
    if phase in (None, "Pending", *TERMINAL):
        if start_reason:
            return start_run(status, now, start_reason)
        if phase is None:
            status["phase"] = "Pending"
        return Step(status)

    if phase in JOB_STAGES:
        entry = _stage(status, phase) or {"stage": phase, "attempts": 1, "state": "Running", "message": ""}
        attempt = int(entry.get("attempts") or 1)
        n = int(status.get("round") or 1)
        job = next((j for j in jobs if j.stage == phase and j.attempt == attempt and j.round == n), None)
        if job is None:  # not created yet, or deleted under us: (re)create it (apply is idempotent)
            _set_stage(status, {**entry, "state": "Running"})
            return Step(status, (phase, attempt))
        entry = {**entry, "job": job.name}
        if job.state == "Running":
            _set_stage(status, {**entry, "state": "Running"})
            return Step(status)
        if job.state == "Failed":
            if attempt <= campaign.spec.max_stage_retries:
                _set_stage(status, {**entry, "attempts": attempt + 1, "state": "Running",
                                    "message": f"attempt {attempt} failed: {job.message[:200]}"})
                return Step(status, (phase, attempt + 1),
                            [("Warning", "StageRetried", f"{phase} attempt {attempt} failed; retrying")])
            _set_stage(status, {**entry, "state": "Failed", "message": job.message[:300], "seconds": job.seconds})
            status["phase"] = "Failed"
            current_round(status)["state"] = "Failed"
            return Step(status, None, [("Warning", "StageFailed",
                                        f"{phase} failed after {attempt} attempts: {job.message[:200]}")], "Failed")
        ok, msg = _record(status, phase, stage_result(job.message), campaign)
        if not ok:
            _set_stage(status, {**entry, "state": "Succeeded" if phase == "Clustering" else "Failed",
                                "message": msg, "seconds": job.seconds})
            if phase == "Clustering":  # nothing to do is a successful run
                status["phase"] = "Succeeded"
                current_round(status)["state"] = "Succeeded"
                return Step(status, None, [("Normal", "NothingToDistill", msg)], "Succeeded")
            status["phase"] = "Failed"
            current_round(status)["state"] = "Failed"
            return Step(status, None, [("Warning", "EvaluationGateFailed", msg)], "Failed")
        _set_stage(status, {**entry, "state": "Succeeded", "message": msg, "seconds": job.seconds})
        nxt = _next_stage(phase)
        if nxt == "RollingOut":
            if not campaign.spec.auto_apply:
                status["phase"] = "Proposed"
                return Step(status, None, [("Normal", "Proposed",
                                            f"results ready for review: adapter {status.get('adapter')}, router "
                                            f"version {status.get('routerVersion')}")], "Succeeded")
            status["phase"] = "RollingOut"
            _set_stage(status, {"stage": "RollingOut", "attempts": 1, "state": "Running", "message": ""})
            return Step(status, None, [("Normal", "RollingOut", f"rolling out router version "
                                                                f"{status.get('routerVersion')}")])
        status["phase"] = nxt
        _set_stage(status, {"stage": nxt, "attempts": 1, "state": "Running", "message": ""})
        return Step(status, (nxt, 1), [("Normal", "StageSucceeded", f"{phase}: {msg}")])

    if phase == "RollingOut":
        return _rolling_out(campaign, status, policy_router or {})
    if phase == "Observing":
        return _observing(campaign, status, policy_router or {}, policy_status or {})
    return Step(status)


def _rolled_back(router: Obj, version: str | None) -> bool:
    return any(h.get("version") == version and h.get("action") == "RolledBack" for h in router.get("history") or [])


def _rolling_out(campaign: DistillationCampaign, status: Obj, router: Obj) -> Step:
    """The last round succeeds once its version is live (canary, current or proposed), as a single round does; an
    earlier round waits for the canary guard to promote its version: the next round learns from its failures."""
    version = status.get("routerVersion")
    n, last = int(status.get("round") or 1), int(status.get("round") or 1) >= campaign.spec.rounds
    entry = _stage(status, "RollingOut") or {"stage": "RollingOut", "attempts": 1}
    if version is not None and _rolled_back(router, version):
        _set_stage(status, {**entry, "state": "Failed", "message": f"the canary guard rolled back router version "
                                                                   f"{version} of round {n}"})
        status["phase"] = "Failed"
        current_round(status)["state"] = "Failed"
        return Step(status, None, [("Warning", "RolledBack", f"round {n}: router version {version} was rolled back; "
                                                             f"the run stops")], "Failed")
    live = version is None or version in (router.get("current"), router.get("canary"), router.get("proposed"))
    if last and live:
        where = "current" if version == router.get("current") else "canary or proposed"
        _set_stage(status, {**entry, "state": "Succeeded", "message": f"router version {version} is {where}"})
        status["phase"] = "Succeeded"
        current_round(status)["state"] = "Succeeded"
        return Step(status, None, [("Normal", "RunSucceeded", f"run {status.get('run')} succeeded")], "Succeeded")
    if last or version != router.get("current"):
        if not last:
            why = (f"router version {version} is only proposed (the policy pins spec.router.version): pin it to go on"
                   if version == router.get("proposed") else
                   f"waiting for the canary guard to promote router version {version}")
            _set_stage(status, {**entry, "state": "Running", "message": why})
        return Step(status)
    _set_stage(status, {**entry, "state": "Succeeded", "message": f"router version {version} is current"})
    status["phase"] = "Observing"
    current_round(status)["state"] = "Succeeded"
    return Step(status, None, [("Normal", "RoundRolledOut", f"round {n}: router version {version} is current; "
                                                            f"waiting for failures under it")])


def _observing(campaign: DistillationCampaign, status: Obj, router: Obj, figures: Obj) -> Step:
    """Between rounds: the next round starts once the router reports minFailures escalations under this version."""
    version, need = status.get("routerVersion"), campaign.spec.trigger.min_failures
    if router.get("current") != version:
        if _rolled_back(router, version) or router.get("current"):
            status["phase"] = "Failed"
            return Step(status, None, [("Warning", "RouterReplaced", f"router version {version} no longer serves "
                                        f"(current: {router.get('current')}); the run stops")], "Failed")
        return Step(status)
    seen = figures.get("escalations") if figures.get("figuresVersion") == version else None
    if seen is None or seen < need:
        _set_stage(status, {**(_stage(status, "RollingOut") or {"stage": "RollingOut", "attempts": 1}),
                            "message": f"router version {version} is current; {seen or 0} of {need} escalations "
                                       f"(trigger.minFailures) under it before round {int(status.get('round') or 1) + 1}"})
        return Step(status)
    return start_round(status, campaign.spec.rounds, f"{seen} escalations under router version {version}")


@dataclass(frozen=True)
class RouterOffer:
    """The newest router version campaigns produced for a policy, and how that campaign wants it rolled out
    (`spec.rollout`; None: the policy's own setting)."""

    version: str | None = None
    propose_only: bool = False  # the campaign has autoApply false: the version is only proposed
    canary_percent: int | None = None
    promote_after: float = 0.0  # seconds the canary serves before the guard may promote it


# Phases in which status.routerVersion is a version the campaign has produced for traffic (in the Job stages of
# round 2 and later it is the previous round's version, which keeps serving).
OFFERING = ("RollingOut", "Succeeded", "Proposed", "Observing", *JOB_STAGES)


def router_offer(campaigns: list[Obj], policy: str) -> RouterOffer:
    """What the policy's rollout follows: the router version of the campaign (for `policy`) that started last."""
    best: tuple[str, Obj] | None = None
    for c in campaigns:
        st, spec = c.get("status") or {}, c.get("spec") or {}
        if spec.get("policyRef") != policy or not st.get("routerVersion") or st.get("phase") not in OFFERING:
            continue
        key = st.get("lastRunTime") or ""
        if best is None or key > best[0]:
            best = (key, c)
    if best is None:
        return RouterOffer()
    st, rollout = best[1]["status"], (best[1].get("spec") or {}).get("rollout") or {}
    try:
        after = parse_duration(rollout["promoteAfter"]) if rollout.get("promoteAfter") else 0.0
    except ValueError:  # the CRD schema's pattern keeps this out; a stored oddity must not stop the policy
        after = 0.0
    return RouterOffer(st["routerVersion"], st.get("phase") == "Proposed", rollout.get("canaryPercent"), after)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def campaign_adapters(status: Obj) -> list[Obj]:
    """{"name","source"} of the adapters the student tier must serve for this campaign (status.adapter is
    name@uri): the one being rolled out or finished, and those of the last two rounds that reached traffic (the
    stable router version may still be the previous round's while the newest is a canary)."""
    names = [r["adapter"] for r in (status.get("rounds") or []) if r.get("state") == "Succeeded" and r.get("adapter")]
    names = names[-2:]
    if status.get("adapter") and status.get("phase") in ("RollingOut", "Succeeded"):
        names.append(status["adapter"])
    out: list[Obj] = []
    for a in dict.fromkeys(names):
        name, _, source = a.partition("@")
        out.append({"name": name, "source": source or name})
    return out


def campaign_ready(campaign: DistillationCampaign, status: Obj, now: datetime, rate: float | None,
                   failures: int | None, generation: int | None) -> Obj:
    """The Ready condition of a campaign in `status`: True once Succeeded or Proposed; the reason is the phase (or
    RunFailed, WaitingForTrigger), the message the last stage's and, while Pending, what the trigger waits for."""
    phase = status.get("phase")
    reason = {"Failed": "RunFailed", "Pending": "WaitingForTrigger"}.get(phase, phase)
    stage_msg = next((s.get("message") for s in reversed(status.get("stages", [])) if s.get("message")), "")
    waiting = trigger_waiting(campaign, status, now, rate, failures) if phase == "Pending" else ""
    return condition(READY, phase in ("Succeeded", "Proposed"), reason,
                     f"phase {phase}" + (f": {stage_msg}" if stage_msg else "")
                     + (f": waiting for the trigger: {waiting}" if waiting else ""), generation)
