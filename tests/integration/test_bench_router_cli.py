"""`routenlp bench router --json` prints exactly one JSON object on stdout (child servers' banners go to stderr)."""

import json
import subprocess
import sys


def test_bench_router_json_is_one_object_on_stdout(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "routenlp.cli.main", "bench", "router", "--json", "--decisions", "20",
         "--decisions-32", "64", "--pairs", "10", "--load", "20"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)  # the whole stdout, nothing before or after the object
    assert r["n_decisions_single"] == 20 and r["decision_p50_ms"] > 0 and r["requests_per_s"] > 0
