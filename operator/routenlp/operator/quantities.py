"""Resource quantities in the specs (`cpu`, `memory`, `shmSize`), checked with the Kubernetes client's parser of the
quantity grammar before any object is built from them.

The CRDs type them as free strings, so without this a typo (`memory: 32GB`, `cpu: two`) surfaced only when the API
server rejected the Deployment or Job, in the operator's log. Checked here, it is the resource's own `InvalidSpec`
(runtime.invalid), and `routenlp validate` reports it offline. Kept out of routenlp.api: the router imports the API
and must not reach the kubernetes package.
"""

from __future__ import annotations

from decimal import Decimal
from typing import NamedTuple, TypeVar

from kubernetes.utils import parse_quantity

from routenlp.api import DistillationCampaign, ModelTier, RoutingPolicy

# How to write each kind of amount, for the fix a finding suggests.
CPU_FORM = "write cores or millicores, e.g. 2 or 500m"
MEMORY_FORM = "write bytes with a binary suffix, e.g. 32Gi or 512Mi"

R = TypeVar("R", ModelTier, RoutingPolicy, DistillationCampaign)


class Problem(NamedTuple):
    path: str  # camelCase, as written in YAML
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} ({self.fix})"


def parse(value: str) -> Decimal:
    """The amount `value` stands for; ValueError saying why when the API server would refuse it as a resource amount."""
    grammar = ValueError("expected a number and an optional suffix (m, k, M, G, Ki, Mi, Gi...), no blanks")
    try:
        amount = parse_quantity(value)
    except ValueError:
        raise grammar from None
    # What the client's parser lets through but the API server refuses: blanks, '_', non-ASCII digits, NaN and
    # Infinity (Python's Decimal syntax, which it ends in), an upper-case 'K' (only 'Ki' is upper case).
    if (not value.isascii() or any(c.isspace() or c == "_" for c in value) or not amount.is_finite()
            or value.endswith("K")):
        raise grammar
    if amount < 0:
        raise ValueError("negative")
    return amount


def _fields(resource: ModelTier | RoutingPolicy | DistillationCampaign) -> list[tuple[str, str | None, str]]:
    """(path, value, form) of each quantity the operator writes into an object; None: not set. An empty cpu or
    memory of a tier or campaign is not set either (meta.host_resources leaves it out)."""
    if isinstance(resource, ModelTier):
        if resource.spec.engine is None:
            return []  # an external tier runs nothing
        res = resource.spec.engine.resources
        return [("spec.engine.resources.cpu", res.cpu or None, CPU_FORM),
                ("spec.engine.resources.memory", res.memory or None, MEMORY_FORM),
                ("spec.engine.resources.shmSize", res.shm_size, MEMORY_FORM)]
    if isinstance(resource, RoutingPolicy):
        dep = resource.spec.deployment
        return [("spec.deployment.cpu", dep.cpu, CPU_FORM), ("spec.deployment.memory", dep.memory, MEMORY_FORM)]
    stage = resource.spec.resources
    return [("spec.resources.cpu", stage.cpu or None, CPU_FORM),
            ("spec.resources.memory", stage.memory or None, MEMORY_FORM)]


def problems(resource: ModelTier | RoutingPolicy | DistillationCampaign) -> list[Problem]:
    """Each quantity of the resource that the API server would refuse."""
    out = []
    for path, value, form in _fields(resource):
        if value is None:
            continue
        try:
            parse(value)
        except ValueError as exc:
            out.append(Problem(path, f"not a Kubernetes resource quantity (got {value!r}): {exc}", form))
    return out


def checked(resource: R) -> R:
    """The resource itself when its quantities are valid, else ValueError naming each bad field (the reconciles
    report it as InvalidSpec, like a pydantic ValidationError)."""
    found = problems(resource)
    if found:
        raise ValueError("; ".join(map(str, found)))
    return resource
