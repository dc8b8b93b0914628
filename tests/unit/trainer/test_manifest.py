import json
from pathlib import Path

import pytest

from routenlp.trainer.manifest import Stage, StageError, local_path, print_summary, sha256_path


def test_local_path_accepts_paths_and_file_uris_and_names_the_argument():
    assert local_path("/a/b") == Path("/a/b")
    assert local_path("file:///a/b") == Path("/a/b")
    with pytest.raises(StageError, match="--events: scheme 's3'"):
        local_path("s3://bucket/x", "--events")


def test_directory_hash_changes_with_content_and_names(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "a.txt").write_text("1")
    h1 = sha256_path(d)
    (d / "sub" / "a.txt").write_text("2")
    h2 = sha256_path(d)
    (d / "sub" / "a.txt").rename(d / "sub" / "b.txt")
    assert len({h1, h2, sha256_path(d)}) == 3
    (d / "keep.txt").write_text("k")
    before = sha256_path(d, exclude=("sub",))
    (d / "sub" / "b.txt").write_text("changed")
    assert sha256_path(d, exclude=("sub",)) == before  # excluded folders (checkpoints) do not count


def test_stage_is_a_noop_when_inputs_and_params_match(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("data")
    out = tmp_path / "out"

    def run(params):
        st = Stage("demo", out, {"source": str(src)}, params)
        if st.done():
            return st.finish_skipped()
        out.mkdir(exist_ok=True)
        st.output("result", "result.txt").write_text(src.read_text().upper())
        st.metrics["length"] = 4
        with st.timed("work"):
            pass
        return st.finish()

    first = run({"k": 1})
    assert first["skipped"] is False and first["status"] == "Succeeded"
    m = json.loads((out / "manifest.json").read_text())
    assert set(m) >= {"inputs", "outputs", "metrics", "versions", "timings", "params", "key", "stage"}
    assert m["inputs"]["source"]["sha256"] == sha256_path(src)
    assert m["outputs"]["result"]["sha256"] == sha256_path(out / "result.txt")
    assert "torch" in m["versions"] and "work" in m["timings"]
    assert run({"k": 1})["skipped"] is True
    assert run({"k": 2})["skipped"] is False  # other params: redo
    src.write_text("other")
    assert run({"k": 2})["skipped"] is False  # other input content: redo
    (out / "result.txt").write_text("tampered")
    assert run({"k": 2})["skipped"] is False  # an output changed since: redo


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(StageError, match="--events-dir: .* does not exist"):
        Stage("x", tmp_path, {"events_dir": str(tmp_path / "nope")}, {})


def test_summary_is_the_last_stdout_line(capsys):
    print("progress...")
    print_summary({"stage": "x", "metrics": {"a": 1}})
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["stage"] == "x"


def test_summary_reaches_the_termination_message_file_only_where_the_kubelet_mounted_it(tmp_path, capsys):
    """A successful container's logs are not its termination message (FallbackToLogsOnError): the summary must be
    in the file, within Kubernetes' 4096 bytes."""
    import json

    from routenlp.trainer.manifest import print_summary

    msg = tmp_path / "termination-log"
    msg.write_text("")
    print_summary({"stage": "cluster", "metrics": {"clusters": 3}}, str(msg))
    assert json.loads(msg.read_text()) == {"stage": "cluster", "metrics": {"clusters": 3}}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stage"] == "cluster"
    big = {"stage": "cluster", "metrics": {"failures": 9, "top": [{"examples": ["x" * 500]}] * 20}}
    print_summary(big, str(msg))
    assert json.loads(msg.read_text()) == {"stage": "cluster", "metrics": {"failures": 9}}
    absent = tmp_path / "none"
    print_summary({"stage": "cluster"}, str(absent))
    assert not absent.exists()  # never created outside a pod
