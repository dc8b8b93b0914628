"""Resource quantities: the Kubernetes client's parser, the few forms it lets through that the API server refuses, and
the fields of each kind checked before the operator builds objects from them."""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path

import kopf
import pytest
import yaml

from routenlp.api import KINDS
from routenlp.operator import webhook
from routenlp.operator.quantities import checked, parse, problems

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = {d["metadata"]["name"]: d for f in ("quickstart.yaml", "campaign-gitops.yaml")
            for d in yaml.safe_load_all((ROOT / "examples" / f).read_text()) if d and d.get("kind") in KINDS}


def example(kind: str, **changes: dict) -> object:
    """The first example of `kind`, with `changes` (dotted spec path -> value) made to it, parsed."""
    body = copy.deepcopy(next(d for d in EXAMPLES.values() if d["kind"] == kind))
    for path, value in changes.items():
        node = body["spec"]
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return KINDS[kind].model_validate(body)


@pytest.mark.parametrize("value,amount", [
    ("8", Decimal(8)), ("500m", Decimal("0.5")), ("0.5", Decimal("0.5")), ("32Gi", Decimal(32 * 2**30)),
    ("512Mi", Decimal(512 * 2**20)), ("1k", Decimal(1000)), ("1e3", Decimal(1000)), ("0", Decimal(0)),
    ("+2", Decimal(2)), (".5", Decimal("0.5")),
])
def test_good_quantities_parse_to_their_amount(value, amount):
    assert parse(value) == amount


@pytest.mark.parametrize("value", [
    "32GB", "32GB ", "two", "", "Gi", "1mi", "1e",  # refused by the client's parser itself
    " 2Gi", "1 Gi", "1_000", "\u0661", "NaN", "Infinity", "1K",  # it lets these through; the API server does not
])
def test_bad_quantities_are_refused(value):
    with pytest.raises(ValueError, match="expected a number"):
        parse(value)


def test_a_negative_amount_is_refused():
    with pytest.raises(ValueError, match="negative"):
        parse("-1")


def test_each_kind_names_its_bad_fields_with_the_fix():
    tier = example("ModelTier", **{"engine.resources": {"cpu": "two", "memory": "32GB ", "shmSize": "1Gi"}})
    cpu, memory = problems(tier)
    assert (cpu.path, memory.path) == ("spec.engine.resources.cpu", "spec.engine.resources.memory")
    assert "(got 'two')" in cpu.message and "e.g. 2 or 500m" in cpu.fix
    assert "(got '32GB ')" in memory.message and "e.g. 32Gi" in memory.fix
    policy = example("RoutingPolicy", **{"deployment.memory": "1 Gi"})
    assert [p.path for p in problems(policy)] == ["spec.deployment.memory"]
    campaign = example("DistillationCampaign", **{"resources.cpu": "-4"})
    assert [(p.path, p.message.endswith("negative")) for p in problems(campaign)] == [("spec.resources.cpu", True)]


def test_unset_and_external_are_not_checked():
    """An empty tier or campaign cpu/memory is left out of the pod (meta.host_resources); an external tier runs no
    pod at all. A policy's router always sets its requests, so an empty one is an error there."""
    assert problems(example("ModelTier", **{"engine.resources": {"cpu": "", "memory": None}})) == []
    assert problems(example("DistillationCampaign", **{"resources.memory": ""})) == []
    external = next(d for d in EXAMPLES.values() if d["kind"] == "ModelTier" and "external" in d["spec"])
    assert problems(KINDS["ModelTier"].model_validate(external)) == []
    assert [p.path for p in problems(example("RoutingPolicy", **{"deployment.cpu": ""}))] == ["spec.deployment.cpu"]


def test_checked_passes_a_good_resource_and_raises_naming_every_bad_field():
    good = example("ModelTier")
    assert checked(good) is good
    with pytest.raises(ValueError) as err:
        checked(example("ModelTier", **{"engine.resources": {"cpu": "two", "shmSize": "2GB"}}))
    assert "spec.engine.resources.cpu: not a Kubernetes resource quantity (got 'two')" in str(err.value)
    assert "spec.engine.resources.shmSize" in str(err.value) and "e.g. 32Gi" in str(err.value)


def test_the_sidecar_webhook_refuses_a_pod_whose_policy_has_a_bad_quantity():
    """The injected router would carry the quantity, and the API server would refuse the pod with no field named."""
    policy = example("RoutingPolicy", **{"deployment.mode": "sidecar", "deployment.memory": "1GB"})
    index = {("ns", policy.metadata.name): [policy.model_dump(mode="json", by_alias=True, exclude_none=True)]}
    pod = {"metadata": {"namespace": "ns", "labels": {"routenlp.io/policy": policy.metadata.name}}, "spec": {}}
    with pytest.raises(kopf.AdmissionError, match="spec.deployment.memory: not a Kubernetes resource quantity"):
        webhook.inject_router(pod, kopf.Patch(), index, {}, "ns")
