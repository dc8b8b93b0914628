"""Everything one router process holds, and what is in force for a request: the versions (versions.py), the
thresholds (the version's calibration, or online recalibration: calibration.py), each task's chain and quality
floor, the routing decision, the tier clients, metrics and rollout figures."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
from typing import Any

import numpy as np

from routenlp.api.modeltier import relative_costs
from routenlp.api.router_config import RouterConfig
from routenlp.api.routingpolicy import RiskMeasure

from .artifacts import Calibration, RouterArtifact
from .auth import FeedbackGate, KeyDir
from .calibration import Key, OnlineCalibration, Snapshot
from .cascade import StartRule
from .floor import COST_WEIGHT, Rule, floor_certificate, served_rule, start_rule
from .clients import TierClient
from .conformal import ThresholdResult
from .decision_cache import DecisionCache
from .encoder import EncoderPool, MicroBatcher
from .engine import CascadeEngine, certified
from .eventlog import EventLogWriter
from .events import JUDGE, FeedbackEvent, RoutingEvent
from .figures import RolloutFigures
from .figures_store import FiguresStore
from .metrics import RouterMetrics
from .versions import ConfigFile, OperatorSwitches, VersionSet, bootstrap_artifact
from .window import LabelWindow

log = logging.getLogger("routenlp.router")

RECENT_REQUESTS = 20_000  # request id -> event kept in memory for feedback and shadow labels


class RouterState:
    """Everything one router process holds: config, versions (stable + canary), thresholds, clients, metrics."""

    def __init__(self, config: RouterConfig, config_path: str | None = None, encoder: Any = None):
        self.config = config
        self.config_file = ConfigFile(config, config_path)
        self.metrics = RouterMetrics()
        self.figures = RolloutFigures(risk_measure=RiskMeasure(config.cascade.risk_measure).value)
        self.figures_store = FiguresStore(config.event_log_dir)  # the figures outlive this process
        self.tier_names = [t.name for t in config.tiers]
        self.K = len(self.tier_names)
        self.tasks = {t.name: t for t in config.tasks}
        # What cost-weighted start rules weigh, once: tiers are not a live field (the operator rolls the pods).
        self.relative_cost = tuple(relative_costs([tier.cost for tier in config.tiers]))
        self.clients = [TierClient(t) for t in config.tiers]
        self.engine = CascadeEngine(config.tiers, self.clients)
        self.rng = random.Random()  # the exploration sample (seeded from the OS: clients cannot predict it)
        self.encoder = encoder
        self.batcher: MicroBatcher | None = None  # embeds answers for generation agreement (fp32 MiniLM)
        self.encoders = EncoderPool(config.encoder_path, encoder)  # each version's queries in its own encoder space
        self.decisions = DecisionCache(counters=(self.metrics.decision_cache_hits.labels(config.policy),
                                                 self.metrics.decision_cache_misses.labels(config.policy)))
        self.events: EventLogWriter | None = None
        self.versions = VersionSet(self.encoders)
        self.calibration = OnlineCalibration(config, self.metrics, self.figures, RECENT_REQUESTS * self.K)
        auth = config.auth
        self.labellers = KeyDir(auth.labellers_dir) if auth.labellers_dir else None
        self.client_keys = KeyDir(auth.client_keys_dir) if auth.client_keys_dir else None
        self.feedback_gate = FeedbackGate()
        self.recent: collections.OrderedDict[str, RoutingEvent] = collections.OrderedDict()
        self.switches = OperatorSwitches(config.state_path)  # re-read in the background
        self.ready = False
        self.background: list[asyncio.Task[None]] = []

    # ---- versions ------------------------------------------------------------------------------------------------
    @property
    def stable(self) -> RouterArtifact | None:
        return self.versions.stable

    @property
    def canary(self) -> RouterArtifact | None:
        return self.versions.canary

    def load_versions(self) -> None:
        """(Re)load the stable and canary versions named by the config (stable None = newest)."""
        self.versions.load(self.config.router, on_new_stable=self.calibration.forget_scores)
        self.versions_changed()

    def start_without_artifact(self) -> None:
        """The configured artifact is missing: serve the bootstrap version until one arrives."""
        if self.versions.stable is None:
            self.versions.stable = bootstrap_artifact()
        self.figures.set_versions(*self.versions.names())
        self.publish_thresholds()

    def versions_changed(self) -> None:
        self.figures.set_versions(*self.versions.names())
        self.figures.chains = {a.version: {t: self.chain_names(a, t) for t in self.tasks}
                               for a in (self.stable, self.canary) if a is not None}
        self.metrics.version_info.clear()
        for art, role in ((self.stable, "stable"), (self.canary, "canary")):
            if art:
                self.metrics.version_info.labels(self.config.policy, art.version, role).set(1)
        self.publish_thresholds()

    def artifact_for(self, request_id: str) -> RouterArtifact | None:
        return self.versions.for_request(request_id, self.config.router.canary_percent)

    def reload(self) -> None:
        """The config file's live fields, then the versions they name."""
        self.config_file.reload()
        self.load_versions()

    def load_state(self) -> None:
        """Apply the operator's live switches from `config.state_path` (absent or unreadable: the defaults)."""
        if self.switches.reload():
            self.metrics.prefer_cheaper.labels(self.config.policy).set(1 if self.prefer_cheaper else 0)

    @property
    def prefer_cheaper(self) -> bool:
        return self.switches.prefer_cheaper

    @prefer_cheaper.setter
    def prefer_cheaper(self, on: bool) -> None:
        self.switches.prefer_cheaper = on

    # ---- thresholds, chains, floors ------------------------------------------------------------------------------
    def threshold(self, art: RouterArtifact | None, task: str, tier: str) -> ThresholdResult | None:
        """Threshold in force: online recalibration (stable version) wins over the artifact's calibration, which is
        used only if calibrated for the policy's risk measure at a risk level no higher than the policy's, on the
        chain in force for the task (thresholds fitted on another chain saw other requests) and, for a task under a
        quality floor, certified for that floor."""
        if art is not None and art is self.stable and (task, tier) in self.online:
            return self.online[(task, tier)]
        cal: Calibration | None = art.calibration if art is not None else None
        c = self.config.cascade
        if (cal is None or cal.risk_level > c.risk_level or cal.delta > c.delta
                or cal.risk_measure != RiskMeasure(c.risk_measure).value):
            return None
        if self.chain_names(art, task) != _calibrated_chain(art, task, self.tier_names):
            return None
        if self.floor(task) is not None and not self.floor_certified(art, task):
            return None
        return cal.get(task, tier)

    def floor(self, task: str) -> tuple[str, float] | None:
        return self.calibration.floor(task)

    def floor_certified(self, art: RouterArtifact | None, task: str) -> bool:
        """The artifact's thresholds for the task were certified for the floor in force, at the same scope (metadata
        `floor_certificates`, written by the trainer's floor_plan)."""
        return floor_certificate(art.metadata if art is not None else None, task, self.floor(task)) is not None

    def start_rule(self, task: str, art: RouterArtifact | None = None) -> StartRule:
        """Where the task's requests start: the rule the version's quality-floor plan was certified with (metadata
        `floor_certificates[task].start_rule`, when certified for the floor in force), else tasks[].qualityTarget,
        or tasks[].costWeight over the tiers' prices relative to the reference's (as the trainer was given them)."""
        t = self.tasks[task]
        rule: Rule = t.quality_target if t.cost_weight is None else (COST_WEIGHT, t.cost_weight)
        rule = served_rule(art.metadata if art is not None else None, task, self.floor(task), rule)
        return start_rule(rule, self.relative_cost)

    def chain_names(self, art: RouterArtifact | None, task: str) -> list[str]:
        """The task's chain: pinned in the RoutingPolicy (`tasks[].chain`), else learnt by the trainer (the
        artifact's `chains`), else every tier."""
        pinned = self.tasks[task].chain
        return list(pinned) if pinned else _calibrated_chain(art, task, self.tier_names)

    def chain(self, art: RouterArtifact | None, task: str) -> list[bool] | None:
        """The task's chain as a mask over the portfolio (None: every tier)."""
        names = self.chain_names(art, task)
        return None if names == self.tier_names else [t in names for t in self.tier_names]

    def publish_thresholds(self) -> None:
        p = self.config.policy
        for task in self.tasks:
            self.metrics.risk_level.labels(p, task).set(self.config.cascade.risk_level)
            for tier in self.tier_names[:-1]:
                value = certified(self.threshold(self.stable, task, tier))
                self.metrics.calibrated.labels(p, task, tier).set(0 if value is None else 1)
                self.metrics.threshold.labels(p, task, tier).set(math.nan if value is None else value)
                w = self.window.get((task, tier))
                self.metrics.labels.labels(p, task, tier).set(len(w) if w else 0)
                rate = self.calibration.observed_risk(task, tier, value)
                if rate is not None:
                    self.metrics.violation_rate.labels(p, task, tier).set(rate)

    # ---- online calibration (calibration.py) -----------------------------------------------------------------------
    @property
    def window(self) -> dict[Key, LabelWindow[tuple[float, bool]]]:
        return self.calibration.window

    @property
    def violations(self) -> dict[Key, LabelWindow[bool]]:
        return self.calibration.violations

    @property
    def online(self) -> dict[Key, ThresholdResult]:
        return self.calibration.online

    def add_label(self, event: RoutingEvent, tier: str, acceptable: bool, trust: int = JUDGE) -> bool:
        """Record a label for one attempt if it takes the place of the attempt's label in force (calibration.py)."""
        return self.calibration.add_label(event, tier, acceptable, self.stable.version if self.stable else None,
                                          trust)

    def label_snapshot(self) -> Snapshot:
        return self.calibration.snapshot()

    def recalibrate(self, snapshot: Snapshot | None = None) -> None:
        """Recompute the stable version's thresholds from the labelled window (enough labels only)."""
        self.calibration.recalibrate(self.label_snapshot() if snapshot is None else snapshot)
        self.publish_thresholds()
        self.metrics.recalibrations.labels(self.config.policy).inc()

    def warm_from_log(self) -> int:
        """Refill the calibration window from labels already in the event log (e.g. after a restart)."""
        return self.calibration.warm_from_log(self.stable.version) if self.stable is not None else 0

    # ---- requests --------------------------------------------------------------------------------------------------
    async def decide(self, art: RouterArtifact | None, task: str, query: str) -> np.ndarray | None:
        """Predicted acceptance per tier (None without a router for this task); the start tier follows from it
        and the task's chain in `engine.make_plan`."""
        router = art.router if art is not None else None
        if art is None or router is None or router.task_index(task) is None:
            return None
        key = self.decisions.key(art.version, task, query)
        probs = self.decisions.get(key)
        if probs is None:
            # Embedded by the encoder variant the version's heads and thresholds were fitted on (artifacts.py).
            vec = await self.encoders.load(art.encoder).encode(query)
            probs = router.predict_proba(vec[None, :], np.array([router.task_index(task)]))[0]
            if router.tier_names != self.tier_names:
                idx = [router.tier_names.index(t) if t in router.tier_names else -1 for t in self.tier_names]
                if min(idx) < 0:
                    return None
                probs = probs[idx]
            self.decisions.put(key, probs)
        return probs

    def remember(self, event: RoutingEvent) -> None:
        self.recent[event.request_id] = event
        while len(self.recent) > RECENT_REQUESTS:
            self.recent.popitem(last=False)

    def log_event(self, event: RoutingEvent | FeedbackEvent) -> None:
        if self.events is not None:
            self.events.submit(event)  # a refusal is counted by the writer's on_drop callback

    def tiers_up(self) -> list[bool]:
        up = self.engine.tiers_up()
        for name, u in zip(self.tier_names, up):
            self.metrics.tier_up.labels(self.config.policy, name).set(1 if u else 0)
        return up

    def retry_after(self) -> int:
        return max(1, math.ceil(min(c.breaker.retry_after() for c in self.clients)))

    async def persist_figures(self, adopt: bool = False, released: bool = False, restore: bool = False) -> None:
        """Write the rollout counters to the event-log volume (figures_store.py), first adding those of this pod's
        previous container (`restore`, at start-up) and of routers that are gone (`adopt`). File work runs off the
        event loop; counting stays on it."""
        store, fig = self.figures_store, self.figures
        try:
            own = await asyncio.to_thread(store.take_own) if restore else None
            if own is not None:
                fig.absorb(own)
            if adopt:
                for snap in await asyncio.to_thread(store.take_orphans):
                    fig.absorb(snap)
            gone = await asyncio.to_thread(store.adopted_meanwhile)
            if gone is not None:
                fig.absorb(gone, sign=-1)
            await asyncio.to_thread(store.write, fig.snapshot(), released)
        except OSError as e:  # a full or read-only volume must not take the router down; the figures stay in memory
            log.warning("rollout figures not persisted: %s", e)


def _calibrated_chain(art: RouterArtifact | None, task: str, tier_names: list[str]) -> list[str]:
    """The chain the artifact's router and thresholds were fitted on for `task` (metadata `chains`; every tier for
    artifacts without chains, or whose chain names a tier this portfolio does not have)."""
    names = (art.metadata.get("chains") or {}).get(task) if art is not None else None
    if not names or any(n not in tier_names for n in names):
        return list(tier_names)
    return [t for t in tier_names if t in names]
