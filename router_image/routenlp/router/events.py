"""Routing events: one JSON object per line in the event log that the router writes and the trainer reads.

The schema is the contract between the router (writer) and the trainer/bench (readers); change it only additively.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from routenlp.api.common import ApiModel


class TierAttempt(ApiModel):
    tier: str
    model: str = Field(description="Model name sent (served name or LoRA adapter).")
    predicted: float | None = Field(default=None, description="Router's predicted acceptance for this tier.")
    score: float | None = Field(default=None, description="Confidence score of the answer.")
    threshold: float | None = Field(default=None, description="Conformal threshold in force (None: uncalibrated).")
    accepted: bool = False
    response: str | None = Field(default=None, description="Answer text (needed for distillation).")
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    error: str | None = None


class RoutingEvent(ApiModel):
    type: Literal["request"] = "request"
    request_id: str
    time: float = Field(description="Unix time the request arrived.")
    policy: str
    task: str
    query: str = Field(description="Text of the prompt (last user message) used for routing and clustering.")
    router_version: str | None = None
    attempts: list[TierAttempt] = Field(default_factory=list, description="Tiers tried, in order.")
    final_tier: str | None = None
    escalations: int = 0
    outcome: Literal["accepted", "fallback", "error"] = "accepted"
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    shadow: bool = Field(default=False, description="A shadow call to the reference tier was scheduled.")
    explored: bool = Field(default=False, description="On the exploration sample (the shadow hash): every attempt is "
                           "labelled against the reference, by the shadow call or, when the request reached the "
                           "reference, by the judge.")


class FeedbackEvent(ApiModel):
    type: Literal["feedback"] = "feedback"
    request_id: str
    time: float
    tier: str | None = Field(default=None, description="Tier whose answer is labelled (default: the final tier).")
    accepted: bool | None = None
    score: float | None = Field(default=None, ge=0, le=1)
    source: Literal["user", "shadow", "judge"] = "user"
    reference_response: str | None = Field(default=None, description="Reference tier's answer (shadow labels).")


def random_sample_label(event: RoutingEvent, attempt: TierAttempt) -> bool:
    """Whether a label of `attempt` belongs to a random sample of the attempts reaching its tier (the labels online
    calibration, the allRequests risk and the trainer's calibration may use): the request was on the exploration
    sample, picked by a hash of its id before any tier answered (`explored`; `shadow` for logs written before that
    field), or the tier had no threshold (every attempt then escalates to the reference and is judged). Labels of
    other accepted answers (user feedback) are selective."""
    return event.explored or event.shadow or attempt.threshold is None
