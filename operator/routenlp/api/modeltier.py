"""ModelTier (`mt`): one model of the portfolio, served by vLLM pods on GPUs or by an external endpoint."""

from __future__ import annotations

from enum import Enum
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from .common import (
    DNS_LABEL, DNS_SUBDOMAIN, ApiModel, Resource, Rule, SecretKeyRef, SpecError, StatusBase, duplicates,
)

DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"


class TierCost(ApiModel):
    """What one million tokens cost on this tier, in USD. The router's cost accounting and savings use it."""

    input_per_million: float = Field(ge=0, description="USD per million prompt (input) tokens.")
    output_per_million: float = Field(ge=0, description="USD per million generated (output) tokens.")

    def usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_million + output_tokens * self.output_per_million) / 1e6

    def blended_per_million(self) -> float:
        """One price per million tokens at 3 input tokens per output token (the usual blend for comparing models)."""
        return 0.75 * self.input_per_million + 0.25 * self.output_per_million


def relative_costs(costs: list[TierCost]) -> list[float]:
    """Each tier's blended price over the last tier's (the portfolio's reference, listed last): what a cost-weighted
    start rule (RoutingPolicy tasks[].costWeight) weighs. A free reference counts every paid tier as costing 1."""
    ref = costs[-1].blended_per_million() if costs else 0.0
    return [c.blended_per_million() / ref if ref > 0 else float(c.blended_per_million() > 0) for c in costs]


class Quantization(str, Enum):
    """Weight quantization methods vLLM supports (`--quantization`)."""

    AWQ = "awq"
    GPTQ = "gptq"
    FP8 = "fp8"
    BITSANDBYTES = "bitsandbytes"
    GGUF = "gguf"


class ModelCache(ApiModel):
    """A PersistentVolumeClaim that holds downloaded weights so restarts do not download them again."""

    claim_name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="Name of an existing PVC.")
    mount_path: str = Field(default="/models", pattern=r"^/", description="Where the PVC is mounted in the pod.")
    read_only: bool = Field(default=False, description="Mount read-only (weights pre-populated by another job).")


TOLERATION_EXISTS_NO_VALUE = Rule(
    rule="!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
    message="a toleration with operator Exists matches any value: remove value, or use operator Equal",
    field="value",
    reason="FieldValueForbidden",
)


class Toleration(ApiModel):
    """A pod toleration (the core/v1 shape), e.g. for GPU node taints."""

    RULES = (TOLERATION_EXISTS_NO_VALUE,)

    # Lengths are bounded so the API server can estimate the cost of the CEL rule per toleration.
    key: str | None = Field(
        default=None, max_length=316, description="Taint key to tolerate; empty with `Exists` tolerates all taints."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="`Equal` (default in Kubernetes) compares `value`; `Exists` matches any value."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value to match with operator `Equal`.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty tolerates all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="With `NoExecute`: how long the pod stays bound after the taint appears."
    )

    @model_validator(mode="after")
    def _exists_has_no_value(self) -> "Toleration":
        if self.operator == "Exists" and self.value:
            raise TOLERATION_EXISTS_NO_VALUE.error(f"value is {self.value!r}")
        return self


class GPUResources(ApiModel):
    """Accelerators and host resources of each tier pod."""

    gpu_count: int = Field(default=1, ge=0, le=16, description="GPUs per pod; should equal tensorParallelSize.")
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu", description="Extended resource name of the accelerator (e.g. `amd.com/gpu`)."
    )
    cpu: str | None = Field(default=None, description="CPU request and limit, e.g. `8`.")
    memory: str | None = Field(default=None, description="Memory request and limit, e.g. `32Gi`.")
    shm_size: str = Field(default="2Gi", description="Size of the memory-backed `/dev/shm` (NCCL, tensor parallel).")


ENGINE_GPUS_FOR_TP = Rule(
    rule="self.resources.gpuCount == 0 || self.resources.gpuCount >= self.tensorParallelSize",
    message="spec.engine.resources.gpuCount must be >= spec.engine.tensorParallelSize (one replica is split over "
    "tensorParallelSize GPUs): raise gpuCount, lower tensorParallelSize, or set gpuCount 0 for CPU serving",
    field="resources.gpuCount",
)

# Model source forms: pvc://claim/path, s3:// or gs:// URIs, an absolute path, or a hub id `org/name`.
MODEL_SOURCE = r"^(pvc://[a-z0-9][-a-z0-9.]*/.*|s3://.+|gs://.+|/.+|[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?)$"


class Engine(ApiModel):
    """How vLLM serves the model inside the cluster."""

    RULES = (ENGINE_GPUS_FOR_TP,)

    model: str = Field(
        min_length=1,
        pattern=MODEL_SOURCE,
        description=(
            "Model source: a model hub id (`Qwen/Qwen2.5-7B-Instruct`), a PVC path (`pvc://claim/path`), an object "
            "store URI (`s3://bucket/prefix`) or an absolute local path inside the image."
        ),
    )
    revision: str | None = Field(default=None, description="Model revision (branch, tag or commit) for hub models.")
    image: str = Field(default=DEFAULT_VLLM_IMAGE, description="vLLM OpenAI-server image (pin a tag or digest).")
    tensor_parallel_size: int = Field(default=1, ge=1, le=16, description="GPUs one model replica is split over.")
    max_model_len: int | None = Field(default=None, ge=16, description="Context length limit (`--max-model-len`).")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use (`--gpu-memory-utilization`)."
    )
    quantization: Quantization | None = Field(default=None, description="Weight quantization method, if any.")
    dtype: str = Field(default="auto", description="Weight/activation dtype (`auto`, `bfloat16`, `float16`).")
    extra_args: list[str] = Field(
        default_factory=list, description="Extra `vllm serve` arguments, appended last (they win over derived ones)."
    )
    resources: GPUResources = Field(default_factory=GPUResources, description="GPU and host resources per pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods must run on.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations, e.g. for GPU node taints."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Pod affinity/anti-affinity (the core/v1 Affinity shape), passed through unchanged.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    model_cache: ModelCache | None = Field(default=None, description="PVC that caches model weights.")
    hub_token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a model-hub token (`HF_TOKEN`) for gated models."
    )
    startup_timeout_seconds: int = Field(
        default=1800, ge=60, description="How long the startup probe waits for weights to load before restarting."
    )

    @model_validator(mode="after")
    def _gpus_cover_tensor_parallel(self) -> "Engine":
        gpus = self.resources.gpu_count
        if gpus and gpus < self.tensor_parallel_size:
            raise ENGINE_GPUS_FOR_TP.error(f"gpuCount {gpus}, tensorParallelSize {self.tensor_parallel_size}")
        return self


class External(ApiModel):
    """A tier served outside the cluster by any OpenAI-compatible API. The operator creates no pods for it."""

    base_url: str = Field(
        pattern=r"^https?://", description="OpenAI-compatible base URL, e.g. `https://api.openai.com/v1`."
    )
    model: str = Field(min_length=1, description="Model name sent in requests to that endpoint.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key; sent as a Bearer token, never logged."
    )
    timeout_seconds: float = Field(default=60, gt=0, le=600, description="Per-request timeout.")


class AdapterSpec(ApiModel):
    """A LoRA adapter served by this tier's vLLM at runtime."""

    name: str = Field(pattern=DNS_LABEL, max_length=63, description="Adapter name; requests use it as the model.")
    source: str = Field(
        min_length=1,
        max_length=1024,
        description="Where the adapter lives: `pvc://claim/path`, `s3://...` or a path in the pod.",
    )


class AdapterPolicy(str, Enum):
    """Which LoRA adapters a tier loads."""

    PINNED = "Pinned"
    ACCEPT_CAMPAIGN = "AcceptCampaign"


TIER_ONE_BACKEND = Rule(
    rule="has(self.engine) != has(self.external)",
    message="exactly one of spec.engine (vLLM pods in the cluster) or spec.external (an OpenAI-compatible endpoint) "
    "must be set",
    field="engine",
)
TIER_ADAPTERS_NEED_ENGINE = Rule(
    rule="!has(self.external) || !has(self.adapters) || size(self.adapters) == 0",
    message="spec.adapters needs spec.engine: external tiers cannot load LoRA adapters; remove spec.adapters",
    field="adapters",
    reason="FieldValueForbidden",
)
TIER_CAMPAIGN_NEEDS_ENGINE = Rule(
    rule="!has(self.external) || self.adapterPolicy == 'Pinned'",
    message="spec.adapterPolicy AcceptCampaign needs spec.engine: external tiers cannot load campaign adapters; "
    "use Pinned",
    field="adapterPolicy",
    reason="FieldValueForbidden",
)


class ModelTierSpec(ApiModel):
    """One model of the portfolio: what it is, what it costs, and how it is served."""

    RULES = (TIER_ONE_BACKEND, TIER_ADAPTERS_NEED_ENGINE, TIER_CAMPAIGN_NEEDS_ENGINE)

    served_model_name: str = Field(
        min_length=1,
        max_length=253,
        description="Name the tier answers to (`model` in OpenAI requests); the router calls the tier with it.",
    )
    cost: TierCost = Field(description="Price of this tier per million tokens (USD).")
    engine: Engine | None = Field(default=None, description="Serve with vLLM pods in the cluster (exactly one of engine/external).")
    external: External | None = Field(default=None, description="Use an external OpenAI-compatible endpoint (exactly one of engine/external).")
    replicas: int = Field(default=1, ge=0, le=1000, description="vLLM pods (engine tiers); the scale subresource sets it.")
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        max_length=64,
        description="LoRA adapters loaded into the running vLLM pods without restarting them (names unique).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    adapter_policy: AdapterPolicy = Field(
        default=AdapterPolicy.PINNED,
        description="`Pinned`: only the adapters listed here. `AcceptCampaign`: also load adapters that "
        "DistillationCampaigns produce for this tier.",
    )
    max_loras: int = Field(default=4, ge=1, le=64, description="Adapters one vLLM pod holds at once (`--max-loras`).")
    max_lora_rank: int = Field(default=16, ge=1, le=512, description="Largest adapter rank accepted (`--max-lora-rank`).")

    @model_validator(mode="after")
    def _exactly_one_backend(self) -> "ModelTierSpec":
        if (self.engine is None) == (self.external is None):
            raise TIER_ONE_BACKEND.error()
        if self.external is not None and self.adapters:
            raise TIER_ADAPTERS_NEED_ENGINE.error()
        if self.external is not None and self.adapter_policy != AdapterPolicy.PINNED:
            raise TIER_CAMPAIGN_NEEDS_ENGINE.error()
        # The CRD states this as a list-map keyed by name (the API server rejects duplicates itself).
        dup = duplicates([a.name for a in self.adapters])
        if dup:
            raise SpecError("adapters", f"spec.adapters names must be unique; repeated: {', '.join(dup)}")
        return self

    @property
    def lora_enabled(self) -> bool:
        return bool(self.adapters) or self.adapter_policy == AdapterPolicy.ACCEPT_CAMPAIGN


class AdapterStatus(ApiModel):
    """One adapter as the operator sees it in the running pods."""

    name: str = Field(description="Adapter name.")
    source: str = Field(description="Where it was loaded from.")
    origin: Literal["Spec", "Campaign"] = Field(description="Listed in the spec, or produced by a campaign.")
    loaded: bool = Field(description="True only when every ready pod lists it in `/v1/models`.")
    loaded_pods: int = Field(default=0, description="Ready pods that list it.")
    message: str = Field(default="", description="Why it is not loaded, when it is not.")


class ModelTierStatus(StatusBase):
    """What the operator observed about the tier."""

    phase: Literal["Pending", "Progressing", "Ready", "Degraded", "Failed"] | None = Field(
        default=None, description="Pending, Progressing, Ready, Degraded or Failed."
    )
    replicas: int | None = Field(default=None, description="Pods the Deployment has.")
    ready_replicas: int | None = Field(default=None, description="Pods that pass vLLM's /health.")
    selector: str | None = Field(default=None, description="Label selector of the pods (scale subresource).")
    endpoint: str | None = Field(default=None, description="OpenAI-compatible base URL of the tier.")
    adapters: list[AdapterStatus] = Field(default_factory=list, description="Each adapter and whether it is really loaded.")


class ModelTier(Resource):
    """One model of the portfolio, served by vLLM pods on GPUs or by an external OpenAI-compatible endpoint."""

    KIND: ClassVar[str] = "ModelTier"
    PLURAL: ClassVar[str] = "modeltiers"
    SHORT_NAMES: ClassVar[list[str]] = ["mt"]

    kind: Literal["ModelTier"] = "ModelTier"
    spec: ModelTierSpec
    status: ModelTierStatus | None = None
