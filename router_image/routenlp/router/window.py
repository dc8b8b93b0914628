"""The router's online label windows: the most recent labels of one (task, tier), one label per attempt.

A request's attempt can be labelled twice (the shadow judge, then a user correcting it). Counting both would weigh
that attempt double in the calibration and the observed risk, and by a timing the router does not control; so a
later label of the same request replaces the earlier one in place, as the trainer reads the event log
(`eventlog.labelled_attempts`: a later label of the same attempt wins).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class LabelWindow(Generic[T]):
    """Insertion-ordered request id -> value, holding at most `size` (the oldest go first)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[str, T] = OrderedDict()

    def put(self, request_id: str, value: T) -> None:
        self._items[request_id] = value  # a relabel keeps its place: the attempt's age has not changed
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())
