"""Every example under examples/*.yaml and examples/portfolio/ is valid for the pydantic models, for the CRD's
openAPIV3Schema (jsonschema, strict), for its CEL rules and list types, and for `routenlp validate` as a set."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from routenlp.api import KINDS
from routenlp.api.celeval import cel_violations, list_type_violations
from routenlp.cli import validate

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE_FILES = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples" / "portfolio").glob("*.yaml"))
DOCS = [(f, i, d) for f in EXAMPLE_FILES for i, d in enumerate(yaml.safe_load_all(f.read_text()), 1) if d]
ROUTENLP_DOCS = [x for x in DOCS if x[2].get("kind") in KINDS]


def _id(x) -> str:
    return f"{x[0].relative_to(ROOT / 'examples')}#{x[1]}"


def test_the_portfolio_is_complete():
    kinds = {}
    for f, _, d in DOCS:
        if f.parent.name == "portfolio":
            kinds.setdefault(d["kind"], []).append(d)
    tiers = {t["metadata"]["name"]: t["spec"] for t in kinds["ModelTier"]}
    assert len(tiers) == 3
    assert sum("external" in t for t in tiers.values()) == 1
    external = next(t for t in tiers.values() if "external" in t)
    assert external["external"]["apiKeySecretRef"]["name"] in {s["metadata"]["name"] for s in kinds["Secret"]}
    assert any(t.get("adapters") and t.get("adapterPolicy") == "AcceptCampaign" for t in tiers.values())
    (policy,) = kinds["RoutingPolicy"]
    tasks = policy["spec"]["tasks"]
    assert len(tasks) >= 3 and any(t["kind"] == "structured" and t["answers"] for t in tasks)
    assert any(t["kind"] == "generation" for t in tasks)
    assert [t["name"] for t in policy["spec"]["tiers"]][-1] == next(n for n, t in tiers.items() if "external" in t)
    assert len(kinds["DistillationCampaign"]) == 1
    secret = kinds["Secret"][0]
    assert "placeholder" in yaml.safe_dump(secret["stringData"]).lower()


@pytest.mark.parametrize("item", ROUTENLP_DOCS, ids=[_id(x) for x in ROUTENLP_DOCS])
def test_example_is_valid_for_models_schema_and_cel(item, schemas, strict_validators):
    _, _, doc = item
    KINDS[doc["kind"]].model_validate(doc)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in strict_validators[doc["kind"]].iter_errors(doc)]
    assert errors == []
    assert cel_violations(schemas[doc["kind"]], doc) == []
    assert list_type_violations(schemas[doc["kind"]], doc) == []


@pytest.mark.parametrize("item", [x for x in DOCS if x not in ROUTENLP_DOCS and x[2].get("kind") != "Kustomization"],
                         ids=_id)
def test_builtin_example_passes_kubernetes_validate_strict(item):
    kubernetes_validate.validate(item[2], kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("paths", [
    ["examples/portfolio", "examples/campaign-gitops.yaml"],  # the GitOps campaign targets the portfolio's policy
    ["examples/quickstart.yaml"],  # a separate portfolio (it reuses the tier name `frontier`)
], ids=["portfolio", "quickstart"])
def test_routenlp_validate_accepts_the_example_sets(paths, capsys):
    args = [a for p in paths for a in ("-f", str(ROOT / p))]
    code = validate.main(args + ["--strict"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert " 0 error(s), 0 warning(s)" in out


def test_every_example_file_is_covered_by_a_set():
    covered = {"portfolio", "campaign-gitops.yaml", "quickstart.yaml"}
    assert {p.name for p in (ROOT / "examples").iterdir() if p.name not in ("local", "gitops")} == covered
