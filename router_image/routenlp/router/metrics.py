"""Prometheus metrics of one router (names and labels documented in docs/operations.md, "Metrics and alerts"). Each
app gets its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("routenlp_requests_total", "Requests answered, by the tier that answered.",
                                ["policy", "task", "tier", "outcome"], registry=r)
        self.escalations = Counter("routenlp_escalations_total", "Escalations from one tier to the next.",
                                   ["policy", "task", "from_tier", "to_tier"], registry=r)
        self.cost = Counter("routenlp_cost_usd_total", "USD spent on tier calls.", ["policy", "task", "tier"], registry=r)
        self.reference_cost = Counter("routenlp_reference_cost_usd_total",
                                      "USD that always using the reference tier would have cost.", ["policy", "task"],
                                      registry=r)
        self.tier_seconds = Histogram("routenlp_tier_request_seconds", "Upstream latency per tier call.",
                                      ["policy", "tier"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_seconds = Histogram("routenlp_request_seconds", "End-to-end request latency.", ["policy"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.decision_seconds = Histogram("routenlp_decision_seconds",
                                          "Routing decision latency (encode + heads + thresholds).", ["policy"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        # hit rate = hits / (hits + misses); decision_cache.py
        self.decision_cache_hits = Counter("routenlp_decision_cache_hits_total", "Routing decisions answered from "
                                           "the exact-match decision cache (no encoding).", ["policy"], registry=r)
        self.decision_cache_misses = Counter("routenlp_decision_cache_misses_total", "Routing decisions not in the "
                                             "decision cache (encoded).", ["policy"], registry=r)
        self.risk_level = Gauge("routenlp_risk_level", "Risk level alpha in force.", ["policy", "task"], registry=r)
        self.violation_rate = Gauge("routenlp_violation_rate",
                                    "Observed risk (the policy's riskMeasure) on labelled events: acceptedAnswers = "
                                    "unacceptable share of accepted answers; allRequests = share of the labelled "
                                    "requests reaching the tier accepted there and unacceptable.",
                                    ["policy", "task", "tier"], registry=r)
        self.threshold = Gauge("routenlp_threshold", "Conformal threshold in force (NaN: none certified).",
                               ["policy", "task", "tier"], registry=r)
        self.calibrated = Gauge("routenlp_calibrated", "1 if the (task, tier) threshold is certified; 0 = too few "
                                "labels or too hard: conservative escalation.", ["policy", "task", "tier"], registry=r)
        self.tier_up = Gauge("routenlp_tier_up", "1 while the tier's circuit breaker is closed.", ["policy", "tier"],
                             registry=r)
        self.feedback = Counter("routenlp_feedback_total", "Labels received that count (an authenticated labeller's "
                                "or the router's own judge's).", ["policy", "task", "tier", "accepted"], registry=r)
        self.feedback_not_applied = Counter("routenlp_feedback_not_applied_total", "Feedback logged (202) that moves "
                                            "no threshold: `unauthenticated` (no labeller token) or `unknown_request` "
                                            "(not in this router's memory; the trainer joins it from the log).",
                                            ["policy", "reason"], registry=r)
        self.feedback_refused = Counter("routenlp_feedback_refused_total", "Feedback refused: `rate_limited` (per "
                                        "client) or `request_cap` (too many labels for one request id).",
                                        ["policy", "reason"], registry=r)
        self.label_conflicts = Counter("routenlp_label_conflicts_total", "A label disagreeing with the one in force "
                                       "for the same attempt: `replaced` (same or more trusted source) or `kept`.",
                                       ["policy", "resolution"], registry=r)
        self.auth_failures = Counter("routenlp_auth_failures_total", "Requests refused with 401 (missing or unknown "
                                     "bearer token).", ["policy"], registry=r)
        self.version_info = Gauge("routenlp_router_version_info", "Router versions serving.",
                                  ["policy", "version", "role"], registry=r)
        self.event_log_dropped = Counter("routenlp_event_log_dropped_total", "Events lost: the event-log queue was "
                                         "full, or a batch could not be written after retries.", ["policy"], registry=r)
        self.event_log_replaced = Counter("routenlp_event_log_replaced_total", "Events written with text UTF-8 cannot "
                                          "hold (lone surrogates) replaced by U+FFFD.", ["policy"], registry=r)
        self.upstream_errors = Counter("routenlp_tier_errors_total", "Failed tier calls (connection, timeout, 5xx).",
                                       ["policy", "tier"], registry=r)
        self.labels = Gauge("routenlp_calibration_samples", "Labelled attempts in the recalibration window.",
                            ["policy", "task", "tier"], registry=r)
        self.prefer_cheaper = Gauge("routenlp_prefer_cheaper", "1 while the budget's PreferCheaper switch starts every "
                                    "request at the cheapest tier.", ["policy"], registry=r)
        self.recalibrations = Counter("routenlp_recalibrations_total", "Online recalibrations run (each publishes "
                                      "thresholds from the label windows as they were when it started).", ["policy"],
                                      registry=r)
