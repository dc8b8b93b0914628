"""The namespace package spread over three image folders installs completely and never shadows stdlib `operator`."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_operator_folder_does_not_shadow_stdlib():
    assert not (ROOT / "operator" / "__init__.py").exists()
    out = subprocess.run(
        [sys.executable, "-c", "import operator, sys; print(operator.__file__); print(operator.itemgetter)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert "routenlp" not in out.stdout and "/operator/" not in out.stdout.splitlines()[0]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg["package-dir"]
    listed = set(cfg["packages"])
    found = set()
    for root in ("operator", "router_image", "trainer_image"):
        for init in (ROOT / root / "routenlp").rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / root)
            found.add(".".join(rel.parts))
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"
    for pkg in listed:
        top = ".".join(pkg.split(".")[:2])
        assert top in mapping, f"{top} has no package-dir entry"


def test_subpackages_import_from_their_image_folders():
    import routenlp.api
    import routenlp.router.engine
    import routenlp.trainer

    assert "/operator/routenlp/api" in routenlp.api.__file__
    assert "/router_image/routenlp/router" in routenlp.router.engine.__file__
    assert "/trainer_image/routenlp/trainer" in routenlp.trainer.__file__
