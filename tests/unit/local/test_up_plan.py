"""`routenlp up` planning (pure): documents -> how each tier is served -> the RouterConfig; and the demo's helpers."""

import textwrap
from pathlib import Path

import pytest

from routenlp.local import up
from routenlp.local.demo import Row, parse_metric, summarize

EXAMPLES = Path(__file__).resolve().parents[3] / "examples" / "local"


def test_examples_plan():
    docs = up.load_documents([EXAMPLES])
    policy = up.select_policy(docs, None)
    plans = up.plan_tiers(policy, docs)
    assert [(p.name, p.kind) for p in plans] == [
        ("intent-classifier", "standin"), ("smollm2", "vllm"), ("frontier-oracle", "standin")]
    clf, smol, oracle = plans
    assert clf.standin == "banking77-classifier" and clf.port == 8101
    assert oracle.standin == "banking77-oracle" and oracle.port == 8102
    assert smol.local_model == "smollm2-135m" and smol.lora is not None  # adapterPolicy AcceptCampaign
    assert smol.lora.max_lora_rank == 16 and smol.lora.max_loras == 2
    assert len(docs.other) == 1  # the DistillationCampaign


def test_render_config(tmp_path):
    docs = up.load_documents([EXAMPLES])
    policy = up.select_policy(docs, "banking77")
    plans = up.plan_tiers(policy, docs)
    for i, p in enumerate(plans):
        p.base_url = f"http://127.0.0.1:{9000 + i}/v1"
    cfg = up.render_config(policy, plans, tmp_path)
    assert [t.name for t in cfg.tiers] == ["intent-classifier", "smollm2", "frontier-oracle"]
    assert cfg.tiers[1].served_model_name == "smollm2-135m"
    assert cfg.tiers[2].cost.input_per_million == 2.0
    assert cfg.event_log_dir == str(tmp_path / "events") and cfg.router.artifact_dir == str(tmp_path / "artifacts")
    assert cfg.cascade.min_calibration_samples == 100 and len(cfg.tasks[0].answers) == 77
    assert cfg.shadow_sample_rate == 0.05
    assert cfg.auth.labellers_dir == str(tmp_path / up.LABELLERS_DIR)  # the local labeller's token folder


def _write(tmp_path, text):
    (tmp_path / "x.yaml").write_text(textwrap.dedent(text))
    return up.load_documents([tmp_path])


TIER = """
apiVersion: routenlp.io/v1alpha1
kind: ModelTier
metadata: {{name: t1{ann}}}
spec:
  servedModelName: m
  cost: {{inputPerMillion: 1, outputPerMillion: 1}}
  {backend}
---
apiVersion: routenlp.io/v1alpha1
kind: RoutingPolicy
metadata: {{name: p}}
spec:
  tiers: [{{name: t1}}]
  tasks: [{{name: a}}]
"""


def test_unknown_engine_model_names_the_field_and_the_choices(tmp_path):
    docs = _write(tmp_path, TIER.format(ann="", backend="engine: {model: Qwen/Qwen2.5-7B-Instruct}"))
    with pytest.raises(up.UpError, match=r"spec.engine.model 'Qwen/Qwen2.5-7B-Instruct' has no local copy.*smollm2-135m"):
        up.plan_tiers(up.select_policy(docs, None), docs)


def test_standin_needs_loopback(tmp_path):
    docs = _write(tmp_path, TIER.format(ann=", annotations: {routenlp.io/local-standin: banking77-oracle}",
                                        backend="external: {baseUrl: 'https://api.example.com/v1', model: m}"))
    with pytest.raises(up.UpError, match="loopback"):
        up.plan_tiers(up.select_policy(docs, None), docs)


def test_unknown_standin_kind(tmp_path):
    docs = _write(tmp_path, TIER.format(ann=", annotations: {routenlp.io/local-standin: gpt5}",
                                        backend="external: {baseUrl: 'http://127.0.0.1:1/v1', model: m}"))
    with pytest.raises(up.UpError, match="not a stand-in"):
        up.plan_tiers(up.select_policy(docs, None), docs)


def test_external_tier_keeps_its_url_and_key_env(tmp_path):
    docs = _write(tmp_path, TIER.format(
        ann="", backend="external: {baseUrl: 'https://api.example.com/v1/', model: m, "
                        "apiKeySecretRef: {name: s, key: k}}"))
    (p,) = up.plan_tiers(up.select_policy(docs, None), docs)
    assert p.kind == "external" and p.base_url == "https://api.example.com/v1"
    assert p.api_key_env == "ROUTENLP_API_KEY_T1"


def test_missing_tier_and_bad_documents(tmp_path):
    (tmp_path / "p.yaml").write_text(TIER.format(ann="", backend="").split("---")[1])
    docs = up.load_documents([tmp_path])
    with pytest.raises(up.UpError, match="not in the given files: t1"):
        up.plan_tiers(up.select_policy(docs, None), docs)
    (tmp_path / "bad.yaml").write_text("kind: ModelTier\napiVersion: routenlp.io/v1alpha1\nmetadata: {name: x}\n"
                                       "spec: {servedModelName: m}\n")
    with pytest.raises(up.UpError, match=r"bad.yaml \(document 1\): spec.cost: Field required"):
        up.load_documents([tmp_path])
    with pytest.raises(up.UpError, match="no such file"):
        up.load_documents([tmp_path / "nope"])


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert up.main(["-f", str(tmp_path / "nope")]) == 2
    assert "routenlp up:" in capsys.readouterr().err


def test_cli_dry_run(capsys):
    assert up.main(["-f", str(EXAMPLES), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "vLLM serving smollm2-135m (LoRA enabled)" in out and "stand-in banking77-oracle" in out


def test_initial_artifact(tmp_path):
    assert up.ensure_initial_artifact(tmp_path / "a") == "v0"
    assert up.ensure_initial_artifact(tmp_path / "a") is None  # never overwrites
    from routenlp.router.artifacts import load_artifact

    art = load_artifact(tmp_path / "a")
    assert art.version == "v0" and art.router is None and art.calibration is None


def test_parse_metric():
    text = ('routenlp_calibrated{policy="p",task="t",tier="a"} 1.0\n'
            'routenlp_calibrated{policy="p",task="t",tier="b"} 0.0\n'
            'routenlp_calibrated{policy="q",task="t",tier="a"} 0.0\n')
    assert parse_metric(text, "routenlp_calibrated", policy="p", task="t") == {"a": 1.0, "b": 0.0}


def test_summarize():
    rows = [Row("q", "g", "g", "cheap", 0, "0.9", True, 1e-6, True, 1e-4),
            Row("q", "g", "x", "ref", 2, "", False, 2e-4, True, 1e-4)]
    s = summarize(rows)
    assert s["accuracy"] == 0.5 and s["reference_accuracy"] == 1.0 and s["quality_ratio"] == 0.5
    assert s["cost_reduction"] == pytest.approx(1 - 2.01e-4 / 2e-4)
    assert s["escalation_rate"] == 0.5 and s["tier_share"] == {"cheap": 0.5, "ref": 0.5}
