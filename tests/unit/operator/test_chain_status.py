"""Chains as users see them: the router serves each task's chain in force with its figures, replicas' answers merge,
and the operator turns them into status.chains / status.chainSummary (the `Chains` column of kubectl get rp -o wide)."""

from routenlp.operator.rollout import observed_figures
from routenlp.api.figures import merge
from routenlp.router.figures import RolloutFigures


def test_router_serves_the_chains_of_each_version_and_the_operator_shows_them():
    f = RolloutFigures(clock=lambda: 1000.0)
    f.set_versions("v2", "v3")
    f.chains = {"v2": {"intent": ["small", "big"], "chat": ["big"]}, "v3": {"intent": ["big"], "chat": ["big"]}}
    answer = f.answer()
    assert answer["stable"]["chains"] == {"intent": ["small", "big"], "chat": ["big"]}
    assert answer["canary"]["chains"]["intent"] == ["big"]
    both = merge([f.report(), f.report()])
    merged = both.wire()
    assert merged["stable"]["chains"] == answer["stable"]["chains"] and merged["stable"]["pods"] == 2
    status = observed_figures(both)
    assert status["chains"] == [{"task": "chat", "tiers": ["big"]}, {"task": "intent", "tiers": ["small", "big"]}]
    assert status["chainSummary"] == "chat: big; intent: small>big"


def test_routers_from_before_chains_leave_the_status_alone():
    f = RolloutFigures(clock=lambda: 1000.0)
    f.set_versions("v1", None)
    status = observed_figures(merge([f.report()]))
    assert "chains" not in status and "chainSummary" not in status
