"""`routenlp validate -f FILE|DIR`: check RouteNLP manifests offline, with the rules the API server applies (the CRD
schema and its CEL rules, mirrored by the pydantic models) plus checks across the documents given together.

Every finding names the file, line, document, field path (camelCase, as written in YAML), what is wrong and the
fix. Exit status: 0 when there is no error (warnings allowed unless --strict), 1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import difflib
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from routenlp.api import GROUP, KINDS, VERSION, RoutingPolicy
from routenlp.api.common import SpecError
from routenlp.api.crdgen import openapi_schema, prune_nulls
from routenlp.api.docgen import constraints
from routenlp.api.routingpolicy import deprecations

try:  # the kubernetes client parses resource quantities: the operator extra has it, the router and trainer images not
    from routenlp.operator.quantities import problems as quantity_problems
except ImportError:
    quantity_problems = None

Segment = str | int
YAML_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class Finding:
    severity: str  # error | warning | note
    source: str
    document: int  # 1-based position in its file
    kind: str
    name: str
    path: str  # camelCase field path, e.g. spec.cascade.riskLevel ("" = the whole document)
    message: str
    fix: str = ""
    line: int | None = None


@dataclass
class Document:
    source: str
    index: int
    data: Any
    node: yaml.Node | None = field(default=None, repr=False)
    model: BaseModel | None = None  # the parsed resource when it is a valid RouteNLP document

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", "")) if isinstance(self.data, dict) else ""

    @property
    def name(self) -> str:
        meta = self.data.get("metadata") if isinstance(self.data, dict) else None
        return str(meta.get("name", "")) if isinstance(meta, dict) else ""

    @property
    def namespace(self) -> str | None:
        meta = self.data.get("metadata") if isinstance(self.data, dict) else None
        return meta.get("namespace") if isinstance(meta, dict) else None

    def finding(self, severity: str, path: list[Segment] | str, message: str, fix: str = "") -> Finding:
        segments = parse_path(path) if isinstance(path, str) else path
        return Finding(severity, self.source, self.index, self.kind, self.name, render_path(segments), message, fix,
                       line_of(self.node, segments))


# --- paths and YAML positions ---

def render_path(segments: Iterable[Segment]) -> str:
    out = ""
    for s in segments:
        out += f"[{s}]" if isinstance(s, int) else (f".{s}" if out else str(s))
    return out


def parse_path(path: str) -> list[Segment]:
    return [int(i) if i else k for k, i in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path)]


def line_of(node: yaml.Node | None, segments: list[Segment]) -> int | None:
    """1-based line of the deepest node along the path that exists (the field itself, or its parent when absent)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for seg in segments:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(seg, str):
            nxt = next(((k, v) for k, v in node.value if k.value == seg), None)
            if nxt:
                line, node = nxt[0].start_mark.line + 1, nxt[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(seg, int) and seg < len(node.value):
            node = node.value[seg]
            line = node.start_mark.line + 1
            nxt = node
        if nxt is None:
            break
    return line


def load_documents(text: str, source: str) -> tuple[list[Document], list[Finding]]:
    docs: list[Document] = []
    loader = yaml.SafeLoader("")
    try:
        for i, node in enumerate(yaml.compose_all(text), start=1):
            data = loader.construct_document(node) if node is not None else None
            docs.append(Document(source, i, data, node))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        return docs, [Finding("error", source, len(docs) + 1, "", "", "", f"not valid YAML: {problem}",
                              "fix the YAML syntax (indentation, quoting, ':' after keys)", line)]
    return docs, []


# --- one document ---

_SCHEMAS: dict[str, dict[str, Any]] = {}


def _schema(kind: str) -> dict[str, Any]:
    if kind not in _SCHEMAS:
        _SCHEMAS[kind] = openapi_schema(KINDS[kind])
    return _SCHEMAS[kind]


def schema_at(schema: dict[str, Any] | None, segments: list[Segment]) -> dict[str, Any] | None:
    for seg in segments:
        if schema is None:
            return None
        if isinstance(seg, int):
            schema = schema.get("items")
        elif seg in schema.get("properties", {}):
            schema = schema["properties"][seg]
        elif isinstance(schema.get("additionalProperties"), dict):
            schema = schema["additionalProperties"]
        else:
            return None
    return schema


def _explain(kind: str, err: dict[str, Any], segments: list[Segment]) -> tuple[str, str]:
    """(message, fix) for one pydantic error that is not one of our own rules."""
    root = _schema(kind)
    here = schema_at(root, segments) or {}
    what = here.get("description", "")
    typ, msg, value = err["type"], err["msg"], err.get("input")
    if typ == "missing":
        return "required field is missing", f"add {segments[-1]}" + (f": {what}" if what else "")
    if typ == "extra_forbidden":
        parent = schema_at(root, segments[:-1]) or {}
        known = list(parent.get("properties", {}))
        close = difflib.get_close_matches(str(segments[-1]), known, n=1)
        hint = f"rename it to {close[0]!r} or remove it" if close else "remove it"
        return "unknown field", f"{hint}; fields allowed here: {', '.join(known) or 'none'}"
    shown = ""
    if isinstance(value, (str, int, float, bool)):
        shown = f" (got {value!r})" if len(repr(value)) <= 80 else f" (got {repr(value)[:77]}...)"
    allowed = constraints(here)
    if not allowed and (typ.endswith("_type") or typ.endswith("_parsing")) and "type" in here:
        allowed = f"a {here['type']}"
    fix = "; ".join(x for x in (f"allowed: {allowed}" if allowed else "", what) if x)
    if typ == "string_pattern_mismatch":
        return f"does not have the expected form{shown}", fix or msg
    return f"{msg[0].lower() + msg[1:]}{shown}", fix


def check_document(doc: Document, kube_version: str | None = None) -> list[Finding]:
    data = doc.data
    if data is None:
        return []
    if not isinstance(data, dict):
        return [doc.finding("error", "", f"a Kubernetes document must be a mapping, got {type(data).__name__}",
                            "start the document with apiVersion, kind and metadata")]
    api_version, kind = str(data.get("apiVersion", "")), doc.kind
    missing = [k for k in ("apiVersion", "kind") if not data.get(k)]
    if missing:
        return [doc.finding("error", missing[0], f"not a Kubernetes object: {' and '.join(missing)} missing",
                            "add apiVersion and kind (e.g. routenlp.io/v1alpha1, ModelTier), or keep files that are "
                            "not manifests out of the folder")]
    if api_version.split("/")[0] == GROUP or kind in KINDS:
        if kind not in KINDS:
            return [doc.finding("error", "kind", f"{kind!r} is not a RouteNLP kind",
                                f"use one of {', '.join(KINDS)}")]
        if api_version != f"{GROUP}/{VERSION}":
            return [doc.finding("error", "apiVersion", f"{api_version!r} is not served",
                                f"use apiVersion: {GROUP}/{VERSION}")]
        return _check_routenlp(doc)
    return _check_other(doc, kube_version)


def _check_routenlp(doc: Document) -> list[Finding]:
    try:
        # Strict JSON-mode validation: like the API server, no "5" for an integer or "yes" for a boolean.
        # Null fields are dropped first, as the API server prunes them (then defaults apply).
        text = json.dumps(prune_nulls(doc.data), default=str)
        doc.model = KINDS[doc.kind].model_validate_json(text, strict=True)
    except ValidationError as exc:
        findings = []
        for err in exc.errors(include_url=False):
            segments: list[Segment] = list(err["loc"])
            rule = (err.get("ctx") or {}).get("error")
            if isinstance(rule, SpecError):  # one of our rules: the message already says what to do
                findings.append(doc.finding("error", segments + parse_path(rule.path), rule.message))
            else:
                message, fix = _explain(doc.kind, err, segments)
                findings.append(doc.finding("error", segments, message, fix))
        return findings
    # Deprecated fields: what the admission webhook warns about and the operator reports as a DeprecatedField Event.
    found = [doc.finding("warning", d.path, f"deprecated since {d.since}, accepted until {d.until}",
                         f"rename it: {d.use} (same meaning)")
             for d in (deprecations(doc.model.spec) if isinstance(doc.model, RoutingPolicy) else [])]
    if quantity_problems is None:
        return found + [doc.finding("note", "", "resource quantities (cpu, memory, shmSize) not checked: install "
                                                "routenlp[operator] for the kubernetes client that parses them")]
    return found + [doc.finding("error", p.path, p.message, p.fix) for p in quantity_problems(doc.model)]


def _check_other(doc: Document, kube_version: str | None) -> list[Finding]:
    what = f"{doc.data.get('apiVersion', '?')} {doc.kind or '?'}"
    try:
        import kubernetes_validate  # noqa: PLC0415 (optional: the dev extra has it)
    except ImportError:
        return [doc.finding("note", "", f"skipped {what}: not a RouteNLP kind (install kubernetes-validate to check "
                                        "built-in kinds)")]
    version = kube_version or kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc.data, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [doc.finding("note", "", f"skipped {what}: not a RouteNLP or built-in Kubernetes kind")]
    except kubernetes_validate.ValidationError as exc:
        return [doc.finding("error", list(exc.absolute_path), exc.message,
                            f"see `kubectl explain {doc.kind.lower()}` (Kubernetes {version} schema)")]
    return []


# --- across documents ---

def _matches(ns_a: str | None, ns_b: str | None) -> bool:
    return ns_a is None or ns_b is None or ns_a == ns_b  # no namespace: applied to whichever kubectl targets


def _find(docs: list[Document], kind: str, name: str, namespace: str | None) -> Document | None:
    return next((d for d in docs if d.kind == kind and d.name == name and _matches(d.namespace, namespace)), None)


def cross_check(docs: list[Document]) -> list[Finding]:
    """Checks that need several documents. Only documents that parsed take part (their errors are reported already)."""
    findings: list[Finding] = []
    seen: dict[tuple[str, str | None, str], Document] = {}
    for d in docs:
        if not isinstance(d.data, dict) or not d.kind or not d.name:
            continue
        key = (d.kind, d.namespace, d.name)
        if key in seen:
            first = seen[key]
            # A warning: one folder may hold several environments; applied together, the later one wins.
            findings.append(d.finding("warning", "metadata.name", f"a {d.kind} named {d.name!r} is already defined "
                                      f"in {first.source} (document {first.index}); applied together, this one "
                                      "replaces it", "rename one of them, or validate each set of manifests "
                                      "separately (one -f per set)"))
        else:
            seen[key] = d
    tiers = [d for d in docs if d.kind == "ModelTier" and d.model]
    secrets = [d for d in docs if d.kind == "Secret" and isinstance(d.data, dict)]
    for d in tiers:
        findings += _check_secret_refs(d, secrets)
    for d in docs:
        if d.kind == "RoutingPolicy" and d.model:
            findings += _check_policy(d, tiers)
            findings += _check_auth_secrets(d, secrets)
        if d.kind == "DistillationCampaign" and d.model:
            findings += _check_campaign(d, docs, tiers)
    return findings


def _check_secret_refs(tier: Document, secrets: list[Document]) -> list[Finding]:
    spec = tier.model.spec
    refs = []
    if spec.external and spec.external.api_key_secret_ref:
        refs.append(("spec.external.apiKeySecretRef", spec.external.api_key_secret_ref))
    if spec.engine and spec.engine.hub_token_secret_ref:
        refs.append(("spec.engine.hubTokenSecretRef", spec.engine.hub_token_secret_ref))
    out = []
    for path, ref in refs:
        secret = _find(secrets, "Secret", ref.name, tier.namespace)
        if secret is None:
            continue  # usually created out of band (sealed-secrets, external-secrets): nothing to check
        keys = set((secret.data.get("data") or {})) | set((secret.data.get("stringData") or {}))
        if ref.key not in keys:
            out.append(tier.finding("error", f"{path}.key", f"Secret {ref.name!r} ({secret.source}, document "
                                    f"{secret.index}) has no key {ref.key!r}",
                                    f"use one of its keys ({', '.join(sorted(keys)) or 'none'}) or add {ref.key!r}"))
    return out


MIN_TOKEN_CHARS = 16  # shorter bearer tokens can be guessed by anyone who can reach the router


def _secret_values(secret: Document) -> dict[str, str]:
    """key -> value (decoded) of a Secret manifest; the values are only measured, never printed."""
    out = {}
    for key, value in (secret.data.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(str(value), validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            out[key] = ""
    out.update({k: str(v) for k, v in (secret.data.get("stringData") or {}).items()})
    return out


def _check_auth_secrets(policy: Document, secrets: list[Document]) -> list[Finding]:
    """The Secrets spec.auth names: each given in these files must hold at least one key (one per labeller or
    client) with a token long enough not to be guessed; one not given is a note (often made out of band)."""
    auth = policy.model.spec.auth
    out = []
    for fld, name, who in (("labellersSecret", auth.labellers_secret, "labeller"),
                           ("clientKeysSecret", auth.client_keys_secret, "client")):
        if not name:
            continue
        path = f"spec.auth.{fld}"
        secret = _find(secrets, "Secret", name, policy.namespace)
        if secret is None:
            out.append(policy.finding("note", path, f"Secret {name!r} is not defined in these files",
                                      "fine if it is created out of band (sealed-secrets, external-secrets); until "
                                      "it exists the router pods do not start"))
            continue
        values = _secret_values(secret)
        if not values:
            out.append(policy.finding("error", path, f"Secret {name!r} ({secret.source}, document {secret.index}) has "
                                      f"no keys, so no {who} could authenticate",
                                      f"add one key per {who}: the key is the {who}'s name, the value its token"))
        short = sorted(k for k, v in values.items() if len(v) < MIN_TOKEN_CHARS)
        if short:
            out.append(policy.finding("warning", path, f"Secret {name!r}: the token of {', '.join(short)} is shorter "
                                      f"than {MIN_TOKEN_CHARS} characters",
                                      "use random tokens, e.g. `openssl rand -hex 32`"))
    return out


def _check_policy(policy: Document, tiers: list[Document]) -> list[Finding]:
    out = []
    found: list[tuple[int, Document]] = []
    for i, ref in enumerate(policy.model.spec.tiers):
        tier = _find(tiers, "ModelTier", ref.name, policy.namespace)
        if tier is None:
            out.append(policy.finding("warning", f"spec.tiers[{i}].name", f"ModelTier {ref.name!r} is not defined in "
                                      "these files", "fine if it exists in the cluster; otherwise the policy reports "
                                      "MissingTiers until it is created"))
        else:
            found.append((i, tier))
    for (_, a), (j, b) in zip(found, found[1:]):
        ca, cb = a.model.spec.cost, b.model.spec.cost
        if (ca.input_per_million, ca.output_per_million) != (cb.input_per_million, cb.output_per_million) and \
                ca.input_per_million >= cb.input_per_million and ca.output_per_million >= cb.output_per_million:
            out.append(policy.finding(
                "warning", f"spec.tiers[{j}]", f"tier {b.name!r} costs less than {a.name!r} before it "
                f"(${cb.input_per_million}/${cb.output_per_million} vs ${ca.input_per_million}/"
                f"${ca.output_per_million} per million input/output tokens)",
                "order spec.tiers from the cheapest to the reference tier: the router tries them in this order"))
    return out


def _check_campaign(campaign: Document, docs: list[Document], tiers: list[Document]) -> list[Finding]:
    spec = campaign.model.spec
    out = []
    policy = _find([d for d in docs if d.model], "RoutingPolicy", spec.policy_ref, campaign.namespace)
    if policy is None:
        out.append(campaign.finding("warning", "spec.policyRef", f"RoutingPolicy {spec.policy_ref!r} is not defined "
                                    "in these files", "fine if it exists in the cluster; otherwise the campaign "
                                    "waits for it"))
    else:
        order = [t.name for t in policy.model.spec.tiers]
        for path, name in (("spec.studentTier", spec.student_tier), ("spec.teacherTier", spec.teacher_tier)):
            if name not in order:
                out.append(campaign.finding(
                    "error", path, f"ModelTier {name!r} is not one of the tiers of RoutingPolicy {policy.name!r} "
                    f"({', '.join(order)})", f"pick a tier of the policy, or add {name!r} to its spec.tiers"))
        if spec.student_tier in order and spec.teacher_tier in order and \
                order.index(spec.student_tier) > order.index(spec.teacher_tier):
            out.append(campaign.finding(
                "warning", "spec.studentTier", f"student {spec.student_tier!r} comes after teacher "
                f"{spec.teacher_tier!r} in the policy's tiers, so it is not the cheaper one",
                "distill into a tier earlier (cheaper) than the teacher"))
    student = _find(tiers, "ModelTier", spec.student_tier, campaign.namespace)
    if student is not None:
        s = student.model.spec
        if s.external is not None:
            out.append(campaign.finding("error", "spec.studentTier", f"ModelTier {student.name!r} is an external "
                                        "tier and cannot load LoRA adapters", "pick a tier served with spec.engine"))
        else:
            if spec.lora.r > s.max_lora_rank:
                out.append(campaign.finding(
                    "error", "spec.lora.r", f"rank {spec.lora.r} exceeds ModelTier {student.name!r} "
                    f"spec.maxLoraRank ({s.max_lora_rank}): vLLM would refuse the adapter",
                    f"lower spec.lora.r to {s.max_lora_rank} or raise the tier's spec.maxLoraRank"))
            if spec.auto_apply and s.adapter_policy == "Pinned":
                out.append(campaign.finding(
                    "warning", "spec.studentTier", f"ModelTier {student.name!r} has adapterPolicy Pinned, so the "
                    "adapter this campaign produces will not be loaded",
                    "set the tier's spec.adapterPolicy to AcceptCampaign, or spec.autoApply to false"))
    return out


# --- files and output ---

def collect_files(paths: list[str]) -> tuple[list[str], list[str]]:
    """(files in a stable order, paths that do not exist). '-' stands for stdin."""
    files, missing = [], []
    for p in paths:
        if p == "-":
            files.append(p)
            continue
        path = Path(p)
        if path.is_dir():
            files += sorted(str(f) for f in path.rglob("*") if f.is_file() and f.suffix in YAML_SUFFIXES
                            and not any(part.startswith(".") for part in f.relative_to(path).parts))
        elif path.is_file():
            files.append(str(path))
        else:
            missing.append(p)
    return files, missing


def validate_texts(texts: list[tuple[str, str]], kube_version: str | None = None
                   ) -> tuple[list[Document], list[Finding]]:
    """Validate (source, text) pairs together: per document, then across them."""
    docs, findings = [], []
    for source, text in texts:
        file_docs, errors = load_documents(text, source)
        findings += errors
        for doc in file_docs:
            findings += check_document(doc, kube_version)
        docs += file_docs
    findings += cross_check(docs)
    order = {"error": 0, "warning": 1, "note": 2}
    findings.sort(key=lambda f: (f.source, f.document, order[f.severity], f.line or 0))
    return docs, findings


def format_finding(f: Finding) -> str:
    where = f"{f.source}:{f.line}" if f.line else f.source
    what = f"{f.kind}/{f.name}" if f.kind and f.name else (f.kind or "document")
    head = f"{where}: {f.severity}: {what} (document {f.document})"
    # "spec.x: spec.x must be ..." reads better as "spec.x: must be ...".
    message = f.message[len(f.path) + 1:] if f.path and f.message.startswith(
        tuple(f"{f.path} {verb} " for verb in ("must", "needs", "is"))) else f.message
    text = f"{head}: {f.path}: {message}" if f.path else f"{head}: {message}"
    return text + (f"\n    fix: {f.fix}" if f.fix else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="routenlp validate",
        description="Validate ModelTier, RoutingPolicy and DistillationCampaign manifests offline: the CRD schema and "
        "CEL rules (same messages as the API server), plus checks across the documents given together. Other "
        "Kubernetes kinds are checked with kubernetes-validate when it is installed, else skipped with a note.",
    )
    p.add_argument("-f", "--filename", action="append", required=True, metavar="FILE|DIR",
                   help="a YAML file (multi-document allowed), a folder (searched recursively) or '-' for stdin; "
                   "repeatable")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")
    p.add_argument("--kubernetes-version", help="schema version for built-in kinds (default: newest bundled)")
    p.add_argument("-o", "--output", choices=["text", "json"], default="text")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors and warnings only")
    args = p.parse_args(argv)

    files, missing = collect_files(args.filename)
    for m in missing:
        print(f"routenlp validate: {m}: no such file or folder", file=sys.stderr)
    if missing:
        return 2
    texts = [("<stdin>" if f == "-" else f, sys.stdin.read() if f == "-" else Path(f).read_text()) for f in files]
    docs, findings = validate_texts(texts, args.kubernetes_version)

    errors = sum(f.severity == "error" for f in findings)
    warnings = sum(f.severity == "warning" for f in findings)
    failed = errors > 0 or (args.strict and warnings > 0)
    if args.output == "json":
        print(json.dumps({"files": len(files), "documents": sum(d.data is not None for d in docs),
                          "errors": errors, "warnings": warnings, "findings": [asdict(f) for f in findings]},
                         indent=2))
        return 1 if failed else 0
    for f in findings:
        if not (args.quiet and f.severity == "note"):
            print(format_finding(f))
    valid = sum(d.model is not None for d in docs)
    print(f"{len(files)} file(s), {sum(d.data is not None for d in docs)} document(s): {valid} valid RouteNLP "
          f"resource(s), {errors} error(s), {warnings} warning(s)" + (" (--strict: warnings fail)" if args.strict
                                                                       and warnings else ""))
    if not files:
        print("routenlp validate: no .yaml/.yml/.json files found", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
