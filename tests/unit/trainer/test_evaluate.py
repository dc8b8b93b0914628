import argparse
import json

import pytest

from routenlp.trainer import distill, evaluate
from routenlp.trainer.evaluate import accuracy, gate, matches, normalise


def test_answers_match_after_normalising_case_space_and_punctuation():
    assert matches("Card_Arrival.", "card_arrival")
    assert matches("  card_arrival\nbecause ...", "card_arrival")  # first line only
    assert not matches("card arrival", "card_arrival")  # underscores are part of a label
    assert not matches("", "")  # an empty answer is never right
    assert not matches(None, "x")
    assert normalise('"exchange_rate"!') == "exchange_rate"
    assert accuracy(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(2 / 3)
    assert accuracy([], []) is None


def test_gate_needs_the_gain_and_bounds_the_regression():
    assert gate(0.1, 0.5, 0.3, 0.3, 0.02, 0.01)["passed"] is True
    low = gate(0.1, 0.11, 0.3, 0.3, 0.02, 0.01)
    assert low["passed"] is False and "minQualityGain" in low["reasons"][0]
    reg = gate(0.1, 0.5, 0.3, 0.2, 0.02, 0.01)
    assert reg["passed"] is False and "maxRegression" in reg["reasons"][0]
    assert reg["regression"] == pytest.approx(0.1)
    assert gate(0.1, 0.5, None, None, 0.02, 0.01)["passed"] is True  # no outside sample: regression unknown


def test_evaluate_stage_in_process_writes_per_cluster_accuracy(tmp_path, tiny_model):
    from routenlp.trainer.manifest import write_json_atomic, write_jsonl

    d = tmp_path / "distill"
    d.mkdir()
    # an adapter straight from peft (untrained): evaluate must load it, run both ways and report
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16),
                       LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    m.save_pretrained(d / "adapter")
    write_json_atomic(d / "adapter.json", {"name": "a", "system_prompt": "classify", "top_clusters": [0, 1]})
    write_jsonl(d / "holdout.jsonl", [
        {"request_id": "1", "query": "where is my card", "target": "card_arrival", "cluster": 0},
        {"request_id": "2", "query": "pin blocked", "target": "pin_blocked", "cluster": 1},
        {"request_id": "3", "query": "exchange rate wrong", "target": "exchange_rate", "cluster": None},
    ])
    args = argparse.Namespace(distill=str(d), out=str(tmp_path / "eval"), base_model=str(tiny_model),
                              min_quality_gain=0.02, max_regression=0.01, teacher_url=None, teacher_model="t",
                              labels=None, max_new_tokens=3, student_url=None, student_model="s", adapter_model=None,
                              baseline_adapter=None)
    s = evaluate.run(args)
    man = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    metrics = man["metrics"]
    assert set(metrics["per_cluster_before"]) == {"0", "1"}
    assert metrics["holdout_cluster"] == 2 and metrics["holdout_outside"] == 1
    # an untrained adapter (B = 0) changes nothing: no gain, so the gate fails, and says why
    assert metrics["quality_gain"] == 0 and metrics["passed"] is False and metrics["reasons"]
    assert s["metrics"]["passed"] is False
    answers = [json.loads(x) for x in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert all(a["before"] == a["after"] for a in answers)
    assert evaluate.run(args)["skipped"] is True


def test_a_later_round_is_judged_against_the_adapter_it_continues(tmp_path, tiny_model):
    """--baseline-adapter: "before" is the student with the previous round's adapter, not the bare student."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from routenlp.trainer.manifest import StageError, read_jsonl, write_json_atomic, write_jsonl

    d = tmp_path / "distill"
    d.mkdir()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    get_peft_model(base, LoraConfig(**cfg)).save_pretrained(d / "adapter")  # untrained: the bare student
    torch.manual_seed(1)
    noisy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16),
                           LoraConfig(**cfg, init_lora_weights=False))  # random B: answers change
    noisy.save_pretrained(tmp_path / "previous")
    write_json_atomic(d / "adapter.json", {"name": "a", "system_prompt": "classify", "top_clusters": [0]})
    write_jsonl(d / "holdout.jsonl", [{"request_id": str(i), "query": q, "target": "x", "cluster": 0}
                                      for i, q in enumerate(["where is my card", "pin blocked", "rate wrong"])])

    def run(out, baseline, url=None):
        return evaluate.run(argparse.Namespace(
            distill=str(d), out=str(tmp_path / out), base_model=str(tiny_model), min_quality_gain=0.0,
            max_regression=1.0, teacher_url=None, teacher_model="t", labels=None, max_new_tokens=4, student_url=url,
            student_model="s", adapter_model="a", baseline_adapter=baseline))

    run("bare", None)
    run("vs-previous", str(tmp_path / "previous"))
    bare = [r["before"] for r in read_jsonl(tmp_path / "bare" / "answers.jsonl")]
    rows = read_jsonl(tmp_path / "vs-previous" / "answers.jsonl")
    assert [r["before"] for r in rows] != bare  # judged against the previous adapter's answers
    assert [r["after"] for r in rows] == bare  # the (untrained) new adapter is the bare student
    man = json.loads((tmp_path / "vs-previous" / "manifest.json").read_text())
    assert "baseline_adapter" in man["inputs"]
    with pytest.raises(StageError, match="--student-model"):
        run("served", str(tmp_path / "previous"), url="http://127.0.0.1:9/v1")
