"""Builders: spec -> Kubernetes objects. Every emitted object is checked with kubernetes-validate --strict (1.37)."""

from __future__ import annotations

import copy
import itertools
import json

import kubernetes_validate
import pytest
import yaml

from routenlp.api import DistillationCampaign, ModelTier, RoutingPolicy
from routenlp.api.campaign import STAGES
from routenlp.operator import campaign, meta, modeltier, routingpolicy, webhook
from routenlp.api.router_config import RouterConfig

NS = "team-a"
API = "routenlp.io/v1alpha1"


def owner(kind: str, name: str) -> dict:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name, "uid": "7b3f1c2e-0000-4000-8000-000000000001"}}


def mt(name: str = "small", **spec) -> ModelTier:
    body = {"servedModelName": name, "cost": {"inputPerMillion": 0.1, "outputPerMillion": 0.3},
            "engine": {"model": "Qwen/Qwen2.5-7B-Instruct"}}
    body.update(spec)
    return ModelTier.model_validate({"apiVersion": API, "kind": "ModelTier", "metadata": {"name": name}, "spec": body})


def rp(name: str = "support", tiers=("small", "large"), **spec) -> RoutingPolicy:
    body = {"tiers": [{"name": t} for t in tiers], "tasks": [{"name": "intent"}]}
    body.update(spec)
    return RoutingPolicy.model_validate({"apiVersion": API, "kind": "RoutingPolicy", "metadata": {"name": name},
                                         "spec": body})


def dc(name: str = "c", **spec) -> DistillationCampaign:
    body = {"policyRef": "support", "studentTier": "small", "teacherTier": "large"}
    body.update(spec)
    return DistillationCampaign.model_validate({"apiVersion": API, "kind": "DistillationCampaign",
                                                "metadata": {"name": name}, "spec": body})


def valid(obj: dict) -> None:
    kubernetes_validate.validate(obj, "1.37", strict=True)


# A matrix of engine specs: every field that changes the emitted objects, in combination.
ENGINE_VARIANTS = [
    {},
    {"engine": {"model": "pvc://weights/qwen7b", "modelCache": {"claimName": "weights", "readOnly": True},
                "tensorParallelSize": 2, "resources": {"gpuCount": 2, "cpu": "8", "memory": "64Gi", "shmSize": "8Gi"}}},
    {"engine": {"model": "s3://bucket/m", "quantization": "awq", "maxModelLen": 8192, "gpuMemoryUtilization": 0.85,
                "revision": "main", "dtype": "bfloat16", "extraArgs": ["--enable-prefix-caching"],
                "hubTokenSecretRef": {"name": "hf", "key": "token"}}},
    {"engine": {"model": "/models/local", "resources": {"gpuCount": 0}, "nodeSelector": {"pool": "cpu"},
                "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}},
    {"engine": {"model": "org/m", "resources": {"gpuResourceName": "amd.com/gpu", "gpuCount": 1}}},
]
ADAPTER_VARIANTS = [{}, {"adapters": [{"name": "billing", "source": "pvc://weights/a/billing"}], "maxLoras": 8},
                    {"adapterPolicy": "AcceptCampaign"}]


@pytest.mark.parametrize("engine,adapters", list(itertools.product(ENGINE_VARIANTS, ADAPTER_VARIANTS)))
def test_tier_objects_valid(engine, adapters):
    tier = mt(**engine, **adapters, replicas=3)
    objs = modeltier.tier_objects(tier, owner("ModelTier", "small"), NS)
    assert [o["kind"] for o in objs] == ["Deployment", "Service"]
    for o in objs:
        valid(o)
        assert o["metadata"]["ownerReferences"][0]["uid"].startswith("7b3f")
        assert o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "routenlp-operator"
        assert o["metadata"]["labels"]["routenlp.io/tier"] == "small"


def test_vllm_deployment_details():
    tier = mt(engine={"model": "pvc://weights/qwen7b", "modelCache": {"claimName": "weights", "mountPath": "/w"},
                      "tensorParallelSize": 2, "maxModelLen": 4096, "quantization": "fp8",
                      "resources": {"gpuCount": 2}, "extraArgs": ["--max-model-len", "2048"]},
              adapters=[{"name": "x", "source": "/a/x"}], replicas=2)
    dep = modeltier.tier_deployment(tier, owner("ModelTier", "small"), NS)
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    args = c["args"]
    assert args[args.index("--model") + 1] == "/w/qwen7b"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--quantization") + 1] == "fp8"
    assert "--enable-lora" in args and args[args.index("--max-loras") + 1] == "4"
    assert args[-2:] == ["--max-model-len", "2048"]  # extraArgs last: they win
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2" and c["resources"]["requests"]["nvidia.com/gpu"] == "2"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["medium"] == "Memory"
    assert next(v for v in pod["volumes"] if v["name"] == "model-cache")["persistentVolumeClaim"]["claimName"] == "weights"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 1800
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_external_tier_has_no_objects():
    tier = mt(engine=None, external={"baseUrl": "https://api.example.com/v1/", "model": "gpt"})
    assert modeltier.tier_objects(tier, owner("ModelTier", "small"), NS) == []
    assert meta.tier_endpoint(tier, NS) == "https://api.example.com/v1"


def _tiers():
    return [mt("small"), mt("large", engine=None, external={"baseUrl": "https://x.example/v1", "model": "big",
                                                            "apiKeySecretRef": {"name": "k", "key": "apiKey"}})]


@pytest.mark.parametrize("mode,claim,stype", [("gateway", None, "ClusterIP"), ("gateway", "shared-events", "LoadBalancer"),
                                               ("sidecar", None, "ClusterIP")])
def test_policy_objects_valid(mode, claim, stype):
    policy = rp(deployment={"mode": mode, "service": {"type": stype}},
                feedback={"eventLogClaimName": claim} if claim else {})
    objs, h = routingpolicy.policy_objects(policy, _tiers(), owner("RoutingPolicy", "support"), NS,
                                      {"current": "v1", "canary": "v2", "canaryPercent": 10})
    kinds = [o["kind"] for o in objs]
    assert kinds[0] == "ConfigMap"
    assert ("PersistentVolumeClaim" in kinds) == (claim is None)
    assert ("Deployment" in kinds) == (mode == "gateway")
    for o in objs:
        valid(o)
    cfg = RouterConfig.model_validate(yaml.safe_load(objs[0]["data"]["router.yaml"]))
    assert [t.name for t in cfg.tiers] == ["small", "large"]
    assert cfg.tiers[1].api_key_env == "ROUTENLP_API_KEY_LARGE" and cfg.tiers[1].served_model_name == "big"
    assert cfg.router.stable == "v1" and cfg.router.canary == "v2" and cfg.router.canary_percent == 10
    assert objs[0]["metadata"]["annotations"]["routenlp.io/config-hash"] == h
    if mode == "gateway":
        dep = next(o for o in objs if o["kind"] == "Deployment")
        assert dep["spec"]["template"]["metadata"]["annotations"]["routenlp.io/config-hash"] == h
        router = dep["spec"]["template"]["spec"]["containers"][0]
        assert router["command"] == ["routenlp", "router"] and router["args"][:2] == ["--config", "/etc/routenlp/router.yaml"]
        assert router["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert router["livenessProbe"]["httpGet"]["path"] == "/healthz"
        env = router["env"]
        key = next(e for e in env if e["name"] == "ROUTENLP_API_KEY_LARGE")
        assert key["valueFrom"]["secretKeyRef"] == {"name": "k", "key": "apiKey"}  # by reference, never the value


def test_config_hash_changes_with_config_only():
    a, h1 = routingpolicy.policy_objects(rp(), _tiers(), owner("RoutingPolicy", "support"), NS)
    _, h2 = routingpolicy.policy_objects(rp(), _tiers(), owner("RoutingPolicy", "support"), NS)
    _, h3 = routingpolicy.policy_objects(rp(cascade={"riskLevel": 0.01}), _tiers(), owner("RoutingPolicy", "support"), NS)
    assert h1 == h2 != h3


def test_sidecar_patch_is_idempotent():
    policy = rp(deployment={"mode": "sidecar"})
    pod = {"spec": {"containers": [{"name": "app", "image": "a"}]}}
    ops = webhook.sidecar_patch(pod, policy, _tiers())
    import jsonpatch
    out = jsonpatch.apply_patch(pod, ops)
    assert [c["name"] for c in out["spec"]["containers"]] == ["app", "router"]
    assert {v["name"] for v in out["spec"]["volumes"]} == {"router-config", "router-state", "routenlp-data",
                                                           "routenlp-tmp", "routenlp-cache"}
    assert out["metadata"]["labels"] == {routingpolicy.ROUTER_LABEL: "support"}  # its tiers' NetworkPolicy lets it in
    assert webhook.sidecar_patch(out, policy, _tiers()) == []
    valid({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": out["spec"]})


def test_deprecated_fields_become_webhook_warnings_and_one_event():
    """`spec.tasks[].labels` (now `answers`): the validating webhook's AdmissionReview warnings and the reconcile's
    DeprecatedField Event say the same (api.routingpolicy.deprecations)."""
    body = {"apiVersion": API, "kind": "RoutingPolicy", "metadata": {"name": "support"},
            "spec": {"tiers": [{"name": "small"}], "defaultTask": "chat",
                     "tasks": [{"name": "chat"}, {"name": "intent", "kind": "structured", "labels": ["a", "b"]}]}}
    warnings: list[str] = []
    webhook.warn_deprecated(body=body, warnings=warnings)
    assert warnings == [("spec.tasks[1].labels is deprecated since v0.2: use spec.tasks[1].answers (same meaning); "
                         "the old name is accepted until v0.3")]
    assert routingpolicy.deprecation_events(RoutingPolicy.model_validate(body)) == [
        ("Warning", "DeprecatedField", warnings[0])]
    renamed = copy.deepcopy(body)
    renamed["spec"]["tasks"][1]["answers"] = renamed["spec"]["tasks"][1].pop("labels")
    assert webhook.deprecation_warnings(renamed) == []
    assert routingpolicy.deprecation_events(RoutingPolicy.model_validate(renamed)) == []
    # a spec the models reject gets no warning: the operator reports it (InvalidSpec)
    renamed["spec"]["tasks"][1]["labels"] = ["c"]
    assert webhook.deprecation_warnings(renamed) == []


@pytest.mark.parametrize("stage", [s for s in STAGES if s != "RollingOut"])
@pytest.mark.parametrize("spec", [{}, {"retrainRouter": False},
                                  {"resources": {"gpuCount": 2, "gpuResourceName": "amd.com/gpu",
                                                 "nodeSelector": {"pool": "train"},
                                                 "tolerations": [{"key": "gpu", "operator": "Exists"}]}}])
def test_stage_jobs_valid(stage, spec):
    job = campaign.stage_job(dc(**spec), owner("DistillationCampaign", "c"), NS, stage, 3, 2, "support-events", ctx())
    valid(job)
    assert job["metadata"]["name"] == f"c-r3-{stage.lower()}-a2"
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] > 0
    pod = job["spec"]["template"]["spec"]
    for c in pod["containers"] + pod.get("initContainers", []):
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert c["command"][:2] == ["routenlp", "train"]
    limits = pod["containers"][0]["resources"]["limits"]
    gpu_name = spec.get("resources", {}).get("gpuResourceName", "nvidia.com/gpu")
    assert (gpu_name in limits) == (stage == "Distilling")


def ctx(**kw) -> campaign.StageContext:
    student = mt("small", engine={"model": "pvc://weights/small", "modelCache": {"claimName": "weights"}})
    teacher = mt("large", engine=None, external={"baseUrl": "https://x.example/v1", "model": "big",
                                                  "apiKeySecretRef": {"name": "k", "key": "apiKey"}})
    return campaign.stage_context(dc(**kw), rp(tiers=("small", "large")), student, teacher, NS)


def test_stage_args_follow_the_trainer_cli():
    c = ctx()
    assert c.teacher_url == "https://x.example/v1" and c.teacher_model == "big" and c.student_cache_claim == "weights"
    job = campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, "Distilling", 1, 1, "ev", c)
    main = job["spec"]["template"]["spec"]["containers"][0]
    args = main["args"]
    assert args[args.index("--clusters") + 1].endswith("/campaigns/c/run-1/cluster")
    assert args[args.index("--base-model") + 1] == "pvc://weights/small"
    assert args[args.index("--teacher-api-key-env") + 1] == "TEACHER_API_KEY"
    key = next(e for e in main["env"] if e["name"] == "TEACHER_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "k", "key": "apiKey"}
    job = campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, "RetrainingRouter", 1, 1, "ev", c)
    pod = job["spec"]["template"]["spec"]
    retrain, calibrate = pod["initContainers"]
    publish = pod["containers"][0]["args"]
    assert retrain["args"][retrain["args"].index("--version") + 1] == "c-r1"
    assert calibrate["args"][calibrate["args"].index("--signals") + 1].endswith("run-1/retrain/signals.jsonl")
    assert publish[publish.index("--router-version") + 1].endswith("run-1/routers/c-r1")
    assert publish[publish.index("--adapter-to") + 1] == f"{campaign.ADAPTER_MOUNT}/adapters"
    assert {"name": "student-cache", "persistentVolumeClaim": {"claimName": "weights"}} in pod["volumes"]
    src = campaign.tier_adapter_source(f"file://{campaign.ADAPTER_MOUNT}/adapters/c-r1", "weights")
    assert src == "pvc://weights/adapters/c-r1"
    from routenlp.operator.adapters import adapter_path
    assert adapter_path(src, "/models") == "/models/adapters/c-r1"


def test_short_names_stay_dns_labels():
    name = campaign.job_name("a" * 60, 12, "RetrainingRouter", 3)
    assert len(name) <= 63 and name == campaign.job_name("a" * 60, 12, "RetrainingRouter", 3)
    assert name != campaign.job_name("a" * 60, 12, "RetrainingRouter", 4)


@pytest.mark.parametrize("measure", [None, "allRequests"])
def test_retrain_jobs_calibrate_for_the_policys_risk_measure(measure):
    student = mt("small", engine={"model": "pvc://weights/small", "modelCache": {"claimName": "weights"}})
    teacher = mt("large")
    cascade = {"riskLevel": 0.07, **({"riskMeasure": measure} if measure else {})}
    c = campaign.stage_context(dc(), rp(tiers=("small", "large"), cascade=cascade), student, teacher, NS)
    job = campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, "RetrainingRouter", 1, 1, "ev", c)
    for container in job["spec"]["template"]["spec"]["initContainers"]:  # retrain, then calibrate
        args = container["args"]
        assert args[args.index("--risk-level") + 1] == "0.07"
        assert args[args.index("--risk-measure") + 1] == (measure or "acceptedAnswers")


def test_retrain_jobs_get_the_policys_pinned_chains_and_quality_floors():
    student, teacher = mt("small", engine={"model": "pvc://weights/small"}), mt("large")
    tasks = [{"name": "intent", "chain": ["large"], "qualityFloor": 0.95}, {"name": "chat"}]
    c = campaign.stage_context(dc(), rp(tiers=("small", "large"), tasks=tasks, defaultTask="intent",
                                        cascade={"riskMeasure": "allRequests"}), student, teacher, NS)
    job = campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, "RetrainingRouter", 1, 1, "ev", c)
    for container in job["spec"]["template"]["spec"]["initContainers"]:
        args = container["args"]
        assert json.loads(args[args.index("--chains") + 1]) == {"intent": ["large"]}  # chat's is learnt
        assert json.loads(args[args.index("--quality-floors") + 1]) == {"intent": 0.95}
    plain = campaign.stage_context(dc(), rp(), student, teacher, NS)
    job = campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, "RetrainingRouter", 1, 1, "ev", plain)
    assert "--chains" not in job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    # the policy's floor (cascade.qualityFloor) travels as "*": the tasks without their own floor, pooled
    mixed = campaign.stage_context(dc(), rp(tiers=("small", "large"), tasks=tasks, defaultTask="intent",
                                            cascade={"qualityFloor": 0.97}), student, teacher, NS)
    job = campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, "RetrainingRouter", 1, 1, "ev", mixed)
    args = job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert json.loads(args[args.index("--quality-floors") + 1]) == {"intent": 0.95, "*": 0.97}


def test_retrain_jobs_get_the_tasks_cost_weights_and_the_tiers_relative_prices():
    """A task's costWeight reaches the trainer with every tier's price over the reference's, so calibration starts
    requests where the router will (api.modeltier.relative_costs, the function the router uses)."""
    from routenlp.api.modeltier import TierCost

    student, teacher = mt("small", engine={"model": "pvc://weights/small"}), mt("large")
    tasks = [{"name": "intent", "costWeight": 0.2}, {"name": "chat"}]
    costs = [TierCost(input_per_million=0.1, output_per_million=0.3), TierCost(input_per_million=2.0,
                                                                                  output_per_million=6.0)]
    c = campaign.stage_context(dc(), rp(tiers=("small", "large"), tasks=tasks, defaultTask="intent"), student, teacher,
                               NS, costs)
    job = campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, "RetrainingRouter", 1, 1, "ev", c)
    for container in job["spec"]["template"]["spec"]["initContainers"]:
        args = container["args"]
        assert json.loads(args[args.index("--cost-weights") + 1]) == {"intent": 0.2}
        assert json.loads(args[args.index("--relative-costs") + 1]) == pytest.approx([0.05, 1.0])
    plain = campaign.stage_context(dc(), rp(), student, teacher, NS)
    job = campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, "RetrainingRouter", 1, 1, "ev", plain)
    args = job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert "--cost-weights" not in args and "--relative-costs" not in args
    # a quality floor alone: the prices travel too (the floor's plan search tries cost-weighted start rules)
    floored = campaign.stage_context(dc(), rp(tiers=("small", "large"), cascade={"qualityFloor": 0.95}), student,
                                     teacher, NS, costs)
    job = campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, "RetrainingRouter", 1, 1, "ev", floored)
    args = job["spec"]["template"]["spec"]["initContainers"][0]["args"]
    assert "--cost-weights" not in args and json.loads(args[args.index("--relative-costs") + 1]) == pytest.approx(
        [0.05, 1.0])


# ---------------------------------------------------------------- issue 14: auth, admin port, read-only root


def _pod_specs(objs):
    return [o["spec"]["template"]["spec"] for o in objs if o["kind"] in ("Deployment", "Job")]


def test_every_container_has_a_read_only_root_and_writable_scratch():
    tier = mt(engine={"model": "org/m", "modelCache": {"claimName": "weights"}})
    policy = rp(auth={"labellersSecret": "labellers"})
    objs = modeltier.tier_objects(tier, owner("ModelTier", "small"), NS)
    objs += routingpolicy.policy_objects(policy, _tiers(), owner("RoutingPolicy", "support"), NS)[0]
    objs += [campaign.stage_job(dc(), owner("DistillationCampaign", "c"), NS, s, 1, 1, "ev", ctx())
             for s in ("Clustering", "RetrainingRouter")]
    specs = _pod_specs(objs)
    assert len(specs) == 4
    for pod in specs:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts["/tmp"] in empty_dirs and mounts[meta.CACHE_DIR] in empty_dirs, c["name"]
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["HOME"] == "/tmp" and env["XDG_CACHE_HOME"] == meta.CACHE_DIR
    vllm_env = {e["name"]: e.get("value") for e in specs[0]["containers"][0]["env"]}
    for var in ("VLLM_CACHE_ROOT", "VLLM_CONFIG_ROOT", "TRITON_CACHE_DIR"):  # vLLM writes there, not under ~
        assert vllm_env[var].startswith(meta.CACHE_DIR + "/")


@pytest.mark.parametrize("mode", ["gateway", "sidecar"])
@pytest.mark.parametrize("auth", [{}, {"labellersSecret": "labellers"},
                                  {"labellersSecret": "labellers", "clientKeysSecret": "client-keys"}])
def test_auth_secrets_are_mounted_and_the_config_names_only_their_directories(mode, auth):
    policy = rp(deployment={"mode": mode, "adminPort": 9191}, auth=auth)
    objs, _ = routingpolicy.policy_objects(policy, _tiers(), owner("RoutingPolicy", "support"), NS)
    text = objs[0]["data"]["router.yaml"]
    cfg = RouterConfig.model_validate(yaml.safe_load(text))
    assert cfg.admin_port == 9191
    assert cfg.auth.labellers_dir == (routingpolicy.LABELLERS_DIR if auth else None)
    assert cfg.auth.client_keys_dir == (routingpolicy.CLIENT_KEYS_DIR if "clientKeysSecret" in auth else None)
    if mode == "gateway":
        pod = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
        assert pod["securityContext"]["fsGroup"] == meta.RUN_AS_USER
    else:
        import jsonpatch
        app = {"metadata": {"labels": {"routenlp.io/policy": "support"}},
               "spec": {"containers": [{"name": "app", "image": "a"}]}}
        pod = jsonpatch.apply_patch(app, webhook.sidecar_patch(app, policy, _tiers()))["spec"]
    router = next(c for c in pod["containers"] if c["name"] == "router")
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["name"]: m for m in router["volumeMounts"]}
    wanted = {"routenlp-labellers": (auth.get("labellersSecret"), routingpolicy.LABELLERS_DIR),
              "routenlp-client-keys": (auth.get("clientKeysSecret"), routingpolicy.CLIENT_KEYS_DIR)}
    for vol, (secret, path) in wanted.items():
        if secret is None:
            assert vol not in secrets and vol not in mounts
            continue
        # No `optional`: a router never starts without its credentials. Gateway pods run with fsGroup 1000, so the
        # router's group may read; an application pod's fsGroup is unknown, and only the router container mounts it.
        assert secrets[vol] == {"secretName": secret, "defaultMode": 0o440 if mode == "gateway" else 0o444}
        assert mounts[vol]["mountPath"] == path and mounts[vol]["readOnly"] is True
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports == {"router": 8080, "admin": 9191}
    # Probes stay on the client port (/healthz, /readyz live there); /metrics and /routenlp/* moved to `admin`.
    assert router["readinessProbe"]["httpGet"]["port"] == "router"
    valid({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod})
    if mode == "gateway":
        svc = next(o for o in objs if o["kind"] == "Service")
        assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
            "http": (8080, "router"), "admin": (9191, "admin")}
        assert routingpolicy.router_admin_url(policy, "10.0.0.7") == "http://10.0.0.7:9191"
