"""RBAC rules as data and the `routenlp operator` command line."""

from __future__ import annotations

import kubernetes_validate
import pytest

from routenlp.operator import main, rbac
from routenlp.operator.kube import KINDS, path


def test_cluster_role_is_valid_and_has_no_wildcards():
    role = rbac.cluster_role()
    kubernetes_validate.validate(role, "1.37", strict=True)
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
    assert not rbac.allows(rbac.RULES, "", "secrets", "list")  # Secrets: get by name only
    assert not rbac.allows(rbac.RULES, "routenlp.io", "modeltiers", "update")  # spec is the user's


def test_every_client_kind_has_a_rule():
    for kind, (api_version, plural) in KINDS.items():
        group = api_version.split("/")[0] if "/" in api_version else ""
        assert any(group in r["apiGroups"] and plural in r["resources"] for r in rbac.RULES), kind


def test_paths():
    assert path("Deployment", "ns", "d") == "/apis/apps/v1/namespaces/ns/deployments/d"
    assert path("Pod", "ns") == "/api/v1/namespaces/ns/pods"
    assert path("ModelTier", "ns", "m", "status") == "/apis/routenlp.io/v1alpha1/namespaces/ns/modeltiers/m/status"


def test_cli_help_and_webhook_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main.main(["--help"])
    assert exc.value.code == 0
    assert "--peering" in capsys.readouterr().out
    assert main.main(["--webhook-port", "9443"]) == 2
    assert "--webhook-cert" in capsys.readouterr().err
