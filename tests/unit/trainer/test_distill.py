import argparse
import json

import pytest

from routenlp.trainer import distill
from routenlp.trainer.distill import (
    Interrupted, batch_indices, encode_pair, split_budget, split_holdout, training_rows,
)


def rows_for(clusters: dict[int, int]) -> list[dict]:
    return [{"request_id": f"{c}-{i}", "query": f"q {c} {i}", "cluster": c, "teacher_response": f"label{c}"}
            for c, n in clusters.items() for i in range(n)]


def test_holdout_is_per_cluster_and_never_trained_on():
    rows = rows_for({0: 10, 1: 5, 2: 1, -1: 30})
    held, outside = split_holdout(rows, [0, 1, 2], 0.2, outside=8, seed=0)
    assert sum(r.startswith("0-") for r in held) == 2 and sum(r.startswith("1-") for r in held) == 1
    assert not any(r.startswith("2-") for r in held)  # a single query is not split
    assert len(outside) == 8 and all(r.startswith("-1-") for r in outside)
    for mode in ("targeted", "untargeted"):
        train = training_rows(rows, [0, 1, 2], held | outside, mode, samples_per_cluster=100, seed=0)
        assert not {r["request_id"] for r in train} & (held | outside)
    assert split_holdout(rows, [0, 1, 2], 0.2, 8, seed=0) == (held, outside)  # deterministic


def test_untargeted_control_has_the_same_budget_but_draws_from_everything():
    rows = rows_for({0: 40, 1: 40, 2: 40, 3: 40, -1: 80})
    targeted = training_rows(rows, [0, 1], set(), "targeted", samples_per_cluster=15, seed=3)
    untargeted = training_rows(rows, [0, 1], set(), "untargeted", samples_per_cluster=15, seed=3)
    assert len(targeted) == len(untargeted) == 30
    assert {r["cluster"] for r in targeted} == {0, 1}
    assert len({r["cluster"] for r in untargeted}) >= 4


def test_budget_split_follows_cost_within_caps():
    assert split_budget([3.0, 1.0], [100, 100], 40) == [30, 10]
    assert split_budget([3.0, 1.0, 0.0], [5, 100, 100], 40) == [5, 35, 0]  # a full cluster's share goes on
    assert split_budget([0.0, 0.0], [100, 100], 9) in ([5, 4], [4, 5])  # no costs: equal
    assert sum(split_budget([1.0, 1.0, 1.0], [100, 100, 100], 10)) == 10  # whole pairs, none lost
    assert split_budget([1.0, 1.0], [2, 3], 50) == [2, 3]  # never more than there is


def test_cost_split_gives_the_costly_cluster_more_pairs_for_the_same_budget():
    rows = [{**r, "cost_usd": 0.03 if r["cluster"] == 0 else 0.01} for r in rows_for({0: 40, 1: 40, 2: 40, -1: 20})]
    equal = training_rows(rows, [0, 1, 2], set(), "targeted", 10, seed=0, budget_split="equal")
    by_cost = training_rows(rows, [0, 1, 2], set(), "targeted", 10, seed=0, budget_split="cost")
    assert len(equal) == len(by_cost) == 30  # the same budget
    assert [sum(r["cluster"] == c for r in equal) for c in (0, 1, 2)] == [10, 10, 10]
    assert [sum(r["cluster"] == c for r in by_cost) for c in (0, 1, 2)] == [18, 6, 6]  # 3:1:1 of the cost
    from routenlp.trainer.manifest import StageError

    with pytest.raises(StageError, match="--budget-split"):
        training_rows(rows, [0], set(), "targeted", 10, seed=0, budget_split="size")


def test_batches_are_a_function_of_the_step():
    assert batch_indices(10, 4, 7, seed=1) == batch_indices(10, 4, 7, seed=1)
    epoch = [i for s in range(5) for i in batch_indices(10, 2, s, seed=1)]
    assert sorted(epoch) == list(range(10))  # one epoch sees every example once


def test_pairs_are_labelled_only_on_the_answer(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ex = encode_pair(tok, "classify", "where is my card", "card_arrival")
    answer = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert tok.decode(answer).split() == ["card_arrival", "<|end|>"]
    assert len(ex["input_ids"]) == len(ex["labels"])


def _args(clusters_dir, out, base, steps=6, **kw):
    ns = dict(clusters=str(clusters_dir), out=str(out), base_model=str(base), adapter_name="a", mode="targeted",
              top_clusters=2, hold_out_fraction=0.25, outside_holdout=2, system_prompt="classify", teacher_url=None,
              teacher_model="t", teacher_api_key_env=None, checkpoint_every=2, seed=0, quiet=True, r=4, alpha=8,
              dropout=0.1, target_modules=["q_proj", "v_proj"], steps=steps, learning_rate=1e-2, batch_size=2,
              samples_per_cluster=6, top_layers=0, init_adapter=None, budget_split="cost", replay=[])
    ns.update(kw)
    return argparse.Namespace(**ns)


@pytest.fixture
def clusters_dir(tmp_path):
    from routenlp.trainer.manifest import write_json_atomic, write_jsonl

    d = tmp_path / "clusters"
    words = {0: "where is my card", 1: "exchange rate wrong", 2: "pin blocked"}
    labels = {0: "card_arrival", 1: "exchange_rate", 2: "pin_blocked"}
    rows = [{"request_id": f"{c}-{i}", "query": f"{words[c]} {'?' * (i % 3 + 1)}", "cluster": c,
             "teacher_response": labels[c], "task": "intent", "tier": "student", "reason": "rejected",
             "cost_usd": 0.001} for c in words for i in range(8)]
    write_jsonl(d / "failures.jsonl", rows)
    write_json_atomic(d / "clusters.json", {"top_clusters": [0, 1, 2], "clusters": []})
    return d


def test_distill_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path, tiny_model, clusters_dir):
    import torch
    from safetensors.torch import load_file

    def stop_at_3(step, loss):
        if step == 3:
            raise Interrupted("preempted")

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        distill.run(_args(clusters_dir, out, tiny_model), on_step=stop_at_3)
    assert (out / "checkpoints" / "last.pt").exists()
    assert not (out / "manifest.json").exists()
    resumed = distill.run(_args(clusters_dir, out, tiny_model))
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["resumed_from_step"] == 2 and m["steps_this_run"] == 4  # continued from step 2, not from 0
    assert resumed["skipped"] is False

    straight = tmp_path / "straight"
    distill.run(_args(clusters_dir, straight, tiny_model))
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(straight / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k])

    # vLLM's runtime-loading layout, and the manifest a Job reports
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and set(cfg["target_modules"]) == {"q_proj", "v_proj"}
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["outputs"]) == {"train", "holdout", "adapter", "adapter_info"}
    assert man["params"]["steps"] == 6 and man["metrics"]["train_pairs"] == 12  # 6 per top cluster, 2 clusters
    holdout = [json.loads(line) for line in (out / "holdout.jsonl").read_text().splitlines()]
    assert {h["cluster"] for h in holdout} == {0, 1, None}

    # idempotent: same inputs -> nothing retrained
    assert distill.run(_args(clusters_dir, out, tiny_model))["skipped"] is True


def test_a_checkpoint_of_other_inputs_is_not_resumed(tmp_path, tiny_model, clusters_dir):
    out = tmp_path / "o"

    def stop(step, loss):
        if step == 2:
            raise Interrupted()

    with pytest.raises(Interrupted):
        distill.run(_args(clusters_dir, out, tiny_model), on_step=stop)
    distill.run(_args(clusters_dir, out, tiny_model, learning_rate=5e-3))
    assert json.loads((out / "manifest.json").read_text())["metrics"]["resumed_from_step"] is None


def test_bad_lora_settings_name_the_flag(tmp_path):
    from routenlp.trainer.manifest import StageError

    with pytest.raises(StageError, match="--steps"):
        distill.main(["--clusters", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "0"])


def test_a_round_continues_the_previous_adapter_with_the_same_settings(tmp_path, tiny_model, clusters_dir):
    """--init-adapter: training starts from the earlier adapter's weights (its first loss is where the earlier run
    ended, not where a fresh adapter starts); other LoRA settings are refused with the flag named."""
    from routenlp.trainer.manifest import StageError

    first = distill.run(_args(clusters_dir, tmp_path / "round-1", tiny_model, steps=8))["metrics"]
    fresh = distill.run(_args(clusters_dir, tmp_path / "fresh", tiny_model, steps=2))["metrics"]
    cont = distill.run(_args(clusters_dir, tmp_path / "round-2", tiny_model, steps=2,
                             init_adapter=str(tmp_path / "round-1" / "adapter")))["metrics"]
    assert cont["loss_first"] < fresh["loss_first"]
    assert cont["loss_first"] < first["loss_first"]
    man = json.loads((tmp_path / "round-2" / "manifest.json").read_text())
    assert "init_adapter" in man["inputs"]  # part of the idempotency key
    with pytest.raises(StageError, match=r"--init-adapter.*r 4 \(asked 8\)"):
        distill.run(_args(clusters_dir, tmp_path / "bad", tiny_model, r=8,
                          init_adapter=str(tmp_path / "round-1" / "adapter")))
    with pytest.raises(StageError, match="adapter_config.json"):
        distill.run(_args(clusters_dir, tmp_path / "bad2", tiny_model, init_adapter=str(tmp_path)))


def test_replay_trains_earlier_rounds_pairs_beside_this_rounds_but_never_a_held_out_query(tmp_path, tiny_model,
                                                                                         clusters_dir):
    """--replay (the union of rounds): an earlier round's train.jsonl pairs join this round's, flagged, once each; one
    whose query is held out this round is dropped (the hold-out stays unseen); the files are part of the key."""
    from routenlp.trainer.manifest import StageError, read_jsonl, write_jsonl

    distill.run(_args(clusters_dir, tmp_path / "round-1", tiny_model, steps=2))
    first = json.loads((tmp_path / "round-1" / "manifest.json").read_text())["metrics"]
    held = read_jsonl(tmp_path / "round-1" / "holdout.jsonl")
    earlier = tmp_path / "earlier.jsonl"
    write_jsonl(earlier, [{"request_id": "old-1", "query": "my card never came", "target": "card_arrival", "cluster": 0},
                          {"request_id": "old-2", "query": held[0]["query"], "target": held[0]["target"],
                           "cluster": 0},
                          {"request_id": "old-1", "query": "my card never came", "target": "card_arrival",
                           "cluster": 0, "replayed": True}])  # a pair listed twice trains once
    out = tmp_path / "round-2"
    distill.run(_args(clusters_dir, out, tiny_model, steps=2, replay=[str(earlier)]))
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    train = read_jsonl(out / "train.jsonl")
    assert [r["request_id"] for r in train if r.get("replayed")] == ["old-1"]
    assert m["replayed_pairs"] == 1 and m["train_pairs"] == first["train_pairs"] + 1
    assert m["pairs_per_cluster"] == first["pairs_per_cluster"]  # this round's pairs only
    assert "replay_0" in json.loads((out / "manifest.json").read_text())["inputs"]  # part of the key
    with pytest.raises(StageError, match="--replay: .* is not a file"):
        distill.run(_args(clusters_dir, tmp_path / "bad", tiny_model, replay=[str(tmp_path)]))


def test_torchrun_processes_train_the_same_adapter_as_one_process(tmp_path, tiny_model, clusters_dir):
    """Data-parallel distill (a TrainJob / JobSet runs it under torchrun): two gloo processes each take half of
    every batch; the adapter equals one process's on the whole batch, and only rank 0 writes and reports."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    def argv(out):
        return ["train", "distill", "--clusters", str(clusters_dir), "--out", str(out), "--base-model", str(tiny_model),
                "--top-clusters", "2", "--hold-out-fraction", "0.25", "--outside-holdout", "2", "--system-prompt",
                "classify", "--quiet", "--r", "4", "--alpha", "8", "--dropout", "0", "--steps", "4",
                "--learning-rate", "1e-2", "--batch-size", "4", "--samples-per-cluster", "6"]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "--", "routenlp.cli.main", *argv(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    summaries = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # rank 0 alone reports
    one = subprocess.run([sys.executable, "-m", "routenlp.cli.main", *argv(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())["metrics"]
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())["metrics"]
    assert m2["train_pairs"] == m1["train_pairs"] and abs(m2["loss_first"] - m1["loss_first"]) < 1e-3
    with pytest.raises(Exception, match="--batch-size"):  # 3 examples cannot be shared by 2 processes
        import unittest.mock

        with unittest.mock.patch.dict(os.environ, {"WORLD_SIZE": "2", "RANK": "1"}):
            distill.run(_args(clusters_dir, tmp_path / "odd", tiny_model, batch_size=3))
