"""Container images and workflows, checked without a Docker engine: each Dockerfile is parsed and held to the rules
(pinned bases, multi-stage, right extra, non-root numeric USER, an ENTRYPOINT the CLI really has, OCI labels); the
GitHub workflows parse and build exactly these Dockerfiles; CI runs the README's test command."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from routenlp.cli.main import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {  # Dockerfile -> (extra it installs, CLI command it runs)
    "operator/Dockerfile": ("operator", "operator"),
    "router_image/Dockerfile": ("router", "router"),
    "trainer_image/Dockerfile": ("trainer", "train"),
}
OCI_LABELS = ("title", "description", "source", "licenses", "version", "revision")
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|cmake|clang|python3?-dev|git)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages): joins continuation lines, drops comments, substitutes ${ARG} in FROM."""
    lines, buf = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not buf:
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        if buf.strip():
            lines.append(" ".join(buf.split()))
        buf = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif op == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            assert stages, f"{op} before FROM"
            stages[-1].instructions.append((op, rest))
    return args, stages


def is_pinned(image: str) -> bool:
    """A digest, or a tag that names an exact release (x.y.z...), never a moving tag like `latest` or `3.11`."""
    if re.search(r"@sha256:[a-f0-9]{64}$", image):
        return True
    tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
    return bool(re.match(r"^v?\d+\.\d+\.\d+", tag))


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("path", list(IMAGES))
def test_dockerfile_rules(path, pyproject):
    extra, command = IMAGES[path]
    args, stages = parse_dockerfile((ROOT / path).read_text())
    assert len(stages) >= 2, f"{path}: not multi-stage"
    for s in stages:
        assert is_pinned(s.base), f"{path}: base image {s.base!r} is not pinned to a release or digest"
    final = stages[-1]
    ops = [op for op, _ in final.instructions]

    # the extra it installs exists, and is the right one
    installs = [rest for s in stages[:-1] for op, rest in s.instructions if op == "RUN" and "pip install" in rest]
    extras = set(re.findall(r"""["']?\.\[(\w+)\]["']?""", " ".join(installs)))
    assert extras == {extra}, f"{path}: installs extras {extras}, expected {{{extra!r}}}"
    assert extra in pyproject["project"]["optional-dependencies"], f"{path}: extra {extra!r} not in pyproject.toml"

    # the final stage only copies the built environment: no compilers, no pip installs, no apt
    copies = [rest for op, rest in final.instructions if op == "COPY"]
    assert any(c.startswith("--from=") for c in copies), f"{path}: final stage copies nothing from the build stage"
    for op, rest in final.instructions:
        if op == "RUN":
            assert "pip install" not in rest and "apt-get install" not in rest and not BUILD_TOOLS.search(rest), \
                f"{path}: final stage installs something: {rest}"

    # non-root numeric user
    users = [rest for op, rest in final.instructions if op == "USER"]
    assert users, f"{path}: no USER in the final stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{path}: USER {users[-1]!r} is not a numeric non-root UID"

    # ENTRYPOINT: exec form, `routenlp <command>` where the command exists in the CLI and its module is installed
    entry = json.loads([rest for op, rest in final.instructions if op == "ENTRYPOINT"][-1])
    assert Path(entry[0]).name == "routenlp" and entry[1] == command, f"{path}: ENTRYPOINT {entry}"
    assert command in COMMANDS, f"{path}: `routenlp {command}` is not a CLI command"
    module = COMMANDS[command][0].split(":")[0]
    assert importlib.util.find_spec(module) is not None, f"{path}: `routenlp {command}` needs {module}, which is missing"

    # OCI labels
    labels = " ".join(rest for op, rest in final.instructions if op == "LABEL")
    for label in OCI_LABELS:
        assert f"org.opencontainers.image.{label}=" in labels, f"{path}: label org.opencontainers.image.{label} missing"

    # every COPY source from the build context exists (context = repository root)
    for s in stages:
        for op, rest in s.instructions:
            if op == "COPY" and not rest.startswith("--from="):
                for src in shlex.split(rest)[:-1]:
                    if not src.startswith("--"):
                        assert (ROOT / src).exists(), f"{path}: COPY {src} does not exist in the build context"


@pytest.mark.parametrize("path", list(IMAGES))
def test_dependencies_are_installed_before_the_sources_are_copied(path, pyproject):
    """A source edit must not rebuild the dependency layers (torch is GBs): every requirement of the image's extra is
    installed by a RUN that comes before the first COPY of a source folder, and the sources' own install adds none."""
    import importlib.util as iu

    extra, _ = IMAGES[path]
    _, stages = parse_dockerfile((ROOT / path).read_text())
    build = stages[0].instructions
    first_source = next(i for i, (op, rest) in enumerate(build) if op == "COPY" and "/routenlp" in rest)
    dep_runs = [rest for op, rest in build[:first_source] if op == "RUN" and "pip install -r" in rest]
    assert dep_runs and "image_requirements.py " + extra in " ".join(dep_runs), path
    late = [rest for op, rest in build[first_source:] if op == "RUN" and "pip install" in rest]
    assert late and all("--no-deps" in r for r in late), f"{path}: a pip install after the sources pulls dependencies"
    spec = iu.spec_from_file_location("image_requirements", ROOT / "scripts" / "image_requirements.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    reqs = mod.requirements(pyproject, extra)
    assert not any(r.startswith("routenlp") for r in reqs) and "pydantic" in " ".join(reqs)
    if extra == "trainer":  # expanded from routenlp[router]
        assert any(r.startswith("torch") for r in reqs) and any(r.startswith("peft") for r in reqs)


def test_trainer_base_carries_the_pinned_torch(pyproject):
    """The CUDA PyTorch base must hold the torch version the router extra pins, else pip would fetch another."""
    pin = next(r for r in pyproject["project"]["optional-dependencies"]["router"] if r.startswith("torch"))
    version = pin.split("==")[1]
    _, stages = parse_dockerfile((ROOT / "trainer_image/Dockerfile").read_text())
    assert all(s.base.startswith(f"pytorch/pytorch:{version}-cuda") for s in stages), [s.base for s in stages]


def test_parser_rejects_bad_dockerfiles():
    """The rules above fail on what they should fail on."""
    assert not is_pinned("python:3.11-slim") and not is_pinned("python:latest") and not is_pinned("python")
    assert is_pinned("python:3.11.14-slim-bookworm") and is_pinned("python@sha256:" + "0" * 64)
    args, stages = parse_dockerfile("ARG B=python:3.11-slim\nFROM ${B} AS x\nRUN echo a \\\n  b\nUSER root\n")
    assert stages[0].base == "python:3.11-slim" and stages[0].instructions == [("RUN", "echo a b"), ("USER", "root")]


# ---------------------------------------------------------------- workflows


def load_workflow(name: str) -> dict:
    doc = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as true
    return doc


@pytest.mark.parametrize("name", ["images.yml", "ci.yml"])
def test_workflow_structure(name):
    wf = load_workflow(name)
    assert wf["name"] and wf["on"] and wf["jobs"]
    for job_name, job in wf["jobs"].items():
        assert job["runs-on"] and job["steps"], job_name
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"{name}/{job_name}: step needs exactly one of uses/run"
            if "uses" in step:
                assert re.match(r"^[\w.-]+/[\w./-]+@v\d+", step["uses"]), f"unpinned action {step['uses']}"
    assert wf["permissions"] == {"contents": "read"}, "least privilege by default"


def test_images_workflow_builds_the_three_dockerfiles():
    wf = load_workflow("images.yml")
    job = wf["jobs"]["build"]
    matrix = job["strategy"]["matrix"]["include"]
    assert sorted(m["dockerfile"] for m in matrix) == sorted(IMAGES)
    for m in matrix:
        assert (ROOT / m["dockerfile"]).is_file()
    build = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/build-push-action"))
    assert build["with"]["file"] == "${{ matrix.dockerfile }}" and build["with"]["context"] == "."
    meta_images = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/metadata-action"))["with"]["images"]
    assert meta_images == "ghcr.io/${{ github.repository_owner }}/${{ matrix.image }}"
    meta = next(s for s in job["steps"] if s.get("uses", "").startswith("docker/metadata-action"))
    assert "type=semver" in meta["with"]["tags"] and "type=sha" in meta["with"]["tags"]
    assert job["permissions"]["packages"] == "write"
    assert any(s.get("uses", "").startswith("docker/setup-buildx-action") for s in job["steps"])
    assert "tags" in wf["on"]["push"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(make \w+)\s+#.*test", readme, flags=re.M)
    assert commands, "README names no test command"
    runs = [s["run"] for job in load_workflow("ci.yml")["jobs"].values() for s in job["steps"] if "run" in s]
    assert any(commands[0] == r.strip() for r in runs), f"ci.yml does not run {commands[0]!r}"


def test_pushed_image_names_are_the_ones_the_chart_and_api_default_to():
    """With owner `routenlp`, the workflow pushes exactly the images the chart (operator) and the API defaults
    (router, trainer) pull, tagged with the chart's appVersion."""
    from routenlp.api.campaign import DEFAULT_TRAINER_IMAGE
    from routenlp.api.routingpolicy import DEFAULT_ROUTER_IMAGE

    chart = yaml.safe_load((ROOT / "charts/routenlp/Chart.yaml").read_text())
    values = yaml.safe_load((ROOT / "charts/routenlp/values.yaml").read_text())
    matrix = {m["image"] for m in load_workflow("images.yml")["jobs"]["build"]["strategy"]["matrix"]["include"]}
    pushed = {f"ghcr.io/routenlp/{name}:{chart['appVersion']}" for name in matrix}
    assert f"{values['image']['repository']}:{chart['appVersion']}" in pushed
    assert DEFAULT_ROUTER_IMAGE in pushed and DEFAULT_TRAINER_IMAGE in pushed


@pytest.mark.parametrize("path", list(IMAGES))
def test_routenlp_is_on_path(path):
    """The operator starts router and trainer containers with `command: [routenlp, ...]` (no absolute path)."""
    _, stages = parse_dockerfile((ROOT / path).read_text())
    final = stages[-1]
    entry = json.loads([rest for op, rest in final.instructions if op == "ENTRYPOINT"][-1])
    env = " ".join(rest for op, rest in final.instructions if op == "ENV")
    path_value = re.search(r"PATH=(\S+)", env).group(1)
    assert str(Path(entry[0]).parent) in path_value.split(":")


def test_charts_are_published_where_the_flux_example_pulls_them():
    wf = load_workflow("images.yml")
    job = wf["jobs"]["chart"]
    script = "\n".join(s.get("run", "") for s in job["steps"])
    assert "helm package charts/routenlp " in script and "helm package charts/routenlp-crds " in script
    assert "oci://ghcr.io/${{ github.repository_owner }}/charts" in script and job["permissions"]["packages"] == "write"
    flux = [d for d in yaml.safe_load_all((ROOT / "examples/gitops/flux/routenlp-helmrepository.yaml").read_text()) if d]
    repo = next(d for d in flux if d["kind"] == "HelmRepository")
    assert repo["spec"]["url"] == "oci://ghcr.io/routenlp/charts" and repo["spec"]["type"] == "oci"
