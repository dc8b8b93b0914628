"""`routenlp train STAGE [ARGS]`: the trainer image's entrypoint; each campaign stage Job runs one stage.

Every stage reads its inputs from paths/URIs given as arguments, writes its outputs and `manifest.json` (inputs and
outputs with sha256, parameters, metrics, versions, timings) into `--out`, skips work whose manifest already matches
(idempotent), and prints a one-line JSON summary as its last stdout line. Bad input exits 2 with a message naming the
argument.
"""

from __future__ import annotations

import importlib
import json
import sys

STAGES = {
    "cluster": ("routenlp.trainer.cluster:main", "cluster escalation failures from the event log, ranked by cost"),
    "distill": ("routenlp.trainer.distill:main", "LoRA fine-tune the student on the teacher's answers (peft)"),
    "evaluate": ("routenlp.trainer.evaluate:main", "student with/without adapter on held-out queries; the gate"),
    "retrain": ("routenlp.trainer.retrain:main_retrain", "new router version with the student's new quality signals"),
    "calibrate": ("routenlp.trainer.retrain:main_calibrate", "recompute conformal thresholds (MAPIE) for a version"),
    "publish": ("routenlp.trainer.publish:main", "copy adapter and router version to where tiers/routers load them"),
}


def usage() -> str:
    lines = ["usage: routenlp train STAGE [--help] [ARGS...]", "", "stages:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .manifest import StageError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in STAGES:
        print(f"routenlp train: unknown stage {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = STAGES[argv[0]][0].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    except StageError as exc:
        print(f"routenlp train {argv[0]}: {exc}", file=sys.stderr)
        print(json.dumps({"stage": argv[0], "status": "Failed", "error": str(exc)}), flush=True)
        return 2
