import argparse
import json

import numpy as np
import pytest

from routenlp.trainer import retrain
from routenlp.trainer.retrain import quality_matrix, split_of


def test_split_is_stable_per_request_and_near_the_fraction():
    ids = [f"r{i}" for i in range(2000)]
    cal = [split_of(i, 0.3) == "cal" for i in ids]
    assert 0.25 < np.mean(cal) < 0.35
    assert cal == [split_of(i, 0.3) == "cal" for i in ids]


def test_signals_replace_the_changed_tiers_labels():
    rows = [{"request_id": "a", "labels": {"student": True, "mid": False}},
            {"request_id": "b", "labels": {"student": True}}]
    signals = [{"request_id": "a", "tier": "student", "acceptable": False}]
    q = quality_matrix(rows, signals, ["student", "mid", "reference"], "reference")
    assert q[0].tolist() == [0.0, 0.0, 1.0]
    assert np.isnan(q[1, 0])  # the student's old label described the model before the adapter
    assert np.isnan(q[1, 1]) and q[1, 2] == 1.0


def synthetic_signals(rows, seed=0):
    """Student answers whose logprobs tell right from wrong: right iff the query mentions a card."""
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        ok = "card" in r["query"]
        lp = list(rng.normal(-0.05 if ok else -2.0, 0.05, size=3))
        out.append({"request_id": r["request_id"], "task": "intent", "query": r["query"], "tier": "student",
                    "answer": r["topic"] if ok else "x", "target": r["topic"], "acceptable": ok, "token_logprobs": lp})
    return out


def _args(tmp_path, **kw):
    ns = dict(events=str(tmp_path / "events"), out=str(tmp_path / "out"), artifact_dir=str(tmp_path / "artifacts"),
              version=None, teacher_tier="reference", tiers=["student", "reference"], quality_target=0.9,
              risk_level=0.2, risk_measure="acceptedAnswers", delta=0.2, max_escalations=1, generation_tasks=[],
              min_samples=10, cal_fraction=0.5, system_prompt="c",
              encoder=None, student_tier="student", student_model="adapter", student_url=None, signals=None,
              exclude=None, probe=100, epochs=30, seed=0, chains=None, quality_floors=None, cost_weights=None,
              relative_costs=None)
    ns.update(kw)
    return argparse.Namespace(**ns)


def test_retrain_writes_a_router_version_the_router_loads(tmp_path, topic_embed, helpers):
    from routenlp.router.artifacts import list_versions, load_artifact
    from routenlp.trainer.manifest import write_jsonl

    rows = helpers.write_log(tmp_path / "events", n_per=80)
    write_jsonl(tmp_path / "signals.jsonl", synthetic_signals(rows))
    args = _args(tmp_path, signals=str(tmp_path / "signals.jsonl"), version="v2")
    s = retrain.run_retrain(args)
    assert s["metrics"]["version"] == "v2"
    art = load_artifact(tmp_path / "artifacts", "v2")
    assert art.router.tier_names == ["student", "reference"]
    assert 1 <= art.metadata["router_epochs"] <= args.epochs  # recorded: how many epochs early stopping kept
    # the router learned where the student is good: card queries
    x = topic_embed(["where is my card ?", "pin is blocked ?"])
    p = art.router.predict_proba(x, np.zeros(2, dtype=int))
    assert p[0, 0] > 0.7 > 0.3 > p[1, 0]
    # a certified threshold that separates right from wrong answers, within the risk level on calibration data
    res = art.calibration.get("intent", "student")
    assert res.certified and res.empirical_risk <= 0.2
    assert art.confidence.get("intent", "student") is not None
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["outputs"]["signals"]["sha256"] and m["metrics"]["student_quality"]["student"] == pytest.approx(1 / 3, abs=1e-3)
    # idempotent, and a crashed run's version is reused rather than refused
    assert retrain.run_retrain(args)["skipped"] is True
    (tmp_path / "out" / "manifest.json").unlink()
    assert retrain.run_retrain(args)["skipped"] is False
    assert list_versions(tmp_path / "artifacts") == ["v2"]


def test_retrain_learns_chains_and_certifies_floors_the_router_reads(tmp_path, topic_embed, helpers):
    """Chains and quality floors go through the trainer into the artifact's metadata, in the names the router reads
    (server.RouterState.chain_names / floor_certified): one certified level for the chain's cheaper tiers."""
    from routenlp.router.artifacts import load_artifact
    from routenlp.trainer.manifest import write_jsonl

    rows = helpers.write_log(tmp_path / "events", n_per=80)
    write_jsonl(tmp_path / "signals.jsonl", synthetic_signals(rows))
    args = _args(tmp_path, signals=str(tmp_path / "signals.jsonl"), version="v2", quality_floors={"intent": 0.8})
    retrain.run_retrain(args)
    art = load_artifact(tmp_path / "artifacts", "v2")
    assert art.metadata["chains"] == {"intent": ["student", "reference"]}  # the student is cheaper, worse: Pareto
    floor = art.metadata["floor_certificates"]["intent"]
    assert floor["floor"] == 0.8 and floor["scope"] == "task" and 0 <= floor["level"] < 1
    assert floor["certificate"]["index"] >= 1 and floor["certificate"]["n"] > 0
    res = art.calibration.get("intent", "student")
    assert res.certified and res.threshold == floor["level"]
    # the policy's floor ("*") covers the tasks without their own, pooled; an unreachable one leaves the reference
    args = _args(tmp_path, signals=str(tmp_path / "signals.jsonl"), version="v4", out=str(tmp_path / "o4"),
                 quality_floors={"*": 0.999})
    retrain.run_retrain(args)
    v4 = load_artifact(tmp_path / "artifacts", "v4")
    assert v4.metadata["floor_certificates"]["intent"]["scope"] == "policy"
    assert v4.metadata["floor_certificates"]["intent"]["level"] is None
    assert v4.metadata["chains"] == {"intent": ["reference"]} and not v4.calibration.get("intent", "student").certified
    # a pinned chain of the reference alone: nothing cheaper is calibrated
    args = _args(tmp_path, signals=str(tmp_path / "signals.jsonl"), version="v3", out=str(tmp_path / "o3"),
                 chains={"intent": ["reference"]})
    retrain.run_retrain(args)
    v3 = load_artifact(tmp_path / "artifacts", "v3")
    assert v3.metadata["chains"] == {"intent": ["reference"]} and not v3.calibration.get("intent", "student").certified


def test_cost_weighted_start_rule_decides_which_requests_calibrate_the_cheaper_tier(tmp_path, topic_embed, helpers):
    """A task's costWeight reaches calibration: its requests start where the router would start them (a heavy cost
    weight starts them all at the student, so all of the task's calibration answers reach it; weight 0 starts the
    ones the reference is likelier to answer well at the reference)."""
    from routenlp.router.artifacts import load_artifact
    from routenlp.trainer.manifest import write_jsonl

    rows = helpers.write_log(tmp_path / "events", n_per=80)
    write_jsonl(tmp_path / "signals.jsonl", synthetic_signals(rows))
    n = {}
    for w in (0.0, 50.0):
        v = f"w{int(w)}"
        retrain.run_retrain(_args(tmp_path, signals=str(tmp_path / "signals.jsonl"), version=v, out=str(tmp_path / v),
                                  cost_weights={"intent": w}, relative_costs=[0.1, 1.0]))
        n[w] = load_artifact(tmp_path / "artifacts", v).calibration.get("intent", "student").n
    assert 0 < n[0.0] < n[50.0]
    with pytest.raises(retrain.StageError, match="relative-costs"):
        retrain.run_retrain(_args(tmp_path, signals=str(tmp_path / "signals.jsonl"), version="bad",
                                  out=str(tmp_path / "bad"), cost_weights={"intent": 1.0}))
    with pytest.raises(retrain.StageError, match="one per tier"):
        retrain.run_retrain(_args(tmp_path, signals=str(tmp_path / "signals.jsonl"), version="bad2",
                                  out=str(tmp_path / "bad2"), relative_costs=[1.0]))


def test_calibrate_recalibrates_an_existing_version(tmp_path, topic_embed, helpers):
    from routenlp.router.artifacts import load_artifact
    from routenlp.trainer.manifest import write_jsonl

    rows = helpers.write_log(tmp_path / "events", n_per=80)
    write_jsonl(tmp_path / "signals.jsonl", synthetic_signals(rows))
    retrain.run_retrain(_args(tmp_path, signals=str(tmp_path / "signals.jsonl"), version="v2"))
    s = retrain.run_calibrate(_args(tmp_path, out=str(tmp_path / "cal"), signals=str(tmp_path / "signals.jsonl"),
                                    version="v3", base_version="v2", risk_level=0.05, delta=0.1))
    v3 = load_artifact(tmp_path / "artifacts", "v3")
    assert v3.metadata["base_version"] == "v2" and v3.calibration.risk_level == 0.05
    assert (tmp_path / "cal" / "calibration.json").is_file() and s["metrics"]["version"] == "v3"


def test_only_exploration_sample_requests_calibrate(tmp_path, topic_embed, helpers):
    """Requests that have a teacher answer only because the cascade escalated them are a sample biased towards hard
    queries: they may train the router and the confidence models, never calibrate. Same log, not explored: nothing
    is certified, and the manifest says how many calibration-bucket rows were left out."""
    from routenlp.router.artifacts import load_artifact
    from routenlp.trainer.manifest import write_jsonl

    rows = helpers.write_log(tmp_path / "events", n_per=80, explored=False)
    write_jsonl(tmp_path / "signals.jsonl", synthetic_signals(rows))
    retrain.run_retrain(_args(tmp_path, signals=str(tmp_path / "signals.jsonl"), version="v2"))
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())["metrics"]
    assert m["calibration_queries"] == 0 and m["calibration_bucket_not_sampled"] > 50
    assert m["fit_queries"] == len(rows)  # every request with a teacher answer still trains
    assert not load_artifact(tmp_path / "artifacts", "v2").calibration.get("intent", "student").certified


def test_tiers_must_end_with_the_teacher(tmp_path, helpers):
    from routenlp.trainer.manifest import StageError

    helpers.write_log(tmp_path / "events", n_per=2)
    with pytest.raises(StageError, match="--tiers"):
        retrain.run_retrain(_args(tmp_path, tiers=["reference", "student"], signals="x"))
