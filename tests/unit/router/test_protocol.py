"""The request models: which field a 400 names when several are wrong (the order the checks always ran), null versus
absent, and what the cascade reads of a valid body."""

import pytest

from routenlp.router.protocol import ApiError, parse_chat, parse_completion, parse_feedback

USER = [{"role": "user", "content": "hi"}]


def refusal(parse, body, *args):
    with pytest.raises(ApiError) as e:
        parse(body, *args)
    return e.value.status, e.value.message, e.value.param


@pytest.mark.parametrize("body,param", [
    ({"messages": [], "stream": "x", "logprobs": 1}, "messages"),  # the payload first
    ({"messages": USER, "top_logprobs": 99, "stream": "x", "n": 2}, "stream"),  # then the sampling fields, in order
    ({"messages": USER, "top_logprobs": 99, "n": 2}, "n"),
    ({"messages": USER, "top_logprobs": 99, "logprobs": 1}, "logprobs"),  # logprobs last
    ({"messages": USER, "metadata": {"task": 1}}, "metadata.task"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages[0].content"),
])
def test_the_first_field_at_fault_is_named(body, param):
    assert refusal(parse_chat, body)[2] == param


def test_null_is_refused_where_absent_is_allowed():
    assert refusal(parse_chat, {"messages": USER, "stream": None})[2] == "stream"
    assert refusal(parse_chat, {"messages": USER, "model": None})[2] == "model"
    req = parse_chat({"messages": USER, "temperature": None, "metadata": None, "n": 1.0, "extra": {"kept": True}})
    assert req.body["extra"] == {"kept": True} and not req.stream


def test_query_and_flags():
    chat = parse_chat({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {}}, {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "c"}], "logprobs": True, "metadata": {"task": "t"}})
    assert (chat.query, chat.wants_logprobs, chat.metadata_task) == ("a\nb", True, "t")
    assert parse_chat({"messages": [{"role": "system", "content": "s"}, {"role": "assistant"}]}).query == "s"
    comp = parse_completion({"prompt": ["p"], "logprobs": 0, "stream": True})
    assert (comp.kind, comp.query, comp.wants_logprobs, comp.stream) == ("completions", "p", True, True)
    assert refusal(parse_completion, {"prompt": ["a", "b"]})[2] == "prompt"


def test_feedback_label_is_checked_before_the_tier():
    tiers = ["small", "big"]
    assert refusal(parse_feedback, {"request_id": "r", "tier": 5}, tiers) == (
        400, "give 'accepted' (boolean) or 'score' (0..1)", "accepted")
    assert refusal(parse_feedback, {"request_id": "r", "score": 1, "tier": "huge"}, tiers) == (
        400, "'tier' must be one of small, big", "tier")
    assert refusal(parse_feedback, {"request_id": "r" * 201, "accepted": True}, tiers)[2] == "request_id"
    assert refusal(parse_feedback, {"request_id": "r", "score": True}, tiers)[2] == "score"
    fb = parse_feedback({"request_id": "r", "score": 1}, tiers)
    assert fb.score == 1.0 and isinstance(fb.score, float) and fb.tier is None
