"""`routenlp operator`: run the kopf operator with RouteNLP's settings.

Health: kopf's liveness endpoint (`--liveness`, default http://0.0.0.0:8080/healthz). Metrics: Prometheus on
`--metrics-port`. Several replicas: `--peering NAME` (kopf peering: only the highest-priority replica acts; needs the
ClusterKopfPeering CRD and object from the chart); one replica: standalone. SIGTERM stops watching and lets
running handlers finish (graceful shutdown).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

import kopf
from prometheus_client import start_http_server


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="routenlp operator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="namespace to serve (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace (default)")
    p.add_argument("--peering", metavar="NAME", help="kopf peering name (several replicas); default: standalone")
    p.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness/readiness endpoint URL")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0: off)")
    p.add_argument("--webhook-port", type=int, default=0,
                   help="serve the sidecar-injection webhook (HTTPS) on this port (0: off)")
    p.add_argument("--webhook-cert", help="TLS certificate file of the webhook server (e.g. from cert-manager)")
    p.add_argument("--webhook-key", help="TLS private key file of the webhook server")
    p.add_argument("--network-policies", action=argparse.BooleanOptionalAction, default=True,
                   help="render NetworkPolicies for tier and router pods (default: on)")
    p.add_argument("--operator-pod-labels", metavar="K=V,...",
                   help="labels of this operator's pods, let into tier pods (LoRA loading) and routers' admin port "
                   "(default: app.kubernetes.io/name=routenlp,app.kubernetes.io/component=operator); the namespace "
                   "is POD_NAMESPACE")
    p.add_argument("--monitoring-namespace", help="namespace whose pods may scrape the routers' admin port (/metrics)")
    p.add_argument("--resync-seconds", type=float, default=None, help="status refresh / drift repair interval")
    p.add_argument("--log-format", choices=["json", "plain"], default="json", help="log format (json: structured)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


def handler_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment the handlers read their settings from (they are also run by `kopf run` without this CLI):
    resync timers at import, the webhook at startup, NetworkPolicy peers (meta.NetworkPeers) on each reconcile."""
    env = {"ROUTENLP_NETWORK_POLICIES": "true" if args.network_policies else "false"}
    if args.resync_seconds is not None:
        env["ROUTENLP_RESYNC_SECONDS"] = str(args.resync_seconds)
    if args.operator_pod_labels:
        env["ROUTENLP_OPERATOR_POD_LABELS"] = args.operator_pod_labels
    if args.monitoring_namespace:
        env["ROUTENLP_MONITORING_NAMESPACE"] = args.monitoring_namespace
    if args.webhook_port:
        env.update(ROUTENLP_WEBHOOK_PORT=str(args.webhook_port), ROUTENLP_WEBHOOK_CERT=args.webhook_cert,
                   ROUTENLP_WEBHOOK_KEY=args.webhook_key)
    return env


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.webhook_port and not (args.webhook_cert and args.webhook_key):
        print("routenlp operator: --webhook-port needs --webhook-cert and --webhook-key", file=sys.stderr)
        return 2
    os.environ.update(handler_env(args))
    kopf.configure(verbose=args.verbose, quiet=args.quiet,
                   log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL)
    # Imported once the environment is set: the handlers read their settings (timer intervals) at import.
    from . import handlers  # noqa: F401, PLC0415  (registers the handlers)

    if args.metrics_port:
        start_http_server(args.metrics_port)

    logging.getLogger("routenlp.operator").info("starting", extra={"namespaces": args.namespace or "all"})
    asyncio.run(kopf.operator(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
    ))
    return 0
