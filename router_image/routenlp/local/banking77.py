"""BANKING77 (customer-service intent detection, 77 intents; CC BY 4.0): the local runtime's workload.

Data is read from the shared public-data folder (never copied into the repository): `$ROUTENLP_SHARED_DATA/banking77`
or `<repo>/../shared/data/banking77`. One prompt format is used by every local tier, the demo and the campaign:
the system message lists the intents, the last user message is the customer's query verbatim, so a tier (or the
oracle stand-in) can read the query back with `query_of(messages)`.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TASK = "banking77-intent"

_REPO = Path(__file__).resolve().parents[3]


def shared_data_dir() -> Path:
    env = os.environ.get("ROUTENLP_SHARED_DATA")
    return Path(env) if env else _REPO.parent / "shared" / "data"


def data_dir() -> Path:
    d = shared_data_dir() / "banking77"
    if not (d / "train.csv").is_file():
        raise FileNotFoundError(
            f"BANKING77 not found in {d} (expected train.csv, test.csv, categories.json); set ROUTENLP_SHARED_DATA "
            "to the folder that holds banking77/"
        )
    return d


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@lru_cache(maxsize=4)
def load_split(split: str, folder: str | None = None) -> tuple[Example, ...]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(folder) if folder else data_dir()
    with open(path / f"{split}.csv", newline="", encoding="utf-8") as f:
        return tuple(Example(r["text"], r["category"]) for r in csv.DictReader(f))


@lru_cache(maxsize=2)
def labels(folder: str | None = None) -> tuple[str, ...]:
    path = Path(folder) if folder else data_dir()
    return tuple(json.loads((path / "categories.json").read_text()))


def sample(split: str, n: int, seed: int = 0, folder: str | None = None) -> list[Example]:
    """n examples drawn without replacement (deterministic for a seed)."""
    data = list(load_split(split, folder))
    rng = random.Random(seed)
    return rng.sample(data, min(n, len(data)))


def system_prompt(label_list: tuple[str, ...] | list[str] | None = None) -> str:
    names = ", ".join(label_list or labels())
    return (
        "You classify online-banking customer queries by intent. Answer with exactly one intent label from this "
        f"list and nothing else: {names}."
    )


def messages(query: str, label_list=None) -> list[dict]:
    """Chat messages for one query: the intent list in the system message, the query verbatim as the user message."""
    return [{"role": "system", "content": system_prompt(label_list)}, {"role": "user", "content": query}]


def query_of(msgs: list[dict]) -> str:
    """The last user message's text (string content or OpenAI content parts)."""
    for m in reversed(msgs or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, list):
                return " ".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
            return c if isinstance(c, str) else ""
    return ""


def normalize_label(answer: str, label_list=None) -> str | None:
    """The intent an answer names: exact label after trimming/lower-casing, else the first label it contains."""
    allowed = label_list or labels()
    a = answer.strip().strip(".\"'` ").lower().replace(" ", "_")
    if a in allowed:
        return a
    text = answer.lower()
    hits = [(text.find(lab), -len(lab), lab) for lab in allowed if lab in text]
    return min(hits)[2] if hits else None


_TOKEN = re.compile(r"\w+|[^\w\s]")


def approx_tokens(text: str) -> int:
    """Token count for stand-in tiers that have no tokenizer: words and punctuation marks (close to BPE counts for
    English). Both stand-ins report it as OpenAI `usage`, so the router prices them like any other tier."""
    return len(_TOKEN.findall(text or ""))
