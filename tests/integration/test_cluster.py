"""The same reconcile scenario against a real cluster (opt-in: `pytest --run-cluster -m cluster` with KUBECONFIG set
and the CRDs installed, e.g. by the Helm chart). The operator runs in-process with kopf.testing.KopfRunner; objects
are created with kubectl in a throwaway namespace, which is deleted at the end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kube_emulator.specs import policy, tier

pytestmark = pytest.mark.cluster
KUBECTL = shutil.which("kubectl") or str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kubectl")


def _kubectl(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run([KUBECTL, *args], input=stdin, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _wait(fn, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except AssertionError:
            pass
        time.sleep(1)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def real_cluster():
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("KUBECONFIG is not set")
    from kopf.testing import KopfRunner

    ns = f"routenlp-test-{uuid.uuid4().hex[:6]}"
    _kubectl("create", "namespace", ns)
    try:
        with KopfRunner(["run", "--standalone", "-n", ns, "-m", "routenlp.operator.handlers"], timeout=60):
            yield ns
    finally:
        _kubectl("delete", "namespace", ns, "--wait=false")


def test_tier_and_policy_on_a_real_cluster(real_cluster):
    ns = real_cluster
    docs = [tier("small", replicas=0), tier("large", replicas=0), policy("support", ["small", "large"])]
    _kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump_all(docs))
    _wait(lambda: json.loads(_kubectl("get", "-n", ns, "deployment", "small", "-o", "json")))
    _wait(lambda: json.loads(_kubectl("get", "-n", ns, "configmap", "support-router-config", "-o", "json")))
    mt = _wait(lambda: (o := json.loads(_kubectl("get", "-n", ns, "mt", "small", "-o", "json"))).get("status") and o)
    ready = next(c for c in mt["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ScaledToZero"
    rp = json.loads(_kubectl("get", "-n", ns, "rp", "support", "-o", "json"))
    assert rp["status"]["tiers"] == ["small", "large"]
