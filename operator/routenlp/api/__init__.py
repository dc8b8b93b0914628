"""The RouteNLP API (`routenlp.io/v1alpha1`): pydantic models are the single source of truth; CRDs are generated."""

from __future__ import annotations

from typing import Any

from .campaign import DistillationCampaign, DistillationCampaignSpec, DistillationCampaignStatus
from .common import API_VERSION, GROUP, VERSION, Condition, Resource, parse_duration
from .modeltier import ModelTier, ModelTierSpec, ModelTierStatus
from .routingpolicy import RoutingPolicy, RoutingPolicySpec, RoutingPolicyStatus

KINDS: dict[str, type[Resource]] = {m.KIND: m for m in (ModelTier, RoutingPolicy, DistillationCampaign)}


def parse(doc: dict[str, Any]) -> Resource:
    """Parse one YAML document into its resource model (raises pydantic.ValidationError or ValueError)."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not a RouteNLP kind (one of {', '.join(KINDS)})")
    return KINDS[kind].model_validate(doc)


__all__ = [
    "API_VERSION", "GROUP", "VERSION", "KINDS", "parse", "parse_duration", "Condition",
    "ModelTier", "ModelTierSpec", "ModelTierStatus",
    "RoutingPolicy", "RoutingPolicySpec", "RoutingPolicyStatus",
    "DistillationCampaign", "DistillationCampaignSpec", "DistillationCampaignStatus",
]
