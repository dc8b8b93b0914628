"""`routenlp`: one entry point; each subcommand lives with the code it drives and is imported only when used
(the operator image has no torch, the router image no kopf)."""

from __future__ import annotations

import importlib
import sys

from routenlp.api.release import RELEASE

# name -> (module:function taking argv, one-line help). Each function owns its argparse parser and `--help`.
COMMANDS: dict[str, tuple[str, str]] = {
    "crds": ("routenlp.api.crdgen:main", "generate the CRD YAML from the API models (writes crds/)"),
    "validate": ("routenlp.cli.validate:main", "validate ModelTier/RoutingPolicy/DistillationCampaign YAML offline"),
    "operator": ("routenlp.operator.main:main", "run the Kubernetes operator (kopf)"),
    "router": ("routenlp.router.server:main", "run the router (OpenAI-compatible gateway) from a config file"),
    "up": ("routenlp.local.up:main", "local runtime: serve tiers with vLLM and the router on this machine"),
    "models": ("routenlp.local.models:main", "prepare the tiny real models shipped in PyPI packages"),
    "train": ("routenlp.trainer.cli:main", "trainer stages: cluster, distill, evaluate, retrain, calibrate, publish"),
    "bench": ("routenlp.bench.cli:main", "benchmarks: routing, router, campaign, operator"),
    "data": ("routenlp.bench.data:main", "convert public routing data sets to the outcome-table format"),
    "tools": ("routenlp.cli.tools:main", "developer tools (install helm/kubectl from PyPI)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: routenlp [--version] COMMAND [ARGS...]", "", "RouteNLP: cost-aware LLM routing operator.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `routenlp COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"routenlp {RELEASE}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"routenlp: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # e.g. the operator image running a trainer command
        print(f"routenlp {name}: needs {exc.name!r}, which this installation lacks ({exc})", file=sys.stderr)
        return 2
    return int(getattr(mod, func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
