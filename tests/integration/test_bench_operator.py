"""The operator benchmark (tests/kube_emulator/bench_operator.py) end to end at a small size (the real figures come
from running it by hand)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parents[1] / "kube_emulator" / "bench_operator.py")


def test_bench_operator_small_size_converges():
    out = subprocess.run([sys.executable, BENCH, "--sizes", "10", "--json", "--timeout", "120"], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    row = result["results"][0]
    assert result["command"] == "python tests/kube_emulator/bench_operator.py --sizes 10"
    assert row["converged"] and row["readyModelTiers"] == 10 and row["readyRoutingPolicies"] == 2
    assert row["reconciles"] >= 12 and row["operatorPeakRssMiB"] > 0


def test_bench_operator_rejects_bad_sizes():
    out = subprocess.run([sys.executable, BENCH, "--sizes", "a,b"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--sizes" in out.stderr
