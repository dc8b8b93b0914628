"""Features for the benchmark: MiniLM embeddings cached on disk, and the offline answer scorer.

Embeddings come from the router's own encoder (all-MiniLM-L6-v2, in the encoder variant new router versions are
trained on: `routenlp.router.encoder.default_variant()`, env ROUTENLP_ENCODER_VARIANT). They are cached per text (a
hash of max tokens and text) in one file per encoder folder, embedding space and max tokens,
`<cache>/embeddings-<encoder>[-int8]-<max tokens>.npz`, so a rerun encodes nothing and a new data set encodes only its
new texts.

The answer scorer replaces token logprobs, which recorded outcome tables do not have (as in FrugalGPT): for each
tier, a logistic regression predicts P(answer acceptable) from [MiniLM embedding of the query, an embedding of the
last `RESPONSE_TAIL_CHARS` characters of the tier's recorded response (where the final answer sits), log response
length, task one-hot]. The response embedding is, by default (`hash`), a hashed bag of word 1-2-grams
(`HashingVectorizer`, 2^14 dimensions, L2-normalised: no fitting, milliseconds per thousand answers); `minilm`
uses the MiniLM encoder instead (cached like the queries, but ~10x slower to compute the first time on 2 cores).
It is trained on the router-training split only; `out_of_fold` gives scores for the training queries from models
that did not see them (to fit the confidence model without in-sample optimism).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from routenlp.router.encoder import EncoderSpec, default_variant, load_encoder, serving_spec

RESPONSE_TAIL_CHARS = 400
QUERY_MAX_TOKENS = 128


def default_cache_dir() -> Path:
    return Path(os.environ.get("ROUTENLP_CACHE", Path.home() / ".cache" / "routenlp")) / "bench"


class EmbeddingCache:
    """Text -> embedding with a persistent per-text cache. The encoder is created only if something is missing."""

    def __init__(self, cache_dir: str | Path | None = None, encoder=None, encoder_path: str | None = None,
                 max_tokens: int = QUERY_MAX_TOKENS, variant: str | None = None):
        self.spec = EncoderSpec(variant or default_variant(), max_tokens)
        self.dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._encoder = encoder
        self._encoder_path = encoder_path
        self.max_tokens = max_tokens
        self.encoded = 0  # texts encoded by this instance (the rest came from the cache)

    def _enc(self):
        if self._encoder is None:
            self._encoder = load_encoder(serving_spec(self.spec), self._encoder_path)
        return self._encoder

    def _file(self) -> Path:
        # Keyed by the encoder folder's name: the default is the router's all-MiniLM-L6-v2.
        name = Path(self._encoder_path).name if self._encoder_path else "all-MiniLM-L6-v2"
        space = "" if self.spec.space == "minilm-l6-fp32" else "-int8"  # both fp32 variants give the same vectors
        return self.dir / f"embeddings-{name}{space}-{self.max_tokens}.npz"

    def _key(self, text: str) -> bytes:
        return hashlib.blake2b(f"{self.max_tokens}\0{text}".encode(), digest_size=16).digest()

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        path = self._file()
        keys = np.array([self._key(t) for t in texts], dtype="S16")
        store_keys = np.zeros(0, dtype="S16")
        store_vecs = np.zeros((0, 384), dtype=np.float32)
        if path.is_file():
            with np.load(path) as z:
                store_keys, store_vecs = z["keys"], z["vectors"]
        index = {k: i for i, k in enumerate(store_keys.tolist())}
        missing = sorted({k for k in keys.tolist() if k not in index})
        if missing:
            first = {}
            for t, k in zip(texts, keys.tolist()):
                first.setdefault(k, t)
            if progress:
                print(f"encoding {len(missing)} new texts (cache: {path})", file=sys.stderr)
            vecs = self._enc().encode([first[k] for k in missing], progress=progress)
            self.encoded += len(missing)
            store_keys = np.concatenate([store_keys, np.array(missing, dtype="S16")])
            store_vecs = np.concatenate([store_vecs, vecs.astype(np.float32)])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, keys=store_keys, vectors=store_vecs)
            tmp.replace(path)
            index = {k: i for i, k in enumerate(store_keys.tolist())}
        return store_vecs[[index[k] for k in keys.tolist()]]


def response_tail(text: str) -> str:
    return (text or "")[-RESPONSE_TAIL_CHARS:]


def hashed_ngrams(texts: list[str]):
    """Sparse (n, 2^14) hashed word 1-2-gram embedding of the response tails (L2-normalised)."""
    from sklearn.feature_extraction.text import HashingVectorizer

    hv = HashingVectorizer(n_features=2**14, ngram_range=(1, 2), alternate_sign=False, norm="l2")
    return hv.transform([response_tail(t) for t in texts])


def scorer_features(query_emb: np.ndarray, resp_emb, responses: list[str], tasks: np.ndarray, n_tasks: int):
    """Design matrix of the answer scorer for one tier (sparse when the response embedding is)."""
    from scipy import sparse

    loglen = np.log1p(np.array([len(r or "") for r in responses], dtype=np.float32))[:, None] / 8.0
    onehot = np.eye(n_tasks, dtype=np.float32)[np.asarray(tasks)]
    if sparse.issparse(resp_emb):
        return sparse.hstack([sparse.csr_matrix(query_emb), resp_emb, sparse.csr_matrix(loglen),
                              sparse.csr_matrix(onehot)]).tocsr()
    return np.hstack([query_emb, resp_emb, loglen, onehot]).astype(np.float32)


class AnswerScorer:
    """P(acceptable) of one tier's recorded answer (logistic regression over `scorer_features`)."""

    def __init__(self, C: float = 1.0):
        self.C = C
        self.model = None
        self.constant: float | None = None

    def fit(self, F: np.ndarray, y: np.ndarray) -> "AnswerScorer":
        from sklearn.linear_model import LogisticRegression

        y = (np.asarray(y) >= 0.5).astype(int)
        if len(np.unique(y)) < 2:  # one class: the scorer is the constant rate
            self.constant = float(y.mean()) if len(y) else 0.5
            return self
        self.model = LogisticRegression(C=self.C, max_iter=500).fit(F, y)
        return self

    def predict(self, F: np.ndarray) -> np.ndarray:
        if self.model is None:
            return np.full(F.shape[0], self.constant if self.constant is not None else 0.5)
        return self.model.predict_proba(F)[:, 1]


def out_of_fold(fit_predict, n: int, folds: int, seed: int) -> np.ndarray:
    """Scores for n training rows from `fit_predict(train_idx, pred_idx)` models that did not see those rows."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(n) % folds
    out = None
    for f in range(folds):
        tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        pred = np.asarray(fit_predict(tr, te))
        if out is None:
            out = np.zeros((n,) + pred.shape[1:], dtype=float)
        out[te] = pred
    return out
