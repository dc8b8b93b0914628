import json

import numpy as np
import pytest

from routenlp.bench import routing
from routenlp.bench.features import EmbeddingCache, response_tail
from routenlp.bench.outcomes import build_outcomes, write_rows


def test_embedding_cache_encodes_each_text_once(tmp_path, fake_encoder):
    c = EmbeddingCache(tmp_path, encoder=fake_encoder)
    a = c.embed(["x one", "y two", "x one"])
    assert fake_encoder.calls == 2 and np.allclose(a[0], a[2])
    c2 = EmbeddingCache(tmp_path, encoder=fake_encoder)
    b = c2.embed(["y two", "z three"])
    assert fake_encoder.calls == 3 and c2.encoded == 1
    np.testing.assert_allclose(b[0], a[1])


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory, make_rows, fake_encoder_cls):
    """The full command on a synthetic table (embeddings pre-cached by the fake encoder, so MiniLM is not loaded)."""
    FakeEncoder = fake_encoder_cls

    d = tmp_path_factory.mktemp("bench")
    table = d / "synth.jsonl"
    rows = make_rows(n=1000, tasks=("alpha", "alpha", "alpha", "beta"))
    write_rows(rows, table)
    o = build_outcomes(rows)
    cache = EmbeddingCache(d / "cache", encoder=FakeEncoder())
    cache.embed(o.queries)
    for j in range(len(o.models)):
        cache.embed([response_tail(r) for r in o.responses[j]])
    out = d / "out"
    rc = routing.main([str(table), "--seeds", "2", "--cache-dir", str(d / "cache"), "--out", str(out), "--json",
                       "--no-progress", "--epochs", "5", "--cal-sizes", "50,200", "--risk", "0.2", "--quality-target", "0",
                       "--alphas", "0.1,0.2", "--shift-window", "60", "--floor", "0.9"])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), out


def test_json_has_the_documented_shape(bench_result):
    res, out = bench_result
    assert set(res["methods"]) == set(routing.METHODS)
    for m in res["methods"].values():
        assert {"cost_reduction", "cost_reduction_ci", "quality_ratio", "aiq", "cost_reduction_at"} <= set(m)
        assert set(m["cost_reduction_at"]) == {"0.95", "0.97", "0.99"}
    r = res["routenlp"]
    assert {"risk", "violation_rate", "violation_rate_ci", "escalation_rate", "calls_per_query"} <= set(r)
    assert res["oracle"] == res["methods"]["oracle"]
    assert res["reference"] == "ref" and res["seeds"] == 2 and res["n_queries"] == 1000
    assert (out / "report.md").is_file() and (out / "synth-cost-quality.png").stat().st_size > 1000
    assert (out / "synth-violation.png").is_file()
    assert len(res["violation_study"]) == 4 and {"static", "recalibrated"} <= set(res["shift"])
    plan = res["routenlp"]["floor_plans"]["0.90"]
    assert isinstance(plan["chain_sets"], dict) and 0 <= plan["reference_only_seeds"] <= 2
    held = res["methods"]["routenlp"]["floor"]["0.90"]
    assert {"cost_reduction", "quality_ratio", "held_seeds"} <= set(held)


def test_sanity_of_the_measured_numbers(bench_result):
    res, _ = bench_result
    m = res["methods"]
    assert m["always_reference"]["cost_reduction"] == pytest.approx(0.0)
    assert m["always_reference"]["quality_ratio"] == pytest.approx(1.0)
    assert m["always_cheapest"]["cost_reduction"] > 0.9
    assert m["oracle"]["quality_ratio"] >= 1.0 and m["oracle"]["cost_reduction"] > 0.5
    # The synthetic answers carry a 'sure/unsure' cue: RouteNLP must save money at the relaxed risk level.
    assert m["routenlp"]["cost_reduction"] > 0.1
    assert m["routenlp"]["quality_ratio"] > 0.85


def test_bad_arguments_name_the_option(tmp_path, capsys):
    assert routing.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert routing.main([str(tmp_path / "x.jsonl"), "--train-frac", "0.9", "--cal-frac", "0.2"]) == 2
    assert "--train-frac" in capsys.readouterr().err


def test_violation_study_respects_alpha_on_synthetic_data(bench_result):
    """Answers accepted below the reference are mostly right here (~91 % of 'sure' cheap answers): the measured
    rate must sit under alpha wherever anything was accepted, and larger calibration samples must accept more."""
    res, _ = bench_result
    rows = {(v["alpha"], v["cal_size"]): v for v in res["violation_study"]}
    assert rows[(0.2, 200)]["seeds_with_acceptance"] >= 1
    for v in res["violation_study"]:
        if v["seeds_with_acceptance"]:
            assert v["violation_rate"] <= v["alpha"] + 0.03
        else:  # nothing certified: uncertified tiers are skipped, so RouteNLP costs exactly always-reference
            assert v["cost_reduction"] == pytest.approx(0.0, abs=1e-9) and v["quality_ratio"] == pytest.approx(1.0)
    assert rows[(0.2, 200)]["accepted_below_reference"] >= rows[(0.2, 50)]["accepted_below_reference"]


def test_cut_chains_end_each_task_at_its_cheapest_good_enough_tier():
    from routenlp.router.floor import cut_chains

    chains = np.array([[True, True, True], [True, False, True]])
    q = np.array([[0.5, 0.9, 1.0], [0.5, 0.9, 1.0], [0.95, 0.2, 1.0], [0.95, 0.2, 1.0]])
    tasks = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(cut_chains(chains, q, tasks, 0.9), [[True, True, False], [True, False, False]])
    np.testing.assert_array_equal(cut_chains(chains, q, tasks, 1.0), chains)
