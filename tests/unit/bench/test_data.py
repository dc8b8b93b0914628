import json

import numpy as np
import pytest

from routenlp.bench import data as D
from routenlp.bench.outcomes import OutcomeError, Price, build_outcomes, load_outcomes, load_prices

PRICES = {"Meta-Llama-3.1-8B-Instruct": Price(0.18, 0.18), "gemini-1.5-pro-002": Price(1.25, 5.0)}


def _rec(qid, pred, answer="B", cat="law", out="text " * 10, key="generated_text"):
    return {"question_id": qid, "question": f"Question {qid}?", "options": "['x', 'y', 'z']", "answer": answer,
            "category": cat, "pred": pred, key: out}


def test_mmlu_records_quality_tokens_and_cost():
    per_model = {
        "Meta-Llama-3_1-8B-Instruct": [_rec("1", "B"), _rec("2", None), _rec("3", "A")],
        "gemini-1.5-pro-002": [_rec("1", "B", key="model_outputs"), _rec("2", "B", key="model_outputs")],
    }
    rows = D.convert_mmlu_records(per_model, PRICES)
    by = {(r["query_id"], r["model"]): r for r in rows}
    assert by[("1", "Meta-Llama-3.1-8B-Instruct")]["quality"] == 1.0
    assert by[("2", "Meta-Llama-3.1-8B-Instruct")]["quality"] == 0.0  # null pred counts as wrong
    assert by[("3", "Meta-Llama-3.1-8B-Instruct")]["quality"] == 0.0
    assert ("3", "gemini-1.5-pro-002") not in by
    r = by[("1", "gemini-1.5-pro-002")]
    assert "A. x" in r["query"] and "C. z" in r["query"]
    assert r["output_tokens"] == 13  # ceil(50 chars / 4)
    assert r["input_tokens"] > r["output_tokens"]  # includes the 5-shot prefix estimate
    assert r["cost_usd"] == pytest.approx((r["input_tokens"] * 1.25 + r["output_tokens"] * 5.0) / 1e6)
    o = build_outcomes(rows)  # query 3 lacks the pro model: dropped and counted
    assert o.n == 2 and o.dropped["missing_some_model"] == 1


def test_mmlu_unknown_model_price_is_an_error():
    with pytest.raises(OutcomeError, match="no entry in the price table"):
        D.convert_mmlu_records({"gpt-9": [_rec("1", "B")]}, PRICES)


def test_financebench_refusal_is_not_acceptable():
    qs = [{"financebench_id": "f1", "question": "What was revenue?", "question_type": "novel-generated"}]
    res = {"gpt-4": [{"financebench_id": "f1", "model_answer": "I cannot answer.", "label": "Refusal"}],
           "llama2": [{"financebench_id": "f1", "model_answer": "42", "label": "Correct Answer"}]}
    rows = D.convert_financebench_records(qs, res, {"gpt-4": Price(30, 60), "llama2": Price(0.9, 0.9)}, 100,
                                          task_field="question_type")
    by = {r["model"]: r for r in rows}
    assert by["gpt-4"]["quality"] == 0.0 and by["llama2"]["quality"] == 1.0
    assert by["gpt-4"]["task"] == "novel-generated" and by["gpt-4"]["input_tokens"] == 100 + 5


def test_convert_cli_on_the_real_data(shared_data, tmp_path, capsys):
    out = tmp_path / "mmlu.jsonl"
    assert D.main(["convert", "mmlu-pro-model-outputs", "--out", str(out), "--limit", "300"]) == 0
    o = load_outcomes(out)
    assert len(o.models) == 8 and 280 <= o.n <= 300
    assert o.models[o.reference] == "gemini-1.5-pro-002"  # the dearest on average
    # Third-party numbers (the data set's SOURCE.md): accuracies differ widely by model; pro beats the small open models.
    acc = dict(zip(o.models, o.quality.mean(0)))
    assert acc["gemini-1.5-pro-002"] > acc["Mistral-7B-Instruct-v0.2"] + 0.1
    fb = tmp_path / "fb.csv"
    assert D.main(["convert", "financebench", "--out", str(fb)]) == 0
    f = load_outcomes(fb)
    assert f.n == 150 and set(f.models) == {"llama2", "gpt-4", "gpt-4-1106-preview"}
    rows = [json.loads(line) for line in out.read_text().splitlines()[:3]]
    assert all(r["response"] and r["cost_usd"] > 0 for r in rows)
    assert load_prices(shared_data / "prices.yaml")["gemini-1.5-pro-002"] == Price(1.25, 5.0)


def test_convert_cli_bad_mode(shared_data, tmp_path, capsys):
    assert D.main(["convert", "financebench", "--out", str(tmp_path / "x.jsonl"), "--mode", "nope"]) == 2
    assert "--mode 'nope'" in capsys.readouterr().err


def test_mmlu_entries_that_are_not_records_are_skipped_and_counted():
    per_model = {"gemini-1.5-pro-002": [_rec("1", "B"), "a stray string", _rec("2", "A")]}
    skipped: dict = {}
    rows = D.convert_mmlu_records(per_model, PRICES, skipped=skipped)
    assert {r["query_id"] for r in rows} == {"1", "2"} and skipped == {"gemini-1.5-pro-002": 1}


def test_convert_cli_adds_the_extra_models(shared_data, tmp_path, capsys):
    out = tmp_path / "mmlu13.jsonl"
    assert D.main(["convert", "mmlu-pro-model-outputs", "--out", str(out), "--limit", "200",
                   "--extra", str(shared_data / "mmlu-pro-more-models")]) == 0
    assert "DeepSeek-Coder-V2: skipped 43 list entries that are not records" in capsys.readouterr().err
    o = load_outcomes(out, frontier="gemini-1.5-pro-002")
    assert len(o.models) == 13 and {"mathstral-7B", "DeepSeek-Coder-V2"} <= set(o.models)
    assert D.main(["convert", "mmlu-pro-model-outputs", "--out", str(out), "--extra", str(tmp_path)]) == 2
    assert "no model_outputs_*.zip" in capsys.readouterr().err
