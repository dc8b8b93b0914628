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
    assert not rbac.allows(rbac.RULES + rbac.SECRET_RULES, "", "secrets", "list")  # Secrets: get by name only
    # Secret `get` is apart, so that the chart grants it only in the namespaces it is asked to.
    assert not rbac.allows(rbac.RULES, "", "secrets", "get") and rbac.allows(rbac.SECRET_RULES, "", "secrets", "get")
    assert not rbac.allows(rbac.RULES, "routenlp.io", "modeltiers", "update")  # spec is the user's


def test_every_client_kind_has_a_rule():
    for kind, (api_version, plural) in KINDS.items():
        group = api_version.split("/")[0] if "/" in api_version else ""
        assert any(group in r["apiGroups"] and plural in r["resources"] for r in rbac.RULES + rbac.SECRET_RULES), kind


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


def test_network_policy_flags_reach_the_handlers_environment():
    from routenlp.operator.meta import NetworkPeers

    def peers(*argv: str) -> NetworkPeers | None:
        return NetworkPeers.from_env(main.handler_env(main.parser().parse_args(list(argv))) | {"POD_NAMESPACE": "ops"})

    assert peers("--no-network-policies") is None
    got = peers("--operator-pod-labels=app.kubernetes.io/name=routenlp,app.kubernetes.io/instance=rn",
                "--monitoring-namespace", "monitoring")
    assert got == NetworkPeers("ops", {"app.kubernetes.io/name": "routenlp", "app.kubernetes.io/instance": "rn"},
                               "monitoring")
    assert peers() == NetworkPeers("ops")  # on by default, with the chart's operator labels
