"""A user's clone has no ../shared: the suite says in one line of its summary which tests did not run for that."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[2] / "conftest.py"
SUITE = '''
def test_needs_mmlu(shared_data):
    assert shared_data.is_dir()

def test_needs_financebench(shared_data):
    assert shared_data.is_dir()

def test_needs_nothing():
    pass
'''


def run_suite(tmp_path: Path, data: Path) -> str:
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(CONFTEST, suite / "conftest.py")
    (suite / "test_x.py").write_text(SUITE)
    # no third-party plugins: the hook under test is plain pytest (and they take seconds to load)
    env = {**os.environ, "ROUTENLP_SHARED_DATA": str(data), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                          "--rootdir", str(suite), str(suite)], capture_output=True, text=True, env=env, timeout=120)
    return out.stdout


def test_skips_for_want_of_shared_data_are_named_in_one_summary_line(tmp_path):
    text = run_suite(tmp_path, tmp_path / "no-such-folder")
    notes = [ln for ln in text.splitlines() if ln.startswith("NOTE:")]
    assert notes == [f"NOTE: 2 tests did not run: they need the public benchmark data (MMLU-Pro, FinanceBench) in "
                     f"{tmp_path / 'no-such-folder'}, which is absent; set ROUTENLP_SHARED_DATA to the folder that "
                     "holds it to run them"], text
    assert "1 passed, 2 skipped" in text


def test_no_note_when_the_data_is_there(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    text = run_suite(tmp_path, data)
    assert "NOTE:" not in text and "3 passed" in text, text
