"""Stage manifests: what a trainer stage read, wrote, measured and ran with.

Every stage writes `manifest.json` into its output directory and prints a one-line JSON summary as the last line of
stdout (a Job can copy it into its termination message). The manifest's `key` hashes the stage name, the inputs'
content and the parameters: a rerun whose key matches a complete manifest (all outputs present with the recorded
hashes) is a no-op, which makes every stage idempotent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from routenlp.api.stage import StageSummary

MANIFEST = "manifest.json"
SCHEMA = "routenlp.io/stage-manifest/v1"


class StageError(Exception):
    """Bad input to a stage: the message names the argument and what to do (the CLI prints it, exit code 2)."""


def local_path(uri: str | Path, arg: str = "path") -> Path:
    """A plain path or a `file://` URI as a Path; other schemes are refused with a message naming the argument."""
    text = str(uri)
    parsed = urlparse(text)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else text)
    if len(parsed.scheme) == 1:  # a Windows drive letter, not a scheme
        return Path(text)
    raise StageError(f"{arg}: scheme {parsed.scheme!r} of {text!r} is not supported (use a path or file:// URI)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path, exclude: tuple[str, ...] = ()) -> str:
    """Content hash of a file, or of a directory tree (relative names + file hashes, sorted)."""
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise StageError(f"{path} does not exist")
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and not any(rel == e or rel.startswith(e + "/") for e in exclude):
            h.update(rel.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("routenlp", "torch", "transformers", "peft", "scikit-learn", "mapie", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_key(stage: str, input_hashes: dict[str, str], params: dict[str, Any]) -> str:
    blob = json.dumps({"stage": stage, "inputs": input_hashes, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Stage:
    """One run of a stage: hashes its inputs up front, collects outputs/metrics/timings, writes the manifest.

    Use: `st = Stage("cluster", out_dir, inputs={...}, params={...})`; `if st.done(): return st.finish_skipped()`;
    do the work (writing files under `st.out_dir`, `st.output(name, relpath)`, `st.metrics[...] = ...`,
    `with st.timed("embed"): ...`); then `st.finish()`.
    """

    stage: str
    out_dir: Path
    inputs: dict[str, str]  # name -> path or URI as given
    params: dict[str, Any]
    input_exclude: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> relpaths not hashed
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    summary_metrics: tuple[str, ...] = ()
    _t0: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.input_hashes: dict[str, str] = {}
        for name, uri in self.inputs.items():
            path = local_path(uri, f"--{name.replace('_', '-')}")
            if not path.exists():
                raise StageError(f"--{name.replace('_', '-')}: {uri} does not exist")
            self.input_hashes[name] = sha256_path(path, self.input_exclude.get(name, ()))
        self.key = run_key(self.stage, self.input_hashes, self.params)

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / MANIFEST

    def previous(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return None

    def done(self) -> bool:
        """True when a complete manifest with the same key exists and every recorded output still has its hash."""
        prev = self.previous()
        if not prev or prev.get("key") != self.key or prev.get("status") != "Succeeded":
            return False
        for out in prev.get("outputs", {}).values():
            p = self.out_dir / out["path"]
            if not p.exists() or sha256_path(p) != out["sha256"]:
                return False
        return True

    def timed(self, name: str) -> "_Timer":
        return _Timer(self, name)

    def output(self, name: str, relpath: str) -> Path:
        """Register an output (a file or directory under out_dir); it is hashed when the stage finishes."""
        self.outputs[name] = {"path": relpath}
        return self.out_dir / relpath

    def finish(self) -> dict[str, Any]:
        for out in self.outputs.values():
            out["sha256"] = sha256_path(self.out_dir / out["path"])
        manifest = {
            "schema": SCHEMA,
            "stage": self.stage,
            "status": "Succeeded",
            "key": self.key,
            "inputs": {n: {"uri": str(u), "sha256": self.input_hashes[n]} for n, u in self.inputs.items()},
            "params": self.params,
            "outputs": self.outputs,
            "metrics": self.metrics,
            "versions": versions(),
            "timings": {**{k: round(v, 3) for k, v in self.timings.items()}, "total": round(time.time() - self._t0, 3)},
            "started": self._t0,
            "finished": time.time(),
        }
        write_json_atomic(self.manifest_path, manifest)
        return self._summary(manifest, skipped=False)

    def finish_skipped(self) -> dict[str, Any]:
        prev = self.previous() or {}
        return self._summary(prev, skipped=True)

    def _summary(self, manifest: dict[str, Any], skipped: bool) -> dict[str, Any]:
        metrics = manifest.get("metrics", {})
        keys = self.summary_metrics or tuple(k for k, v in metrics.items() if isinstance(v, (int, float, str, bool)))
        return StageSummary(
            stage=self.stage,
            status=manifest.get("status", "Succeeded"),
            skipped=skipped,
            manifest=str(self.manifest_path),
            key=manifest.get("key"),
            seconds=manifest.get("timings", {}).get("total"),
            metrics={k: metrics[k] for k in keys if k in metrics},
        ).model_dump(by_alias=True)  # Python values: print_summary writes what JSON cannot hold as text


class _Timer:
    def __init__(self, stage: Stage, name: str):
        self.stage, self.name = stage, name

    def __enter__(self) -> "_Timer":
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stage.timings[self.name] = self.stage.timings.get(self.name, 0.0) + time.perf_counter() - self.t


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader (or a resumed run) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


TERMINATION_LOG = "/dev/termination-log"  # the kubelet's terminationMessagePath default


def print_summary(summary: dict[str, Any], termination_log: str | None = None) -> None:
    """The stage's last stdout line: one JSON object, also written to the container's termination message file when
    the kubelet provides one (FallbackToLogsOnError reads the logs only of a container that failed: without the file
    a successful stage's summary would never reach the operator). Kubernetes keeps 4096 bytes of it."""
    line = json.dumps(summary, sort_keys=True, default=str)
    sys.stdout.flush()
    print(line, flush=True)
    path = Path(termination_log or os.environ.get("ROUTENLP_TERMINATION_LOG", TERMINATION_LOG))
    if path.is_file():  # only where the kubelet mounted it: never create it on a workstation
        with contextlib.suppress(OSError):
            path.write_text(line if len(line.encode()) <= 4096 else _short(summary))


def _short(summary: dict[str, Any]) -> str:
    """A summary within 4096 bytes: the scalar metrics only (lists such as examples are in the manifest)."""
    metrics = {k: v for k, v in (summary.get("metrics") or {}).items() if not isinstance(v, (list, dict))}
    return json.dumps({**summary, "metrics": metrics}, sort_keys=True, default=str)[:4096]
