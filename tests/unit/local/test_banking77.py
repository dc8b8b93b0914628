"""The BANKING77 workload helpers: data loading, the prompt format and label normalisation."""

import pytest

from routenlp.local import banking77 as b77


@pytest.fixture
def folder(shared_data):
    return str(shared_data / "banking77")


def test_splits_and_labels(folder):
    assert len(b77.load_split("train", folder)) == 10003
    assert len(b77.load_split("test", folder)) == 3080
    labs = b77.labels(folder)
    assert len(labs) == 77 and "card_arrival" in labs
    assert {e.label for e in b77.load_split("test", folder)} <= set(labs)


def test_bad_split(folder):
    with pytest.raises(ValueError):
        b77.load_split("dev", folder)


def test_missing_data_dir_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("ROUTENLP_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ROUTENLP_SHARED_DATA"):
        b77.data_dir()


def test_sample_is_deterministic(folder):
    a = b77.sample("test", 5, seed=3, folder=folder)
    assert a == b77.sample("test", 5, seed=3, folder=folder) and len(set(a)) == 5
    assert a != b77.sample("test", 5, seed=4, folder=folder)


def test_prompt_round_trip(folder):
    labs = b77.labels(folder)
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
def test_normalize_label(folder, answer, label):
    assert b77.normalize_label(answer, b77.labels(folder)) == label


def test_approx_tokens():
    assert b77.approx_tokens("I lost my card!") == 5
    assert b77.approx_tokens("") == 0
