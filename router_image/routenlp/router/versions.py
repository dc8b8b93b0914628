"""What the router re-reads while it serves: the router versions in force (stable, and a canary with its share of
traffic), the live fields of its config file, and the operator's state file (the budget switch).

The operator rolls a version out by rewriting router.yaml (`router.current`, `router.canary`,
`router.canaryPercent`) and writes `<policy>-router-state` (`preferCheaper`); the trainer adds versions to the
artifact directory. The router polls all three (server.py's background loop) and swaps without a restart.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from routenlp.api.router_config import RouterConfig, RouterState, RouterVersions

from .artifacts import RouterArtifact, latest_version, load_artifact
from .cascade import canary_bucket
from .confidence import ConfidenceSet
from .encoder import EncoderPool

log = logging.getLogger("routenlp.router")

BOOTSTRAP_VERSION = "none"  # served before any router artifact exists


def bootstrap_artifact() -> RouterArtifact:
    """No trained router yet: no priors (start at the cheapest tier), fallback confidence, no thresholds until online
    calibration certifies some (conservative escalation, routenlp_calibrated 0)."""
    return RouterArtifact(BOOTSTRAP_VERSION, None, ConfidenceSet(), None, {})


class VersionSet:
    """The stable version and the canary, each with its encoder loaded before it serves."""

    def __init__(self, encoders: EncoderPool):
        self.encoders = encoders
        self.stable: RouterArtifact | None = None
        self.canary: RouterArtifact | None = None

    def load(self, rv: RouterVersions, on_new_stable: Callable[[], None]) -> None:
        """(Re)load the versions `rv` names (stable None = the newest in the artifact directory). `on_new_stable`
        runs before a loaded stable version is replaced by another."""
        stable_name = rv.stable or latest_version(rv.artifact_dir)
        if stable_name is None and self.stable is None:
            self.stable = bootstrap_artifact()
        if stable_name and (self.stable is None or self.stable.version != stable_name):
            new = load_artifact(rv.artifact_dir, stable_name)
            self.encoders.load(new.encoder)  # its encoder is ready before the version serves
            if self.stable is not None:
                on_new_stable()
            self.stable = new
            log.info("router version %s loaded (stable)", stable_name)
        canary_name = rv.canary if rv.canary_percent > 0 else None
        if canary_name != (self.canary.version if self.canary else None):
            canary = load_artifact(rv.artifact_dir, canary_name) if canary_name else None
            if canary is not None:
                self.encoders.load(canary.encoder)
            self.canary = canary

    def for_request(self, request_id: str, canary_percent: int) -> RouterArtifact | None:
        """The version that serves a request: the canary for its share of request ids (a stable hash), else stable."""
        if self.canary is not None and canary_bucket(request_id) < canary_percent:
            return self.canary
        return self.stable

    def names(self) -> tuple[str | None, str | None]:
        return (self.stable.version if self.stable else None, self.canary.version if self.canary else None)


class ConfigFile:
    """router.yaml: only the version choice and the shadow sample rate are reloaded live."""

    def __init__(self, config: RouterConfig, path: str | None):
        self.config, self.path = config, path
        self._mtime = os.path.getmtime(path) if path else None

    def reload(self) -> None:
        if not self.path:
            return
        m = os.path.getmtime(self.path)
        if m != self._mtime:
            new = RouterConfig.load(self.path)
            self._mtime = m
            self.config.router = new.router
            self.config.shadow_sample_rate = new.shadow_sample_rate


class OperatorSwitches:
    """The operator's live switches, from `config.state_path` (absent or unreadable: the defaults)."""

    def __init__(self, path: str | None):
        self.path = path
        self.prefer_cheaper = False  # the budget switch: every request starts at the cheapest tier
        self._text: str | None = None

    def reload(self) -> bool:
        """Re-read the file; whether its text changed."""
        try:
            text = Path(self.path).read_text() if self.path else ""
        except OSError:
            text = ""
        if text == self._text:
            return False
        self._text = text
        try:
            state = RouterState.parse_yaml(text)
        except ValueError as exc:
            log.warning("router state %s unreadable (%s); back to the defaults", self.path, exc)
            state = RouterState()
        cheaper = state.prefer_cheaper
        if cheaper != self.prefer_cheaper:
            log.info("preferCheaper %s (budget)", "on: every request starts at the cheapest tier" if cheaper else "off")
        self.prefer_cheaper = cheaper
        return True
