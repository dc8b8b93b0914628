"""The campaign bench's figures: matched-quality comparison per round, the paired difference when the control saves
under 1 %, the per-round plot and table (synthetic route results; the real run is tests/e2e/campaign)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
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


class RecordingBench:
    """arm_round's collaborators, recorded: the stage arguments it builds, no server and no stage run."""

    def __init__(self, s, work):
        from routenlp.bench.campaign import Bench

        self.b = Bench(s=s, work=work, server=SimpleNamespace(load_lora=lambda name, path: None, base_url="http://student/v1"), model=work / "m",
                       encoder=None, timings=Timings(), quiet=True, tag="t", held_q=[])
        self.calls: dict[str, list[str]] = {}
        self.b.stage = self.stage
        self.b.at_floor = lambda version, signals, name: (f"{version}-floor", {"metrics": {"thresholds": {}}})
        self.b.route = lambda *a, **k: dict(routed(0.1, 0.95), _signals=[])

    def stage(self, args, name):
        self.calls[name] = args
        if args[0] == "distill":  # the file the next round reads
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "train.jsonl").write_text("{}\n")
        return {"metrics": {"thresholds": {}}}


@pytest.mark.parametrize("adapter_rounds", ["continue", "union"])
def test_a_later_round_continues_the_adapter_or_replays_every_earlier_rounds_pairs(tmp_path, adapter_rounds):
    """--adapter-rounds: round 2 either continues round 1's adapter (the operator's way) or trains a fresh adapter on
    round 1's pairs beside its own (round 1's train.jsonl already holds them all); round 1 is the same either way."""
    from dataclasses import replace

    from routenlp.bench.campaign import arm_round

    rb = RecordingBench(replace(SMALL, adapter_rounds=adapter_rounds), tmp_path)
    first = arm_round(rb.b, "targeted", 1, tmp_path / "cluster", None)
    arm_round(rb.b, "targeted", 2, tmp_path / "cluster-r2", first)
    r1, r2 = rb.calls["distill_targeted"], rb.calls["distill_targeted_r2"]
    assert "--init-adapter" not in r1 and "--replay" not in r1
    if adapter_rounds == "continue":
        assert r2[r2.index("--init-adapter") + 1] == str(tmp_path / "distill-targeted" / "adapter")
        assert "--replay" not in r2
    else:
        assert r2[r2.index("--replay") + 1] == str(tmp_path / "distill-targeted" / "train.jsonl")
        assert "--init-adapter" not in r2
    # evaluate judges round 2 against what round 1 serves, in both ways
    assert rb.calls["evaluate_targeted_r2"][rb.calls["evaluate_targeted_r2"].index("--student-model") + 1] == \
        "b77-targeted"
