"""The router's figures in the operator: status fields, the EscalationRate trigger (with minFailures) and why it
waits, the BudgetExceeded condition and its Events."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from routenlp.api import DistillationCampaign, RoutingPolicy
from routenlp.api.figures import RolloutAnswer
from routenlp.operator import campaign_flow as cm
from routenlp.operator import rollout, routingpolicy

API = "routenlp.io/v1alpha1"
NOW = datetime(2026, 11, 27, 12, tzinfo=timezone.utc)
ANSWER = RolloutAnswer.model_validate({"stable": {"version": "v1", "requests": 900, "acceptanceRate": 0.6, "violationRate": 0.02,
                     "escalationRate": 0.35, "costReduction": 0.46, "escalations": 315},
          "canary": None, "spentUsd24h": 12.3456789})


def policy(budget=None) -> RoutingPolicy:
    spec = {"tiers": [{"name": "a"}], "tasks": [{"name": "t"}], **({"budget": budget} if budget else {})}
    return RoutingPolicy.model_validate({"apiVersion": API, "kind": "RoutingPolicy", "metadata": {"name": "p"},
                                         "spec": spec})


def esc_campaign(min_failures=200) -> DistillationCampaign:
    return DistillationCampaign.model_validate({
        "apiVersion": API, "kind": "DistillationCampaign", "metadata": {"name": "c"},
        "spec": {"policyRef": "p", "studentTier": "s", "teacherTier": "t",
                 "trigger": {"mode": "EscalationRate", "escalationRateThreshold": 0.3, "minFailures": min_failures,
                             "cooldown": "1h"}}})


def test_observed_figures_take_the_stable_block_and_the_spend():
    assert rollout.observed_figures(ANSWER) == {"costReduction": 0.46, "escalationRate": 0.35,
                                                "violationRate": 0.02, "escalations": 315, "spentUsd24h": 12.345679,
                                                "figuresVersion": "v1"}
    # no labels yet: violationRate null is left out, not written as 0
    no_labels = RolloutAnswer.model_validate({"stable": {"violationRate": None, "requests": 0}})
    assert rollout.observed_figures(no_labels) == {}


def test_escalation_trigger_fires_on_rate_and_failures_and_says_why_not():
    c = esc_campaign(min_failures=200)
    figs = rollout.observed_figures(ANSWER)
    assert cm.should_start(c, {}, None, NOW, figs["escalationRate"], figs["escalations"]) == "EscalationRate"
    assert cm.trigger_waiting(c, {}, NOW, 0.35, 315) == ""
    assert cm.should_start(c, {}, None, NOW, 0.35, 150) is None
    assert cm.trigger_waiting(c, {}, NOW, 0.35, 150) == "150 escalation failures observed, minFailures 200"
    assert cm.should_start(c, {}, None, NOW, 0.2, 500) is None
    assert cm.trigger_waiting(c, {}, NOW, 0.2, 500) == ("escalation rate 0.200 of RoutingPolicy p below "
                                                         "escalationRateThreshold 0.3")
    assert cm.should_start(c, {}, None, NOW, None, None) is None
    assert "no escalation rate" in cm.trigger_waiting(c, {}, NOW, None, None)
    recent = {"phase": "Succeeded", "run": 1, "lastRunTime": (NOW - timedelta(minutes=10)).isoformat()}
    assert cm.should_start(c, recent, None, NOW, 0.9, 10_000) is None
    assert cm.trigger_waiting(c, recent, NOW, 0.9, 10_000) == "cooldown 1h after the last run: 3000s left"


def test_budget_condition_and_events():
    assert rollout.budget_condition(policy(), 100.0, 3) is None  # no budget: no condition
    p = policy({"maxUsdPerDay": 10})
    over = rollout.budget_condition(p, 12.5, 3)
    assert (over["type"], over["status"], over["reason"]) == ("BudgetExceeded", "True", "DailyBudgetExceeded")
    assert over["message"] == "$12.50 spent over the last 24 h, limit spec.budget.maxUsdPerDay $10.00"
    under = rollout.budget_condition(p, 4.0, 3)
    assert (under["status"], under["reason"]) == ("False", "WithinBudget") and "$4.00" in under["message"]
    unknown = rollout.budget_condition(p, None, 3)
    assert (unknown["status"], unknown["reason"]) == ("Unknown", "SpendUnknown")
    cheaper = rollout.budget_condition(policy({"maxUsdPerDay": 10, "action": "PreferCheaper"}), 11.0, 3)
    assert cheaper["status"] == "True" and "PreferCheaper: every request starts at the cheapest tier" in cheaper["message"]
    # the routers' switch: only with action PreferCheaper, only while over budget
    pc = policy({"maxUsdPerDay": 10, "action": "PreferCheaper"})
    assert rollout.prefer_cheaper(pc, cheaper) is True
    assert rollout.prefer_cheaper(pc, rollout.budget_condition(pc, 4.0, 3)) is False
    assert rollout.prefer_cheaper(pc, rollout.budget_condition(pc, None, 3)) is False  # spend unknown
    assert rollout.prefer_cheaper(pc, None) is False
    assert rollout.prefer_cheaper(p, over) is False  # action Alert
    assert rollout.prefer_cheaper(policy(), over) is False  # no budget
    # Events only on transitions: over budget -> Warning once; back within -> Normal once
    assert routingpolicy.budget_events(None, over) == [("Warning", "BudgetExceeded", over["message"])]
    assert routingpolicy.budget_events(over, over) == []
    assert routingpolicy.budget_events(over, under) == [("Normal", "WithinBudget", under["message"])]
    assert routingpolicy.budget_events(None, under) == [] and routingpolicy.budget_events(under, None) == []


def test_canary_figures_of_another_version_are_ignored():
    answer = RolloutAnswer.model_validate({
        "canary": {"version": "v3", "requests": 900, "violationRate": 0.5, "acceptanceRate": 0.1},
        "stable": {"version": "v1", "acceptanceRate": 0.7}})
    assert rollout.CanaryStats.from_answer(answer, "v2") is None  # pods still serve the previous canary
    assert rollout.CanaryStats.from_answer(answer, "v3") == rollout.CanaryStats(900, 0.5, 0.1, 0.7)
    unnamed = RolloutAnswer.model_validate({"canary": {"requests": 5}})
    assert rollout.CanaryStats.from_answer(unnamed, "v2").requests == 5  # unnamed: trusted
