"""Encoder variants (fp32 torch, fp32 ONNX, int8 ONNX): the embeddings each gives, what a router artifact records, and
that a router embeds each version's queries with the variant that version was fitted on."""

import json
import os

import numpy as np
import pytest
import torch

from routenlp.router import encoder as encoder_mod
from routenlp.router.artifacts import load_artifact, save_artifact
from routenlp.router.decision_cache import normalise
from routenlp.router.difficulty import DifficultyRouter
from routenlp.router.encoder import (LEGACY_VARIANT, MAX_TOKENS, VARIANTS, Encoder, EncoderPool, EncoderSpec,
                                     OnnxEncoder, encoder_for, onnx_model, serving_spec)
from routenlp.router.state import RouterState

from .fakes import FakeEncoder
from .test_server import make_config

QUERIES = ["How do I get a refund for my order?", "my card was declined at the ATM abroad", "Why is there a fee?",
           "can I top up with apple pay", "What is the exchange rate for euros to pounds today, and is there a fee "
           "when I pay by card in a shop abroad?", "pin blocked", "I did not receive my new card yet, where is it?"]
LONG = "refund " * 400  # past the 256-token budget: truncation must match too
FP32, ONNX, INT8 = (EncoderSpec(v) for v in ("minilm-l6-fp32-torch", "minilm-l6-fp32-onnx", "minilm-l6-int8-onnx"))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    cache = tmp_path_factory.mktemp("onnx-cache")
    return {"torch": Encoder(), "onnx": OnnxEncoder(cache_dir=cache),
            "int8": OnnxEncoder(quantization="int8", cache_dir=cache)}


def test_fp32_onnx_gives_the_torch_embeddings(encoders):
    ref = encoders["torch"].encode(QUERIES + [LONG], batch_size=3)
    got = encoders["onnx"].encode(QUERIES + [LONG], batch_size=3)
    assert got.shape == ref.shape == (len(QUERIES) + 1, 384) and got.dtype == np.float32
    cos = np.sum(ref * got, axis=1)
    assert cos.min() > 0.99999  # identical up to float rounding: one embedding space
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # batching and padding do not change a text's embedding
    np.testing.assert_allclose(encoders["onnx"].encode([QUERIES[2]])[0], got[2], atol=1e-5)
    assert encoders["onnx"].spec == ONNX and ONNX.compatible(FP32) and FP32.compatible(ONNX)


def test_int8_moves_embeddings_a_little_and_is_its_own_space(encoders):
    ref = encoders["torch"].encode(QUERIES)
    got = encoders["int8"].encode(QUERIES)
    cos = np.sum(ref * got, axis=1)
    assert 0.95 < cos.min() and cos.max() < 0.9999  # close, but not the fp32 vectors: heads must be refitted
    assert encoders["int8"].spec == INT8
    assert not INT8.compatible(FP32) and not FP32.compatible(INT8)
    assert not FP32.compatible(EncoderSpec(LEGACY_VARIANT, 128))  # another token budget is another space


def test_normalisation_of_the_decision_cache_is_invisible_to_the_encoder(encoders):
    raw = ["  How   DO I get a\tREFUND for my ORDER?\n", "PIN  Blocked"]
    enc = encoders["onnx"]
    np.testing.assert_allclose(enc.encode(raw), enc.encode([normalise(t) for t in raw]), atol=1e-6)


def test_spec_json_and_validation():
    assert EncoderSpec.from_json(None) == EncoderSpec(LEGACY_VARIANT, MAX_TOKENS)
    assert EncoderSpec.from_json(INT8.to_json()) == INT8
    assert EncoderSpec.from_json({"variant": "minilm-l6-int8-onnx"}).max_tokens == MAX_TOKENS
    for bad in ({"variant": "bert-large"}, {"variant": LEGACY_VARIANT, "max_tokens": 0}, "fp32"):
        with pytest.raises(ValueError):
            EncoderSpec.from_json(bad)
    assert serving_spec(FP32) == ONNX and serving_spec(INT8) == INT8  # onnxruntime is installed here
    assert set(VARIANTS) == {"minilm-l6-fp32-torch", "minilm-l6-fp32-onnx", "minilm-l6-int8-onnx"}


def test_onnx_export_is_cached_and_unwritable_cache_falls_back(tmp_path, monkeypatch):
    path = encoder_mod.default_encoder_path()
    f = onnx_model(path, "fp32", tmp_path / "c")
    mtime = os.path.getmtime(f)
    assert onnx_model(path, "fp32", tmp_path / "c") == f and os.path.getmtime(f) == mtime  # not exported again
    assert not [p for p in f.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind
    (tmp_path / "ro").write_text("a file, not a folder: mkdir under it fails")
    monkeypatch.setattr(encoder_mod.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    g = onnx_model(path, "fp32", tmp_path / "ro")
    assert g.is_file() and str(g).startswith(str(tmp_path / "tmp"))


def test_artifact_records_the_variant_and_old_artifacts_read_as_fp32_torch(tmp_path):
    r = DifficultyRouter(["small", "big"], ["intent"])
    save_artifact(tmp_path, "old", r)  # written as before variants existed
    meta = json.loads((tmp_path / "old" / "metadata.json").read_text())
    assert "encoder" not in meta and load_artifact(tmp_path, "old").encoder == EncoderSpec(LEGACY_VARIANT, 256)
    save_artifact(tmp_path, "new", r, encoder=INT8)
    assert load_artifact(tmp_path, "new").encoder == INT8
    save_artifact(tmp_path, "meta", r, metadata={"encoder": ONNX.to_json()})
    assert load_artifact(tmp_path, "meta").encoder == ONNX
    with pytest.raises(ValueError):
        save_artifact(tmp_path, "bad", r, metadata={"encoder": {"variant": "nope"}})
    assert not (tmp_path / "bad").exists()


class SpaceEncoder(FakeEncoder):
    """A fake encoder of one variant: different vectors per embedding space, and it remembers what it embedded."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        self.seen = []

    def _encode_batch(self, texts):
        self.seen += texts
        return super()._encode_batch([f"{self.spec.space}|{t}" for t in texts])


@pytest.fixture
def fake_variants(monkeypatch):
    made = {}

    def shared(spec, path=None):
        return made.setdefault(spec, SpaceEncoder(spec))

    monkeypatch.setattr(encoder_mod, "shared_encoder_for", shared)
    return made


def test_pool_loads_one_encoder_per_space(fake_variants):
    pool = EncoderPool()
    a, b = pool.load(FP32), pool.load(ONNX)
    assert a is b and a.encoder.spec == ONNX  # fp32 torch versions are served by the faster fp32 ONNX
    assert pool.load(INT8).encoder.spec == INT8 and set(fake_variants) == {ONNX, INT8}
    with pool._lock:  # a reload loading another space holds the lock: a loaded space is still served at once
        assert pool.load(INT8) is pool.load(INT8)
    pool.close()
    # an injected encoder serves its own space; a version of another space gets its own encoder
    injected = SpaceEncoder(FP32)
    pool = EncoderPool(encoder=injected)
    assert pool.load(ONNX).encoder is injected and pool.load(INT8).encoder is fake_variants[INT8]
    assert encoder_for(FP32, injected) is injected and encoder_for(INT8, injected) is fake_variants[INT8]  # offline
    pool.close()
    double = FakeEncoder()  # a test double without a spec serves every version
    pool = EncoderPool(encoder=double)
    assert pool.load(INT8).encoder is double and pool.load(FP32).encoder is double
    pool.close()


async def test_router_embeds_each_version_with_its_own_variant(tmp_path, fake_variants):
    """Stable fitted on int8, canary on (legacy) fp32: each decision uses its version's space, never the other's."""
    torch.manual_seed(0)
    tiers = ["small", "medium", "big"]
    save_artifact(tmp_path / "artifacts", "v-fp32", DifficultyRouter(tiers, ["intent", "chat"]))
    save_artifact(tmp_path / "artifacts", "v-int8", DifficultyRouter(tiers, ["intent", "chat"]), encoder=INT8)
    config = make_config(tmp_path, [1, 2, 3], router={"current": "v-int8", "canary": "v-fp32", "canaryPercent": 50})
    state = RouterState(config)
    state.load_versions()
    assert state.stable.encoder == INT8 and state.canary.encoder == EncoderSpec()
    assert set(fake_variants) == {INT8, ONNX}  # both encoders loaded before either version serves
    q = "where is my refund?"
    for art, spec, other in ((state.stable, INT8, ONNX), (state.canary, ONNX, INT8)):
        n_other = len(fake_variants[other].seen)
        prior = await state.decide(art, "intent", q)
        assert fake_variants[spec].seen[-1] == q and len(fake_variants[other].seen) == n_other
        vec = SpaceEncoder(spec)._encode_batch([q])
        want = art.router.predict_proba(vec, np.array([art.router.task_index("intent")]))[0]
        np.testing.assert_allclose(prior, want, atol=1e-6)
    state.encoders.close()

