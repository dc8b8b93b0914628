"""The router's configuration file: what the operator renders into a ConfigMap and the local runtime writes to disk.

It reuses the API's models for the concepts they share (tasks, cascade, cost) so a field keeps one name from the
RoutingPolicy down to the router. Nothing here knows about Kubernetes: tiers are plain OpenAI-compatible URLs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, Field

from .common import ApiModel, WireModel
from .modeltier import TierCost
from .routingpolicy import Cascade, Task


class TierEndpoint(ApiModel):
    name: str = Field(description="ModelTier name.")
    served_model_name: str = Field(description="`model` sent to the tier.")
    base_url: str = Field(description="OpenAI-compatible base URL ending in /v1.")
    cost: TierCost
    api_key_env: str | None = Field(default=None, description="Environment variable holding the API key (from a Secret).")
    timeout_seconds: float = Field(default=60, gt=0)
    adapters: list[str] = Field(default_factory=list, description="LoRA adapters the tier serves (model names).")


class RouterVersions(ApiModel):
    artifact_dir: str = Field(description="Directory holding one sub-directory per router version.")
    # "stable" is the name in Python, as in the rollout figures; router.yaml keeps writing `current` (the CRD's
    # status.router.current spelling) for a release, so that sidecar routers of the previous image, which reject
    # unknown keys, still read it; both spellings are read.
    stable: str | None = Field(default=None, validation_alias=AliasChoices("current", "stable"),
                               serialization_alias="current", description="Stable version; None = newest in "
                               "artifact_dir.")
    canary: str | None = Field(default=None)
    canary_percent: int = Field(default=0, ge=0, le=100)


class RouterAuth(ApiModel):
    """Credentials the router checks: directories of a mounted Secret's files (file name = labeller or client name,
    content = its bearer token), re-read every few seconds so a rotated Secret takes effect without a restart."""

    labellers_dir: str | None = Field(default=None, description="Labeller tokens: only feedback carrying one of them "
                                      "(`Authorization: Bearer`) may move thresholds. None: feedback is logged but "
                                      "never moves a threshold.")
    client_keys_dir: str | None = Field(default=None, description="Client API keys: when set, `/v1/*` requires one "
                                        "(`Authorization: Bearer`); the client's name is recorded in routing events.")


class RouterState(WireModel):
    """The `<policy>-router-state` file (`RouterConfig.state_path`): switches the operator flips without restarting
    the routers. Unknown keys are ignored (an operator newer than the router may add switches)."""

    prefer_cheaper: bool = Field(default=False, description="The budget's PreferCheaper switch: every request starts "
                                 "at the cheapest tier.")

    @classmethod
    def parse_yaml(cls, text: str) -> "RouterState":
        """The state in `text` (empty: the defaults); raises ValueError (pydantic's ValidationError among them) on
        text that is not such a mapping."""
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"not YAML: {exc}") from exc
        return cls() if doc is None else cls.model_validate(doc)

    def dump_yaml(self) -> str:
        return str(yaml.safe_dump(self.wire()))


class RouterConfig(ApiModel):
    policy: str = Field(description="RoutingPolicy name.")
    tiers: list[TierEndpoint] = Field(min_length=1, description="Cheapest first; the last is the reference tier.")
    tasks: list[Task] = Field(min_length=1)
    default_task: str | None = None
    unknown_task: str = "UseDefault"
    cascade: Cascade = Field(default_factory=Cascade)
    router: RouterVersions
    shadow_sample_rate: float = Field(default=0.0, ge=0, le=1)
    event_log_dir: str = Field(description="Directory of the durable routing event log.")
    encoder_path: str | None = Field(default=None, description="all-MiniLM-L6-v2 folder; None = the PyPI package's.")
    state_path: str | None = Field(default=None, description="YAML of live switches the operator sets without a "
                                   "restart (`preferCheaper`); re-read every few seconds; None = none.")
    auth: RouterAuth = Field(default_factory=RouterAuth)
    admin_port: int | None = Field(default=None, ge=1, le=65535, description="When set, `/metrics` and `/routenlp/*` "
                                   "are served only on this port; the main port keeps `/v1/*`, `/healthz`, `/readyz`.")

    @classmethod
    def load(cls, path: str | Path) -> "RouterConfig":
        return cls.model_validate(yaml.safe_load(Path(path).read_text()))

    def to_k8s(self) -> dict[str, Any]:
        """router.yaml's form. A task's `answers` are still written as `labels` (their name before v0.2) until v0.3,
        so that sidecar routers of the previous image, which reject unknown keys, read it; `Task` reads both."""
        out = super().to_k8s()
        # In place of `answers`, so that router.yaml (and its hash, which rolls the routers) stays as it was.
        out["tasks"] = [{("labels" if k == "answers" else k): v for k, v in task.items() if k != "labels"}
                        for task in out["tasks"]]
        return out

    def dump_yaml(self) -> str:
        return str(yaml.safe_dump(self.to_k8s(), sort_keys=False))
