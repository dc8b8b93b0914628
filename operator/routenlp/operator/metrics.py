"""Prometheus metrics of the operator (names and labels documented in docs/operations.md, "Metrics and alerts")."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter("routenlp_operator_reconciles_total", "Reconciles by kind and result.", ["kind", "result"])
RECONCILE_SECONDS = Histogram("routenlp_operator_reconcile_seconds", "Reconcile duration.", ["kind"],
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
CAMPAIGN_RUNS = Counter("routenlp_campaign_runs_total", "Finished campaign runs.", ["namespace", "campaign", "result"])
MODELTIER_READY = Gauge("routenlp_modeltier_ready", "1 when the ModelTier's Ready condition is True.",
                        ["namespace", "tier"])
