"""docs/operations.md tells the truth about the code: the condition reasons it documents are exactly the ones the
operator sets, and the commands and paths it names exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"
OPERATOR = ROOT / "operator" / "routenlp" / "operator"


def code_reasons() -> set[str]:
    """Reasons the operator writes into conditions: literal third arguments of condition(...) (its type a literal
    or an api.common constant), literals assigned to a `reason` variable, (reason, message) pairs returned for a
    condition, and the phase -> reason mapping of campaigns (phases themselves are reasons too)."""
    from routenlp.api.campaign import STAGES

    text = "\n".join(p.read_text() for p in OPERATOR.glob("*.py"))
    ctype = r'(?:"[A-Za-z]+"|[A-Z_]+)'
    reasons = set(re.findall(r'condition\(\s*' + ctype + r',[^,\n]*,\s*"([A-Z][A-Za-z]+)"', text))
    reasons |= set(re.findall(r'^\s*return "([A-Z][A-Za-z]+)", f?"', text, flags=re.M))
    for a, b in re.findall(r'condition\(\s*' + ctype + r',[^,\n]*,\s*"([A-Z]\w+)" if [^,\n]* else "([A-Z]\w+)"', text):
        reasons |= {a, b}
    for line in re.findall(r"^\s*reason(?:_word)?\s*=.*$", text, flags=re.M):
        if ".get(" in line:  # {"Failed": "RunFailed", ...}.get(phase, phase): the values, then the phases
            reasons |= set(re.findall(r':\s*"([A-Z][A-Za-z]+)"', line))
            reasons |= set(STAGES) | {"Succeeded", "Proposed"}
        else:
            reasons |= set(re.findall(r'"([A-Z][A-Za-z]+)"', line))
    return reasons


def documented_reasons() -> set[str]:
    section = DOC.read_text().split("## Conditions", 1)[1].split("\n## ", 1)[0]
    out = set()
    for row in re.findall(r"^\|(.+)\|\s*$", section, flags=re.M):
        for cell in row.split("|"):
            m = re.match(r"^\s*`([A-Z][A-Za-z]+)`", cell)
            if m:
                out.add(m.group(1))
                break
    # phases named in the campaign paragraph
    out |= set(re.findall(r"`(Clustering|Distilling|Evaluating|RetrainingRouter|RollingOut)`", section))
    return out


def test_documented_reasons_are_exactly_the_ones_the_operator_sets():
    code, doc = code_reasons(), documented_reasons()
    assert {"InvalidSpec", "InsufficientGPU", "MissingTiers", "PodsNotReady"} <= code, code  # the extraction works
    assert not code - doc, f"reasons the operator sets but docs/operations.md does not explain: {sorted(code - doc)}"
    assert not doc - code, f"reasons docs/operations.md explains but the operator never sets: {sorted(doc - code)}"


def test_paths_and_commands_named_in_the_guide_exist():
    text = DOC.read_text()
    for path in re.findall(r"`((?:charts|examples|crds|docs)/[\w./-]*)`", text):
        assert (ROOT / path.rstrip("/")).exists(), path
    for path in re.findall(r"kubectl apply -k (\S+)", text):
        assert (ROOT / path / "kustomization.yaml").is_file(), path
    from routenlp.cli.main import COMMANDS

    for cmd in re.findall(r"`routenlp (\w+)", text):
        assert cmd in COMMANDS, cmd
    for flag in re.findall(r"--set ([\w.]+)=", text):
        node = __import__("yaml").safe_load((ROOT / "charts/routenlp/values.yaml").read_text())
        for key in flag.split("."):
            assert key in node, f"--set {flag}: no such value"
            node = node[key]
