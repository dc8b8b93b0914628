"""A structured task's allowed answers are `answers`; `labels`, their name before v0.2, is accepted until v0.3: read
as `answers`, reported as deprecated (api.routingpolicy.deprecations: the webhook's warnings, the DeprecatedField
Event, `routenlp validate`), in the CRD schema, and still what router.yaml writes for the routers of the previous
image (which reject unknown keys)."""

from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import ValidationError

from routenlp.api import RoutingPolicy
from routenlp.api.celeval import cel_violations, list_type_violations
from routenlp.api.router_config import RouterConfig, RouterVersions, TierEndpoint
from routenlp.api.routingpolicy import Task, deprecations
from routenlp.cli.validate import Document, check_document


def policy(*tasks: dict) -> dict:
    return {"apiVersion": "routenlp.io/v1alpha1", "kind": "RoutingPolicy", "metadata": {"name": "p"},
            "spec": {"tiers": [{"name": "small"}, {"name": "big"}], "defaultTask": "chat",
                     "tasks": [{"name": "chat"}, *tasks]}}


INTENT_OLD = {"name": "intent", "kind": "structured", "labels": ["refund", "card"]}
INTENT_NEW = {"name": "intent", "kind": "structured", "answers": ["refund", "card"]}


def test_labels_are_read_as_answers_and_reported_as_deprecated():
    p = RoutingPolicy.model_validate(policy(INTENT_OLD))
    assert p.spec.tasks[1].answers == ["refund", "card"]
    [d] = deprecations(p.spec)
    assert (d.path, d.use) == ("spec.tasks[1].labels", "spec.tasks[1].answers")
    assert str(d) == ("spec.tasks[1].labels is deprecated since v0.2: use spec.tasks[1].answers (same meaning); the "
                      "old name is accepted until v0.3")
    # the new name: nothing deprecated; a task without either has no answers
    p = RoutingPolicy.model_validate(policy(INTENT_NEW))
    assert p.spec.tasks[1].answers == ["refund", "card"] and p.spec.tasks[1].labels is None
    assert deprecations(p.spec) == [] and p.spec.tasks[0].answers == []
    assert "labels" not in p.to_k8s()["spec"]["tasks"][1]


def test_both_names_agreeing_are_accepted_differing_are_an_error_naming_both():
    same = Task.model_validate({**INTENT_NEW, "labels": ["card", "refund"]})  # a set: order does not matter
    assert same.answers == ["refund", "card"]
    with pytest.raises(ValidationError) as exc:
        Task.model_validate({**INTENT_NEW, "labels": ["refund", "cash"]})
    msg = str(exc.value)
    assert "labels is the deprecated name of answers" in msg and "only in answers: card" in msg
    assert "only in labels: cash" in msg
    # `routenlp validate` puts it on the deprecated field
    doc = policy({**INTENT_NEW, "labels": ["refund", "cash"]})
    errors = [f for f in check_document(Document("p.yaml", 1, doc)) if f.severity == "error"]
    assert [f.path for f in errors] == ["spec.tasks[1].labels"] and "answers" in errors[0].message


def test_rules_name_the_field_the_user_wrote():
    for field in ("labels", "answers"):
        with pytest.raises(ValidationError, match=rf"{field} (\(the deprecated name of answers\) )?apply only to "
                           "structured tasks"):
            Task.model_validate({"name": "chat", field: ["x"]})
        with pytest.raises(ValidationError, match=f"{field} must be unique; repeated: x"):
            Task.model_validate({"name": "intent", "kind": "structured", field: ["x", "x"]})


@pytest.mark.parametrize("task", [INTENT_OLD, INTENT_NEW, {**INTENT_NEW, "labels": ["card", "refund"]}],
                         ids=["labels", "answers", "both"])
def test_the_crd_accepts_either_name(task, schemas, strict_validators):
    doc = policy(task)
    strict_validators["RoutingPolicy"].validate(doc)
    assert cel_violations(schemas["RoutingPolicy"], doc) == []
    assert list_type_violations(schemas["RoutingPolicy"], doc) == []


def test_validate_warns_about_the_deprecated_name():
    [warning] = check_document(Document("p.yaml", 1, policy(INTENT_OLD)))
    assert (warning.severity, warning.path) == ("warning", "spec.tasks[1].labels")
    assert "v0.3" in warning.message and "spec.tasks[1].answers" in warning.fix
    assert check_document(Document("p.yaml", 1, policy(INTENT_NEW))) == []


def router_config(tasks: list[Task]) -> RouterConfig:
    return RouterConfig(policy="p", tiers=[TierEndpoint(name="small", served_model_name="s", base_url="http://s/v1",
                                                        cost={"inputPerMillion": 1, "outputPerMillion": 2})],
                        tasks=tasks, router=RouterVersions(artifact_dir="/a"), event_log_dir="/e")


def test_router_yaml_writes_labels_until_v03_and_is_read_with_either_name():
    for task in (INTENT_OLD, INTENT_NEW):
        cfg = router_config([Task.model_validate(task), Task.model_validate({"name": "chat"})])
        out = yaml.safe_load(cfg.dump_yaml())
        # the previous release's keys, in the previous order (router.yaml and its hash unchanged by the rename)
        assert [list(t) for t in out["tasks"]] == [
            ["name", "kind", "qualityTarget", "chain", "labels", "match"]] * 2
        assert out["tasks"][0]["labels"] == ["refund", "card"] and out["tasks"][1]["labels"] == []
        assert RouterConfig.model_validate(out).tasks[0].answers == ["refund", "card"]
    # a router.yaml a later operator writes (with `answers`) reads too
    newer = copy.deepcopy(out)
    newer["tasks"][0]["answers"] = newer["tasks"][0].pop("labels")
    assert RouterConfig.model_validate(newer).tasks[0].answers == ["refund", "card"]
