"""`routenlp validate`: files, folders and stdin; messages that name file, line, document and field; checks across
documents; other kinds; exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest

from routenlp.cli import validate
from routenlp.cli.validate import main, parse_path, render_path, validate_texts

TIERS = """
apiVersion: routenlp.io/v1alpha1
kind: ModelTier
metadata: {name: small}
spec:
  servedModelName: small
  cost: {inputPerMillion: 0.1, outputPerMillion: 0.2}
  engine: {model: org/small}
  maxLoraRank: 16
---
apiVersion: routenlp.io/v1alpha1
kind: ModelTier
metadata: {name: frontier}
spec:
  servedModelName: big
  cost: {inputPerMillion: 2, outputPerMillion: 8}
  external:
    baseUrl: https://api.example.com/v1
    model: big
    apiKeySecretRef: {name: api-key, key: token}
"""

POLICY = """
apiVersion: routenlp.io/v1alpha1
kind: RoutingPolicy
metadata: {name: p}
spec:
  tiers: [{name: small}, {name: frontier}]
  tasks: [{name: chat}]
"""


def campaign(student="small", teacher="frontier", r=8, auto_apply=False, policy="p"):
    return textwrap.dedent(f"""
        apiVersion: routenlp.io/v1alpha1
        kind: DistillationCampaign
        metadata: {{name: c}}
        spec:
          policyRef: {policy}
          studentTier: {student}
          teacherTier: {teacher}
          lora: {{r: {r}}}
          autoApply: {str(auto_apply).lower()}
        """)


def run(*texts: str):
    _, findings = validate_texts([(f"f{i}.yaml", t) for i, t in enumerate(texts)])
    return findings


def by_severity(findings, severity):
    return {(f.path, f.source, f.document) for f in findings if f.severity == severity}


def test_paths_round_trip():
    assert parse_path("spec.tasks[2].match.patterns[0]") == ["spec", "tasks", 2, "match", "patterns", 0]
    assert render_path(["spec", "tasks", 2, "match"]) == "spec.tasks[2].match"


def test_a_consistent_set_has_no_findings():
    assert [f for f in run(TIERS, POLICY, campaign()) if f.severity != "note"] == []


def test_policy_naming_an_undefined_tier_is_a_warning_not_an_error():
    policy = POLICY.replace("{name: small}, {name: frontier}", "{name: small}, {name: medium}, {name: frontier}")
    findings = run(TIERS, policy)
    assert by_severity(findings, "error") == set()
    (warning,) = [f for f in findings if f.severity == "warning"]
    assert warning.path == "spec.tiers[1].name" and "'medium'" in warning.message and "cluster" in warning.fix


def test_tiers_out_of_cost_order_warn():
    policy = POLICY.replace("{name: small}, {name: frontier}", "{name: frontier}, {name: small}")
    (warning,) = [f for f in run(TIERS, policy) if f.severity == "warning"]
    assert warning.path == "spec.tiers[1]" and "cheapest" in warning.fix


@pytest.mark.parametrize("kwargs,path,words", [
    ({"student": "medium"}, "spec.studentTier", "not one of the tiers"),
    ({"teacher": "oracle"}, "spec.teacherTier", "not one of the tiers"),
    ({"student": "frontier", "teacher": "small"}, "spec.studentTier", "external tier"),
    ({"r": 64}, "spec.lora.r", "maxLoraRank (16)"),
])
def test_campaign_inconsistent_with_its_policy_or_tiers_is_an_error(kwargs, path, words):
    findings = run(TIERS, POLICY, campaign(**kwargs))
    errors = [f for f in findings if f.severity == "error"]
    assert path in [f.path for f in errors], errors
    assert words in next(f for f in errors if f.path == path).message


def test_campaign_whose_adapter_would_not_be_loaded_warns():
    warnings = [f for f in run(TIERS, POLICY, campaign(auto_apply=True)) if f.severity == "warning"]
    assert [f.path for f in warnings] == ["spec.studentTier"] and "AcceptCampaign" in warnings[0].fix


def test_campaign_without_its_policy_in_the_set_warns_only():
    findings = run(TIERS, campaign(student="x", teacher="y"))
    assert by_severity(findings, "error") == set()
    assert {f.path for f in findings if f.severity == "warning"} == {"spec.policyRef"}


def test_secret_in_the_set_without_the_referenced_key_is_an_error():
    secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: api-key}\nstringData: {api-key: REPLACE-ME}\n"
    errors = [f for f in run(TIERS, secret) if f.severity == "error"]
    assert [f.path for f in errors] == ["spec.external.apiKeySecretRef.key"]
    assert "'token'" in errors[0].message and "api-key" in errors[0].fix


AUTH_POLICY = POLICY + "  auth: {labellersSecret: labellers, clientKeysSecret: client-keys}\n"


def secret(name: str, string_data: dict | None = None, data: dict | None = None) -> str:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}
    body.update({"stringData": string_data} if string_data is not None else {})
    body.update({"data": data} if data is not None else {})
    return json.dumps(body)


def test_auth_secrets_given_together_are_checked():
    token = "a" * 32
    ok = run(TIERS, AUTH_POLICY, secret("labellers", {"alice": token}),
             secret("client-keys", data={"app": "YWFhYWFhYWFhYWFhYWFhYWFhYWFh"}))  # base64 of 20 'a's
    assert [f for f in ok if f.severity in ("error", "warning")] == []
    # Missing Secrets: a note each (often created out of band), never an error.
    notes = [f for f in run(TIERS, AUTH_POLICY) if f.kind == "RoutingPolicy"]
    assert {(f.severity, f.path) for f in notes} == {("note", "spec.auth.labellersSecret"),
                                                     ("note", "spec.auth.clientKeysSecret")}
    # A Secret without keys authenticates nobody; a short token can be guessed (its value is never printed).
    findings = run(TIERS, AUTH_POLICY, secret("labellers", {}), secret("client-keys", {"app": "hunter2"}))
    errors = [(f.path, f.message) for f in findings if f.severity == "error"]
    assert errors == [("spec.auth.labellersSecret", errors[0][1])] and "no keys" in errors[0][1]
    warnings = [f for f in findings if f.severity == "warning"]
    assert [f.path for f in warnings] == ["spec.auth.clientKeysSecret"] and "app" in warnings[0].message
    assert all("hunter2" not in f.message + f.fix for f in findings)


def test_duplicate_resources_warn():
    findings = run(TIERS, TIERS)
    assert {(f.severity, f.source, f.path) for f in findings} == {("warning", "f1.yaml", "metadata.name")}
    assert len(findings) == 2 and "f0.yaml (document 1)" in findings[0].message


def test_namespaces_separate_resources():
    other = TIERS.replace("metadata: {name: small}", "metadata: {name: small, namespace: a}") \
                 .replace("metadata: {name: frontier}", "metadata: {name: frontier, namespace: a}")
    policy = POLICY.replace("metadata: {name: p}", "metadata: {name: p, namespace: b}")
    warnings = [f for f in run(other, policy) if f.severity == "warning"]
    assert {f.path for f in warnings} == {"spec.tiers[0].name", "spec.tiers[1].name"}


def test_message_names_file_line_document_and_field(tmp_path, capsys):
    bad = POLICY + "  cascade:\n    riskLevel: 1.5\n"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bundle.yaml").write_text(TIERS + "---" + bad)
    (tmp_path / "notes.txt").write_text("not yaml: [")
    code = main(["-f", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    line = next(x for x in out.splitlines() if "riskLevel" in x)
    expected_line = (TIERS + "---" + bad).splitlines().index("    riskLevel: 1.5") + 1
    assert line.startswith(f"{tmp_path}/sub/bundle.yaml:{expected_line}: error: RoutingPolicy/p (document 3): "
                           "spec.cascade.riskLevel: input should be less than 1 (got 1.5)")
    assert "fix: allowed: 0 < x < 1" in out
    assert "1 file(s), 3 document(s)" in out


def test_yaml_syntax_error_names_the_line(capsys):
    findings = run(POLICY + "---\nkind: [unclosed\n")
    (error,) = [f for f in findings if f.severity == "error"]
    assert error.severity == "error" and error.document == 2 and "YAML" in error.message
    assert error.line == len((POLICY + "---\nkind: [unclosed\n").splitlines()) + 1


def test_document_without_apiversion_and_kind_is_an_error():
    (error,) = run("replicas: 3\n")
    assert error.severity == "error" and error.path == "apiVersion" and "apiVersion and kind missing" in error.message


def test_other_kinds_are_checked_or_skipped_with_a_note():
    service = "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: x}]}\n"
    app = "apiVersion: argoproj.io/v1alpha1\nkind: Application\nmetadata: {name: a}\nspec: {}\n"
    wrong_version = POLICY.replace("routenlp.io/v1alpha1", "routenlp.io/v1")
    unknown_kind = "apiVersion: routenlp.io/v1alpha1\nkind: Router\nmetadata: {name: r}\n"
    findings = run(service, app, wrong_version, unknown_kind)
    got = {(f.source, f.severity, f.path) for f in findings}
    assert got == {("f0.yaml", "error", "spec.ports[0].port"), ("f1.yaml", "note", ""),
                   ("f2.yaml", "error", "apiVersion"), ("f3.yaml", "error", "kind")}


def test_resource_quantities_name_the_field_line_and_form(monkeypatch):
    """The operator's check (the kubernetes client's quantity parser), offline; skipped with a note without it."""
    tiers = TIERS.replace("engine: {model: org/small}", "engine:\n    model: org/small\n    resources:\n"
                          "      cpu: two\n      memory: 32GB\n      shmSize: 1Gi")
    policy = POLICY + "  deployment: {memory: 1 Gi}\n"
    errors = [f for f in run(tiers, policy) if f.severity == "error"]
    assert [(f.path, f.line) for f in errors] == [
        ("spec.engine.resources.cpu", 11), ("spec.engine.resources.memory", 12), ("spec.deployment.memory", 8)]
    assert "(got 'two')" in errors[0].message and "500m" in errors[0].fix and "32Gi" in errors[1].fix
    monkeypatch.setattr(validate, "quantity_problems", None)
    assert {(f.severity, f.document) for f in run(tiers)} == {("note", 1), ("note", 2)}


def test_unknown_field_suggests_the_close_name():
    (error,) = run(POLICY + "  cascade: {riskLevle: 0.1}\n")
    assert error.path == "spec.cascade.riskLevle" and "rename it to 'riskLevel'" in error.fix


def test_stdin_json_output_and_strict(monkeypatch, capsys):
    policy = POLICY.replace("{name: small}, {name: frontier}", "{name: small}")
    monkeypatch.setattr(sys, "stdin", io.StringIO(policy))
    assert main(["-f", "-", "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["errors"] == 0 and report["warnings"] == 1
    assert report["findings"][0]["source"] == "<stdin>" and report["findings"][0]["path"] == "spec.tiers[0].name"
    monkeypatch.setattr(sys, "stdin", io.StringIO(policy))
    assert main(["-f", "-", "--strict"]) == 1


def test_missing_path_is_a_usage_error(tmp_path, capsys):
    assert main(["-f", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_console_script_dispatches_and_exits_1_on_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text(campaign(student="same", teacher="same"))
    out = subprocess.run([sys.executable, "-m", "routenlp.cli.main", "validate", "-f", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "(document 1): spec.studentTier: spec.studentTier and spec.teacherTier must differ" in out.stdout
