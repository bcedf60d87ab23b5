"""Rebuilding the core from what the journal holds, and the rows the journal is given.

`restore` puts every alert and delivery back exactly as recorded (same states, counts, flags),
then re-derives what is not journalled: the holder and waiters of each terminal, and fresh timers
(an attempt in flight gets a new acknowledgement timer, a retry is due at once, a broadcast that
held its terminal playing holds it for another `max_play_s`; a terminal two records claim goes to
the one playing it, then the highest). `resend_in_flight` then re-sends every attempt in flight
that holds its terminal: it may never have left before the crash, and terminals play an (alert,
revision) once however often it arrives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ebcd.delivery.alerts import Alert, Delivery
from ebcd.delivery.core import Core
from ebcd.delivery.preemption import rank
from ebcd.delivery.records import AlertRecord, DeliveryRecord, Play, Transition
from ebcd.delivery.state import AState, DEvent, DState, Progress
from ebcd.model.alert import AlertRequest

RESTORED_PLAY_HOLD_S = 30.0  # how long a rebuilt, still-playing broadcast keeps its terminal


def delivery_row(t: Transition, wall_at: float) -> dict[str, Any]:
    """The journal row (`Journal.record_delivery`) of a transition: the delivery's whole state."""
    r = t.record
    detail = r.progress.value if r.state is DState.ACKNOWLEDGED and r.progress else r.cause
    return {
        "full": 1,
        "alert_id": r.alert_id,
        "terminal": r.terminal,
        "state": r.state.value,
        "detail": detail,
        "at": wall_at,
        "attempt": int(t.event is DEvent.SEND),
        "attempts": r.attempts,
        "revision": r.revision,
        "progress": r.progress.value if r.progress else None,
        "acked": int(r.acked),
        "finished": int(r.finished),
        "resume": int(r.resume),
        "retry": int(r.retry),
        "budget_base": r.budget_base,
        "left_area": int(r.left),
    }


def record_from_row(alert_id: str, terminal: str, row: Any) -> DeliveryRecord:
    """A DeliveryRecord from the journal's `Delivery` row (ebcd.journal.journal.Delivery)."""
    return DeliveryRecord(
        alert_id=alert_id,
        terminal=terminal,
        revision=int(row.revision),
        state=DState(row.state),
        progress=Progress(row.progress) if row.progress else None,
        acked=bool(row.acked),
        finished=bool(row.finished),
        resume=bool(row.resume),
        attempts=int(row.attempts),
        budget_base=int(row.budget_base),
        cause=None if row.state == DState.ACKNOWLEDGED.value else row.detail,
        retry=bool(row.retry),
        left=bool(row.left),
    )


def restore(
    core: Core,
    alerts: Iterable[AlertRecord],
    deliveries: Mapping[str, Iterable[DeliveryRecord]],
    *,
    now: float,
    wall_now: float,
) -> list[Alert]:
    """Put journalled alerts and deliveries back into an empty core; returns the alerts restored."""
    policy = core.policy
    restored = []
    for rec in sorted(alerts, key=lambda a: a.order):
        request = AlertRequest.model_validate(rec.request)
        alert = Alert(
            id=rec.alert_id,
            ebmid=rec.ebmid,
            request=request,
            rank=rank(request, policy.priority_order),
            order=rec.order,
            accepted_at=rec.accepted_at,
            expires=now + (rec.expires_at - wall_now),
            expires_at=rec.expires_at,
            revision=rec.revision,
            state=rec.state,
            closed=rec.closed,
            reason=rec.reason,
            source=rec.source,
            actor=rec.actor,
        )
        core.adopt(alert)
        for r in deliveries.get(rec.alert_id, ()):
            d = Delivery(
                terminal=r.terminal,
                state=r.state,
                progress=r.progress,
                acked=r.acked,
                finished=r.finished,
                resume=r.resume,
                attempts=r.attempts,
                budget_base=r.budget_base,
                cause=r.cause,
            )
            if r.left or r.revision != rec.revision:
                alert.left[r.terminal] = d
                continue
            d.due = _timer(alert, d, r.retry, now, core)
            core.adopt_delivery(alert, d)
        restored.append(alert)
    core.rederive(now)
    return restored


def _timer(alert: Alert, d: Delivery, retry: bool, now: float, core: Core) -> float | None:
    if alert.closed:
        return None
    if d.state is DState.SENT:
        return now + core.policy.ack_timeout_s
    if d.state is DState.UNCERTAIN:
        return now if retry else None
    if d.state is DState.ACKNOWLEDGED and retry and not d.finished and d.progress is not Progress.STOPPED:
        # it held its terminal: maybe still playing, maybe its `done` was the last thing a crash
        # lost; hold it a little, not `max_play_s`, or every waiter behind it stalls for minutes
        return now + min(core.policy.max_play_s, RESTORED_PLAY_HOLD_S)
    return None


def resend_in_flight(core: Core) -> list[Play]:
    """Play effects for every attempt in flight, and every broadcast that was playing, after a
    restore (the state does not change)."""
    plays: dict[tuple[str, int, bool], list[str]] = {}
    for alert in core.alerts.values():
        if alert.closed or alert.state is AState.PENDING_APPROVAL:
            continue
        for d in alert.deliveries.values():
            # an attempt that lost its terminal (it went away, another broadcast took it) asks again
            # when its timer runs out: re-sending it now would play it over the holder's
            holder = core.holders.holder_of(d.terminal)
            if d.finished or holder != alert.id:
                continue
            if d.state is DState.SENT:
                plays.setdefault((alert.id, alert.revision, d.resume), []).append(d.terminal)
            elif d.state is DState.ACKNOWLEDGED and d.due is not None:
                # playing when the daemon died, or its `done` was lost with it: a copy (never a
                # resume) is answered `done` by a terminal that finished, and is not played twice
                plays.setdefault((alert.id, alert.revision, False), []).append(d.terminal)
    return [Play(a, rev, tuple(codes), resume, first=False) for (a, rev, resume), codes in plays.items()]
