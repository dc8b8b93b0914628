"""The wire formats between operator, router and trainer (api.figures, api.router_config.RouterState, api.stage):
what each side writes, and what the reading side makes of a peer from another release or of a malformed payload."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from routenlp.api.figures import RolloutAnswer, merge
from routenlp.api.router_config import RouterState, RouterVersions
from routenlp.api.stage import StageResult, StageSummary


def test_rollout_answer_reads_old_spellings_and_leaves_out_what_it_cannot_read():
    # "current" (the CRD's spelling of the stable version) is read as "stable"
    legacy = RolloutAnswer.model_validate({"current": {"version": "v1", "requests": 3}, "spentUsd24h": 1})
    assert legacy.stable is not None and (legacy.stable.version, legacy.stable.requests) == ("v1", 3)
    assert legacy.wire()["stable"]["version"] == "v1" and "current" not in legacy.wire()
    # a role that is not an object is not served; chains that are not task -> tier names are left out
    odd = RolloutAnswer.model_validate({"stable": {"version": "v1", "chains": {"t": "big"}, "newField": 1},
                                        "canary": "v2"})
    assert odd.canary is None and odd.stable.chains is None
    assert "chains" not in odd.wire()["stable"] and "pods" not in odd.wire()["stable"]
    # what a reconcile must not trust raises pydantic's ValidationError (a ValueError), caught where it is read
    for bad in (None, [], {"stable": {"requests": "many"}}, {"spentUsd24h": "lots"}):
        with pytest.raises(ValidationError):
            RolloutAnswer.model_validate(bad)


def test_merge_keeps_the_most_common_version_of_a_role():
    v1 = {"stable": {"version": "v1", "requests": 10, "accepted": 5}}
    v2 = {"stable": {"version": "v2", "requests": 1, "accepted": 1}}
    m = merge([RolloutAnswer.model_validate(a) for a in (v1, v1, v2)])
    assert (m.stable.version, m.stable.requests, m.stable.pods, m.stable.acceptance_rate) == ("v1", 20, 2, 0.5)
    assert m.canary is None and m.spent_usd_24h == 0


def test_router_yaml_names_the_stable_version_current_and_reads_both_spellings():
    for key in ("current", "stable"):
        rv = RouterVersions.model_validate({"artifactDir": "/a", key: "v1"})
        assert rv.stable == "v1" and rv.to_k8s() == {"artifactDir": "/a", "current": "v1", "canaryPercent": 0}


def test_router_state_round_trip_and_unreadable_files():
    assert RouterState(prefer_cheaper=True).dump_yaml() == "preferCheaper: true\n"
    assert RouterState.parse_yaml("preferCheaper: true\nlaterSwitch: 1\n").prefer_cheaper is True
    assert RouterState.parse_yaml("") == RouterState()
    for bad in ("preferCheaper: [not, yaml: {", "- a list", "preferCheaper: maybe"):
        with pytest.raises(ValueError):
            RouterState.parse_yaml(bad)


def test_stage_result_reads_a_summary_in_either_spelling_and_keeps_new_metrics():
    summary = StageSummary(stage="retrain", key="k", metrics={"version": 7, "adapter": {"name": "a", "uri": "s3://x"},
                                                              "qualityBefore": 0.3, "newMetric": [1]}).model_dump()
    r = StageResult.of({**summary, "qualityBefore": 0.1, "quality_after": 0.5})  # the metrics win
    assert (r.router_version, r.adapter, r.quality_before, r.quality_after) == ("7", "a@s3://x", 0.3, 0.5)
    assert r.model_extra["newMetric"] == [1] and r.model_extra["key"] == "k"
    assert StageResult.of({"routerVersion": "v2", "version": "v1"}).router_version == "v2"
    assert StageResult.of({"metrics": {"clusters": 3}}).clusters == 3
    assert StageResult.of({"metrics": "not an object"}) == StageResult(metrics="not an object")
    with pytest.raises(ValidationError):
        StageResult.of({"qualityGain": "high"})
