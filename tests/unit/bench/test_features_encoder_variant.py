"""The benchmark's embedding cache keeps one file per embedding space: int8 vectors never answer for fp32 ones."""

import numpy as np

from routenlp.bench.features import EmbeddingCache


def test_embedding_cache_is_per_space(tmp_path, fake_encoder, monkeypatch):
    monkeypatch.delenv("ROUTENLP_ENCODER_VARIANT", raising=False)
    torch_ = EmbeddingCache(tmp_path, encoder=fake_encoder, variant="minilm-l6-fp32-torch")
    onnx = EmbeddingCache(tmp_path, encoder=fake_encoder, variant="minilm-l6-fp32-onnx")
    int8 = EmbeddingCache(tmp_path, encoder=fake_encoder, variant="minilm-l6-int8-onnx")
    assert torch_._file() == onnx._file() == tmp_path / "embeddings-all-MiniLM-L6-v2-128.npz"  # same vectors
    assert int8._file() == tmp_path / "embeddings-all-MiniLM-L6-v2-int8-128.npz"
    torch_.embed(["a b", "c d"])
    assert onnx.embed(["a b"]).shape == (1, 384) and onnx.encoded == 0  # fp32 vectors reused across runtimes
    int8.embed(["a b"])
    assert int8.encoded == 1  # but never for int8
    monkeypatch.setenv("ROUTENLP_ENCODER_VARIANT", "minilm-l6-fp32-torch")
    assert EmbeddingCache(tmp_path)._file() == torch_._file()
    monkeypatch.setenv("ROUTENLP_ENCODER_VARIANT", "minilm-l6-int8-onnx")
    assert EmbeddingCache(tmp_path)._file() == int8._file()
    np.testing.assert_allclose(EmbeddingCache(tmp_path, encoder=fake_encoder).embed(["a b"]), int8.embed(["a b"]))
