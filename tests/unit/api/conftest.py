"""Fixtures of the API tests: the generated schemas, and JSON-schema validators as strict as the API server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest

from routenlp.api import KINDS, crdgen

ROOT = Path(__file__).resolve().parents[3]


def strict_schema(schema: Any, at_root: bool = True) -> Any:
    """The schema as `kubectl apply --validate=strict` (server-side field validation) applies it: unknown fields
    fail. Metadata is left open (Kubernetes owns its fields)."""
    if isinstance(schema, dict):
        out = {k: (v if k == "metadata" and at_root else strict_schema(v, False)) for k, v in schema.items()}
        if at_root and "properties" in out:
            out["properties"] = {k: (v if k == "metadata" else strict_schema(v, False))
                                 for k, v in schema["properties"].items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict_schema(v, False) for v in schema]
    return schema


@pytest.fixture(scope="session")
def schemas() -> dict[str, dict[str, Any]]:
    return {kind: crdgen.openapi_schema(cls) for kind, cls in KINDS.items()}


@pytest.fixture(scope="session")
def strict_validators(schemas) -> dict[str, jsonschema.Draft4Validator]:
    # OpenAPI 3.0 schemas use draft-4 semantics (boolean exclusiveMinimum/exclusiveMaximum).
    return {kind: jsonschema.Draft4Validator(strict_schema(s)) for kind, s in schemas.items()}
