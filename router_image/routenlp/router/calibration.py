"""Online recalibration of the stable version: the label windows and the thresholds they certify.

Labels (an authenticated labeller's feedback, the router's judge after an escalation reached the reference, shadow
calls to the reference) pass the precedence shared with the trainer (window.py), then feed, per (task, tier): the
calibration window, random-sample labels only (score, acceptable), which keeps the recalibrated threshold unbiased;
and the violations window, labels of accepted answers, which the acceptedAnswers risk gauge reads. Every
cascade.recalibrationInterval the stable version's thresholds are recomputed from the calibration windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routenlp.api.router_config import RouterConfig
from routenlp.api.routingpolicy import RiskMeasure

from .conformal import ThresholdResult, calibrate_threshold
from .eventlog import labelled_attempts, read_events
from .events import JUDGE, RoutingEvent, random_sample_label
from .figures import RolloutFigures
from .metrics import RouterMetrics
from .window import AttemptLabels, LabelWindow

WARM_SEGMENTS = 16  # event-log segments read at start-up to refill the calibration window

Key = tuple[str, str]  # (task, tier)
Snapshot = dict[Key, list[tuple[float, bool]]]


class OnlineCalibration:
    """The label windows of one router and the thresholds online recalibration certified for its stable version."""

    def __init__(self, config: RouterConfig, metrics: RouterMetrics, figures: RolloutFigures, attempts: int):
        """`attempts`: how many recent attempts keep their label in force (the precedence's memory)."""
        self.config, self.metrics, self.figures = config, metrics, figures
        self.tier_names = [t.name for t in config.tiers]
        self.tasks = {t.name: t for t in config.tasks}
        self.window: dict[Key, LabelWindow[tuple[float, bool]]] = {}
        self.violations: dict[Key, LabelWindow[bool]] = {}
        self.attempt_labels = AttemptLabels(attempts)
        self.online: dict[Key, ThresholdResult] = {}

    def forget_scores(self) -> None:
        """A new stable version: its confidence models score differently, so the old scores and thresholds go."""
        self.window.clear()
        self.online.clear()

    def floor(self, task: str) -> tuple[str, float] | None:
        """The quality floor a task is under: ("task", its qualityFloor), else ("policy", cascade.qualityFloor)."""
        own, policy = self.tasks[task].quality_floor, self.config.cascade.quality_floor
        if own is not None:
            return "task", own
        return ("policy", policy) if policy is not None else None

    def add_label(self, event: RoutingEvent, tier: str, acceptable: bool, stable_version: str | None,
                  trust: int = JUDGE) -> bool:
        """Record a label for one attempt (online calibration of the stable version, violation gauge, rollout
        figures) if it takes the place of the attempt's label in force under the precedence shared with the trainer
        (`events.resolve_label`; `trust`: events.JUDGE for the router's own labels, LABELLER for an authenticated
        labeller's). Returns whether it was taken."""
        att = next((a for a in event.attempts if a.tier == tier), None)
        if att is None:
            return False
        taken, conflict = self.attempt_labels.offer(event.request_id, tier, trust, acceptable)
        if conflict:
            self.metrics.label_conflicts.labels(self.config.policy, "replaced" if taken else "kept").inc()
        if not taken:
            return False
        # Only labels that are a random sample of the attempts reaching the tier keep the calibration unbiased.
        sampled = att.score is not None and random_sample_label(event, att)
        if tier != self.tier_names[-1]:
            self.figures.label(event.router_version, acceptable, att.accepted, sampled,  # canary labels count too
                               attempt=(event.request_id, tier))
        if stable_version is None or event.router_version != stable_version:
            return True
        key, size = (event.task, tier), self.config.cascade.calibration_window
        if att.accepted:
            self.violations.setdefault(key, LabelWindow(size)).put(event.request_id, acceptable)
        if sampled and att.score is not None:  # random_sample_label holds only scored attempts
            self.window.setdefault(key, LabelWindow(size)).put(event.request_id, (att.score, acceptable))
        return True

    def snapshot(self) -> Snapshot:
        """Copy of the calibration windows (taken on the event loop, which is the only writer)."""
        return {k: list(w) for k, w in list(self.window.items())}

    def recalibrate(self, snapshot: Snapshot) -> None:
        """Recompute the stable version's thresholds from the labelled windows (enough labels only)."""
        c = self.config.cascade
        for (task, tier), w in snapshot.items():
            # A floor certifies the task's whole cascade against the reference (one level for every cheaper tier, on
            # requests labelled at every tier): per-tier windows cannot recertify it; the trainer does.
            if tier == self.tier_names[-1] or len(w) < c.min_calibration_samples or self.floor(task) is not None:
                continue
            s, y = np.array([x[0] for x in w]), np.array([x[1] for x in w], dtype=float)
            measure = RiskMeasure(c.risk_measure).value
            # allRequests' risk only grows as the threshold falls, so the fixed grid walked from strict to loose is a
            # valid fixed sequence with no training data; acceptedAnswers' is not monotone there: Holm over the grid.
            fwer = "fixed_sequence" if measure == RiskMeasure.ALL_REQUESTS.value else "holm"
            self.online[(task, tier)] = calibrate_threshold(s, y, c.risk_level, c.delta, c.min_calibration_samples,
                                                            fwer=fwer, risk_measure=measure)

    def observed_risk(self, task: str, tier: str, threshold: float | None) -> float | None:
        """The policy's risk measure on labelled traffic (None: no labels yet). `acceptedAnswers`: the unacceptable
        share of labelled accepted answers. `allRequests`: on the random-sample labels of the calibration window
        (requests that reached the tier), the share the threshold in force accepts and that are unacceptable."""
        if RiskMeasure(self.config.cascade.risk_measure) == RiskMeasure.ALL_REQUESTS:
            w = self.window.get((task, tier))
            if not w:
                return None
            return sum(1 for s, ok in w if threshold is not None and s >= threshold and not ok) / len(w)
        v = self.violations.get((task, tier))
        return 1 - sum(v) / len(v) if v else None

    def warm_from_log(self, stable_version: str) -> int:
        """Refill the windows from labels already in the event log (e.g. after a restart), under the same precedence
        as online labels: untrusted labels (old unauthenticated feedback included) stay out."""
        log_dir = self.config.event_log_dir
        # The newest segments only: a long-lived log can be far larger than the window needs.
        segments = sorted(Path(log_dir).glob("events-*.jsonl"))[-WARM_SEGMENTS:]
        evs = list(read_events(log_dir, since_segment=segments[0].name)) if segments else []
        by_id = {e.request_id: e for e in evs if isinstance(e, RoutingEvent)}
        n = 0
        for la in labelled_attempts(evs):
            ev = by_id.get(la.request_id)
            if ev is not None:
                n += self.add_label(ev, la.tier, la.acceptable, stable_version, la.trust)
        return n
