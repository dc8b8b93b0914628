"""Evaluate a CRD schema's CEL rules and list-type constraints on an object, the way the API server does: defaults
first, then every `x-kubernetes-validations` rule with `self` bound to its node. Used by the tests to prove the CEL
says what the pydantic validators say (needs `cel-python`, a dev dependency; the operator image does not)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .crdgen import apply_defaults, prune_nulls


@dataclass(frozen=True)
class Violation:
    path: str  # where the rule sits (its fieldPath appended when it has one)
    rule: str
    message: str


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


_PROGRAMS: dict[str, Any] = {}  # rule text -> compiled program (compiling is the slow part)


def _program(rule: str) -> Any:
    import celpy  # noqa: PLC0415

    if rule not in _PROGRAMS:
        env = celpy.Environment()
        _PROGRAMS[rule] = env.program(env.compile(rule))
    return _PROGRAMS[rule]


def _cel_failures(schema: dict[str, Any], obj: Any, path: str, out: list[Violation]) -> None:
    import celpy  # noqa: PLC0415

    for r in schema.get("x-kubernetes-validations", []):
        where = path + r.get("fieldPath", "") if path else r.get("fieldPath", "").lstrip(".")
        try:
            ok = _program(r["rule"]).evaluate({"self": celpy.json_to_cel(obj)})  # type: ignore[attr-defined]
        except celpy.CELEvalError as exc:  # type: ignore[attr-defined]  # the API server reports a failing evaluation as invalid too
            out.append(Violation(where, r["rule"], f"{r['message']} (evaluation error: {exc})"))
            continue
        if isinstance(ok, celpy.CELEvalError) or not bool(ok):  # type: ignore[attr-defined]
            out.append(Violation(where, r["rule"], r["message"]))
    if isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                _cel_failures(sub, obj[name], _join(path, name), out)
        if isinstance(schema.get("additionalProperties"), dict):
            for key, value in obj.items():
                _cel_failures(schema["additionalProperties"], value, _join(path, key), out)
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            _cel_failures(schema["items"], item, f"{path}[{i}]", out)


def cel_violations(schema: dict[str, Any], obj: Any) -> list[Violation]:
    """Every CEL rule of `schema` that `obj` breaks, after nulls are pruned and the schema's defaults applied."""
    out: list[Violation] = []
    _cel_failures(schema, apply_defaults(schema, prune_nulls(obj)), "", out)
    return out


def list_type_violations(schema: dict[str, Any], obj: Any, path: str = "") -> list[Violation]:
    """Duplicates in `x-kubernetes-list-type: set` lists and duplicate keys in `map` lists."""
    out: list[Violation] = []
    if isinstance(obj, list) and "items" in schema:
        kind = schema.get("x-kubernetes-list-type")
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen = []
        for i, item in enumerate(obj):
            key = tuple(item.get(k) for k in keys) if kind == "map" and isinstance(item, dict) else item
            if kind in ("set", "map") and key in seen:
                out.append(Violation(f"{path}[{i}]", f"x-kubernetes-list-type: {kind}", f"duplicate value {key!r}"))
            seen.append(key)
            out += list_type_violations(schema["items"], item, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in obj:
                out += list_type_violations(sub, obj[name], _join(path, name))
    return out
