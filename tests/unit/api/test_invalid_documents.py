"""Bad input, three ways: every invalid document below is rejected by the pydantic models (what `routenlp validate`
reports, naming the field path), by the CRD the API server would use (JSON schema, list types, or CEL evaluated
with cel-python after defaulting), and with the same message on both sides for the CEL rules."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest

from routenlp.api import KINDS
from routenlp.api.celeval import cel_violations, list_type_violations
from routenlp.cli.validate import Document, check_document, render_path

def engine_tier() -> dict[str, Any]:
    return {
        "apiVersion": "routenlp.io/v1alpha1", "kind": "ModelTier", "metadata": {"name": "small"},
        "spec": {"servedModelName": "qwen", "cost": {"inputPerMillion": 0.1, "outputPerMillion": 0.2},
                 "engine": {"model": "Qwen/Qwen2.5-3B-Instruct",
                            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
                 "adapters": [{"name": "a1", "source": "s3://bucket/a1"}]},
    }


def external_tier() -> dict[str, Any]:
    return {
        "apiVersion": "routenlp.io/v1alpha1", "kind": "ModelTier", "metadata": {"name": "frontier"},
        "spec": {"servedModelName": "gpt", "cost": {"inputPerMillion": 2, "outputPerMillion": 8},
                 "external": {"baseUrl": "https://api.example.com/v1", "model": "gpt"}},
    }


def policy() -> dict[str, Any]:
    return {
        "apiVersion": "routenlp.io/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
        "spec": {"tiers": [{"name": "small"}, {"name": "frontier"}],
                 "tasks": [{"name": "intent", "kind": "structured", "answers": ["a", "b"],
                            "match": {"models": ["intent"], "patterns": ["(?i)refund"]}},
                           {"name": "chat", "kind": "generation", "match": {"models": ["chat"]}}],
                 "defaultTask": "chat"},
    }


def campaign() -> dict[str, Any]:
    return {
        "apiVersion": "routenlp.io/v1alpha1", "kind": "DistillationCampaign", "metadata": {"name": "c"},
        "spec": {"policyRef": "p", "studentTier": "small", "teacherTier": "frontier",
                 "trigger": {"mode": "Manual"}},
    }


BASES: dict[str, Callable[[], dict[str, Any]]] = {
    "engine": engine_tier, "external": external_tier, "policy": policy, "campaign": campaign,
}


def setp(doc: dict, path: str, value: Any) -> dict:
    """Set (or with value=DEL remove) a dotted path; numeric parts index lists."""
    parts = path.split(".")
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    last = parts[-1]
    if value is DEL:
        del node[last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return doc


DEL = object()

# (id, base, edits {dotted path: value}, field path the message must name, layers that must reject it too).
# Layers: "schema" (openAPIV3Schema, strict), "cel" (a CEL rule; pydantic must give the same message),
# "list" (x-kubernetes-list-type), "offline" (only `routenlp validate` can tell).
CASES = [
    ("tier-both-backends", "external", {"spec.engine": {"model": "org/model"}}, "spec.engine", {"cel"}),
    ("tier-no-backend", "engine", {"spec.engine": DEL, "spec.adapters": DEL}, "spec.engine", {"cel"}),
    ("tier-external-adapters", "external", {"spec.adapters": [{"name": "x", "source": "s3://b/x"}]},
     "spec.adapters", {"cel"}),
    ("tier-external-accepts-campaigns", "external", {"spec.adapterPolicy": "AcceptCampaign"},
     "spec.adapterPolicy", {"cel"}),
    ("tier-gpus-below-tp", "engine", {"spec.engine.tensorParallelSize": 4, "spec.engine.resources": {"gpuCount": 2}},
     "spec.engine.resources.gpuCount", {"cel"}),
    # gpuCount left out defaults to 1: the CEL only fails after defaulting, like on the API server.
    ("tier-default-gpus-below-tp", "engine", {"spec.engine.tensorParallelSize": 2},
     "spec.engine.resources.gpuCount", {"cel"}),
    ("tier-toleration-exists-with-value", "engine", {"spec.engine.tolerations.0.value": "true"},
     "spec.engine.tolerations[0].value", {"cel"}),
    ("tier-duplicate-adapter", "engine",
     {"spec.adapters": [{"name": "a1", "source": "s3://b/1"}, {"name": "a1", "source": "s3://b/2"}]},
     "spec.adapters", {"list"}),
    ("tier-negative-cost", "engine", {"spec.cost.inputPerMillion": -1}, "spec.cost.inputPerMillion", {"schema"}),
    ("tier-missing-cost", "engine", {"spec.cost": DEL}, "spec.cost", {"schema"}),
    ("tier-name-not-a-label", "engine", {"metadata.name": "Small_Tier"}, "metadata.name", {"cel"}),
    ("tier-bad-model-source", "engine", {"spec.engine.model": "not a model id!"}, "spec.engine.model", {"schema"}),
    ("tier-unknown-field", "engine", {"spec.replica": 3}, "spec.replica", {"schema"}),
    ("tier-gpu-utilisation-zero", "engine", {"spec.engine.gpuMemoryUtilization": 0},
     "spec.engine.gpuMemoryUtilization", {"schema"}),
    ("tier-http-less-url", "external", {"spec.external.baseUrl": "api.example.com/v1"},
     "spec.external.baseUrl", {"schema"}),
    ("policy-duplicate-tiers", "policy", {"spec.tiers": [{"name": "small"}, {"name": "small"}]},
     "spec.tiers", {"cel"}),
    ("policy-duplicate-tasks", "policy", {"spec.tasks.1.name": "intent", "spec.defaultTask": "intent"},
     "spec.tasks", {"cel"}),
    ("policy-default-task-unknown", "policy", {"spec.defaultTask": "summarise"}, "spec.defaultTask", {"cel"}),
    ("policy-default-task-missing", "policy", {"spec.defaultTask": DEL}, "spec.defaultTask", {"cel"}),
    ("policy-answers-on-generation", "policy", {"spec.tasks.1.answers": ["x"]}, "spec.tasks[1].answers", {"cel"}),
    # `labels`, the deprecated name of `answers`: its errors name it, as the user wrote it
    ("policy-labels-on-generation", "policy", {"spec.tasks.1.labels": ["x"]}, "spec.tasks[1].labels", {"cel"}),
    ("policy-duplicate-deprecated-labels", "policy", {"spec.tasks.0.answers": DEL, "spec.tasks.0.labels": ["a", "a"]},
     "spec.tasks[0].labels", {"list"}),
    # both names with different answers: beyond a CEL rule's cost budget (two lists of unbounded strings)
    ("policy-answers-and-labels-differ", "policy", {"spec.tasks.0.labels": ["a", "c"]}, "spec.tasks[0].labels",
     {"offline"}),
    ("policy-chain-unknown-tier", "policy", {"spec.tasks.0.chain": ["small", "huge"]}, "spec.tasks", {"cel"}),
    ("policy-chain-out-of-order", "policy", {"spec.tasks.0.chain": ["frontier", "small"]}, "spec.tasks[0].chain",
     {"offline"}),
    ("policy-floor-not-a-fraction", "policy", {"spec.tasks.0.qualityFloor": 1.0}, "spec.tasks[0].qualityFloor",
     {"schema"}),
    ("policy-duplicate-answers", "policy", {"spec.tasks.0.answers": ["a", "a"]}, "spec.tasks[0].answers", {"list"}),
    ("policy-risk-above-one", "policy", {"spec.cascade": {"riskLevel": 1.5}}, "spec.cascade.riskLevel", {"schema"}),
    ("policy-risk-zero", "policy", {"spec.cascade": {"riskLevel": 0}}, "spec.cascade.riskLevel", {"schema"}),
    ("policy-window-below-minimum", "policy",
     {"spec.cascade": {"minCalibrationSamples": 500, "calibrationWindow": 100}}, "spec.cascade.calibrationWindow",
     {"cel"}),
    ("policy-bad-regex", "policy", {"spec.tasks.0.match.patterns": ["(unclosed"]},
     "spec.tasks[0].match.patterns[0]", {"offline"}),
    ("policy-model-claimed-twice", "policy", {"spec.tasks.1.match.models": ["intent"]},
     "spec.tasks[1].match.models", {"offline"}),
    ("policy-task-kind-typo", "policy", {"spec.tasks.1.kind": "generative"}, "spec.tasks[1].kind", {"schema"}),
    ("policy-bad-duration", "policy", {"spec.cascade": {"recalibrationInterval": "10 minutes"}},
     "spec.cascade.recalibrationInterval", {"schema"}),
    ("policy-no-tiers", "policy", {"spec.tiers": []}, "spec.tiers", {"schema"}),
    ("policy-canary-above-100", "policy", {"spec.router": {"canaryPercent": 150}}, "spec.router.canaryPercent",
     {"schema"}),
    # spec.auth and the router's network (issue 14)
    ("policy-auth-one-secret-for-both", "policy",
     {"spec.auth": {"labellersSecret": "keys", "clientKeysSecret": "keys"}}, "spec.auth.clientKeysSecret", {"cel"}),
    ("policy-auth-secret-not-a-name", "policy", {"spec.auth": {"labellersSecret": "Labellers_Tokens"}},
     "spec.auth.labellersSecret", {"schema"}),
    ("policy-admin-port-is-client-port", "policy", {"spec.deployment": {"adminPort": 8080}},
     "spec.deployment.adminPort", {"cel"}),
    ("policy-client-namespace-not-a-name", "policy",
     {"spec.deployment": {"network": {"allowedClientNamespaces": ["Team A"]}}},
     "spec.deployment.network.allowedClientNamespaces[0]", {"schema"}),
    ("policy-client-cidr-host-bits", "policy", {"spec.deployment": {"network": {"allowedClientCidrs": ["10.0.0.1/8"]}}},
     "spec.deployment.network.allowedClientCidrs[0]", {"offline"}),
    ("campaign-student-is-teacher", "campaign", {"spec.teacherTier": "small"}, "spec.studentTier", {"cel"}),
    ("campaign-schedule-missing", "campaign", {"spec.trigger": {"mode": "Schedule"}}, "spec.trigger.schedule",
     {"cel"}),
    ("campaign-threshold-missing", "campaign", {"spec.trigger": {"mode": "EscalationRate"}},
     "spec.trigger.escalationRateThreshold", {"cel"}),
    ("campaign-schedule-not-cron", "campaign", {"spec.trigger": {"mode": "Schedule", "schedule": "daily"}},
     "spec.trigger.schedule", {"schema"}),
    ("campaign-dropout-one", "campaign", {"spec.lora": {"dropout": 1}}, "spec.lora.dropout", {"schema"}),
    ("campaign-mode-typo", "campaign", {"spec.trigger": {"mode": "Nightly"}}, "spec.trigger.mode", {"schema"}),
    ("campaign-policy-ref-not-a-name", "campaign", {"spec.policyRef": "My Policy"}, "spec.policyRef", {"schema"}),
    ("campaign-rounds-over-limit", "campaign", {"spec.rounds": 11}, "spec.rounds", {"schema"}),
    ("campaign-rounds-without-auto-apply", "campaign", {"spec.rounds": 2, "spec.autoApply": False}, "spec.rounds",
     {"cel"}),
    ("campaign-nodes-on-a-plain-job", "campaign", {"spec.resources": {"distillNodes": 4}},
     "spec.resources.distillNodes", {"cel"}),
]


def build(base: str, edits: dict[str, Any]) -> dict[str, Any]:
    doc = BASES[base]()
    for path, value in edits.items():
        setp(doc, path, value if value is DEL else copy.deepcopy(value))
    return doc


def test_enough_distinct_invalid_documents():
    assert len({c[0] for c in CASES}) == len(CASES) >= 15


@pytest.mark.parametrize("base", sorted(BASES))
def test_bases_are_valid_everywhere(base, schemas, strict_validators):
    doc = BASES[base]()
    KINDS[doc["kind"]].model_validate(doc)
    assert check_document(Document("t.yaml", 1, doc)) == []
    strict_validators[doc["kind"]].validate(doc)
    assert cel_violations(schemas[doc["kind"]], doc) == []
    assert list_type_violations(schemas[doc["kind"]], doc) == []


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_invalid_document_is_rejected_naming_the_field(case, schemas, strict_validators):
    _, base, edits, field, layers = case
    doc = build(base, edits)
    kind = doc["kind"]

    findings = check_document(Document("bad.yaml", 1, doc))
    errors = [f for f in findings if f.severity == "error"]
    assert errors, f"routenlp validate accepted {doc}"
    assert field in [f.path for f in errors], [(f.path, f.message) for f in errors]
    mine = next(f for f in errors if f.path == field)
    assert mine.message

    schema_errors = list(strict_validators[kind].iter_errors(doc))
    cel = cel_violations(schemas[kind], doc)
    listed = list_type_violations(schemas[kind], doc)
    if "schema" in layers:
        paths = [render_path(e.absolute_path) for e in schema_errors]
        assert any(field == p or field.startswith(p) for p in paths), paths
    if "cel" in layers:
        assert not schema_errors, [e.message for e in schema_errors]
        assert cel, "no CEL rule rejects it"
        # Same words on both sides: the CEL message is what pydantic said (pydantic may add the values seen).
        assert any(mine.message.startswith(v.message) or v.message.startswith(mine.message.split(" (got")[0])
                   for v in cel), ([v.message for v in cel], mine.message)
        assert field in [v.path for v in cel], [v.path for v in cel]
    if "list" in layers:
        assert listed, "no list-type constraint rejects it"
    if "offline" in layers:  # documented limitation: the API server cannot see it, `routenlp validate` can
        assert not schema_errors and not cel and not listed


def test_every_cel_rule_is_proven_by_an_invalid_document(schemas):
    fired = set()
    for _, base, edits, _, layers in CASES:
        if "cel" in layers:
            doc = build(base, edits)
            fired |= {v.rule for v in cel_violations(schemas[doc["kind"]], doc)}
    declared = set()

    def walk(node):
        if isinstance(node, dict):
            declared.update(r["rule"] for r in node.get("x-kubernetes-validations", []))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for schema in schemas.values():
        walk(schema)
    assert declared - fired == set(), "CEL rules no invalid document exercises"
