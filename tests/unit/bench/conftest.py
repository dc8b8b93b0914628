"""Synthetic outcome tables generated at test time (shared helpers of the bench tests)."""

from __future__ import annotations

import hashlib

import numpy as np


def _h(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=4).digest(), "big")


class FakeEncoder:
    """Deterministic stand-in for the MiniLM encoder: a random unit vector per text, shifted by the text's first word
    so that queries of the same 'difficulty word' are neighbours. Used only where the encoder itself is not tested."""

    path = "/nonexistent/all-MiniLM-L6-v2"

    def __init__(self):
        self.calls = 0

    def encode(self, texts, progress=False):
        self.calls += len(texts)
        out = np.zeros((len(texts), 384), dtype=np.float32)
        for i, t in enumerate(texts):
            v = np.random.default_rng(_h("v", t)).normal(size=384)
            word = t.split()[0] if t.split() else ""
            v[:8] += 6.0 * np.random.default_rng(_h("w", word)).normal(size=8)
            out[i] = v / np.linalg.norm(v)
        return out


def synthetic_rows(n: int = 400, seed: int = 0, tasks=("alpha", "beta")) -> list[dict]:
    """Three models (cheap/mid/ref). Each query has a latent difficulty visible in its first word and in the cheap
    model's response ('sure' vs 'unsure'), so routers and answer scorers have real signal to learn."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        hard = rng.random() < 0.4
        task = tasks[i % len(tasks)]
        query = f"{'hard' if hard else 'easy'} question {i} about {task}"
        p = {"cheap": 0.25 if hard else 0.9, "mid": 0.5 if hard else 0.93, "ref": 0.8 if hard else 0.95}
        for model, price in (("cheap", 1e-4), ("mid", 5e-4), ("ref", 2e-3)):
            ok = rng.random() < p[model]
            sure = ok if rng.random() < 0.85 else not ok
            rows.append({"query_id": f"q{i}", "task": task, "query": query, "model": model, "quality": float(ok),
                         "cost_usd": price * (1 + 0.1 * rng.random()),
                         "response": f"{'I am sure' if sure else 'maybe, unsure'} the answer is {int(ok)}"})
    return rows


import pytest  # noqa: E402


@pytest.fixture
def fake_encoder():
    return FakeEncoder()


@pytest.fixture(scope="module")
def synth_rows():
    return synthetic_rows()


@pytest.fixture(scope="session")
def make_rows():
    return synthetic_rows


@pytest.fixture(scope="session")
def fake_encoder_cls():
    return FakeEncoder
