"""What the core hands out and takes back: effects, transitions and the records the journal keeps.

Everything here is plain frozen data. A `DeliveryRecord` is the whole state of one delivery, so
the journal's current-state table is simply the latest record of each (alert, terminal), and a
rebuild from those records gives back the same core (`ebcd.delivery.recovery`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ebcd.delivery.state import AEvent, AState, DEvent, DState, Progress


@dataclass(frozen=True, slots=True)
class Play:
    """Send the alert's current revision to these terminals (`first`: all first attempts)."""

    alert_id: str
    revision: int
    terminals: tuple[str, ...]
    resume: bool
    first: bool


@dataclass(frozen=True, slots=True)
class Stop:
    """Tell these terminals to stop the alert."""

    alert_id: str
    revision: int
    terminals: tuple[str, ...]
    why: str


@dataclass(frozen=True, slots=True)
class Note:
    """Something the runner must log and count: a timeout, a release for silence, a drop."""

    kind: str
    alert_id: str
    terminal: str | None
    detail: str


Effect = Play | Stop | Note


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """The whole state of one delivery, as journalled."""

    alert_id: str
    terminal: str
    revision: int
    state: DState
    progress: Progress | None
    acked: bool
    finished: bool
    resume: bool
    attempts: int
    budget_base: int
    cause: str | None
    retry: bool  # a timer armed past the attempt: a retry (uncertain), a play hold (acknowledged)
    left: bool = False  # an update took the terminal out of the alert's area


@dataclass(frozen=True, slots=True)
class Transition:
    """One delivery changed: from `old` by `event` to the state in `record`, at `at` (monotonic).

    `event` is None when the delivery's state did not move: it was created (an alert held for
    review: its targets are journalled before anything moves; `old` is None too) or an update took
    its terminal out of the alert's area (`record.left`).
    """

    old: DState | None
    event: DEvent | None
    record: DeliveryRecord
    at: float
    was_acked: bool = False  # acknowledged in this revision before this transition


@dataclass(frozen=True, slots=True)
class AlertTransition:
    """One alert changed state (old is None when it was accepted)."""

    alert_id: str
    old: AState | None
    event: AEvent | None
    new: AState
    at: float


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """An alert as journalled: enough to rebuild it (its deliveries are DeliveryRecords)."""

    alert_id: str
    ebmid: str
    request: dict[str, Any]  # AlertRequest as JSON
    revision: int
    state: AState
    accepted_at: float  # wall clock
    expires_at: float  # wall clock
    order: int
    source: str
    actor: str
    reason: str | None
    closed: bool


@dataclass(slots=True)
class Outbox:
    """What the core decided since the last drain, in order."""

    effects: list[Effect]
    transitions: list[Transition]
    alerts: list[AlertTransition]
    changed: set[str]  # alerts whose figures or state changed (to journal and publish)
    settled: set[str]  # alerts that reached a settled or final state in this batch

    @classmethod
    def empty(cls) -> Outbox:
        """An outbox with nothing in it."""
        return cls([], [], [], set(), set())
