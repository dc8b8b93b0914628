"""The real all-MiniLM-L6-v2 encoder from the PyPI package folder, and the async micro-batcher."""

import asyncio

import numpy as np
import pytest

from routenlp.router.encoder import Encoder, MicroBatcher, default_encoder_path

from .fakes import FakeEncoder


@pytest.fixture(scope="module")
def encoder():
    return Encoder()


def test_encoder_shape_norm_and_meaning(encoder):
    assert default_encoder_path().endswith("model")
    texts = ["How do I get a refund for my order?", "I want my money back for this purchase",
             "The weather in Paris is sunny today"]
    v = encoder.encode(texts, batch_size=2)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sims = v @ v.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # paraphrases are closer than unrelated text
    # batching and padding do not change a text's embedding
    alone = encoder.encode([texts[2]])
    np.testing.assert_allclose(alone[0], v[2], atol=1e-5)
    with pytest.raises(TypeError):
        encoder.encode("one string")


def test_encoder_refuses_a_folder_without_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        Encoder(str(tmp_path))


async def test_micro_batcher_coalesces_concurrent_calls():
    enc = FakeEncoder()
    b = MicroBatcher(enc, max_batch=16)
    texts = [f"query {i}" for i in range(40)]
    out = await asyncio.gather(*(b.encode(t) for t in texts))
    np.testing.assert_allclose(np.stack(out), enc._encode_batch(texts), atol=1e-6)
    assert b.batches < 40 and max(enc.batch_sizes[:-1]) <= 16  # coalesced, never above max_batch
    one = await b.encode("alone")
    assert one.shape == (384,)
    b.close()


async def test_micro_batcher_delivers_errors_and_keeps_serving():
    class Flaky(FakeEncoder):
        def _encode_batch(self, texts):
            if any("boom" in t for t in texts):
                raise RuntimeError("boom")
            return super()._encode_batch(texts)

    b = MicroBatcher(Flaky())
    with pytest.raises(RuntimeError):
        await b.encode("boom")
    assert (await b.encode("fine")).shape == (384,)
    b.close()


def test_length_groups_bound_padding():
    from routenlp.router.encoder import length_groups

    lengths = [5, 80, 6, 7, 40, 5, 9, 12, 78]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        ls = [lengths[i] for i in g]
        assert len(g) == 1 or max(ls) * len(ls) <= 1.25 * sum(ls)


async def test_micro_batcher_parallel_workers_match_sequential(encoder):
    texts = [f"how do I {w} my card {i}" for i, w in enumerate(["activate", "block", "top up", "replace"] * 6)]
    b = MicroBatcher(encoder, max_batch=4, workers=2)
    out = await asyncio.gather(*(b.encode(t) for t in texts))
    np.testing.assert_allclose(np.stack(out), encoder.encode(texts), atol=1e-5)
    b.close()
