import json

import pytest

from routenlp.trainer import cli, publish
from routenlp.trainer.manifest import StageError


def _folders(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    version = tmp_path / "artifacts" / "v2"
    version.mkdir(parents=True)
    (version / "metadata.json").write_text('{"version": "v2"}')
    return adapter, version


def test_publish_copies_both_and_records_uris(tmp_path, capsys):
    adapter, version = _folders(tmp_path)
    dest = tmp_path / "volume"
    argv = ["--out", str(tmp_path / "out"), "--adapter", str(adapter), "--adapter-name", "b77",
            "--adapter-to", dest.as_uri() + "/adapters", "--router-version", str(version),
            "--router-to", str(dest / "router")]
    assert cli.main(["publish", *argv]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["metrics"]["router_version"] == "v2"
    assert (dest / "adapters" / "b77" / "adapter_model.safetensors").read_bytes() == b"w"
    assert (dest / "router" / "v2" / "metadata.json").is_file()
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["metrics"]["published"]["adapter"]["uri"].startswith("file://")
    assert m["inputs"]["adapter"]["sha256"] == m["metrics"]["published"]["adapter"]["sha256"]
    # same again: no-op; a different adapter under the same name: refused (published artifacts are immutable)
    assert cli.main(["publish", *argv]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] is True
    (adapter / "adapter_model.safetensors").write_bytes(b"other")
    assert cli.main(["publish", *argv]) == 2
    assert "immutable" in capsys.readouterr().err


def test_publish_refuses_what_is_not_an_adapter(tmp_path):
    with pytest.raises(StageError, match="adapter_config.json"):
        publish.main(["--out", str(tmp_path / "o"), "--adapter", str(tmp_path), "--adapter-name", "x",
                      "--adapter-to", str(tmp_path / "d")])


def test_cli_lists_stages_and_rejects_unknown_ones(capsys):
    assert cli.main([]) == 0
    assert "distill" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert "unknown stage" in capsys.readouterr().err
