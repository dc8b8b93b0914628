"""examples/gitops: the kustomize overlays build, pass strict validation (built-in kinds) and `routenlp validate`
(RouteNLP kinds); the Argo CD and Flux manifests point at paths that exist and at chart values the chart accepts."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from routenlp.api import KINDS, parse

ROOT = Path(__file__).resolve().parents[2]
GITOPS = ROOT / "examples" / "gitops"
OVERLAYS = {"dev": "routenlp-dev", "prod": "routenlp-prod"}
ROUTENLP = ROOT / ".venv" / "bin" / "routenlp"


@pytest.fixture(scope="module")
def built(h) -> dict[str, list[dict]]:
    return {name: h.docs(h.run(h.tool("kubectl"), "kustomize", str(GITOPS / "portfolio" / "overlays" / name)).stdout)
            for name in OVERLAYS}


def find(objs: list[dict], kind: str, name: str) -> dict:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_overlay_builtin_kinds_pass_strict_validation(h, built, overlay):
    objs = built[overlay]
    builtin = [o for o in objs if o["kind"] not in KINDS]
    assert builtin, "the overlay has no built-in objects (Namespace at least)"
    errors = [e for o in builtin for e in h.validation_errors(o)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_overlay_passes_routenlp_validate(h, built, overlay):
    objs = built[overlay]
    assert sorted(o["kind"] for o in objs if o["kind"] in KINDS) == [
        "DistillationCampaign", "ModelTier", "ModelTier", "ModelTier", "RoutingPolicy"]
    text = yaml.safe_dump_all(objs)
    proc = h.run(str(ROUTENLP), "validate", "-f", "-", "--strict", input=text, check=False)
    assert proc.returncode == 0, f"routenlp validate rejected the {overlay} overlay:\n{proc.stdout}\n{proc.stderr}"
    for o in objs:
        if o["kind"] in KINDS:
            parse(o)  # the API models themselves (what the operator reads)
            assert o["metadata"]["namespace"] == OVERLAYS[overlay]


def test_routenlp_validate_catches_a_broken_overlay(h, built):
    """The check above can fail: a risk level out of range and a policy naming a missing tier are reported."""
    objs = copy.deepcopy(built["prod"])
    find(objs, "RoutingPolicy", "assistant")["spec"]["cascade"]["riskLevel"] = 1.5
    proc = h.run(str(ROUTENLP), "validate", "-f", "-", input=yaml.safe_dump_all(objs), check=False)
    assert proc.returncode != 0 and "riskLevel" in proc.stdout + proc.stderr
    objs = [o for o in copy.deepcopy(built["prod"]) if o["metadata"]["name"] != "mid"]
    proc = h.run(str(ROUTENLP), "validate", "-f", "-", "--strict", input=yaml.safe_dump_all(objs), check=False)
    assert proc.returncode != 0 and "mid" in proc.stdout + proc.stderr


def test_overlays_differ_as_documented(built):
    dev, prod = built["dev"], built["prod"]
    assert find(prod, "RoutingPolicy", "assistant")["spec"]["cascade"]["riskLevel"] == 0.02
    assert find(dev, "RoutingPolicy", "assistant")["spec"]["cascade"]["riskLevel"] == 0.1
    frontier_prod = find(prod, "ModelTier", "frontier")["spec"]
    assert "engine" not in frontier_prod and frontier_prod["external"]["apiKeySecretRef"]["name"] == "frontier-api-key"
    assert "engine" in find(dev, "ModelTier", "frontier")["spec"]
    assert find(prod, "ModelTier", "small")["spec"]["replicas"] > find(dev, "ModelTier", "small")["spec"]["replicas"]
    assert find(prod, "RoutingPolicy", "assistant")["spec"]["budget"]["maxUsdPerDay"] > 0
    # last tier = quality reference, in both
    for objs in (dev, prod):
        assert find(objs, "RoutingPolicy", "assistant")["spec"]["tiers"][-1] == {"name": "frontier"}


def test_prod_router_pdb_selects_the_operators_router_pods(built):
    from routenlp.operator import meta

    pdb = find(built["prod"], "PodDisruptionBudget", "assistant-router")
    router_labels = meta.labels("router", "assistant", policy="assistant")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= router_labels.items()
    replicas = find(built["prod"], "RoutingPolicy", "assistant")["spec"]["deployment"]["replicas"]
    assert pdb["spec"]["minAvailable"] < replicas, "a PDB that allows no disruption blocks node drains"


# ---------------------------------------------------------------- Argo CD and Flux


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_argocd_applications(h):
    apps = {d["metadata"]["name"]: d for f in sorted((GITOPS / "argocd").glob("*.yaml")) for d in load(f)}
    assert set(apps) == {"routenlp-operator", "routenlp-portfolio-prod"}
    for app in apps.values():
        assert app["apiVersion"] == "argoproj.io/v1alpha1" and app["kind"] == "Application"
        src = app["spec"]["source"]
        assert (ROOT / src["path"]).is_dir(), src["path"]
        assert app["spec"]["destination"]["server"] and app["spec"]["destination"]["namespace"]
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    # the operator comes first, and its values are values the chart accepts and renders validly
    waves = {n: int(a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"]) for n, a in apps.items()}
    assert waves["routenlp-operator"] < waves["routenlp-portfolio-prod"]
    op = apps["routenlp-operator"]["spec"]
    objs = h.render(op["source"]["helm"]["valuesObject"], chart=ROOT / op["source"]["path"])
    assert not [e for o in objs for e in h.validation_errors(o)]
    assert apps["routenlp-portfolio-prod"]["spec"]["source"]["path"].endswith("overlays/prod")


def test_flux_manifests(h):
    docs = [d for f in sorted((GITOPS / "flux").glob("*.yaml")) for d in load(f)]
    kinds = {(d["apiVersion"], d["kind"]) for d in docs}
    assert {("source.toolkit.fluxcd.io/v1", "GitRepository"), ("source.toolkit.fluxcd.io/v1", "HelmRepository"),
            ("helm.toolkit.fluxcd.io/v2", "HelmRelease"),
            ("kustomize.toolkit.fluxcd.io/v1", "Kustomization")} <= kinds
    sources = {(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in ("GitRepository", "HelmRepository")}
    for d in docs:
        if d["kind"] == "HelmRelease":
            chart = d["spec"]["chart"]["spec"]
            assert (chart["sourceRef"]["kind"], chart["sourceRef"]["name"]) in sources
            if chart["sourceRef"]["kind"] == "GitRepository":
                assert (ROOT / chart["chart"]).is_dir()
            objs = h.render(d["spec"].get("values", {}))  # the chart accepts these values
            assert not [e for o in objs for e in h.validation_errors(o)]
        if d["kind"] == "Kustomization":
            assert (d["spec"]["sourceRef"]["kind"], d["spec"]["sourceRef"]["name"]) in sources
            assert (ROOT / d["spec"]["path"]).is_dir(), d["spec"]["path"]
            for check in d["spec"].get("healthChecks", []):
                assert check["kind"] in KINDS or check["apiVersion"].count("/") == 1
