"""retrain records the encoder variant it embedded with; calibrate keeps the base version's and never fits thresholds
on scores of another variant."""

import pytest

from routenlp.router.artifacts import load_artifact
from routenlp.router.encoder import DEFAULT_VARIANT, EncoderSpec
from routenlp.trainer import cluster, retrain
from routenlp.trainer.manifest import StageError, write_jsonl

from .test_retrain import _args, synthetic_signals


@pytest.fixture
def spied_embed(topic_embed, monkeypatch):
    """The planted topic embeddings, remembering the encoder spec of each call."""
    specs = []

    def embed(texts, encoder_path=None, spec=None):
        specs.append(spec)
        return topic_embed(texts)

    monkeypatch.setattr(cluster, "embed", embed)
    return specs


def _signals(tmp_path, helpers):
    rows = helpers.write_log(tmp_path / "events", n_per=80)
    write_jsonl(tmp_path / "signals.jsonl", synthetic_signals(rows))
    return str(tmp_path / "signals.jsonl")


def test_retrain_records_the_variant_it_embedded_with(tmp_path, spied_embed, helpers, monkeypatch):
    monkeypatch.delenv("ROUTENLP_ENCODER_VARIANT", raising=False)
    signals = _signals(tmp_path, helpers)
    retrain.run_retrain(_args(tmp_path, signals=signals, version="v-default"))
    assert spied_embed[-1] == EncoderSpec(DEFAULT_VARIANT)
    assert load_artifact(tmp_path / "artifacts", "v-default").encoder == EncoderSpec(DEFAULT_VARIANT)
    retrain.run_retrain(_args(tmp_path, signals=signals, version="v-fp32", out=str(tmp_path / "out2"),
                              encoder_variant="minilm-l6-fp32-torch"))
    assert spied_embed[-1] == EncoderSpec("minilm-l6-fp32-torch")
    assert load_artifact(tmp_path / "artifacts", "v-fp32").encoder == EncoderSpec("minilm-l6-fp32-torch")


def test_calibrate_uses_the_base_versions_variant_and_refuses_another(tmp_path, spied_embed, helpers):
    signals = _signals(tmp_path, helpers)
    retrain.run_retrain(_args(tmp_path, signals=signals, version="v1", encoder_variant="minilm-l6-int8-onnx"))
    cal = dict(signals=signals, base_version="v1", out=str(tmp_path / "cal"))
    with pytest.raises(StageError, match="encoder-variant"):
        retrain.run_calibrate(_args(tmp_path, version="c-fp32", encoder_variant="minilm-l6-fp32-onnx", **cal))
    assert not (tmp_path / "artifacts" / "c-fp32").exists()
    retrain.run_calibrate(_args(tmp_path, version="c1", **cal))
    assert spied_embed[-1] == EncoderSpec("minilm-l6-int8-onnx")  # scores of the variant the heads were fitted on
    assert load_artifact(tmp_path / "artifacts", "c1").encoder == EncoderSpec("minilm-l6-int8-onnx")
