"""Shared test settings: where the public data lives, offline model hubs, opt-in markers, and one summary line naming
the tests that did not run for want of that data."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# shared/ sits beside the checkout (in CI too); ROUTENLP_SHARED_DATA overrides it. Only the large benchmark data
# (MMLU-Pro, FinanceBench, prices) is read from there: BANKING77 ships with the package (routenlp.local.banking77).
SHARED_DATA = Path(os.environ.get("ROUTENLP_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The skip reason of the `shared_data` fixture starts with this; the terminal summary counts those skips.
NEEDS_SHARED = "needs the public benchmark data"

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
    """The public benchmark data folder (MMLU-Pro, FinanceBench, prices); the test skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{NEEDS_SHARED} in {SHARED_DATA} (absent; set ROUTENLP_SHARED_DATA)")
    return SHARED_DATA


def shared_data_skips(reports) -> int:
    """How many skipped test reports skipped for want of the shared data folder."""
    n = 0
    for r in reports:
        reason = r.longrepr[2] if isinstance(r.longrepr, tuple) and len(r.longrepr) == 3 else str(r.longrepr)
        n += NEEDS_SHARED in reason
    return n


def pytest_terminal_summary(terminalreporter):
    # A user's clone has no ../shared: say in one line what did not run, rather than leave it in the skip count.
    n = shared_data_skips(terminalreporter.stats.get("skipped", []))
    if n:
        terminalreporter.write_line(
            f"NOTE: {n} test{'s' if n > 1 else ''} did not run: {'they need' if n > 1 else 'it needs'} the public "
            f"benchmark data (MMLU-Pro, FinanceBench) in {SHARED_DATA}, which is absent; set ROUTENLP_SHARED_DATA "
            "to the folder that holds it to run them", yellow=True, bold=True)
