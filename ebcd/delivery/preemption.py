"""One broadcast per terminal: priorities, the holder of each terminal and who waits for it.

A terminal plays one broadcast at a time. `Holders` records which alert holds each terminal and,
per terminal, a heap of the alerts waiting for it (highest priority first, then the one accepted
first), so that waiting costs nothing until the terminal is released: no scan, no re-ranking.
Entries of alerts that stopped waiting are dropped lazily when they reach the top.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence

from ebcd.model.alert import AlertRequest, Origin

TIER_RANK = {Origin.DISTRICT: 3, Origin.TOWN: 2, Origin.VILLAGE: 1}
CRITERIA = ("emergency", "tier", "level")


def rank(request: AlertRequest, order: Sequence[str]) -> tuple[int, ...]:
    """The request's priority as a tuple (higher wins), by the configured `order` of criteria."""
    keys = {
        "emergency": 1 if request.event_type.startswith("1") else 0,
        "tier": TIER_RANK[request.origin],
        "level": 5 - request.level,
    }
    return tuple(keys[k] for k in order)


_Entry = tuple[tuple[int, ...], int, str]  # (negated rank, acceptance order, alert id)
Waits = Callable[[str, tuple[int, ...]], bool]  # (alert id, rank it was queued with) -> entry stands


class Holders:
    """Which alert holds each terminal, and the alerts waiting for it."""

    def __init__(self) -> None:
        self._holder: dict[str, str] = {}
        self._waiting: dict[str, list[_Entry]] = {}
        self._queued: dict[str, set[_Entry]] = {}

    def holder_of(self, terminal: str) -> str | None:
        """The alert that holds the terminal, or None when it is free."""
        return self._holder.get(terminal)

    def take(self, terminal: str, alert_id: str) -> None:
        """`alert_id` holds the terminal from now on."""
        self._holder[terminal] = alert_id

    def release(self, terminal: str, alert_id: str) -> bool:
        """`alert_id` no longer holds the terminal; True if it did."""
        if self._holder.get(terminal) != alert_id:
            return False
        del self._holder[terminal]
        return True

    def wait(self, terminal: str, alert_id: str, alert_rank: tuple[int, ...], order: int) -> None:
        """`alert_id` waits for the terminal (idempotent)."""
        entry = (tuple(-r for r in alert_rank), order, alert_id)
        queued = self._queued.setdefault(terminal, set())
        if entry in queued:
            return
        queued.add(entry)
        heapq.heappush(self._waiting.setdefault(terminal, []), entry)

    def best(self, terminal: str, still_waiting: Waits) -> str | None:
        """The best alert still waiting for the terminal, left in its queue; None if none."""
        heap = self._waiting.get(terminal)
        while heap:
            entry = heap[0]
            if still_waiting(entry[2], tuple(-r for r in entry[0])):
                return entry[2]
            heapq.heappop(heap)
            self._queued[terminal].discard(entry)
        self._waiting.pop(terminal, None)
        self._queued.pop(terminal, None)
        return None

    def pop_best(self, terminal: str, still_waiting: Waits) -> str | None:
        """The best alert still waiting for the terminal, removed from its queue; None if none.

        `still_waiting(alert_id, rank)` tells a standing entry from a stale one (the alert stopped
        waiting, or waits again at another rank); stale entries are dropped on the way.
        """
        best = self.best(terminal, still_waiting)
        if best is not None:
            entry = heapq.heappop(self._waiting[terminal])
            self._queued[terminal].discard(entry)
        return best

    def waiters(self, terminal: str) -> Iterator[str]:
        """The alerts queued for the terminal (including stale entries), in no order."""
        for entry in self._waiting.get(terminal, ()):
            yield entry[2]

    def held(self) -> dict[str, str]:
        """terminal -> holding alert, a copy (for checks and reports)."""
        return dict(self._holder)

    def clear(self) -> None:
        """Forget everything (before a rebuild)."""
        self._holder.clear()
        self._waiting.clear()
        self._queued.clear()
