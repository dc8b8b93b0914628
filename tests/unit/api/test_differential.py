"""Differential test: for documents made by mutating valid ones (hypothesis), `routenlp validate` (the pydantic
models, strict) accepts exactly when the API server would (the CRD's schema with unknown fields rejected, its list
types, and its CEL rules after null pruning and defaulting), except for the checks only `routenlp validate` makes
(task regular expressions, request models claimed twice, resource quantities: the CRD types those as free strings)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routenlp.api import KINDS
from routenlp.api.celeval import cel_violations, list_type_violations
from routenlp.api.crdgen import prune_nulls
from routenlp.cli.validate import Document, check_document

ROOT = Path(__file__).resolve().parents[3]
BASES = [d for f in sorted((ROOT / "examples" / "portfolio").glob("*.yaml")) + [ROOT / "examples" / "quickstart.yaml",
                                                                                 ROOT / "examples" / "campaign-gitops.yaml"]
         for d in yaml.safe_load_all(f.read_text()) if d and d.get("kind") in KINDS]
# Messages of the rules the API server cannot check (documented in docs/api.md's intro: `routenlp validate` only).
OFFLINE_ONLY = ("not a valid Python regular expression", "request model ", "not a Kubernetes resource quantity")
DELETE = "<delete>"
STRINGS = ["", "a", "ok-name", "Bad_Name", "x" * 70, "x" * 400, "Qwen/Qwen2.5-7B-Instruct", "not a model!",
           "0 3 * * *", "daily", "10m", "10 minutes", "s3://bucket/x", "https://api.example.com/v1", "api.example.com",
           "(unclosed", "support-intent", "small", "mid", "frontier", "Exists", "Equal", "true"]
INTEGERS = [-1, 0, 1, 2, 4, 16, 17, 64, 65, 200, 1001, 100000]
NUMBERS = [-0.5, 0, 0.02, 0.5, 0.999, 1, 1.5, 100]


def leaves(schema: dict, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """(path, schema) of every field under spec, lists entered at index 0 (the mutation needs that item to exist)."""
    out = [(path, schema)] if path else []
    for name, sub in schema.get("properties", {}).items():
        out += leaves(sub, path + (name,))
    if isinstance(schema.get("items"), dict):
        out += leaves(schema["items"], path + (0,))
    return out


def values_for(schema: dict) -> list[Any]:
    t = schema.get("type")
    extra = list(schema.get("enum", [])) + ([schema["default"]] if "default" in schema else [])
    if t == "integer":
        return INTEGERS + ["3", 2.5] + extra
    if t == "number":
        return NUMBERS + ["0.5"] + extra
    if t == "boolean":
        return [True, False, "yes"]
    if t == "string":
        return STRINGS + [3] + extra
    if t == "array":
        return [[], ["a", "a"], [{}], "x"]
    return [{}, "x", None]


def mutate(doc: dict, path: tuple, value: Any) -> bool:
    node: Any = doc
    for part in path[:-1]:
        if isinstance(part, int):
            if not isinstance(node, list) or not node:
                return False
            node = node[part]
        else:
            if not isinstance(node, dict):
                return False
            node = node.setdefault(part, {})
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or not node:
            return False
        if value is DELETE:
            node.pop(last)
        else:
            node[last] = value
    elif isinstance(node, dict):
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    else:
        return False
    return True


@st.composite
def mutated(draw, schemas: dict) -> dict:
    doc = copy.deepcopy(draw(st.sampled_from(BASES)))
    candidates = [p for p in leaves(schemas[doc["kind"]]) if p[0][0] in ("spec", "metadata")]
    for _ in range(draw(st.integers(1, 3))):
        path, schema = draw(st.sampled_from(candidates))
        value = draw(st.sampled_from(values_for(schema) + [DELETE]))
        mutate(doc, ("spec",) + path[1:] if path[0] == "spec" else path, copy.deepcopy(value))
    return doc


def test_pydantic_and_the_api_server_agree(schemas, strict_validators):
    @settings(max_examples=400, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def check(data):
        doc = data.draw(mutated(schemas))
        kind = doc["kind"]
        errors = [f for f in check_document(Document("d.yaml", 1, doc)) if f.severity == "error"]
        pruned = prune_nulls(doc)
        server = [f"schema: {e.message}" for e in strict_validators[kind].iter_errors(pruned)]
        if not server:  # the API server runs CEL only on schema-valid objects
            server += [f"cel: {v.path}: {v.message}" for v in cel_violations(schemas[kind], pruned)]
            server += [f"list: {v.path}: {v.message}" for v in list_type_violations(schemas[kind], pruned)]
        if errors and all(f.message.startswith(OFFLINE_ONLY) for f in errors):
            return  # a rule only `routenlp validate` can check: the server's verdict depends on the rest
        assert bool(errors) == bool(server), (
            f"validate: {[(e.path, e.message) for e in errors]}\nserver: {server}\ndoc: {doc['spec']}")

    check()
