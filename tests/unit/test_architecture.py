"""The architecture as a test: the layers of .importlinter (api at the bottom; router; local and trainer; bench and
cli on top; the operator on api only; the router free of Kubernetes) and the type checker, strict on routenlp.api
(the wire formats every part shares) and on routenlp.router (what serves every request)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# The namespace package spans three folders; the tools read it from the source tree, not the editable install.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("operator", "router_image",
                                                                            "trainer_image"))}


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_layers_hold():
    r = run(str(BIN / "lint-imports"), "--no-cache")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_the_contracts_name_every_top_package():
    """A new top package must take its place in the layers (else nothing checks its imports)."""
    contracts = (ROOT / ".importlinter").read_text()
    tops = {p.name for d in ("operator", "router_image", "trainer_image") for p in (ROOT / d / "routenlp").iterdir()
            if (p / "__init__.py").is_file()}
    missing = [t for t in sorted(tops) if f"routenlp.{t}" not in contracts]
    assert not missing, f"packages not in .importlinter: {missing}"


@pytest.mark.parametrize("package,strict", [("routenlp.api", True), ("routenlp.router", True)])
def test_types_check(package, strict):
    r = run(str(BIN / "mypy"), "-p", package, *(["--strict"] if strict else []))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
