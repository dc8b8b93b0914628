"""The router's online label windows: the most recent labels of one (task, tier), one label per attempt.

A request's attempt can be labelled twice (the shadow judge, then a labeller correcting it). Counting both would
weigh that attempt double in the calibration and the observed risk, and by a timing the router does not control; so a
later label of the same request replaces the earlier one in place. Which label wins is the precedence the trainer
applies too (`events.resolve_label`, used by `AttemptLabels` here and by `eventlog.labelled_attempts`): a later label
replaces the one in force only from the same or a more trusted source, and untrusted labels never count.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Iterator, TypeVar

from .events import resolve_label

T = TypeVar("T")


class LabelWindow(Generic[T]):
    """Insertion-ordered key (a request id) -> value, holding at most `size` (the oldest go first)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, T] = OrderedDict()

    def put(self, key: Hashable, value: T) -> None:
        self._items[key] = value  # a relabel keeps its place: the attempt's age has not changed
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, key: Hashable) -> T | None:
        return self._items.get(key)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())


class AttemptLabels:
    """The label in force per attempt, (request id, tier) -> (trust, acceptable), for the most recent `size`
    attempts: the gate every online label passes before it reaches a window or the rollout figures."""

    def __init__(self, size: int):
        self._labels: LabelWindow[tuple[int, bool]] = LabelWindow(size)

    def offer(self, request_id: str, tier: str, trust: int, acceptable: bool) -> tuple[bool, bool]:
        """(taken, conflict): see `events.resolve_label`. A taken label becomes the one in force."""
        take, conflict = resolve_label(self._labels.get((request_id, tier)), trust, acceptable)
        if take:
            self._labels.put((request_id, tier), (trust, acceptable))
        return take, conflict
