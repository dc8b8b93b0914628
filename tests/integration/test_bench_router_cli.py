"""`routenlp bench router --json` prints exactly one JSON object on stdout (child servers' banners go to stderr), with
the CPU, the encoder variant and the decision cache's hit rate on the no-repeat and the repeat mix."""

import json
import os
import subprocess
import sys


def test_bench_router_json_is_one_object_on_stdout(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "routenlp.cli.main", "bench", "router", "--json", "--decisions", "20",
         "--decisions-32", "64", "--pairs", "10", "--load", "20", "--repeat-pool", "5",
         "--encoder-variant", "minilm-l6-int8-onnx"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "ROUTENLP_ENCODER_CACHE": str(tmp_path / "encoders")})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)  # the whole stdout, nothing before or after the object
    assert r["n_decisions_single"] == 20 and r["decision_p50_ms"] > 0 and r["requests_per_s"] > 0
    assert r["cpu_model"] and isinstance(r["avx512"], bool) and isinstance(r["avx2"], bool)
    assert r["encoder_variant"] == r["encoder_runtime_variant"] == "minilm-l6-int8-onnx"
    # no repeats: nothing to hit, in process and in the router child
    assert r["cache_hit_rate_single"] == 0 and r["cache_hit_rate_at_32"] == 0 and r["proxy_cache_hit_rate"] == 0
    # 20 draws from 5 queries x 2 tasks: at least half repeat, and one client hits every repeat
    assert r["repeat_share_single"] >= 0.5 and r["repeat_cache_hit_rate_single"] == r["repeat_share_single"]
    assert 0 < r["repeat_cache_hit_rate_at_32"] <= r["repeat_share_at_32"]
