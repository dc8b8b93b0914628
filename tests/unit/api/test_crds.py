"""The checked-in CRDs: equal to a fresh generation, valid CRD objects, structural, and saying what the issue asks
(subresources, names, printer columns that resolve, CEL rules that compile and point at real fields)."""

from __future__ import annotations

import re
from pathlib import Path

import celpy
import kubernetes_validate
import pytest
import yaml

from routenlp.api import KINDS, crdgen, docgen
from routenlp.api.common import NAME_RULE
from routenlp.api.campaign import TRIGGER_SCHEDULE_REQUIRED, TRIGGER_THRESHOLD_REQUIRED, CAMPAIGN_STUDENT_NOT_TEACHER
from routenlp.api.modeltier import (
    ENGINE_GPUS_FOR_TP, TIER_ADAPTERS_NEED_ENGINE, TIER_CAMPAIGN_NEEDS_ENGINE, TIER_ONE_BACKEND,
    TOLERATION_EXISTS_NO_VALUE,
)
from routenlp.api.routingpolicy import (
    CASCADE_WINDOW_COVERS_MINIMUM, POLICY_DEFAULT_TASK_KNOWN, POLICY_DEFAULT_TASK_REQUIRED, POLICY_TASKS_UNIQUE,
    POLICY_TIERS_UNIQUE, TASK_ANSWERS_NEED_STRUCTURED, TASK_LABELS_NEED_STRUCTURED,
)

ROOT = Path(__file__).resolve().parents[3]
CRD_DIR = ROOT / "crds"
FILES = {f"routenlp.io_{cls.PLURAL}.yaml": kind for kind, cls in KINDS.items()}


def load(name: str) -> dict:
    return yaml.safe_load((CRD_DIR / name).read_text())


def schema_of(crd: dict) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node, path=""):
    """(path, schema node) for every schema node."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


def test_checked_in_crds_equal_a_fresh_generation():
    fresh = crdgen.rendered()
    on_disk = {p.name: p.read_text() for p in CRD_DIR.glob("*.yaml")}
    assert set(on_disk) == set(fresh) == set(FILES)
    for name, text in fresh.items():
        assert on_disk[name] == text, f"crds/{name} drifted: run `routenlp crds --docs docs/api.md`"


def test_check_mode_passes_on_the_repo_and_fails_on_drift(tmp_path, capsys):
    assert crdgen.main(["--check", "--out", str(CRD_DIR), "--docs", str(ROOT / "docs" / "api.md")]) == 0
    assert crdgen.main(["--out", str(tmp_path)]) == 0
    assert crdgen.main(["--check", "--out", str(tmp_path)]) == 0
    victim = tmp_path / "routenlp.io_modeltiers.yaml"
    victim.write_text(victim.read_text().replace("shortNames:\n    - mt", "shortNames:\n    - tier"))
    (tmp_path / "routenlp.io_oldkinds.yaml").write_text("stale\n")
    capsys.readouterr()
    assert crdgen.main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "routenlp.io_modeltiers.yaml: differs" in err and "routenlp.io_oldkinds.yaml: not generated" in err


def test_stdout_output_is_a_valid_multi_document_stream(capsys):
    assert crdgen.main(["--out", "-"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert [d["spec"]["names"]["kind"] for d in docs] == list(KINDS)


@pytest.mark.parametrize("name", sorted(FILES))
def test_crd_passes_kubernetes_validate_strict(name):
    kubernetes_validate.validate(load(name), kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("name", sorted(FILES))
def test_names_subresources_and_printer_columns(name):
    crd, kind = load(name), FILES[name]
    cls = KINDS[kind]
    names = crd["spec"]["names"]
    assert names["kind"] == kind and names["plural"] == cls.PLURAL and names["categories"] == ["routenlp"]
    assert names["shortNames"] == {"ModelTier": ["mt"], "RoutingPolicy": ["rp"], "DistillationCampaign": ["dc"]}[kind]
    assert crd["metadata"]["name"] == f"{cls.PLURAL}.routenlp.io" and crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    if kind == "ModelTier":
        assert version["subresources"]["scale"] == {
            "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    else:
        assert "scale" not in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    expected = {
        "ModelTier": ["Ready", "Reason", "Model", "Replicas", "$In/M", "$Out/M", "Age"],
        "RoutingPolicy": ["Ready", "Reason", "Risk", "Router", "Saved", "Age"],
        "DistillationCampaign": ["Phase", "Student", "Gain", "Router", "Age"],
    }[kind]
    assert [c for c in columns if c in expected] == expected


@pytest.mark.parametrize("name", sorted(FILES))
def test_printer_columns_and_scale_paths_resolve_in_the_schema(name):
    """A renamed field must not leave a printer column (or the scale subresource) pointing at nothing."""
    crd = load(name)
    schema = schema_of(crd)
    version = crd["spec"]["versions"][0]
    paths = [c["jsonPath"] for c in version["additionalPrinterColumns"]]
    paths += list(version["subresources"].get("scale", {}).values())
    type_of = {"string": "string", "integer": "integer", "number": "number", "date": "string"}
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"]
        if path == ".metadata.creationTimestamp":
            continue
        node = schema
        for part in re.findall(r"\.([A-Za-z]+)(\[[^\]]*\])?", path):
            node = node["properties"][part[0]]
            if part[1]:
                node = node["items"]
        assert node["type"] == type_of[column["type"]], (path, node["type"], column["type"])
    for path in version["subresources"].get("scale", {}).values():
        node = schema
        for part in path.strip(".").split("."):
            node = node["properties"][part]


@pytest.mark.parametrize("name", sorted(FILES))
def test_schema_is_structural(name):
    schema = schema_of(load(name))
    forbidden = {"$ref", "anyOf", "oneOf", "allOf", "not", "nullable", "title", "$defs", "const"}
    for path, node in walk(schema):
        assert not forbidden & set(node), (path, forbidden & set(node))
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        assert not isinstance(node.get("additionalProperties"), bool), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if node.get("x-kubernetes-list-type") == "map":
            keys = node["x-kubernetes-list-map-keys"]
            assert set(keys) <= set(node["items"].get("required", [])), f"{path}: list-map keys must be required"
        if "default" in node:  # defaults must be valid for the API server to accept the CRD
            assert path.startswith(".spec"), f"{path}: status fields are written, not defaulted"
        if path.startswith(".spec") and path != ".spec" and "type" in node and not path.endswith("[]") \
                and not path.endswith(".*"):
            assert node.get("description"), f"{path} has no description (docs/api.md is made from them)"


def test_optional_fields_are_not_required_and_required_ones_are():
    spec = schema_of(load("routenlp.io_modeltiers.yaml"))["properties"]["spec"]
    assert spec["required"] == ["servedModelName", "cost"]
    assert "engine" in spec["properties"] and "external" in spec["properties"]
    engine = spec["properties"]["engine"]["properties"]
    assert engine["gpuMemoryUtilization"]["exclusiveMinimum"] is True and engine["gpuMemoryUtilization"]["minimum"] == 0
    assert engine["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert engine["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    assert engine["resources"]["default"] == {} and engine["resources"]["properties"]["gpuCount"]["default"] == 1
    policy = schema_of(load("routenlp.io_routingpolicies.yaml"))["properties"]["spec"]["properties"]
    assert policy["cascade"]["properties"]["riskLevel"] == {
        **policy["cascade"]["properties"]["riskLevel"], "minimum": 0, "exclusiveMinimum": True, "maximum": 1,
        "exclusiveMaximum": True, "default": 0.05,
    }
    task = policy["tasks"]["items"]["properties"]
    assert task["answers"]["x-kubernetes-list-type"] == "set"
    # the deprecated name stays in the schema for a release (else the API server would prune it from stored
    # policies), the same list, said to be deprecated
    assert {k: v for k, v in task["labels"].items() if k != "description"} == {
        k: v for k, v in task["answers"].items() if k != "description"}
    assert task["labels"]["description"].startswith("Deprecated since v0.2")
    assert policy["tasks"]["items"]["properties"]["kind"]["enum"] == ["structured", "generation"]
    campaign = schema_of(load("routenlp.io_distillationcampaigns.yaml"))["properties"]["spec"]["properties"]
    assert campaign["lora"]["properties"]["targetModules"]["default"] == ["q_proj", "v_proj"]


# Each rule the issue names, and where the CRD must carry it.
EXPECTED_RULES = [
    ("routenlp.io_modeltiers.yaml", "", NAME_RULE),
    ("routenlp.io_modeltiers.yaml", ".spec", TIER_ONE_BACKEND),
    ("routenlp.io_modeltiers.yaml", ".spec", TIER_ADAPTERS_NEED_ENGINE),
    ("routenlp.io_modeltiers.yaml", ".spec", TIER_CAMPAIGN_NEEDS_ENGINE),
    ("routenlp.io_modeltiers.yaml", ".spec.engine", ENGINE_GPUS_FOR_TP),
    ("routenlp.io_modeltiers.yaml", ".spec.engine.tolerations[]", TOLERATION_EXISTS_NO_VALUE),
    ("routenlp.io_routingpolicies.yaml", "", NAME_RULE),
    ("routenlp.io_routingpolicies.yaml", ".spec", POLICY_TIERS_UNIQUE),
    ("routenlp.io_routingpolicies.yaml", ".spec", POLICY_TASKS_UNIQUE),
    ("routenlp.io_routingpolicies.yaml", ".spec", POLICY_DEFAULT_TASK_KNOWN),
    ("routenlp.io_routingpolicies.yaml", ".spec", POLICY_DEFAULT_TASK_REQUIRED),
    ("routenlp.io_routingpolicies.yaml", ".spec.tasks[]", TASK_ANSWERS_NEED_STRUCTURED),
    ("routenlp.io_routingpolicies.yaml", ".spec.tasks[]", TASK_LABELS_NEED_STRUCTURED),
    ("routenlp.io_routingpolicies.yaml", ".spec.cascade", CASCADE_WINDOW_COVERS_MINIMUM),
    ("routenlp.io_distillationcampaigns.yaml", "", NAME_RULE),
    ("routenlp.io_distillationcampaigns.yaml", ".spec", CAMPAIGN_STUDENT_NOT_TEACHER),
    ("routenlp.io_distillationcampaigns.yaml", ".spec.trigger", TRIGGER_SCHEDULE_REQUIRED),
    ("routenlp.io_distillationcampaigns.yaml", ".spec.trigger", TRIGGER_THRESHOLD_REQUIRED),
    ("routenlp.io_distillationcampaigns.yaml", ".spec.resources.tolerations[]", TOLERATION_EXISTS_NO_VALUE),
]


@pytest.mark.parametrize("name,path,rule", EXPECTED_RULES, ids=[f"{n.split('_')[1][:-5]}{p}:{r.field or 'root'}"
                                                                for n, p, r in EXPECTED_RULES])
def test_cel_rule_is_present(name, path, rule):
    node = dict(walk(schema_of(load(name))))[path]
    assert rule.to_k8s() in node.get("x-kubernetes-validations", [])


@pytest.mark.parametrize("name", sorted(FILES))
def test_every_cel_rule_compiles_and_its_field_path_exists(name):
    env = celpy.Environment()
    seen = 0
    for path, node in walk(schema_of(load(name))):
        for rule in node.get("x-kubernetes-validations", []):
            env.compile(rule["rule"])  # raises CELParseError on a syntax error
            seen += 1
            assert rule["message"] and rule["reason"] in {
                "FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"}
            target = node
            for part in rule.get("fieldPath", "").strip(".").split("."):
                if part:
                    target = target["properties"][part]
    assert seen >= 4


def _has_rules(node) -> bool:
    return any(n.get("x-kubernetes-validations") for _, n in walk(node))


@pytest.mark.parametrize("name", sorted(FILES))
def test_cel_cost_is_bounded(name):
    """The API server refuses a CRD whose rules' estimated cost exceeds its budget; estimates are only bounded when
    every list a rule runs in or over has maxItems and every string it compares has maxLength (or is an enum)."""
    for path, node in walk(schema_of(load(name))):
        if node.get("type") == "array" and _has_rules(node["items"]):
            assert "maxItems" in node, f"{path}: items carry CEL rules, so the list needs maxItems"
        for rule in node.get("x-kubernetes-validations", []):
            for var in set(re.findall(r"self\.(\w+)", rule["rule"])) & set(node.get("properties", {})):
                sub = node["properties"][var]
                if sub["type"] == "array":
                    assert "maxItems" in sub, f"{path}.{var} needs maxItems"
                    item = sub["items"]
                    for field in item.get("properties", {}).values():
                        if field["type"] == "string":
                            assert "maxLength" in field, f"{path}.{var}[] strings need maxLength"
                if sub["type"] == "string":
                    assert "maxLength" in sub, f"{path}.{var} needs maxLength"


def test_docs_api_md_equals_a_fresh_generation():
    assert (ROOT / "docs" / "api.md").read_text() == docgen.render_markdown(), \
        "docs/api.md drifted: run `routenlp crds --docs docs/api.md`"


def test_docs_carry_every_field_description_and_rule():
    text = docgen.render_markdown()
    for crd in crdgen.crds().values():
        for path, node in walk(schema_of(crd)):
            if path.startswith((".spec.", ".status.")) and node.get("description"):
                assert node["description"].replace("|", "\\|") in text, path
            for rule in node.get("x-kubernetes-validations", []):
                assert rule["message"] in text
