"""Condition types and ready sets declared with the API (KServe's condition-set pattern)."""

from __future__ import annotations

from routenlp.api.common import READY, ROUTING_POLICY_READY, ReadySet


def cond(type_: str, status: str, reason: str = "R") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": ""}


def test_the_first_false_condition_of_the_set_blocks_ready_in_the_sets_order():
    ready_set = ReadySet(("A", "B", "C"))
    assert ready_set.blocking([cond("A", "True"), cond("B", "True"), cond("C", "True")]) is None
    assert ready_set.blocking([cond("C", "False", "c"), cond("B", "False", "b"), cond("A", "True")])["reason"] == "b"
    # absent and Unknown ones do not block; types outside the set never do
    assert ready_set.blocking([cond("B", "Unknown"), cond(READY, "False"), cond("X", "False")]) is None


def test_routing_policy_ready_set():
    assert ROUTING_POLICY_READY.types == ("TiersResolved", "AuthSecretsFound", "RouterReady", "TiersReady")
