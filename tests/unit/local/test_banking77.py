"""The BANKING77 workload helpers: the shipped data (checksums, licence), the prompt format and label normalisation."""

import fnmatch
import gzip
import hashlib
import shutil
import tomllib
from pathlib import Path

import pytest

from routenlp.local import banking77 as b77


def test_splits_and_labels_ship_with_the_package():
    assert b77.data_dir() == b77.DATA_DIR and "router_image/routenlp/local/data" in str(b77.DATA_DIR)
    assert len(b77.load_split("train")) == 10003
    assert len(b77.load_split("test")) == 3080
    labs = b77.labels()
    assert len(labs) == 77 and "card_arrival" in labs
    assert {e.label for e in b77.load_split("test")} <= set(labs)


def test_licence_source_and_checksums_sit_beside_the_data():
    d = b77.data_dir()
    assert "Attribution 4.0 International" in (d / "LICENSE").read_text()
    readme = (d / "README.md").read_text()
    assert "PolyAI-LDN/task-specific-datasets" in readme and "57ec275d8078af65b7731c2a98be812d844a6d6b" in readme
    sums = b77.checksums()
    assert set(sums) == {"train.csv", "test.csv", "categories.json", "LICENSE"}
    for name in ("train.csv", "test.csv"):  # the compressed files hold exactly the upstream bytes
        assert hashlib.sha256(gzip.decompress((d / f"{name}.gz").read_bytes())).hexdigest() == sums[name]
    for name in ("categories.json", "LICENSE"):
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == sums[name]


def test_a_corrupted_file_is_a_clear_error(tmp_path):
    folder = tmp_path / "b77"
    shutil.copytree(b77.data_dir(), folder)
    rows = gzip.decompress((folder / "test.csv.gz").read_bytes()).replace(b"card_arrival", b"card_linking", 1)
    (folder / "test.csv.gz").write_bytes(gzip.compress(rows))
    with pytest.raises(b77.DataError, match="does not match its SHA-256"):
        b77.load_split("test", str(folder))
    assert len(b77.load_split("train", str(folder))) == 10003  # the others still load


def test_a_folder_of_plain_csv_files_loads_too(tmp_path):
    (tmp_path / "test.csv").write_bytes(b"text,category\nwhere is my card?,card_arrival\n")
    assert b77.load_split("test", str(tmp_path)) == (b77.Example("where is my card?", "card_arrival"),)
    with pytest.raises(b77.DataError, match="neither train.csv nor train.csv.gz"):
        b77.load_split("train", str(tmp_path))


def test_fingerprint_follows_the_content(tmp_path):
    folder = tmp_path / "b77"
    shutil.copytree(b77.data_dir(), folder)
    assert b77.fingerprint(str(folder)) == b77.fingerprint()
    (folder / "SHA256SUMS").unlink()
    (folder / "categories.json").write_text('["a", "b"]')
    assert b77.fingerprint(str(folder)) != b77.fingerprint()


def test_bad_split():
    with pytest.raises(ValueError):
        b77.load_split("dev")


def test_sample_is_deterministic():
    a = b77.sample("test", 5, seed=3)
    assert a == b77.sample("test", 5, seed=3) and len(set(a)) == 5
    assert a != b77.sample("test", 5, seed=4)


def test_prompt_round_trip():
    labs = b77.labels()
    msgs = b77.messages("I lost my card", labs)
    assert b77.query_of(msgs) == "I lost my card"
    assert "lost_or_stolen_card" in msgs[0]["content"]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}]
    assert b77.query_of(parts) == "hi"
    assert b77.query_of([]) == ""


@pytest.mark.parametrize("answer,label", [
    ("card_arrival", "card_arrival"),
    (" Card arrival. ", "card_arrival"),
    ("The intent is: lost_or_stolen_card", "lost_or_stolen_card"),
    ("I don't know", None),
])
def test_normalize_label(answer, label):
    assert b77.normalize_label(answer, b77.labels()) == label


def test_approx_tokens():
    assert b77.approx_tokens("I lost my card!") == 5
    assert b77.approx_tokens("") == 0


def test_the_data_files_are_package_data():
    """A wheel carries every shipped file: each matches a `tool.setuptools.package-data` pattern of routenlp.local."""
    root = Path(__file__).resolve().parents[3]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["routenlp.local"]
    pkg = b77.DATA_DIR.parents[1]
    for f in b77.data_dir().iterdir():
        rel = f.relative_to(pkg).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} would be left out of the wheel"
