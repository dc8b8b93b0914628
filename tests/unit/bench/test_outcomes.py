import json

import numpy as np
import pytest

from routenlp.bench.outcomes import (OutcomeError, Price, build_outcomes, chars_to_tokens, load_outcomes, load_prices,
                                     pareto_tiers, write_rows)


def test_pivot_sorts_models_by_cost_and_picks_the_dearest_as_reference(synth_rows):
    o = build_outcomes(synth_rows)
    assert o.models == ["cheap", "mid", "ref"]
    assert o.models[o.reference] == "ref"
    assert o.quality.shape == o.cost.shape == (400, 3)
    assert o.dropped == {"missing_some_model": 0}
    assert o.task_names == ["alpha", "beta"]


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet", "jsonl.gz"])
def test_formats_round_trip(tmp_path, synth_rows, ext):
    p = tmp_path / f"t.{ext}"
    write_rows(synth_rows[:60], p)
    o = load_outcomes(p)
    assert o.n == 20 and len(o.models) == 3
    ref = build_outcomes(synth_rows[:60])
    np.testing.assert_allclose(o.quality, ref.quality)
    np.testing.assert_allclose(o.cost, ref.cost)


def test_missing_models_are_dropped_and_counted(synth_rows):
    rows = [r for r in synth_rows if not (r["query_id"] in ("q1", "q2") and r["model"] == "mid")]
    o = build_outcomes(rows)
    assert o.n == 398 and o.dropped["missing_some_model"] == 2


def test_cost_from_tokens_and_price_table(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("unit: per_million_tokens\nmodels:\n  Meta-Llama-3.1-8B-Instruct: {input: 0.2, output: 0.4}\n")
    rows = [{"query_id": "a", "task": "t", "query": "x", "model": "Meta-Llama-3_1-8B-Instruct", "quality": 1,
             "input_tokens": 1000, "output_tokens": 500}]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    o = load_outcomes(p, prices=prices)
    assert o.cost[0, 0] == pytest.approx((1000 * 0.2 + 500 * 0.4) / 1e6)
    assert o.cost_from_tokens == 1
    assert load_prices(prices)["Meta-Llama-3.1-8B-Instruct"] == Price(0.2, 0.4)


@pytest.mark.parametrize("bad, field", [
    ({"quality": 1.5}, "quality"), ({"quality": None}, "quality"), ({"cost_usd": None}, "cost_usd"),
    ({"task": ""}, "task"), ({"cost_usd": "cheap"}, "cost_usd"), ({"cost_usd": -1}, "cost_usd"),
])
def test_bad_rows_name_the_row_and_field(bad, field):
    row = {"query_id": "a", "task": "t", "query": "x", "model": "m", "quality": 1.0, "cost_usd": 0.1}
    row.update(bad)
    with pytest.raises(OutcomeError, match=rf"row 1: field `{field}`"):
        build_outcomes([row])


def test_unknown_frontier_and_extension(tmp_path, synth_rows):
    with pytest.raises(OutcomeError, match="--frontier 'gpt-9'"):
        build_outcomes(synth_rows, frontier="gpt-9")
    (tmp_path / "t.xlsx").write_text("")
    with pytest.raises(OutcomeError, match="unknown extension"):
        load_outcomes(tmp_path / "t.xlsx")


def test_frontier_override(synth_rows):
    o = build_outcomes(synth_rows, frontier="mid")
    assert o.models[o.reference] == "mid"


def test_pareto_tiers_drop_dominated_models():
    q = np.array([[0.6, 0.5, 0.7, 0.8]])  # model 1 is dearer and worse than model 0
    c = np.array([[1.0, 2.0, 3.0, 9.0]])
    assert pareto_tiers(q, c, reference=3) == [0, 2, 3]


def test_chars_to_tokens():
    assert chars_to_tokens("") == 0 and chars_to_tokens("abcd") == 1 and chars_to_tokens("abcde") == 2


def test_self_hosted_prices_from_params_and_list_prices_for_api_models(tmp_path):
    from routenlp.bench.outcomes import load_self_hosted_prices, self_hosted_price

    prices = tmp_path / "prices.yaml"
    prices.write_text("unit: per_million_tokens\nmodels:\n  small: {input: 0.2, output: 0.2, params_b: 8}\n"
                      "  api: {input: 1.0, output: 4.0}\n")
    p = load_self_hosted_prices(prices)
    assert p["api"] == Price(1.0, 4.0)
    # 2 x 8e9 FLOPs per token on a 989 TFLOP/s GPU at 2.50 USD/h: 50 % utilisation in prefill, 15 % in decode
    assert p["small"].input == pytest.approx(2 * 8e9 / (989e12 * 0.5) * 2.5 / 3600 * 1e6)
    assert p["small"].output == pytest.approx(p["small"].input * 0.5 / 0.15)
    assert self_hosted_price(70).output == pytest.approx(self_hosted_price(7).output * 10)
    rows = [{"query_id": "a", "task": "t", "query": "x", "model": m, "quality": 1, "cost_usd": 99.0,
             "input_tokens": 1000, "output_tokens": 100} for m in ("small", "api")]
    t = tmp_path / "t.jsonl"
    t.write_text("\n".join(json.dumps(r) for r in rows))
    o = load_outcomes(t, prices, self_hosted=True)  # cost_usd (list prices) replaced by the token cost
    assert o.cost[0, o.models.index("api")] == pytest.approx((1000 * 1.0 + 100 * 4.0) / 1e6)
    assert o.cost[0, o.models.index("small")] == pytest.approx(p["small"].cost(1000, 100))
    with pytest.raises(OutcomeError, match="price table"):
        load_outcomes(t, None, self_hosted=True)


def test_portfolio_keeps_every_model_no_dearer_than_the_reference():
    from routenlp.bench.outcomes import portfolio_tiers

    c = np.array([[3.0, 1.0, 9.0, 5.0]])
    assert portfolio_tiers(c, reference=3) == [1, 0, 3]
