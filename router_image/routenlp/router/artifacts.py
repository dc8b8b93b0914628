"""Versioned router artifacts: `<artifact_dir>/<version>/` holds

- router/           DifficultyRouter weights (router.pt state_dict) + router.json (tier/task names, dims)
- confidence.json   confidence models per task and tier (`confidence.ConfidenceSet`)
- calibration.json  thresholds per task and tier: {"risk_level", "delta", "time", "tasks": {task: {tier:
                    {threshold, n, n_accepted, empirical_risk, certified}}}}
- metadata.json     {"version", "created", "encoder": {"variant", "max_tokens"}, ...free-form (training data,
                    metrics)}; `encoder` names the encoder variant the heads and thresholds were fitted on (absent:
                    fp32 torch MiniLM at 256 tokens, as before variants existed; see encoder.py)

Written atomically: everything goes to a hidden temp folder beside the target, fsynced, then renamed, so a reader
(the router's hot reload) sees a version whole or not at all.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .conformal import ACCEPTED_ANSWERS, ThresholdResult
from .confidence import ConfidenceSet
from .difficulty import DifficultyRouter
from .encoder import EncoderSpec

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Calibration:
    """Thresholds in force: tasks[task][tier] -> ThresholdResult."""

    risk_level: float
    delta: float
    time: float = field(default_factory=time.time)
    tasks: dict[str, dict[str, ThresholdResult]] = field(default_factory=dict)
    risk_measure: str = ACCEPTED_ANSWERS  # what risk_level bounds (conformal.RISK_MEASURES)

    def get(self, task: str, tier: str) -> ThresholdResult | None:
        return self.tasks.get(task, {}).get(tier)

    def to_json(self) -> dict[str, Any]:
        return {"risk_level": self.risk_level, "delta": self.delta, "risk_measure": self.risk_measure, "time": self.time,
                "tasks": {t: {k: r.to_json() for k, r in tiers.items()} for t, tiers in self.tasks.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Calibration":
        return cls(float(d["risk_level"]), float(d["delta"]), float(d.get("time", 0.0)),
                   {t: {k: ThresholdResult.from_json(r) for k, r in tiers.items()} for t, tiers in d.get("tasks", {}).items()},
                   d.get("risk_measure", ACCEPTED_ANSWERS))


@dataclass
class RouterArtifact:
    """One loaded router version."""

    version: str
    router: DifficultyRouter | None
    confidence: ConfidenceSet
    calibration: Calibration | None
    metadata: dict[str, Any]
    path: Path | None = None
    encoder: EncoderSpec = field(init=False)  # from metadata["encoder"]; queries are embedded with exactly this

    def __post_init__(self) -> None:
        self.encoder = EncoderSpec.from_json(self.metadata.get("encoder"))


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def save_artifact(artifact_dir: str | Path, version: str, router: DifficultyRouter | None,
                  confidence: ConfidenceSet | None = None, calibration: Calibration | None = None,
                  metadata: dict[str, Any] | None = None, encoder: EncoderSpec | None = None) -> Path:
    """Write version `version` atomically; refuses to overwrite an existing version (versions are immutable).
    `encoder`: what `router` and `calibration` were fitted on (or metadata["encoder"]; neither: fp32 torch MiniLM)."""
    if not VERSION_RE.match(version):
        raise ValueError(f"router version {version!r} must match {VERSION_RE.pattern}")
    metadata = dict(metadata or {})
    if encoder is not None:
        metadata["encoder"] = encoder.to_json()
    EncoderSpec.from_json(metadata.get("encoder"))  # a version no router could load is never written
    root = Path(artifact_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise FileExistsError(f"router version {version!r} already exists in {root}")
    tmp = root / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if router is not None:
            router.save(tmp / "router")
        (tmp / "confidence.json").write_text(json.dumps((confidence or ConfidenceSet()).to_json(), indent=1))
        if calibration is not None:
            (tmp / "calibration.json").write_text(json.dumps(calibration.to_json(), indent=1))
        meta = {"version": version, "created": time.time(), **metadata}
        (tmp / "metadata.json").write_text(json.dumps(meta, indent=1))
        _fsync_tree(tmp)
        os.rename(tmp, final)
        dfd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_versions(artifact_dir: str | Path) -> list[str]:
    """Complete versions, oldest first (by metadata `created`, then name). Temp folders are ignored."""
    root = Path(artifact_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        meta = d / "metadata.json"
        if d.is_dir() and not d.name.startswith(".") and meta.is_file():
            try:
                created = float(json.loads(meta.read_text()).get("created", 0.0))
            except (ValueError, OSError):
                continue
            found.append((created, d.name))
    return [name for _, name in sorted(found)]


def latest_version(artifact_dir: str | Path) -> str | None:
    """Newest complete version, or None."""
    versions = list_versions(artifact_dir)
    return versions[-1] if versions else None


def load_artifact(artifact_dir: str | Path, version: str | None = None) -> RouterArtifact:
    """Load `version` (default: latest). FileNotFoundError when there is none."""
    version = version or latest_version(artifact_dir)
    if version is None:
        raise FileNotFoundError(f"no router version in {artifact_dir}")
    d = Path(artifact_dir) / version
    if not (d / "metadata.json").is_file():
        raise FileNotFoundError(f"router version {version!r} not found in {artifact_dir}")
    router = DifficultyRouter.load(d / "router") if (d / "router").is_dir() else None
    conf_path, cal_path = d / "confidence.json", d / "calibration.json"
    confidence = ConfidenceSet.from_json(json.loads(conf_path.read_text())) if conf_path.is_file() else ConfidenceSet()
    calibration = Calibration.from_json(json.loads(cal_path.read_text())) if cal_path.is_file() else None
    return RouterArtifact(version, router, confidence, calibration, json.loads((d / "metadata.json").read_text()), d)
