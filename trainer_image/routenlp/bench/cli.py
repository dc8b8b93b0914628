"""`routenlp bench NAME`: benchmarks. Each lives in its own module with its own options and `--json` output."""

from __future__ import annotations

import importlib
import sys

BENCHES = {
    "routing": ("routenlp.bench.routing", "cost/quality of RouteNLP vs baselines on a labelled outcome table"),
    "router": ("routenlp.bench.router", "router hot path: decision latency, proxy overhead, requests/s"),
    "campaign": ("routenlp.bench.campaign", "a distillation campaign end to end on BANKING77 (targeted vs untargeted)"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        out = sys.stdout if (not argv or argv[0] in ("-h", "--help")) else sys.stderr
        print("usage: routenlp bench {" + ",".join(BENCHES) + "} [--json] [...]\n", file=out)
        for name, (_, help_) in BENCHES.items():
            print(f"  {name:<9} {help_}", file=out)
        return 0 if out is sys.stdout else 2
    return int(importlib.import_module(BENCHES[argv[0]][0]).main(argv[1:]) or 0)
