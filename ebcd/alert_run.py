"""An accepted alert on its way out: its deliveries, its timers and its rolled-up state.

Sans-IO: every method takes `now` (monotonic seconds) and returns what to do; the engine owns
the clock, the tasks and the links. That keeps retry timing testable with a fake clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ebcd.delivery import Backoff, Delivery, DState, Progress
from ebcd.model.alert import AlertRequest
from ebcd.protocols.messages import AckStatus, TerminalReport
from ebcd.tiers.district import District


class AlertState(StrEnum):
    """The alert's state as CONTRACT.md names it."""

    PENDING_APPROVAL = "pending_approval"
    DISPATCHING = "dispatching"
    COMPLETED = "completed"
    PARTIAL = "partial"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REJECTED = "rejected"


# EBMState: 0 unprocessed, 1 waiting, 2 playing, 3 success, 4 failed (incl. partial), 5 cancelled
EBM_STATE = {
    AlertState.PENDING_APPROVAL: 1,
    AlertState.DISPATCHING: 2,
    AlertState.COMPLETED: 3,
    AlertState.PARTIAL: 4,
    AlertState.EXPIRED: 4,
    AlertState.CANCELLED: 5,
    AlertState.REJECTED: 0,
}
ENDED = frozenset({AlertState.CANCELLED, AlertState.EXPIRED, AlertState.REJECTED})

_PROGRESS = {
    AckStatus.RECEIVED: Progress.RECEIVED,
    AckStatus.PLAYING: Progress.PLAYING,
    AckStatus.DONE: Progress.DONE,
    AckStatus.STOPPED: Progress.STOPPED,
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Acknowledgement timeout and retry budget per delivery."""

    ack_timeout_s: float = 5.0
    max_attempts: int = 4
    backoff: Backoff = field(default_factory=Backoff)


@dataclass(slots=True)
class AlertRun:
    """One accepted alert and its deliveries."""

    id: str
    ebmid: str
    request: AlertRequest
    deliveries: dict[str, Delivery]
    accepted_at: float  # wall clock, for people
    started: float  # monotonic
    expires: float  # monotonic: started + ttl
    revision: int = 1
    state: AlertState = AlertState.DISPATCHING
    reason: str | None = None
    source: str = ""
    actor: str = ""
    settled_at: float | None = None
    rng: random.Random = field(default_factory=random.Random)
    counts: dict[str, int] = field(default_factory=dict)
    left: dict[str, Delivery] = field(default_factory=dict)  # terminals an update took out of the area
    refusals: list[tuple[str, str]] = field(default_factory=list)  # (terminal, cause) of every refusal heard

    def __post_init__(self) -> None:
        self.recount()

    # -- counting ------------------------------------------------------------------------------
    def recount(self) -> None:
        """Recompute the per-bucket counts from the deliveries."""
        self.counts = {"acked": 0, "failed": 0, "uncertain": 0, "pending": 0}
        for d in self.deliveries.values():
            self.counts[d.bucket] += 1

    def _moved(self, before: str, d: Delivery) -> None:
        if before != d.bucket:
            self.counts[before] -= 1
            self.counts[d.bucket] += 1

    @property
    def active(self) -> bool:
        """Still within its life: not cancelled, expired or rejected."""
        return self.state not in ENDED

    @property
    def settled(self) -> bool:
        """No delivery is waiting for a send, an ack timer or a retry."""
        # asked after every report: the counts answer in O(1) while anything is pending (a scan
        # of all deliveries per ack made a 769-terminal fan-out quadratic)
        if self.counts["pending"]:
            return False
        if not self.counts["uncertain"]:
            return True
        return all(d.final for d in self.deliveries.values() if d.state is DState.UNCERTAIN)

    # -- events ----------------------------------------------------------------------------
    def to_send(self, now: float) -> list[str]:
        """Terminals due for an attempt now (pending, or uncertain with its retry due)."""
        if self.state is not AlertState.DISPATCHING and self.state not in (
            AlertState.COMPLETED,
            AlertState.PARTIAL,
        ):
            return []
        out = []
        for d in self.deliveries.values():
            if d.state is DState.PENDING or (
                d.state is DState.UNCERTAIN and d.retry_at is not None and d.retry_at <= now
            ):
                out.append(d.terminal)
        return out

    def mark_sent(self, terminals: list[str], now: float, policy: RetryPolicy) -> None:
        """Record that an attempt went out to these terminals."""
        for t in terminals:
            d = self.deliveries[t]
            before = d.bucket
            d.sent(now, policy.ack_timeout_s)
            self._moved(before, d)

    def check_timers(self, now: float, policy: RetryPolicy) -> list[str]:
        """Time out overdue attempts and schedule retries; return the terminals that timed out."""
        timed_out = []
        for d in self.deliveries.values():
            if d.state is DState.SENT and d.deadline is not None and d.deadline <= now:
                retry_at = None
                if d.attempts < policy.max_attempts:
                    retry_at = now + policy.backoff.delay(d.attempts, self.rng)
                    if retry_at >= self.expires:
                        retry_at = None
                before = d.bucket
                d.timed_out(now, retry_at=retry_at)
                self._moved(before, d)
                timed_out.append(d.terminal)
        return timed_out

    def next_wake(self) -> float:
        """The earliest monotonic time at which a timer of this alert fires."""
        wake = self.expires
        for d in self.deliveries.values():
            if d.deadline is not None:
                wake = min(wake, d.deadline)
            if d.retry_at is not None:
                wake = min(wake, d.retry_at)
        return wake

    def on_report(self, report: TerminalReport, now: float) -> bool:
        """Apply a terminal's report of the current revision; True if the alert's figures changed."""
        d = self.deliveries.get(report.terminal)
        if d is None or report.revision != self.revision:
            return False
        before = d.bucket
        if report.status is AckStatus.REFUSED:
            changed = d.refused(now, report.cause or "refused")
        else:
            changed = d.acknowledged(now, _PROGRESS[report.status])
        self._moved(before, d)
        return changed

    def preempt(self, terminal: str, now: float, by: str, *, end: bool) -> bool:
        """Another alert took the terminal: pre-empted (to resume later) or, if `end`, cancelled."""
        d = self.deliveries[terminal]
        before = d.bucket
        changed = d.preempt(now, by)
        if changed and end:
            d.to(DState.CANCELLED, now, f"ended: pre-empted by alert {by}")
        self._moved(before, d)
        return changed

    def resume(self, terminal: str, now: float) -> bool:
        """The terminal is free: play this alert on it again."""
        d = self.deliveries.get(terminal)
        if d is None or not self.active:
            return False
        before = d.bucket
        changed = d.resume(now)
        self._moved(before, d)
        return changed

    def reopen(self, terminal: str, now: float, why: str) -> bool:
        """A terminal came back: send again if it has not acknowledged; True if reopened."""
        d = self.deliveries.get(terminal)
        if d is None or not self.active:
            return False
        before = d.bucket
        changed = d.reopen(now, why)
        self._moved(before, d)
        return changed

    def revise(self, request: AlertRequest, terminals: list[str], now: float) -> list[str]:
        """Apply an update: new content and area; return the terminals to stop (they left the area)."""
        keep = set(terminals)
        to_stop = []
        for code in [c for c in self.deliveries if c not in keep]:
            d = self.deliveries.pop(code)
            if d.state in (DState.SENT, DState.UNCERTAIN, DState.ACKNOWLEDGED):
                to_stop.append(code)
            if d.state not in (DState.EXPIRED, DState.CANCELLED):
                d.to(DState.CANCELLED, now, f"left the alert's area in revision {self.revision + 1}")
            self.left[code] = d
        why = f"updated to revision {self.revision + 1}"
        for code in terminals:
            kept = self.deliveries.get(code)
            if kept is None:
                self.deliveries[code] = Delivery(code)
            else:
                kept.renew(now, why)
        self.revision += 1
        self.request = request
        self.expires = now + request.ttl_s
        self.state = AlertState.DISPATCHING
        self.settled_at = None
        self.recount()
        return to_stop

    def end(self, state: AlertState, now: float, why: str) -> list[str]:
        """Cancel or expire the alert; return the terminals that should be told to stop."""
        to_stop = []
        target = DState.EXPIRED if state is AlertState.EXPIRED else DState.CANCELLED
        for d in self.deliveries.values():
            before = d.bucket
            if d.state in (DState.PENDING, DState.SENT, DState.UNCERTAIN, DState.PREEMPTED):
                if d.state in (DState.SENT, DState.UNCERTAIN):
                    to_stop.append(d.terminal)
                d.to(target, now, why)
            elif d.state is DState.ACKNOWLEDGED and state is AlertState.CANCELLED:
                to_stop.append(d.terminal)
                d.to(DState.CANCELLED, now, why)
            self._moved(before, d)
        if state is AlertState.EXPIRED and self.state in (AlertState.COMPLETED, AlertState.PARTIAL):
            self.state = self.state if self.counts["acked"] else AlertState.EXPIRED
        else:
            self.state = state
        self.reason = why
        return to_stop

    def settle(self, now: float) -> bool:
        """Update the alert state from its deliveries; True if the state changed."""
        if self.state not in (AlertState.DISPATCHING, AlertState.COMPLETED, AlertState.PARTIAL):
            return False
        if not self.settled:
            new = AlertState.DISPATCHING
        elif self.counts["acked"] == len(self.deliveries):
            new = AlertState.COMPLETED
        else:
            new = AlertState.PARTIAL
        if new is self.state:
            return False
        self.state = new
        self.settled_at = now if new is not AlertState.DISPATCHING else None
        return True

    # -- reporting -------------------------------------------------------------------------
    def buckets(self) -> dict[str, str]:
        """terminal -> acked/failed/uncertain/pending."""
        return {t: d.bucket for t, d in self.deliveries.items()}

    def state_doc(self, district: District, now: float) -> dict[str, Any]:
        """The alert state of CONTRACT.md, as published on the state topic."""
        targets = len(self.deliveries)
        buckets = self.buckets()
        towns = {
            code: {"name": district.towns[code].name, **t.as_dict()}
            for code, t in sorted(district.town_tallies(buckets).items())
        }
        req = self.request
        return {
            "id": self.id,
            "identifier": req.identifier,
            "sender": req.sender,
            "ebmid": self.ebmid,
            "revision": self.revision,
            "state": self.state.value,
            "ebm_state": EBM_STATE[self.state],
            "level": req.level,
            "event_type": req.event_type,
            "test": req.test,
            "text": req.text,
            "targets": targets,
            "acked": self.counts["acked"],
            "failed": self.counts["failed"],
            "uncertain": self.counts["uncertain"],
            "pending": self.counts["pending"],
            "coverage": round(self.counts["acked"] / targets, 4) if targets else 0.0,
            "towns": towns,
            "accepted_at": self.accepted_at,
            "ttl_remaining_s": max(0.0, round(self.expires - now, 1)),
            "reason": self.reason,
        }
