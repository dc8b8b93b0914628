"""The campaign bench's figures: matched-quality comparison per round, the paired difference when the control saves
under 1 %, the per-round plot and table (synthetic route results; the real run is tests/e2e/campaign)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from routenlp.bench.campaign import SMALL, Timings, compare, plot_rounds, report, table


def routed(cost_reduction: float, quality_ratio: float, version: str = "v") -> dict:
    return {"queries": 60, "quality": quality_ratio, "quality_ratio": quality_ratio, "cost_usd": 1.0,
            "reference_cost_usd": 2.0, "cost_reduction": cost_reduction, "student_share": cost_reduction,
            "student_tried": 10, "router_version": version, "student_model": "m"}


def test_improvement_ratio_needs_a_control_that_saved_at_least_one_percent():
    before = routed(0.0, 1.0)
    c = compare(before, routed(0.30, 0.96), routed(0.10, 0.95))
    assert c["improvement_ratio"] == 3.0 and c["paired_difference_points"] == 20.0
    assert c["quality_ratio"] == {"targeted": 0.96, "untargeted": 0.95}
    tiny = compare(before, routed(0.05, 0.97), routed(0.004, 0.99))
    assert tiny["improvement_ratio"] is None  # 0.4 % saved: a ratio over noise
    assert tiny["paired_difference_points"] == 4.6
    assert compare(before, routed(0.0, 1.0), routed(0.0, 1.0))["paired_difference_points"] == 0.0


@dataclass
class Ex:
    text: str
    label: str


def arm(round_: int, floor_cost: float, floor_q: float, policy_cost: float) -> dict:
    return {"at_floor": routed(floor_cost, floor_q, f"v{round_ + 1}-floor"),
            "at_policy": routed(policy_cost, 0.9, f"v{round_ + 1}"),
            "distill": {"train_pairs": 90, "pairs_per_cluster": {"0": 60, "1": 30}, "steps": 60},
            "evaluate": {"passed": True, "quality_before": 0.0, "quality_after": 0.5, "quality_gain": 0.5,
                         "outside_before": 0.0, "outside_after": 0.1, "regression": -0.1, "reasons": [],
                         "per_cluster_before": {"0": 0.0}, "per_cluster_after": {"0": 0.5}},
            "thresholds": {"policy": {}, "floor": {}}, "clusters": {"k": 3, "failures": 200}}


def test_report_plot_and_table_per_round(tmp_path):
    s = SMALL
    bench = SimpleNamespace(held_q=[Ex("q", "a")], timings=Timings({"cluster": 1.0}))
    before = {"at_floor": routed(0.0, 1.0, "v1-floor"), "at_policy": routed(0.0, 1.0, "v1")}
    rounds = [{"round": 1, "targeted": arm(1, 0.10, 0.85, 0.2), "untargeted": arm(1, 0.05, 0.82, 0.25)},
              {"round": 2, "targeted": arm(2, 0.20, 0.84, 0.3), "untargeted": arm(2, 0.005, 0.79, 0.3)}]
    r = report(s, bench, {"queries": 240}, [Ex("q", "a")], before, rounds, {}, 12.0)
    assert r["after"]["cost_reduction"] == 0.20 and r["control"]["cost_reduction"] == 0.005
    assert r["improvement_ratio"] is None and r["paired_difference_points"] == 19.5  # control saved 0.5 %
    assert [x["at_floor"]["improvement_ratio"] for x in r["rounds"]] == [2.0, None]
    assert r["rounds"][0]["at_policy_risk"]["improvement_ratio"] == pytest.approx(0.8)
    assert r["meets_floor"] == {"before": True, "targeted": True, "untargeted": False}  # floor 0.8 in --small
    assert r["distill"]["targeted"]["pairs_per_cluster"] == {"0": 60, "1": 30}
    png = plot_rounds(r, tmp_path / "plot" / "rounds.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table(r)
    assert "round 2 untargeted | 0.790 | 0.005" in text and "n/a (control saved < 1 %)" in text
