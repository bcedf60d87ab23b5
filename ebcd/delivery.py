"""One delivery per (alert, terminal): an explicit state machine.

Theory of operation
-------------------
A delivery starts PENDING. Each attempt sends the command (SENT) and starts an acknowledgement
timer. An acknowledgement (received, playing, done) makes it ACKNOWLEDGED; a refusal with a
cause makes it REFUSED. When the timer runs out the delivery becomes UNCERTAIN: the terminal may
well be playing, we just do not know. An uncertain delivery is retried (back to SENT) after a
capped, jittered backoff while attempts remain and the alert lives; a late acknowledgement
upgrades it at any time. When the alert's time to live ends, whatever was never acknowledged
becomes EXPIRED; when the alert is cancelled, it becomes CANCELLED. A terminal that comes back
online re-opens its UNCERTAIN or EXPIRED-before-TTL delivery (back to PENDING) so it still gets
every alert active in its scope. An update of the alert re-opens every delivery it keeps (back
to PENDING, attempts reset) so the terminal gets the new revision. A terminal plays one broadcast
at a time: when a higher-priority alert takes it, this delivery is PREEMPTED; by policy it is
resumed (back to PENDING, sent again with `resume`) when the terminal is free, or ended.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum


class DState(StrEnum):
    """The states of one delivery."""

    PENDING = "pending"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"
    REFUSED = "refused"
    UNCERTAIN = "uncertain"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"


class Progress(StrEnum):
    """How far an acknowledged delivery got on the loudspeaker."""

    RECEIVED = "received"
    PLAYING = "playing"
    DONE = "done"
    STOPPED = "stopped"


_S = DState
TRANSITIONS: dict[DState, frozenset[DState]] = {
    _S.PENDING: frozenset({_S.SENT, _S.CANCELLED, _S.EXPIRED}),
    _S.SENT: frozenset(
        {_S.ACKNOWLEDGED, _S.REFUSED, _S.UNCERTAIN, _S.CANCELLED, _S.EXPIRED, _S.PENDING, _S.PREEMPTED}),
    _S.UNCERTAIN: frozenset(
        {_S.SENT, _S.ACKNOWLEDGED, _S.REFUSED, _S.CANCELLED, _S.EXPIRED, _S.PENDING, _S.PREEMPTED}),
    # progress (received -> playing -> done) stays ACKNOWLEDGED; a stop ends it CANCELLED
    _S.ACKNOWLEDGED: frozenset({_S.ACKNOWLEDGED, _S.CANCELLED, _S.REFUSED, _S.PENDING, _S.PREEMPTED}),
    _S.REFUSED: frozenset({_S.PENDING, _S.ACKNOWLEDGED}),
    _S.PREEMPTED: frozenset({_S.PENDING, _S.CANCELLED, _S.EXPIRED}),
    _S.EXPIRED: frozenset(),
    _S.CANCELLED: frozenset(),
}  # fmt: skip

# How each state counts in the alert state and coverage.
BUCKET: dict[DState, str] = {
    DState.PENDING: "pending",
    DState.SENT: "pending",
    DState.ACKNOWLEDGED: "acked",
    DState.REFUSED: "failed",
    DState.UNCERTAIN: "uncertain",
    DState.EXPIRED: "failed",
    DState.CANCELLED: "failed",
    DState.PREEMPTED: "pending",  # it will play again when the terminal is free (resume policy)
}


class InvalidTransition(RuntimeError):
    """A transition the table does not allow: a bug in the caller, never the peer's fault."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter: initial * 2^(attempt-1), at most `max_s`."""

    initial_s: float = 1.0
    max_s: float = 30.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        base: float = min(self.max_s, self.initial_s * 2.0 ** max(0, attempt - 1))
        return base * (1 + rng.uniform(-self.jitter, self.jitter))


@dataclass(slots=True)
class Delivery:
    """The delivery of one alert to one terminal."""

    terminal: str
    state: DState = DState.PENDING
    progress: Progress | None = None
    cause: str | None = None
    attempts: int = 0
    deadline: float | None = None  # ack timer of the attempt in flight, monotonic seconds
    retry_at: float | None = None  # when an uncertain delivery is sent again
    acked_at: float | None = None
    resuming: bool = False  # the next send resumes a pre-empted broadcast
    history: list[tuple[float, DState, str | None]] = field(default_factory=list)

    @property
    def bucket(self) -> str:
        """acked / failed / uncertain / pending, as the alert state counts it."""
        return BUCKET[self.state]

    @property
    def final(self) -> bool:
        """No timer or retry will move this delivery any more (a late ack still may)."""
        if self.state in (DState.PENDING, DState.SENT, DState.PREEMPTED):
            return False
        return not (self.state is DState.UNCERTAIN and self.retry_at is not None)

    def to(self, new: DState, now: float, cause: str | None = None) -> None:
        """Move to `new`, or raise InvalidTransition."""
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.terminal}: {self.state} -> {new} is not allowed")
        self.state = new
        if cause is not None or new is not DState.ACKNOWLEDGED:
            self.cause = cause
        if new is not DState.SENT:
            self.deadline = None
        if new is not DState.UNCERTAIN:
            self.retry_at = None
        self.history.append((now, new, cause))

    # -- events ----------------------------------------------------------------------------
    def sent(self, now: float, ack_timeout_s: float) -> None:
        """An attempt went out; start its acknowledgement timer."""
        self.to(DState.SENT, now)
        self.attempts += 1
        self.deadline = now + ack_timeout_s

    def acknowledged(self, now: float, progress: Progress) -> bool:
        """The terminal acknowledged; return True if anything changed."""
        if self.state is DState.ACKNOWLEDGED and _rank(progress) <= _rank(self.progress):
            return False
        if DState.ACKNOWLEDGED not in TRANSITIONS[self.state]:
            return False  # e.g. an ack after the alert was cancelled or expired
        self.to(DState.ACKNOWLEDGED, now)
        self.progress = progress
        self.resuming = False
        if self.acked_at is None:
            self.acked_at = now
        return True

    def refused(self, now: float, cause: str) -> bool:
        """The terminal refused the command; return True if anything changed."""
        if DState.REFUSED not in TRANSITIONS[self.state] or self.state is DState.REFUSED:
            return False
        self.to(DState.REFUSED, now, cause)
        return True

    def timed_out(self, now: float, *, retry_at: float | None) -> None:
        """The ack timer ran out: uncertain, retried at `retry_at` unless None."""
        self.to(DState.UNCERTAIN, now, f"no acknowledgement after attempt {self.attempts}")
        self.retry_at = retry_at

    def renew(self, now: float, why: str) -> bool:
        """The alert was updated: deliver its new revision (from any state an update keeps)."""
        if self.state in (DState.PENDING, DState.EXPIRED, DState.CANCELLED):
            return False
        self.to(DState.PENDING, now, why)
        self.attempts = 0
        self.progress = None
        self.acked_at = None
        return True

    def preempt(self, now: float, by: str) -> bool:
        """A higher-priority alert took the terminal."""
        if DState.PREEMPTED not in TRANSITIONS[self.state]:
            return False
        self.to(DState.PREEMPTED, now, f"pre-empted by alert {by}")
        return True

    def resume(self, now: float) -> bool:
        """The terminal is free again: play this alert again."""
        if self.state is not DState.PREEMPTED:
            return False
        self.to(DState.PENDING, now, "resumed after pre-emption")
        self.attempts = 0
        self.resuming = True
        return True

    def reopen(self, now: float, why: str) -> bool:
        """The terminal came back: send again if it never acknowledged. An attempt still in
        flight (SENT) is sent again too: it may have gone out before the terminal subscribed."""
        if self.state not in (DState.SENT, DState.UNCERTAIN, DState.REFUSED):
            return False
        self.to(DState.PENDING, now, why)
        self.attempts = 0
        return True


_RANKS = {None: 0, Progress.RECEIVED: 1, Progress.PLAYING: 2, Progress.DONE: 3, Progress.STOPPED: 4}


def _rank(p: Progress | None) -> int:
    return _RANKS[p]
