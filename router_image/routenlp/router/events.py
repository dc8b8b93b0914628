"""Routing events: one JSON object per line in the event log that the router writes and the trainer reads.

The schema is the contract between the router (writer) and the trainer/bench (readers); change it only additively.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from routenlp.api.common import ApiModel


# accepted: a threshold or the chain end took the answer; fallback: answered by a tier that did not accept it (the
# plan ran out); error: no tier answered.
RoutingOutcome = Literal["accepted", "fallback", "error"]
LabelSource = Literal["user", "shadow", "judge"]

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
    outcome: RoutingOutcome = "accepted"
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    shadow: bool = Field(default=False, description="A shadow call to the reference tier was scheduled.")
    explored: bool = Field(default=False, description="On the exploration sample (the shadow hash): every attempt is "
                           "labelled against the reference, by the shadow call or, when the request reached the "
                           "reference, by the judge.")
    client: str | None = Field(default=None, description="Client API key name that sent the request "
                               "(auth.clientKeysDir).")


class FeedbackEvent(ApiModel):
    type: Literal["feedback"] = "feedback"
    request_id: str
    time: float
    tier: str | None = Field(default=None, description="Tier whose answer is labelled (default: the final tier).")
    accepted: bool | None = None
    score: float | None = Field(default=None, ge=0, le=1)
    source: LabelSource = "user"
    reference_response: str | None = Field(default=None, description="Reference tier's answer (shadow labels).")
    labeller: str | None = Field(default=None, description="Authenticated labeller who sent it (source user): set by "
                                 "the router only after checking the labeller's bearer token.")
    client: str | None = Field(default=None, description="Client API key name that sent it (auth.clientKeysDir).")


def random_sample_label(event: RoutingEvent, attempt: TierAttempt) -> bool:
    """Whether a label of `attempt` belongs to a random sample of the attempts reaching its tier (the labels online
    calibration, the allRequests risk and the trainer's calibration may use): the request was on the exploration
    sample, picked by a hash of its id before any tier answered (`explored`; `shadow` for logs written before that
    field), or the tier had no threshold (every attempt then escalates to the reference and is judged). Labels of
    other accepted answers (user feedback) are selective."""
    return event.explored or event.shadow or attempt.threshold is None


# Label precedence, shared by the router's label windows and the trainer's joins (`eventlog.labelled_attempts`).
# Everything crossing the network is hostile, so only labels the router can vouch for count.
UNTRUSTED, JUDGE, LABELLER = 0, 1, 2


def label_trust(fb: FeedbackEvent) -> int:
    """How far a label is trusted: LABELLER (an authenticated labeller's), JUDGE (the router's own comparison with
    the reference tier: `shadow`, `judge`), UNTRUSTED (any other feedback, including every user label logged before
    labellers existed). UNTRUSTED labels are logged but never count."""
    if fb.source == "user":
        return LABELLER if fb.labeller else UNTRUSTED
    return JUDGE


def label_acceptable(fb: FeedbackEvent) -> bool:
    """The label's verdict: `accepted`, else `score` >= 0.5."""
    return fb.accepted if fb.accepted is not None else (fb.score is not None and fb.score >= 0.5)


def resolve_label(current: tuple[int, bool] | None, trust: int, acceptable: bool) -> tuple[bool, bool]:
    """(take, conflict) for a new label (trust, acceptable) of an attempt whose label in force is `current`
    ((trust, acceptable), None: none yet). A later label replaces an earlier one only from the same or a more trusted
    source, so neither a user nor the judge can overturn an authenticated labeller; UNTRUSTED labels never count.
    `conflict`: the new label disagrees with the one in force (counted, whichever wins)."""
    conflict = current is not None and current[1] != acceptable
    if trust <= UNTRUSTED:
        return False, conflict
    return current is None or trust >= current[0], conflict
