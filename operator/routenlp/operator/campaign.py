"""DistillationCampaign: the stage Jobs a campaign runs (pure builders) and its kopf handlers.

The state machine itself is campaign_flow (pure); this module reads what it needs (the policy, its tiers, the
run's Jobs and pods), applies the Job of the next stage, and passes results on: the router version to the policy's
status, the adapter to the student tier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import kopf
from pydantic import ValidationError

from routenlp.api import GROUP, VERSION, DistillationCampaign, ModelTier, RoutingPolicy
from routenlp.api.common import READY, SecretKeyRef, now_rfc3339
from routenlp.api.modeltier import TierCost, relative_costs
from routenlp.api.routingpolicy import RiskMeasure

from . import metrics
from .campaign_flow import advance, campaign_ready, job_result, now_utc, should_start
from .distributed import distill_workload
from .meta import (
    RUN_AS_USER, host_resources, labels, metadata, pod_security_context, restricted_security_context, scratch_env,
    scratch_volumes, short_name, tier_endpoint,
)
from .modeltier import reconcile_tier
from .quantities import checked
from .routingpolicy import CAMPAIGN_POLICY_LABEL, DATA_DIR, events_claim, reconcile_policy
from .runtime import RT, doc, emit, invalid, kube, settle, timed, transition_events, write_status
from .status import condition, merge_conditions

Obj = dict[str, Any]


# Stage -> the `routenlp train` commands its Job runs, in order (all but the last as init containers, so the main
# container's termination message carries the stage's result).
STAGE_COMMANDS: dict[str, list[str]] = {
    "Clustering": ["cluster"],
    "Distilling": ["distill"],
    "Evaluating": ["evaluate"],
    "RetrainingRouter": ["retrain", "calibrate", "publish"],
}


def stage_commands(campaign: DistillationCampaign, stage: str) -> list[str]:
    if stage == "RetrainingRouter" and not campaign.spec.retrain_router:
        return ["publish"]
    return STAGE_COMMANDS[stage]


def _round(round_: int) -> list[str]:
    """Name part of a campaign round: none for round 1 (the names a single-round run always had)."""
    return [f"n{round_}"] if round_ > 1 else []


def job_name(campaign: str, run: int, stage: str, attempt: int, round_: int = 1) -> str:
    return short_name(campaign, f"r{run}", *_round(round_), stage.lower(), f"a{attempt}")


def campaign_work_dir(campaign: str, run: int, round_: int = 1) -> str:
    return f"{DATA_DIR}/campaigns/{campaign}/run-{run}" + (f"/round-{round_}" if round_ > 1 else "")


@dataclass(frozen=True)
class StageContext:
    """What the stage Jobs need to know beyond the campaign: the tiers and policy they work on."""

    student_model: str  # the student's model (path/hub id), what the trainer loads
    student_url: str  # the student tier's OpenAI-compatible base URL
    student_served_name: str
    teacher_url: str
    teacher_model: str  # `model` sent to the teacher
    tiers: tuple[str, ...]  # the policy's tiers, cheapest first
    risk_level: float
    delta: float
    max_escalations: int
    risk_measure: str = RiskMeasure.ACCEPTED_ANSWERS.value
    generation_tasks: tuple[str, ...] = ()  # tasks of kind generation: the trainer scores them as the router does
    teacher_key: SecretKeyRef | None = None
    student_cache_claim: str | None = None  # student tier's model-cache PVC: where adapters are published
    chains: tuple[tuple[str, tuple[str, ...]], ...] = ()  # pinned tasks[].chain (other tasks' chains are learnt)
    quality_floors: tuple[tuple[str, float], ...] = ()  # tasks[].qualityFloor; "*": cascade.qualityFloor
    cost_weights: tuple[tuple[str, float], ...] = ()  # tasks[].costWeight: the trainer starts requests as the router
    relative_costs: tuple[float, ...] = ()  # each policy tier's price over the reference's (with a costWeight or floor)


ADAPTER_MOUNT = "/var/lib/routenlp-adapters"  # the student's model-cache PVC inside stage Jobs


def adapter_name(campaign: str, run: int, round_: int = 1) -> str:
    """The adapter's name, which is also the router version the round produces."""
    return short_name(campaign, f"r{run}", *_round(round_))


def stage_args(campaign: DistillationCampaign, ctx: StageContext, cmd: str, run: int, round_: int = 1) -> list[str]:
    """Arguments of `routenlp train <cmd>` (trainer_image/routenlp/trainer) for this campaign run and round. From
    round 2 on, cluster reads only the failures logged under the previous round's router version, and distill and
    evaluate start from the previous round's adapter."""
    spec = campaign.spec
    work = campaign_work_dir(campaign.metadata.name, run, round_)
    events, routers = f"{DATA_DIR}/events", f"{work}/routers"
    version = adapter_name(campaign.metadata.name, run, round_)
    previous = [] if round_ == 1 else [adapter_name(campaign.metadata.name, run, round_ - 1),
                                       campaign_work_dir(campaign.metadata.name, run, round_ - 1)]
    teacher = ["--teacher-url", ctx.teacher_url, "--teacher-model", ctx.teacher_model]
    if cmd == "cluster":
        c = spec.clustering
        return ["--events", events, "--out", f"{work}/cluster", "--teacher-tier", spec.teacher_tier,
                "--student-tier", spec.student_tier, "--method", c.method, "--max-clusters", str(c.max_clusters),
                "--min-cluster-size", str(c.min_cluster_size), "--top-clusters", str(c.top_clusters),
                *(["--router-version", previous[0]] if previous else [])]
    if cmd == "distill":
        lora = spec.lora
        out = ["--clusters", f"{work}/cluster", "--out", f"{work}/distill", "--base-model", ctx.student_model,
               "--adapter-name", version, "--r", str(lora.r), "--alpha", str(lora.alpha),
               "--dropout", str(lora.dropout), "--target-modules", *lora.target_modules, "--steps", str(lora.steps),
               "--learning-rate", str(lora.learning_rate), "--batch-size", str(lora.batch_size),
               "--samples-per-cluster", str(lora.samples_per_cluster), "--budget-split", lora.budget_split,
               "--top-clusters", str(spec.clustering.top_clusters),
               "--hold-out-fraction", str(spec.evaluation.hold_out_fraction), "--quiet", *teacher,
               *(["--init-adapter", f"{previous[1]}/distill/adapter"] if previous else [])]
        return out + (["--teacher-api-key-env", "TEACHER_API_KEY"] if ctx.teacher_key else [])
    if cmd == "evaluate":
        return ["--distill", f"{work}/distill", "--out", f"{work}/evaluate", "--base-model", ctx.student_model,
                "--min-quality-gain", str(spec.evaluation.min_quality_gain),
                "--max-regression", str(spec.evaluation.max_regression), *teacher,
                *(["--baseline-adapter", f"{previous[1]}/distill/adapter"] if previous else [])]
    common = ["--events", events, "--artifact-dir", routers, "--version", version,
              "--teacher-tier", spec.teacher_tier, "--tiers", *ctx.tiers, "--risk-level", str(ctx.risk_level),
              "--risk-measure", ctx.risk_measure, "--delta", str(ctx.delta),
              "--max-escalations", str(ctx.max_escalations), "--generation-tasks", *ctx.generation_tasks]
    if ctx.chains:
        common += ["--chains", json.dumps({task: list(chain) for task, chain in ctx.chains})]
    if ctx.quality_floors:
        common += ["--quality-floors", json.dumps(dict(ctx.quality_floors))]
    if ctx.cost_weights:
        common += ["--cost-weights", json.dumps(dict(ctx.cost_weights))]
    if ctx.relative_costs:
        common += ["--relative-costs", json.dumps(list(ctx.relative_costs))]
    if cmd == "retrain":
        return [*common, "--out", f"{work}/retrain", "--student-tier", spec.student_tier,
                "--student-model", ctx.student_served_name, "--student-url", ctx.student_url,
                "--exclude", f"{work}/distill/train.jsonl"]
    if cmd == "calibrate":
        return [*common, "--out", f"{work}/calibrate", "--signals", f"{work}/retrain/signals.jsonl"]
    if cmd == "publish":
        out = ["--out", f"{work}/publish"]
        if ctx.student_cache_claim:  # the tier loads adapters from its own model-cache PVC
            out += ["--adapter", f"{work}/distill/adapter", "--adapter-name", version,
                    "--adapter-to", f"{ADAPTER_MOUNT}/adapters"]
        if campaign.spec.retrain_router:
            out += ["--router-version", f"{routers}/{version}", "--router-to", f"{DATA_DIR}/routers"]
        return out
    raise ValueError(f"unknown stage command {cmd!r}")


def stage_job(campaign: DistillationCampaign, owner: Obj, namespace: str, stage: str, run: int, attempt: int,
              artifact_claim: str, ctx: StageContext, round_: int = 1) -> Obj:
    name = campaign.metadata.name
    spec, res = campaign.spec, campaign.spec.resources
    commands = stage_commands(campaign, stage)
    gpu = {res.gpu_resource_name: str(res.gpu_count)} if stage == "Distilling" and res.gpu_count else {}
    env: list[Obj] = [{"name": "HF_HUB_OFFLINE", "value": "1"}, *scratch_env()]
    if ctx.teacher_key:  # by reference: the kubelet reads the Secret, the operator never does
        env.append({"name": "TEACHER_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": ctx.teacher_key.name, "key": ctx.teacher_key.key}}})
    scratch, scratch_mounts = scratch_volumes()
    mounts: list[Obj] = [{"name": "routenlp-data", "mountPath": DATA_DIR}, *scratch_mounts]
    volumes: list[Obj] = [{"name": "routenlp-data", "persistentVolumeClaim": {"claimName": artifact_claim}}, *scratch]
    if ctx.student_cache_claim:
        mounts.append({"name": "student-cache", "mountPath": ADAPTER_MOUNT})
        volumes.append({"name": "student-cache", "persistentVolumeClaim": {"claimName": ctx.student_cache_claim}})

    def container(cmd: str) -> Obj:
        return {
            "name": cmd,
            "image": res.image,
            "command": ["routenlp", "train", cmd],
            "args": stage_args(campaign, ctx, cmd, run, round_),
            "env": env,
            "resources": host_resources(res.cpu, res.memory, gpu),
            "volumeMounts": mounts,
            # The stage prints a one-line JSON summary last; the operator reads it from the termination message.
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "securityContext": restricted_security_context() | {"runAsUser": RUN_AS_USER},
        }

    lbls = labels("campaign-stage", name, campaign=name) | {"routenlp.io/stage": stage, "routenlp.io/run": str(run),
                                                            "routenlp.io/round": str(round_),
                                                            CAMPAIGN_POLICY_LABEL: spec.policy_ref}
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "containers": [container(commands[-1])],
        "volumes": volumes,
        "securityContext": pod_security_context(),
        "automountServiceAccountToken": False,
    }
    if len(commands) > 1:
        pod_spec["initContainers"] = [container(c) for c in commands[:-1]]
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.to_k8s() for t in res.tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(job_name(name, run, stage, attempt, round_), namespace, owner, lbls,
                             {"routenlp.io/attempt": str(attempt)}),
        "spec": {
            # Retries are the operator's (bounded by maxStageRetries, visible in status), not the Job's.
            "backoffLimit": 0,
            "activeDeadlineSeconds": res.active_deadline_seconds,
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {"metadata": {"labels": lbls}, "spec": pod_spec},
        },
    }


def stage_context(campaign: DistillationCampaign, policy: RoutingPolicy, student: ModelTier, teacher: ModelTier,
                  namespace: str, tier_costs: list[TierCost] | None = None) -> StageContext:
    """tier_costs: the policy's tiers' prices in spec.tiers order (needed with a costWeight or a quality floor)."""
    ext = teacher.spec.external
    engine = student.spec.engine
    return StageContext(
        student_model=engine.model if engine else student.spec.served_model_name,
        student_url=tier_endpoint(student, namespace),
        student_served_name=student.spec.served_model_name,
        teacher_url=tier_endpoint(teacher, namespace),
        teacher_model=ext.model if ext else teacher.spec.served_model_name,
        tiers=tuple(t.name for t in policy.spec.tiers),
        risk_level=policy.spec.cascade.risk_level,
        risk_measure=RiskMeasure(policy.spec.cascade.risk_measure).value,
        delta=policy.spec.cascade.delta,
        max_escalations=policy.spec.cascade.max_escalations,
        generation_tasks=tuple(t.name for t in policy.spec.tasks if t.kind == "generation"),
        teacher_key=ext.api_key_secret_ref if ext else None,
        student_cache_claim=engine.model_cache.claim_name if engine and engine.model_cache else None,
        chains=tuple((t.name, tuple(t.chain)) for t in policy.spec.tasks if t.chain),
        quality_floors=tuple((t.name, t.quality_floor) for t in policy.spec.tasks if t.quality_floor is not None)
        + ((("*", policy.spec.cascade.quality_floor),) if policy.spec.cascade.quality_floor is not None else ()),
        cost_weights=tuple((t.name, t.cost_weight) for t in policy.spec.tasks if t.cost_weight is not None),
        relative_costs=tuple(relative_costs(tier_costs or [])),
    )


def tier_adapter_source(reported: str, ctx_claim: str | None) -> str:
    """publish reports where it wrote the adapter inside the Job; the tier sees the same PVC as pvc://claim/path."""
    path = reported.removeprefix("file://")
    if ctx_claim and path.startswith(ADAPTER_MOUNT + "/"):
        return f"pvc://{ctx_claim}/{path[len(ADAPTER_MOUNT) + 1:]}"
    return reported


# ---------------------------------------------------------------- handlers


async def reconcile_campaign(body: Any) -> str | None:
    """Reconcile a campaign, then the policy and student tier its results go to. Returns the message of an invalid
    spec (runtime.settle), else None."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    if meta.get("deletionTimestamp"):
        return None
    async with RT.locks[("DistillationCampaign", ns, name)], RT.slots():
        fresh = await kube().get("DistillationCampaign", ns, name)
        if fresh is None:
            return None
        with timed("DistillationCampaign"):
            follow_up, invalid_spec = await _reconcile_campaign(fresh, ns, name)
    if follow_up:
        # Results flow to the policy's status (router version) and the student tier (adapter), never their spec.
        policy_name, student = follow_up
        policy = await kube().get("RoutingPolicy", ns, policy_name)
        if policy is not None:
            await reconcile_policy(policy)
        tier = await kube().get("ModelTier", ns, student)
        if tier is not None:
            await reconcile_tier(tier)
    return invalid_spec


@dataclass(frozen=True)
class _References:
    """What a campaign's stages work on, all found and valid."""

    policy: Obj  # the policy's body: its status carries the router's figures and versions
    policy_model: RoutingPolicy
    ctx: StageContext


async def _references(campaign: DistillationCampaign, ns: str) -> _References | tuple[str, str]:
    """The policy and tiers the campaign names, or the (reason, message) of why it waits for them."""
    api = kube()
    policy = await api.get("RoutingPolicy", ns, campaign.spec.policy_ref)
    if policy is None:
        return "PolicyNotFound", f"RoutingPolicy {campaign.spec.policy_ref!r} does not exist"
    tiers = {t: await api.get("ModelTier", ns, t) for t in (campaign.spec.student_tier, campaign.spec.teacher_tier)}
    missing = [t for t, obj in tiers.items() if obj is None]
    if missing:
        return "TiersNotFound", f"ModelTiers not found: {', '.join(missing)}"
    try:
        policy_model = RoutingPolicy.model_validate(doc(policy))
        costs = None
        # Cost-weighted start rules, the policy's and those a quality floor's plan search tries, weigh every tier's
        # price: the trainer needs them all.
        spec = policy_model.spec
        if spec.cascade.quality_floor is not None or any(
                t.cost_weight is not None or t.quality_floor is not None for t in spec.tasks):
            named = {t.name: await api.get("ModelTier", ns, t.name) for t in policy_model.spec.tiers}
            missing = [t for t, obj in named.items() if obj is None]
            if missing:
                return "TiersNotFound", f"ModelTiers not found: {', '.join(missing)}"
            costs = [ModelTier.model_validate(doc(obj)).spec.cost for obj in named.values()]
        ctx = stage_context(campaign, policy_model, ModelTier.model_validate(doc(tiers[campaign.spec.student_tier])),
                            ModelTier.model_validate(doc(tiers[campaign.spec.teacher_tier])), ns, costs)
    except (ValidationError, ValueError) as exc:
        return "InvalidReference", f"the policy or a tier it names is invalid: {exc}"[:500]
    return _References(policy, policy_model, ctx)


async def _reconcile_campaign(body: Obj, ns: str, name: str) -> tuple[tuple[str, str] | None, str | None]:
    """(the policy and student tier to reconcile next, or None; the message of an invalid spec, or None)."""
    api = kube()
    try:
        campaign = checked(DistillationCampaign.model_validate(doc(body)))
    except (ValidationError, ValueError) as exc:
        return None, await invalid("DistillationCampaign", body, exc)
    gen = body["metadata"].get("generation")
    old = body.get("status") or {}
    refs = await _references(campaign, ns)
    if isinstance(refs, tuple):  # waiting for them: the campaign timer looks again
        conds = [condition(READY, False, *refs, gen)]
        transition_events(body, conds)
        await write_status("DistillationCampaign", body, {
            "observedGeneration": gen, "phase": old.get("phase") or "Pending",
            "conditions": merge_conditions(old.get("conditions"), conds)})
        return None, None
    ctx = refs.ctx
    pol_status = refs.policy.get("status") or {}
    annotations = body["metadata"].get("annotations") or {}
    observed_run_id = annotations.get("routenlp.io/observed-run-id")
    # The policy's figures come from its router (/routenlp/rollout): escalations since its stable version was first
    # served, so a new version from the previous run starts the failure count afresh.
    rate, failures = pol_status.get("escalationRate"), pol_status.get("escalations")
    reason = should_start(campaign, old, observed_run_id, now_utc(), rate, failures)
    run = int(old.get("run") or 0)
    jobs = []
    if run:
        for j in await api.list("Job", ns, f"routenlp.io/campaign={name},routenlp.io/run={run}"):
            pods = await api.list("Pod", ns, f"job-name={j['metadata']['name']}")
            jobs.append(job_result(j, pods))
    step = advance(campaign, old, jobs, now_rfc3339(), pol_status.get("router"), reason, pol_status)
    if reason and campaign.spec.trigger.run_id and step.status.get("run", 0) > run:
        await api.patch_metadata("DistillationCampaign", ns, name,
                                 {"annotations": {"routenlp.io/observed-run-id": campaign.spec.trigger.run_id}})
    for holder in (step.status, *step.status.get("rounds", [])):  # where the student tier sees what publish wrote
        if holder.get("adapter"):
            adapter, _, source = holder["adapter"].partition("@")
            holder["adapter"] = f"{adapter}@{tier_adapter_source(source, ctx.student_cache_claim)}"
    if step.create_job:
        stage, attempt = step.create_job
        claim = campaign.spec.resources.artifact_claim_name or events_claim(refs.policy_model)
        job = stage_job(campaign, body, ns, stage, int(step.status["run"]), attempt, claim, ctx,
                        int(step.status.get("round") or 1))
        await api.apply(distill_workload(job, campaign) if stage == "Distilling" else job)
    emit(body, step.events)
    if step.finished:
        metrics.CAMPAIGN_RUNS.labels(ns, name, step.finished).inc()
    phase = step.status.get("phase")
    conds = [campaign_ready(campaign, step.status, now_utc(), rate, failures, gen)]
    step.status["observedGeneration"] = gen
    step.status["conditions"] = merge_conditions(old.get("conditions"), conds)
    transition_events(body, conds)
    await write_status("DistillationCampaign", body, step.status)
    if phase != old.get("phase") and phase in ("RollingOut", "Proposed", "Succeeded"):
        return (campaign.spec.policy_ref, campaign.spec.student_tier), None
    return None, None


@kopf.on.create(GROUP, VERSION, "distillationcampaigns", backoff=5)
@kopf.on.update(GROUP, VERSION, "distillationcampaigns", field="spec", backoff=5)
@kopf.on.resume(GROUP, VERSION, "distillationcampaigns", backoff=5)
async def campaign_changed(body: kopf.Body, **_: Any) -> None:
    settle(await reconcile_campaign(body))


@kopf.timer(GROUP, VERSION, "distillationcampaigns", interval=RT.campaign_seconds, initial_delay=RT.campaign_seconds,
            idle=0)
async def campaign_resync(body: kopf.Body, **_: Any) -> None:
    await reconcile_campaign(body)


@kopf.on.event("batch", "v1", "jobs", labels={"routenlp.io/campaign": kopf.PRESENT})
async def stage_job_changed(body: kopf.Body, **_: Any) -> None:
    for ref in body["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "DistillationCampaign":
            owner = await kube().get("DistillationCampaign", body["metadata"]["namespace"], ref["name"])
            if owner is not None:
                await reconcile_campaign(owner)

