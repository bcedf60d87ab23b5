"""The two state machines of the delivery core, as event x state tables.

Theory of operation
-------------------
A **delivery** is one alert's way to one terminal. It starts PENDING while its alert waits for
approval, then asks for the terminal: a terminal plays one broadcast at a time, so the delivery
either gets it (an attempt goes out: SENT, with an acknowledgement timer) or WAITs for the
broadcast that holds it. An acknowledgement (received, playing, done) makes it ACKNOWLEDGED; a
refusal REFUSED. When the timer runs out it is UNCERTAIN (the terminal may well be playing) and is
retried after a capped, jittered backoff while attempts and time to live remain; a late
acknowledgement upgrades it at any time. A higher broadcast that takes the terminal makes it
PREEMPTED; it asks for the terminal again when that one ends (policy `resume`) or ends CANCELLED
(policy `end`). So does a late acknowledgement of an attempt whose terminal another broadcast has
taken since (the holder it waits for, or the one ebcd sent after giving up on it): it counts, and
the broadcast the terminal did not finish is pre-empted, not forgotten. A cancel makes whatever is
open CANCELLED, the time to live EXPIRED; nothing is sent past the time to live, even when the
clock jumps past it and its timer has yet to fire. A terminal that comes back (a new session)
re-opens what it never acknowledged, and a resume it never confirmed (back to PENDING), asked by
priority; an update re-opens every delivery it keeps for the new revision. A resend (the duty
officer finishing a partial alert) re-opens the UNCERTAIN and REFUSED ones the officer picked,
with a fresh retry budget, in the same revision; never one acknowledged or finished.

Counting never rewrites history: a delivery that was acknowledged in the current revision counts
as acked whatever happens to it later (pre-empted, cancelled, expired). A delivery whose terminal
reported `done`, or that ebcd stopped, is *finished*: nothing sends its revision again.

An **alert** is PENDING_APPROVAL (manual review) or DISPATCHING until no delivery has work left,
then COMPLETED (every target acknowledged) or PARTIAL; a late acknowledgement turns PARTIAL into
COMPLETED, a returning terminal turns it back into DISPATCHING. CANCELLED, EXPIRED and REJECTED
end it. At its time to live a settled alert keeps its state and is *closed*.

A missing cell means the event does not apply in that state: for a report from a terminal that
is the peer's business (ignored, counted by the caller); for anything ebcd decides itself it is a
bug (`InvalidTransition`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class DState(StrEnum):
    """The states of one delivery (alert x terminal)."""

    PENDING = "pending"  # not asked for the terminal yet (the alert waits for approval)
    WAITING = "waiting"  # the terminal plays another broadcast; asks again when that one ends
    SENT = "sent"  # an attempt in flight, acknowledgement timer armed
    UNCERTAIN = "uncertain"  # no acknowledgement in time; retry timer armed while attempts remain
    ACKNOWLEDGED = "acknowledged"  # received / playing / done (see Progress)
    PREEMPTED = "preempted"  # a higher broadcast took the terminal before this one finished
    REFUSED = "refused"  # the terminal refused, with a cause
    CANCELLED = "cancelled"  # stopped by a cancel, an update that left it out, or pre-emption (end)
    EXPIRED = "expired"  # the alert's time to live ended first


class DEvent(StrEnum):
    """What can happen to a delivery."""

    SEND = "send"  # the terminal is free: an attempt goes out
    BLOCK = "block"  # the terminal is held by another broadcast
    ACK = "ack"  # received / playing / done
    REFUSE = "refuse"
    TIMEOUT = "timeout"  # the acknowledgement timer ran out (or the link could not send)
    PREEMPT = "preempt"
    CANCEL = "cancel"
    EXPIRE = "expire"
    REOPEN = "reopen"  # the terminal came back: send again what it never acknowledged
    RENEW = "renew"  # an update: deliver the new revision
    RESEND = "resend"  # the duty officer asked for a new attempt of the same revision


class Progress(StrEnum):
    """How far an acknowledged delivery got on the loudspeaker."""

    RECEIVED = "received"
    PLAYING = "playing"
    DONE = "done"
    STOPPED = "stopped"


class Bucket(StrEnum):
    """How a delivery counts in the alert state (CONTRACT.md's fields, plus cancelled)."""

    ACKED = "acked"
    FAILED = "failed"
    UNCERTAIN = "uncertain"
    PENDING = "pending"
    CANCELLED = "cancelled"


_S, _E = DState, DEvent

# DELIVERY[state][event] -> next state
DELIVERY: Final[dict[DState, dict[DEvent, DState]]] = {
    _S.PENDING: {_E.SEND: _S.SENT, _E.BLOCK: _S.WAITING, _E.CANCEL: _S.CANCELLED, _E.EXPIRE: _S.EXPIRED,
                 _E.RENEW: _S.PENDING},
    _S.WAITING: {_E.SEND: _S.SENT, _E.BLOCK: _S.WAITING, _E.ACK: _S.ACKNOWLEDGED, _E.CANCEL: _S.CANCELLED,
                 _E.EXPIRE: _S.EXPIRED, _E.RENEW: _S.PENDING},
    _S.SENT: {_E.ACK: _S.ACKNOWLEDGED, _E.REFUSE: _S.REFUSED, _E.TIMEOUT: _S.UNCERTAIN,
              _E.PREEMPT: _S.PREEMPTED, _E.CANCEL: _S.CANCELLED, _E.EXPIRE: _S.EXPIRED,
              _E.REOPEN: _S.PENDING, _E.RENEW: _S.PENDING},
    _S.UNCERTAIN: {_E.SEND: _S.SENT, _E.BLOCK: _S.WAITING, _E.ACK: _S.ACKNOWLEDGED, _E.REFUSE: _S.REFUSED,
                   _E.PREEMPT: _S.PREEMPTED, _E.CANCEL: _S.CANCELLED, _E.EXPIRE: _S.EXPIRED,
                   _E.REOPEN: _S.PENDING, _E.RENEW: _S.PENDING, _E.RESEND: _S.PENDING},
    # a cancel stops what plays: the delivery stays acknowledged (progress `stopped`)
    _S.ACKNOWLEDGED: {_E.ACK: _S.ACKNOWLEDGED, _E.PREEMPT: _S.PREEMPTED, _E.CANCEL: _S.ACKNOWLEDGED,
                      _E.RENEW: _S.PENDING},
    _S.PREEMPTED: {_E.SEND: _S.SENT, _E.BLOCK: _S.PREEMPTED, _E.ACK: _S.ACKNOWLEDGED,
                   _E.CANCEL: _S.CANCELLED, _E.EXPIRE: _S.EXPIRED, _E.RENEW: _S.PENDING},
    _S.REFUSED: {_E.ACK: _S.ACKNOWLEDGED, _E.REOPEN: _S.PENDING, _E.RENEW: _S.PENDING,
                 _E.RESEND: _S.PENDING},
    # a late acknowledgement of an attempt that did go out is still the truth about that terminal
    _S.CANCELLED: {_E.ACK: _S.CANCELLED, _E.RENEW: _S.PENDING},
    _S.EXPIRED: {_E.ACK: _S.EXPIRED},
}  # fmt: skip

# Events a terminal causes: a missing cell means "ignore this report", never a bug.
PEER_EVENTS: Final = frozenset({DEvent.ACK, DEvent.REFUSE})

# How each state counts when the delivery was not acknowledged in the current revision.
BUCKET: Final[dict[DState, Bucket]] = {
    DState.PENDING: Bucket.PENDING,
    DState.WAITING: Bucket.PENDING,
    DState.SENT: Bucket.PENDING,
    DState.UNCERTAIN: Bucket.UNCERTAIN,
    DState.ACKNOWLEDGED: Bucket.ACKED,
    DState.PREEMPTED: Bucket.PENDING,
    DState.REFUSED: Bucket.FAILED,
    DState.CANCELLED: Bucket.CANCELLED,
    DState.EXPIRED: Bucket.FAILED,
}

# States in which a delivery that was never acknowledged still has work ahead (keeps its alert
# dispatching). UNCERTAIN has work only while a retry is armed; the core checks that itself.
OPEN: Final = frozenset({DState.PENDING, DState.WAITING, DState.SENT, DState.PREEMPTED})


class AState(StrEnum):
    """The alert's state, as CONTRACT.md names it."""

    PENDING_APPROVAL = "pending_approval"
    DISPATCHING = "dispatching"
    COMPLETED = "completed"
    PARTIAL = "partial"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    REJECTED = "rejected"


class AEvent(StrEnum):
    """What can happen to an alert."""

    APPROVE = "approve"
    REJECT = "reject"
    ALL_ACKED = "all_acked"  # no work left, every target acknowledged
    SETTLED = "settled"  # no work left, some targets not acknowledged
    REOPENED = "reopened"  # work again (a terminal came back)
    UPDATE = "update"
    CANCEL = "cancel"
    EXPIRE = "expire"  # time to live over with work left (or nothing reached)
    CLOSE = "close"  # time to live over, settled: the state stands


_A, _V = AState, AEvent
ALERT: Final[dict[AState, dict[AEvent, AState]]] = {
    _A.PENDING_APPROVAL: {_V.APPROVE: _A.DISPATCHING, _V.REJECT: _A.REJECTED, _V.CANCEL: _A.CANCELLED,
                          _V.EXPIRE: _A.EXPIRED},
    _A.DISPATCHING: {_V.ALL_ACKED: _A.COMPLETED, _V.SETTLED: _A.PARTIAL, _V.UPDATE: _A.DISPATCHING,
                     _V.CANCEL: _A.CANCELLED, _V.EXPIRE: _A.EXPIRED},
    _A.PARTIAL: {_V.ALL_ACKED: _A.COMPLETED, _V.REOPENED: _A.DISPATCHING, _V.UPDATE: _A.DISPATCHING,
                 _V.CANCEL: _A.CANCELLED, _V.EXPIRE: _A.EXPIRED, _V.CLOSE: _A.PARTIAL},
    # a completed alert may still be playing: a cancel stops the loudspeakers (the counts stay)
    _A.COMPLETED: {_V.UPDATE: _A.DISPATCHING, _V.CANCEL: _A.CANCELLED, _V.CLOSE: _A.COMPLETED},
    _A.CANCELLED: {},
    _A.EXPIRED: {},
    _A.REJECTED: {},
}  # fmt: skip

ENDED: Final = frozenset({AState.CANCELLED, AState.EXPIRED, AState.REJECTED})

# EBMState (DOMAIN.md): 0 unprocessed, 1 waiting, 2 playing, 3 success, 4 failed/partial, 5 cancelled
EBM_STATE: Final[dict[AState, int]] = {
    AState.PENDING_APPROVAL: 1,
    AState.DISPATCHING: 2,
    AState.COMPLETED: 3,
    AState.PARTIAL: 4,
    AState.EXPIRED: 4,
    AState.CANCELLED: 5,
    AState.REJECTED: 0,
}


class InvalidTransition(RuntimeError):
    """A transition the table does not allow, asked for by ebcd itself: a bug, never the peer's."""


def next_delivery_state(state: DState, event: DEvent) -> DState | None:
    """The delivery's next state, None for a peer event that does not apply; else InvalidTransition."""
    new = DELIVERY[state].get(event)
    if new is None and event not in PEER_EVENTS:
        raise InvalidTransition(f"delivery: {event} in state {state}")
    return new


def next_alert_state(state: AState, event: AEvent) -> AState:
    """The alert's next state, or InvalidTransition."""
    new = ALERT[state].get(event)
    if new is None:
        raise InvalidTransition(f"alert: {event} in state {state}")
    return new
