"""Shared test settings: where the public data lives, offline model hubs, opt-in markers."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# shared/ sits beside the checkout (in CI too); ROUTENLP_SHARED_DATA overrides it.
SHARED_DATA = Path(os.environ.get("ROUTENLP_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--run-cluster", action="store_true", help="also run tests against the cluster in KUBECONFIG")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-cluster"):
        return
    skip = pytest.mark.skip(reason="needs a real cluster: pass --run-cluster with KUBECONFIG set")
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public data folder {SHARED_DATA} is absent (set ROUTENLP_SHARED_DATA)")
    return SHARED_DATA
