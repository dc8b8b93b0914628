"""RBAC: every API request the operator made during the integration tests is allowed by routenlp.operator.rbac.RULES
(+ SECRET_RULES, which the chart grants apart) and every permission they grant was used. Named to run after the other integration tests of the session, whose
requests it checks (run alone it drives a short scenario of its own first)."""

from __future__ import annotations

from kube_emulator.harness import wait_for
from kube_emulator.specs import campaign, external_tier, policy, tier

from routenlp.operator.rbac import RULES, SECRET_RULES, allows, triples

OPERATOR_AGENTS = ("kopf/", "routenlp-operator/")


def _operator_requests(cluster) -> set[tuple[str, str, str]]:
    return {(g, res, verb) for ua, verb, g, res, _ in list(cluster.emu.emulator.audit) if ua.startswith(OPERATOR_AGENTS)}


def _scenario(cluster) -> None:
    ns = "rbac"
    cluster.api.create(cluster.cr_path("modeltiers", ns), tier("a"))
    cluster.api.create(cluster.cr_path("modeltiers", ns), external_tier("b"))
    cluster.api.create(cluster.cr_path("routingpolicies", ns), policy("p", ["a", "b"]))
    cluster.api.create(cluster.cr_path("distillationcampaigns", ns), campaign("c", "p", "a", "b"))
    wait_for(lambda: cluster.api.get(f"/apis/batch/v1/namespaces/{ns}/jobs/c-r1-clustering-a1"), what="job")
    wait_for(lambda: cluster.condition("routingpolicies", ns, "p"), what="policy status")
    wait_for(lambda: cluster.condition("modeltiers", ns, "b"), what="external tier status (Secret checked)")


def test_rules_cover_every_request_and_nothing_more(cluster):
    _scenario(cluster)
    used = _operator_requests(cluster)
    denied = sorted(t for t in used if not allows(RULES + SECRET_RULES, *t))
    assert not denied, f"requests not allowed by rbac.RULES: {denied}"
    unused = sorted(triples(RULES + SECRET_RULES) - used)
    assert not unused, f"rbac.RULES grants permissions the operator never used: {unused}"
