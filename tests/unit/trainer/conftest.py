"""Fixtures of the trainer unit tests: a tiny random causal LM with a chat template, event logs, fake embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

WORDS = ("card arrive arrived still waiting exchange rate wrong fee charged top up failed pin blocked "
         "my the is a why what how when did not has have I where can do card_arrival exchange_rate "
         "extra_fee top_up_failed pin_blocked answer query classify").split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a word-level tokenizer: real peft/transformers code paths in a second."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-model")
    specials = ["<pad>", "<unk>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)) + [".", "?", "!", ","])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=vocab["<|end|>"], bos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return d


TOPICS = {
    "card_arrival": ["my card still not arrived", "where is my card", "card did not arrive", "still waiting card",
                     "when did my card arrive", "how can I card arrive", "my card has not arrived"],
    "exchange_rate": ["exchange rate wrong", "why is the exchange rate wrong", "what exchange rate", "rate is wrong",
                      "exchange rate is wrong why", "how is the exchange rate", "the rate wrong"],
    "pin_blocked": ["my pin blocked", "pin is blocked", "why pin blocked", "how can I do pin blocked",
                    "pin blocked what do", "my pin is blocked why", "pin blocked still"],
}


def planted_embeddings(n_per: int = 20, dim: int = 384, seed: int = 0, spread: float = 0.05):
    """Three well-separated blobs on the unit sphere, and which blob each row came from."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim))
    x = np.concatenate([c + spread * np.linalg.norm(c) * rng.normal(size=(n_per, dim)) / np.sqrt(dim) * 5
                        for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(3), n_per)


def write_log(directory: Path, n_per: int = 12, cost_by_topic=None, labelled_bad: int = 0,
              explored: bool = True) -> list[dict]:
    """An event log: per topic `n_per` requests where the student was rejected and the reference answered (its answer
    = the topic's label; on the router's exploration sample unless `explored` is False), plus requests the student
    answered well, plus `labelled_bad` accepted-but-bad ones."""
    from routenlp.router.eventlog import EventLogWriter
    from routenlp.router.events import FeedbackEvent, RoutingEvent, TierAttempt

    cost_by_topic = cost_by_topic or {"card_arrival": 0.003, "exchange_rate": 0.001, "pin_blocked": 0.002}
    w = EventLogWriter(directory)
    rows = []
    t = 1_700_000_000.0
    for topic, queries in TOPICS.items():
        for i in range(n_per):
            q = f"{queries[i % len(queries)]} {'?' * (i // len(queries) + 1)}"
            rid = f"{topic}-{i}"
            t += 1
            w.submit(RoutingEvent(request_id=rid, time=t, policy="p", task="intent", query=q, final_tier="reference",
                                  escalations=1, explored=explored, attempts=[
                                      TierAttempt(tier="student", model="s", score=0.1, accepted=False, response="x",
                                                  cost_usd=0.00001),
                                      TierAttempt(tier="reference", model="r", accepted=True, response=topic,
                                                  cost_usd=cost_by_topic[topic])]))
            w.submit(FeedbackEvent(request_id=rid, time=t + 0.5, tier="student", accepted=False, source="shadow",
                                   reference_response=topic))
            rows.append({"request_id": rid, "query": q, "topic": topic})
    for i in range(6):  # the student answered and nobody complained: not a failure
        t += 1
        w.submit(RoutingEvent(request_id=f"ok-{i}", time=t, policy="p", task="intent", query=f"top up failed {i}",
                              final_tier="student", attempts=[TierAttempt(tier="student", model="s", score=0.9,
                                                                          accepted=True, response="top_up_failed")]))
    for i in range(labelled_bad):  # accepted, later labelled unacceptable by a labeller
        t += 1
        rid = f"bad-{i}"
        w.submit(RoutingEvent(request_id=rid, time=t, policy="p", task="intent", query=f"extra fee charged {i}",
                              final_tier="student", attempts=[TierAttempt(tier="student", model="s", score=0.8,
                                                                          accepted=True, response="top_up_failed")]))
        w.submit(FeedbackEvent(request_id=rid, time=t + 1, accepted=False, source="user", labeller="qa"))
        # and an anonymous label of another accepted answer: logged, never counts (events.label_trust)
        w.submit(FeedbackEvent(request_id=f"ok-{i % 6}", time=t + 2, accepted=False, source="user"))
    w.close()
    return rows


@pytest.fixture
def topic_embed(monkeypatch):
    """Replace the MiniLM encoder with planted topic embeddings (the stage code around it stays real)."""
    from routenlp.trainer import cluster

    rng = np.random.default_rng(1)
    centres = {t: rng.normal(size=384) for t in list(TOPICS) + ["other"]}

    def fake_embed(texts, encoder_path=None, spec=None):
        out = []
        for text in texts:
            topic = next((t for t, qs in TOPICS.items() if any(text.startswith(q) for q in qs)), "other")
            out.append(centres[topic] + 0.05 * rng.normal(size=384))
        return np.array(out, dtype=np.float32)

    monkeypatch.setattr(cluster, "embed", fake_embed)
    return fake_embed


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="session")
def helpers():
    """The helper functions above (pytest's importlib mode cannot import conftest from a test module)."""
    from types import SimpleNamespace

    return SimpleNamespace(planted_embeddings=planted_embeddings, write_log=write_log, read_manifest=read_manifest,
                           TOPICS=TOPICS)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread: on a machine shared with busy processes two spinning OpenMP threads are far slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
