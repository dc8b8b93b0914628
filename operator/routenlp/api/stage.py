"""A trainer stage's result: the one-line JSON summary every stage prints last and writes to its container's
termination message (routenlp.trainer.manifest writes a `StageSummary`), which the operator reads from the terminated
Job container to move a DistillationCampaign on (`StageResult`: the fields it uses, from the summary or its
`metrics`). Both keep fields they do not name: stages add metrics without a change here."""

from __future__ import annotations

from typing import Any

from pydantic import AliasChoices, ConfigDict, Field, field_validator

from .common import WireModel


class StageSummary(WireModel):
    """What a stage prints: which stage ran, whether it was skipped (its inputs and parameters unchanged), its
    manifest and the metrics it chose to report."""

    model_config = ConfigDict(extra="allow")

    stage: str
    status: str = "Succeeded"
    skipped: bool = False
    manifest: str | None = None
    key: str | None = None  # the manifest's key (stage, inputs' content, parameters)
    seconds: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class StageCluster(WireModel):
    """One cluster of escalation failures as the clustering stage reports it."""

    id: int | None = None
    size: int | None = None
    cost_usd: float | None = None
    escalation_rate: float | None = None
    examples: list[Any] | None = None


class StageResult(WireModel):
    """What the operator reads from a summary (camelCase or the trainer's snake_case; None: not reported)."""

    model_config = ConfigDict(extra="allow")

    clusters: list[StageCluster] | int | None = None  # Clustering: the clusters, or their count only
    failures: int | None = None  # Clustering: escalation failures clustered
    adapter: str | None = None  # Distilling, RetrainingRouter: `name@source`
    quality_before: float | None = None  # Evaluating
    quality_after: float | None = None
    quality_gain: float | None = None
    regression: float | None = None
    teacher_quality: float | None = None
    passed: bool | None = None  # Evaluating, when it reports no quality figures
    router_version: str | None = Field(  # RetrainingRouter (the retrain stage calls it `version`)
        default=None, validation_alias=AliasChoices("routerVersion", "router_version", "version"))

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter_ref(cls, value: Any) -> Any:
        """An adapter reported as {name, source | uri} reads as `name@source`."""
        if isinstance(value, dict):
            return f"{value.get('name')}@{value.get('source') or value.get('uri')}"
        return value

    @field_validator("router_version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value

    @classmethod
    def of(cls, summary: dict[str, Any]) -> StageResult:
        """From a summary: its fields and its metrics' (the trainer nests its figures under `metrics`; they win).
        Raises pydantic's ValidationError on fields of the wrong type."""
        metrics = summary.get("metrics")
        return cls.model_validate({**summary, **(metrics if isinstance(metrics, dict) else {})})
