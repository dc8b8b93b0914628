"""BANKING77 (customer-service intent detection, 77 intents; CC BY 4.0): the local runtime's workload.

The data ships with the package (`data/banking77/`: the upstream CSV files gzip-compressed, the licence, the source
and SHA-256 checksums of the upstream files, verified on every load), so the demo and its tests run on a clone with
nothing beside it. Every reader of BANKING77 (stand-ins, demo, benches, tests) goes through `load_split` / `labels`.
One prompt format is used by every local tier, the demo and the campaign: the system message lists the intents, the
last user message is the customer's query verbatim, so a tier (or the oracle stand-in) can read the query back with
`query_of(messages)`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TASK = "banking77-intent"

# The copy that ships with the package (see its README.md for source and attribution).
DATA_DIR = Path(__file__).resolve().parent / "data" / "banking77"
CHECKSUMS = "SHA256SUMS"


class DataError(RuntimeError):
    """The BANKING77 files are missing or do not match their checksums."""


def data_dir() -> Path:
    """The shipped BANKING77 folder."""
    if not (DATA_DIR / CHECKSUMS).is_file():
        raise DataError(f"BANKING77 is missing from the package ({DATA_DIR}); reinstall routenlp or restore the "
                        "folder from git")
    return DATA_DIR


def read_bytes(name: str, folder: str | Path | None = None) -> bytes:
    """The upstream bytes of `name` (train.csv, test.csv, categories.json): from `name` or `name.gz` in the folder
    (default: the shipped copy), checked against the folder's SHA256SUMS when it has one."""
    path = Path(folder) if folder else data_dir()
    if (path / name).is_file():
        data = (path / name).read_bytes()
    elif (path / f"{name}.gz").is_file():
        data = gzip.decompress((path / f"{name}.gz").read_bytes())
    else:
        raise DataError(f"BANKING77: neither {name} nor {name}.gz in {path}")
    want = checksums(path).get(name)
    if want is not None and hashlib.sha256(data).hexdigest() != want:
        raise DataError(f"BANKING77: {path / name} does not match its SHA-256 in {path / CHECKSUMS} (corrupted or "
                        "edited; restore it from git)")
    return data


def checksums(folder: str | Path | None = None) -> dict[str, str]:
    """{file name: sha256} from the folder's SHA256SUMS (`sha256sum` format); {} when it has none."""
    f = (Path(folder) if folder else data_dir()) / CHECKSUMS
    if not f.is_file():
        return {}
    return {name.lstrip("*"): digest for digest, name in (ln.split(None, 1) for ln in f.read_text().splitlines()
                                                          if ln.strip())}


def fingerprint(folder: str | Path | None = None) -> str:
    """Short digest of the data's content (train, test, labels): a cache key for anything derived from it."""
    h = hashlib.sha256()
    for name in ("train.csv", "test.csv", "categories.json"):
        h.update(read_bytes(name, folder))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@lru_cache(maxsize=4)
def load_split(split: str, folder: str | None = None) -> tuple[Example, ...]:
    """The train or test split (default: the shipped copy; `folder`: another copy, plain or gzip CSV)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    text = read_bytes(f"{split}.csv", folder).decode("utf-8")
    return tuple(Example(r["text"], r["category"]) for r in csv.DictReader(io.StringIO(text, newline="")))


@lru_cache(maxsize=2)
def labels(folder: str | None = None) -> tuple[str, ...]:
    return tuple(json.loads(read_bytes("categories.json", folder)))


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


def response_format(label_list=None) -> dict:
    """OpenAI structured output asking for exactly one intent label (a JSON string from the label enum). vLLM
    constrains an LLM tier's answer to it; `normalize_label` reads the quoted label back."""
    return {"type": "json_schema", "json_schema": {"name": "banking77_intent", "schema": {
        "type": "string", "enum": list(label_list or labels())}}}


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
