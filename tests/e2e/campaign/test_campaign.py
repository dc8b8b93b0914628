"""A short real campaign (`routenlp bench campaign --small`): events from real SmolLM2 answers on BANKING77 ->
cluster -> peft LoRA distillation on CPU -> the adapter loaded into the shared, RUNNING vLLM server -> evaluate ->
retrain/recalibrate the router -> publish -> route the held-out traffic again. The reference tier is
banking77-oracle, an oracle-quality stand-in for a frontier model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def campaign(vllm_server, tmp_path_factory):
    from routenlp.bench.campaign import SMALL, run_campaign

    work = tmp_path_factory.mktemp("campaign")
    return work, run_campaign(SMALL, work, progress=False, server=vllm_server)


def test_report_has_before_after_control_and_stage_times(campaign):
    work, r = campaign
    for run in ("before", "after", "control"):
        assert 0.0 <= r[run]["quality_ratio"] <= 1.0
        assert r[run]["cost_reduction"] <= 1.0
        assert r[run]["queries"] == r["workload"]["heldout_queries"]
    # the reference tier answers everything the student does not: quality holds within the risk level's reach
    assert r["after"]["quality_ratio"] >= 0.7
    for stage in ("log_traffic", "cluster", "distill_targeted", "distill_untargeted", "evaluate_targeted",
                  "retrain_targeted", "publish_targeted", "route_targeted"):
        assert r["stage_seconds"][stage] > 0
    assert "improvement_ratio" in r
    # matched quality: every arm's router recalibrated for the one quality floor; the policy-risk figures secondary
    assert r["quality_floor"] == 0.8 and set(r["meets_floor"]) == {"before", "targeted", "untargeted"}
    assert [x["round"] for x in r["rounds"]] == [1] and r["at_policy_risk"]["risk_level"] == 0.2
    assert r["after"]["router_version"].endswith("-floor") and r["at_policy_risk"]["after"]["router_version"]
    assert r["paired_difference_points"] == round(100 * (r["after"]["cost_reduction"]
                                                         - r["control"]["cost_reduction"]), 2)
    assert sum(r["distill"]["targeted"]["pairs_per_cluster"].values()) == r["distill"]["targeted"]["train_pairs"]
    json.dumps(r)  # the --json output is plain JSON
    # each round's figures are written to the work folder as it ends (kept if a later round crashes)
    saved = json.loads((work / "report.json").read_text())
    assert saved["complete"] and saved["rounds_completed"] == 1 and saved["after"] == r["after"]


def test_vllm_serves_the_fine_tuned_adapter_by_name(campaign, vllm_server, smollm2_path):
    """A request naming the adapter returns the distilled behaviour: the teacher's label format (snake_case intents;
    the base model writes prose), and the same greedy answers as the trained adapter run in-process with peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from routenlp.bench.campaign import SYSTEM_PROMPT
    from routenlp.trainer.client import chat_many
    from routenlp.trainer.distill import messages_for
    from routenlp.trainer.evaluate import accuracy, generate, normalise

    work, _ = campaign
    rows = [json.loads(x) for x in (work / "distill-targeted" / "train.jsonl").read_text().splitlines()][:12]
    queries, targets = [r["query"] for r in rows], [r["target"] for r in rows]
    convs = [messages_for(SYSTEM_PROMPT, q) for q in queries]
    base = [a.text for a in chat_many(vllm_server.base_url, "smollm2-135m", convs, max_tokens=20, logprobs=False)]
    tuned = [a.text for a in chat_many(vllm_server.base_url, "b77-targeted", convs, max_tokens=20, logprobs=False)]
    assert "b77-targeted" in vllm_server.models()

    def label_shaped(text: str) -> bool:
        return re.fullmatch(r"[a-z]+(_[a-z]+)+", normalise(text)) is not None

    assert sum(map(label_shaped, tuned)) / len(tuned) >= 0.8, tuned
    assert sum(map(label_shaped, base)) / len(base) <= 0.2, base
    assert accuracy(tuned, targets) >= accuracy(base, targets)

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16),
                                      work / "distill-targeted" / "adapter")
    local = generate(model, tok, SYSTEM_PROMPT, queries, max_new_tokens=20)
    same = sum(normalise(a) == normalise(b) for a, b in zip(tuned, local)) / len(queries)
    assert same >= 0.75, list(zip(tuned, local))


def test_targeted_adapter_improves_its_clusters_on_held_out_queries(campaign):
    _, r = campaign
    ev = r["evaluation"]["targeted"]
    assert ev["quality_after"] > ev["quality_before"]
    pc = r["per_cluster_student_accuracy"]["targeted"]
    assert set(pc["before"]) == set(pc["after"]) and pc["before"]


def test_published_router_version_is_loadable_and_calibrated(campaign):
    from routenlp.router.artifacts import load_artifact

    work, r = campaign
    art = load_artifact(work / "published" / "router", r["after"]["router_version"])
    assert art.router.tier_names == ["student", "reference"]
    assert art.calibration is not None and art.calibration.get("banking77-intent", "student") is not None
    assert (work / "published" / "adapters" / "b77-targeted" / "adapter_model.safetensors").is_file()


def test_rerunning_a_stage_with_the_same_inputs_is_a_noop(campaign):
    work, _ = campaign
    out = subprocess.run(
        [sys.executable, "-m", "routenlp.cli.main", "train", "cluster", "--events", str(work / "events"), "--out",
         str(work / "cluster"), "--teacher-tier", "reference", "--student-tier", "student", "--max-clusters", "8",
         "--min-cluster-size", "10", "--top-clusters", "3", "--seed", "0"],
        capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["skipped"] is True
