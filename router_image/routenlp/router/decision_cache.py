"""Exact-match cache of routing decisions: real traffic repeats itself (support queries, retried requests).

Key: the query after whitespace/case normalisation, the task and the router version. The normalisation is one the
encoder cannot see (all-MiniLM-L6-v2's tokenizer lower-cases and splits on whitespace; tested), so a hit returns exactly
what encoding would have; versions are immutable, so an entry never goes stale, and entries of versions no longer
served age out of the LRU order. What is cached is the prior (predicted acceptance per tier): the start rule and the
budget switch are applied to it on every request. Keys are BLAKE2b digests, so a 1 MiB query costs 16 bytes to keep.
"""

from __future__ import annotations

import collections
import hashlib
import os
from typing import Protocol

import numpy as np

DEFAULT_SIZE = 20_000  # ~300 bytes an entry (digest + prior + LRU links): ~6 MB


class _Counter(Protocol):
    """What the cache needs of a Prometheus counter child."""

    def inc(self) -> None: ...


def normalise(query: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped, lower case."""
    return " ".join(query.split()).lower()


def default_size() -> int:
    return int(os.environ.get("ROUTENLP_DECISION_CACHE_SIZE", DEFAULT_SIZE))


class DecisionCache:
    """Bounded LRU of (version, task, normalised query) -> prior. `hits`/`misses` count lookups; `counters`, if
    given, is a (hits, misses) pair of Prometheus counter children incremented alongside. Size 0 disables it."""

    def __init__(self, size: int | None = None, counters: tuple[_Counter, _Counter] | None = None):
        self.size = default_size() if size is None else size
        if self.size < 0:
            raise ValueError(f"decision cache size must be >= 0, got {self.size}")
        self._entries: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self._counters = counters
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(version: str, task: str, query: str) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for part in (version, task, normalise(query)):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.digest()

    def get(self, key: bytes) -> np.ndarray | None:
        prior = self._entries.get(key)
        if prior is None:
            self.misses += 1
        else:
            self.hits += 1
            self._entries.move_to_end(key)
        if self._counters is not None:
            self._counters[0 if prior is not None else 1].inc()
        return prior

    def put(self, key: bytes, prior: np.ndarray) -> None:
        if self.size == 0:
            return
        prior = np.array(prior, copy=True)
        prior.flags.writeable = False  # shared by every hit: nobody may change it in place
        self._entries[key] = prior
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float | None:
        n = self.hits + self.misses
        return self.hits / n if n else None

    def clear(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0
