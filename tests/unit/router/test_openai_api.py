"""openai_api's extraction from upstream bodies: whatever a tier sends, what it returns has the type it declares."""

from routenlp.router.events import TierAttempt
from routenlp.router.openai_api import answer_text


def test_answer_text_reads_chat_and_completion_answers():
    assert answer_text("chat", {"choices": [{"message": {"content": "hi"}}]}) == "hi"
    assert answer_text("completion", {"choices": [{"text": "hi"}]}) == "hi"
    assert answer_text("chat", {"choices": []}) is None
    assert answer_text("chat", None) is None


def test_answer_text_that_is_not_a_string_is_no_answer_text():
    """A tier answering with list content (or a number) must not reach TierAttempt.response, which takes a string
    and would raise on it, failing the request."""
    for content in ([{"type": "text", "text": "hi"}], 42, {"text": "hi"}):
        text = answer_text("chat", {"choices": [{"message": {"content": content}}]})
        assert text is None
        TierAttempt(tier="a", model="m", response=text)
    assert answer_text("completion", {"choices": [{"text": 7}]}) is None
