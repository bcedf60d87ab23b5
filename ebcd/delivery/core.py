"""The delivery core: every alert and delivery, driven by events, deciding effects. Pure.

It never touches the network, the disk or the clock: each call takes `now` (monotonic seconds)
and an event (an alert accepted, approved, updated or cancelled; a terminal's report or presence;
a link that could not send; the clock reaching a timer), changes state only through `_move` and
`_alert_to` (the one door, which records a `Transition`), and leaves what must be done in its
outbox (`drain()`): commands to send, transitions to journal, alerts to publish. Timers live in
one heap keyed by due time; waiting for a terminal costs nothing until it is released
(`ebcd.delivery.preemption.Holders`).
"""

from __future__ import annotations

import functools
import heapq
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ebcd.delivery.alerts import Alert, Delivery
from ebcd.delivery.liveness import Heard, Liveness
from ebcd.delivery.preemption import CRITERIA, Holders, rank
from ebcd.delivery.records import (
    AlertTransition,
    Note,
    Outbox,
    Play,
    Stop,
    Transition,
)
from ebcd.delivery.state import (
    AEvent,
    AState,
    Bucket,
    DEvent,
    DState,
    Progress,
    next_alert_state,
    next_delivery_state,
)
from ebcd.model.alert import AlertRequest
from ebcd.model.backoff import Backoff
from ebcd.protocols.messages import AckStatus, TerminalPresence, TerminalReport

_PROGRESS = {
    AckStatus.RECEIVED: Progress.RECEIVED,
    AckStatus.PLAYING: Progress.PLAYING,
    AckStatus.DONE: Progress.DONE,
}
# What `ebcd alert resend --only` names: the states a resend re-opens (never one acknowledged)
RESEND_KINDS: dict[str, frozenset[DState]] = {
    "uncertain": frozenset({DState.UNCERTAIN}),
    "failed": frozenset({DState.REFUSED}),  # counted failed while the alert lives: refusals only
    "refused": frozenset({DState.REFUSED}),
}
_RANK = {None: 0, Progress.RECEIVED: 1, Progress.PLAYING: 2, Progress.DONE: 3, Progress.STOPPED: 3}
_UNSET: object = object()


@dataclass(frozen=True, slots=True)
class Policy:
    """Timing and priority rules of the core (from `[delivery]` and `[priority]`)."""

    ack_timeout_s: float = 5.0
    max_attempts: int = 4
    backoff: Backoff = field(default_factory=Backoff)
    max_play_s: float = 600.0  # an acknowledged broadcast holds its terminal at most this long
    priority_order: tuple[str, ...] = CRITERIA
    preempted: str = "resume"  # or "end"


class Refused(Exception):
    """The core will not do what was asked (`code` as the control socket names it)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class ReportVerdict:
    """What became of a terminal's report."""

    APPLIED = "applied"
    UNMATCHED = "unmatched"  # no such alert or delivery, or never sent: counted, dropped
    STALE = "stale_revision"


@dataclass(frozen=True, slots=True)
class AlertSpec:
    """A new alert as admission hands it over."""

    id: str
    ebmid: str
    request: AlertRequest
    accepted_at: float  # wall clock
    source: str = ""
    actor: str = ""


class Core:
    """Every alert, its deliveries, the terminals' holders and liveness, and the timers."""

    def __init__(self, terminals: Iterable[str], policy: Policy, *, seed: int | None = None) -> None:
        self.policy = policy
        self.alerts: dict[str, Alert] = {}
        self.holders = Holders()
        self.liveness = Liveness(terminals)
        self.rng = random.Random(seed)
        self._by_terminal: dict[str, set[str]] = {}  # terminal -> alerts not closed that target it
        self._timers: list[tuple[float, int, str, str | None, int]] = []  # (due, n, alert, terminal, gen)
        self._timer_n = 0
        self._order = 0
        self._out = Outbox.empty()
        self._plays: dict[tuple[str, int, bool], list[str]] = {}
        self._stops: dict[tuple[str, int, str], list[str]] = {}
        self._freed: list[str] = []
        self._touched: set[str] = set()
        self._sent_n = 0
        self._last_sent: dict[str, tuple[int, str]] = {}  # terminal -> (send number, alert) of the latest

    # -- events: alerts -------------------------------------------------------------------
    def accept(
        self, spec: AlertSpec, terminals: Sequence[str], now: float, *, hold: bool, wall_now: float
    ) -> Alert:
        """Register an alert; its fan-out starts at once unless `hold` (manual review)."""
        if spec.id in self.alerts:
            raise Refused("duplicate", f"alert {spec.id} exists")
        self._order += 1
        ttl = spec.request.ttl_s
        alert = Alert(
            id=spec.id,
            ebmid=spec.ebmid,
            request=spec.request,
            rank=rank(spec.request, self.policy.priority_order),
            order=self._order,
            accepted_at=spec.accepted_at,
            expires=now + ttl,
            expires_at=wall_now + ttl,
            source=spec.source,
            actor=spec.actor,
        )
        self.alerts[alert.id] = alert
        self._out.alerts.append(AlertTransition(alert.id, None, None, alert.state, now))
        for code in dict.fromkeys(terminals):
            self._add_delivery(alert, Delivery(code))
        self._arm_alert(alert)
        if hold:  # nothing moves until the review: journal the targets now, or a rebuild loses them
            for d in alert.deliveries.values():
                self._out.transitions.append(Transition(None, None, d.record(alert.id, alert.revision), now))
            self._out.changed.add(alert.id)
        else:
            self._approve(alert, now)
        self._finish(now)
        return alert

    def approve(self, alert_id: str, now: float) -> Alert:
        """Release an alert held for manual review."""
        alert = self._get(alert_id)
        if alert.state is not AState.PENDING_APPROVAL:
            raise Refused("not_pending", f"alert {alert_id} is not waiting for approval ({alert.state})")
        self._approve(alert, now)
        self._finish(now)
        return alert

    def reject(self, alert_id: str, why: str, now: float) -> Alert:
        """Refuse an alert held for manual review."""
        alert = self._get(alert_id)
        if alert.state is not AState.PENDING_APPROVAL:
            raise Refused("not_pending", f"alert {alert_id} is not waiting for approval ({alert.state})")
        self._end(alert, AEvent.REJECT, why, now)
        self._finish(now)
        return alert

    def cancel(self, alert_id: str, why: str, now: float) -> Alert:
        """Stop an alert everywhere; what was acknowledged stays acknowledged."""
        alert = self._get(alert_id)
        if alert.closed:
            raise Refused("ended", f"alert {alert_id} has already ended ({alert.state})")
        self._end(alert, AEvent.CANCEL, why, now)
        self._finish(now)
        return alert

    def update(self, alert_id: str, request: AlertRequest, terminals: Sequence[str], now: float) -> Alert:
        """A new revision: new content and area; terminals that left get a stop."""
        alert = self._get(alert_id)
        if alert.closed or alert.state is AState.PENDING_APPROVAL:
            raise Refused("ended", f"alert {alert_id} cannot be updated ({alert.state})")
        keep = dict.fromkeys(terminals)
        new_rev = alert.revision + 1
        why = f"left the alert's area in revision {new_rev}"
        for code in [c for c in alert.deliveries if c not in keep]:
            d = alert.deliveries[code]
            self._stop_if_playing(alert, d, why)
            self._cancel(alert, d, why, now)
            self._drop_delivery(alert, code, now)
        alert.revision = new_rev
        alert.request = request
        alert.rank = rank(request, self.policy.priority_order)
        ttl = request.ttl_s
        alert.expires_at += now + ttl - alert.expires
        alert.expires = now + ttl
        self._arm_alert(alert)
        self._alert_to(alert, AEvent.UPDATE, now)
        self._touched.add(alert.id)  # settles at once when the new area has no terminal
        renewed = f"updated to revision {new_rev}"
        for code in keep:
            kept = alert.deliveries.get(code)
            if kept is None:
                d = Delivery(code)
                self._add_delivery(alert, d)
            else:
                d = kept
                self._move(
                    alert, d, DEvent.RENEW, now, cause=renewed, due=None, acked=False, finished=False,
                    resume=False, attempts=0, budget_base=0, progress=None,
                )  # fmt: skip
                d.acked_at = None
            self._ask(alert, d, now)
        self._finish(now)
        return alert

    def resendable(self, alert_id: str, kinds: Iterable[str], now: float) -> list[Delivery]:
        """The deliveries a resend of `kinds` (RESEND_KINDS) would re-open; Refused when it may not.

        Never one acknowledged in this revision or finished: a terminal that played it is not asked
        again. Refused for an alert past its time to live, ended, waiting for approval, or with no
        terminal to resend to.
        """
        kinds = tuple(kinds)
        alert = self._get(alert_id)
        if alert.state in (AState.CANCELLED, AState.REJECTED):
            raise Refused("ended", f"alert {alert_id} has ended ({alert.state}): nothing is sent for it")
        if alert.closed or now >= alert.expires:
            raise Refused("expired", f"alert {alert_id} is past its time to live: nothing is sent for it")
        if alert.state is AState.PENDING_APPROVAL:
            raise Refused("not_approved", f"alert {alert_id} waits for approval: approve it first")
        unknown = set(kinds) - RESEND_KINDS.keys()
        if unknown or not kinds:
            raise Refused("bad_request", f"resend: expected some of {', '.join(RESEND_KINDS)}")
        states = set().union(*(RESEND_KINDS[k] for k in kinds))
        chosen = [
            d for d in alert.deliveries.values() if d.state in states and not d.acked and not d.finished
        ]
        if not chosen:
            raise Refused(
                "nothing_to_resend",
                f"alert {alert_id}: no terminal is {' or '.join(kinds)};"
                " the others acknowledged or are in flight",
            )
        return chosen

    def resend(self, alert_id: str, kinds: Iterable[str], why: str, now: float) -> list[str]:
        """A new attempt of the current revision to the terminals `resendable` picks; their codes."""
        chosen = self.resendable(alert_id, kinds, now)
        alert = self.alerts[alert_id]
        for d in chosen:
            self._move(alert, d, DEvent.RESEND, now, cause=why, due=None, budget_base=d.attempts)
            self._ask(alert, d, now)
        self._finish(now)
        return [d.terminal for d in chosen]

    # -- events: terminals ----------------------------------------------------------------
    def report(self, r: TerminalReport, now: float) -> str:
        """A terminal acknowledged, refused or stopped; returns a ReportVerdict."""
        alert = self.alerts.get(r.alert_id)
        d = alert.deliveries.get(r.terminal) if alert else None
        if alert is None or d is None or d.attempts == 0:
            return ReportVerdict.UNMATCHED
        self.liveness.heard(r.terminal, now)
        if r.revision != alert.revision:
            return ReportVerdict.STALE
        if r.status is AckStatus.REFUSED:
            cause = r.cause or "refused"
            alert.note_refusal(r.terminal, cause)
            if not d.acked:  # an acknowledgement is never undone by a refusal
                self._move(alert, d, DEvent.REFUSE, now, cause=cause, due=None)
        elif r.status is AckStatus.STOPPED:
            if d.state is DState.ACKNOWLEDGED and not d.finished:
                self._move(alert, d, DEvent.ACK, now, progress=Progress.STOPPED, due=None)
        else:
            self._acknowledged(alert, d, _PROGRESS[r.status], now)
        self._finish(now)
        return ReportVerdict.APPLIED

    def presence(self, p: TerminalPresence, now: float) -> Heard:
        """Birth, heartbeat or last will: liveness, and what a returning terminal missed."""
        heard = self.liveness.on_presence(p, now)
        if heard is Heard.RETURNED:
            self._reopen(p.terminal, now, f"terminal back online (session {p.session})")
        elif heard is Heard.WENT_OFFLINE:
            self._gone(p.terminal, "terminal offline", now)
        self._finish(now)
        return heard

    def terminals_unknown(self, terminals: Iterable[str], now: float, why: str) -> list[str]:
        """A room's link is down or terminals went silent: unknown, and free for whoever waits."""
        changed = self.liveness.mark_unknown(terminals)
        for code in changed:
            self._gone(code, why, now)
        self._finish(now)
        return changed

    def sweep(self, now: float, silent_after_s: float) -> list[str]:
        """Terminals silent for longer than `silent_after_s` become unknown."""
        gone = self.liveness.sweep(now, silent_after_s)
        for code in gone:
            self._gone(code, "terminal silent", now)
        self._finish(now)
        return gone

    def send_failed(
        self, alert_id: str, revision: int, terminals: Iterable[str], cause: str, now: float
    ) -> None:
        """A link could not carry an attempt: it is uncertain at once, with the link's cause."""
        alert = self.alerts.get(alert_id)
        if alert is None or alert.revision != revision or alert.closed:
            return
        for code in terminals:
            d = alert.deliveries.get(code)
            if d is not None and d.state is DState.SENT:
                self._timed_out(alert, d, now, cause)
        self._finish(now)

    # -- the clock ------------------------------------------------------------------------
    def next_wake(self) -> float | None:
        """When the next timer is due (monotonic), None when none is armed."""
        while self._timers:
            due, _, alert_id, terminal, gen = self._timers[0]
            if self._timer_live(alert_id, terminal, gen):
                return due
            heapq.heappop(self._timers)
        return None

    def tick(self, now: float) -> None:
        """Fire every timer due by `now`."""
        while self._timers and self._timers[0][0] <= now:
            _, _, alert_id, terminal, gen = heapq.heappop(self._timers)
            if not self._timer_live(alert_id, terminal, gen):
                continue
            alert = self.alerts[alert_id]
            if terminal is None:
                self._expire(alert, now)
            else:
                self._fire(alert, alert.deliveries[terminal], now)
            self._finish(now)

    def drain(self) -> Outbox:
        """What was decided since the last drain; the outbox starts empty again."""
        out, self._out = self._out, Outbox.empty()
        return out

    # -- rebuilding (ebcd.delivery.recovery) ----------------------------------------------
    def adopt(self, alert: Alert) -> None:
        """Take back a journalled alert as it was (its deliveries follow with adopt_delivery)."""
        self.alerts[alert.id] = alert
        self._order = max(self._order, alert.order)
        if not alert.closed:
            self._arm_alert(alert)

    def adopt_delivery(self, alert: Alert, d: Delivery) -> None:
        """Take back a journalled delivery as it was, with the timer recovery gave it."""
        self._add_delivery(alert, d)
        if alert.closed:
            self._by_terminal[d.terminal].discard(alert.id)
        if d.due is not None:
            self._push(d.due, alert.id, d.terminal, d.gen)

    def rederive(self, now: float) -> None:
        """After adopting: who holds each terminal and who waits for it, from the deliveries."""
        self.holders.clear()
        live = sorted((a for a in self.alerts.values() if not a.closed), key=lambda a: (a.rank, -a.order))
        # A terminal two records claim (an attempt that outlived its terminal going away, and the
        # broadcast ebcd sent it next) goes to the one it acknowledged playing, then the highest.
        for playing in (True, False):
            for alert in reversed(live):
                for d in alert.deliveries.values():
                    claims = d.holds and (d.state is DState.ACKNOWLEDGED) is playing
                    if claims and self.holders.holder_of(d.terminal) is None:
                        self.holders.take(d.terminal, alert.id)
        for alert in live:
            for d in alert.deliveries.values():
                if d.state in (DState.WAITING, DState.PREEMPTED) and not d.finished:
                    self.holders.wait(d.terminal, alert.id, alert.rank, alert.order)
                    if self.holders.holder_of(d.terminal) is None:
                        self._freed.append(d.terminal)
            self._touched.add(alert.id)
        for alert in reversed(live):  # journalled before it was sent: ask for the terminals now
            if alert.state is not AState.PENDING_APPROVAL:
                for d in list(alert.deliveries.values()):
                    if d.state is DState.PENDING:
                        self._ask(alert, d, now)
        for alert in self.alerts.values():  # ended before its deliveries were: end them too
            # (a cancel or a rejection, journalled before the core acted on it; an expiry is the
            # core's own and leaves acknowledged deliveries as they were)
            if alert.closed and alert.state in (AState.CANCELLED, AState.REJECTED):
                for d in alert.deliveries.values():
                    self._stop_if_playing(alert, d, alert.reason or "ended")
                    self._cancel(alert, d, alert.reason or "ended", now)
        self._finish(now)

    # -- internals: the one door ----------------------------------------------------------
    def _move(
        self,
        alert: Alert,
        d: Delivery,
        event: DEvent,
        now: float,
        *,
        cause: object = _UNSET,
        due: object = _UNSET,
        progress: object = _UNSET,
        acked: bool | None = None,
        finished: bool | None = None,
        resume: bool | None = None,
        attempts: int | None = None,
        budget_base: int | None = None,
    ) -> bool:
        """Apply `event` to `d` by the table; record the transition; keep counts and holders."""
        new = next_delivery_state(d.state, event)
        if new is None:
            return False
        old, old_bucket, old_open, old_holds, old_acked = d.state, d.bucket, d.open, d.holds, d.acked
        d.state = new
        if cause is not _UNSET:
            d.cause = cause  # type: ignore[assignment]
        if progress is not _UNSET:
            d.progress = progress  # type: ignore[assignment]
        if acked is not None:
            d.acked = acked
        if finished is not None:
            d.finished = finished
        if resume is not None:
            d.resume = resume
        if attempts is not None:
            d.attempts = attempts
        if budget_base is not None:
            d.budget_base = budget_base
        if due is not _UNSET:
            d.gen += 1
            d.due = due  # type: ignore[assignment]
            if d.due is not None:
                self._push(d.due, alert.id, d.terminal, d.gen)
        if d.bucket is not old_bucket:
            alert.count(d.terminal, old_bucket, -1)
            alert.count(d.terminal, d.bucket, 1)
        alert.open += int(d.open) - int(old_open)
        if old_holds and not d.holds:
            self._release(d.terminal, alert.id)
        self._out.transitions.append(
            Transition(old, event, d.record(alert.id, alert.revision), now, old_acked)
        )
        self._out.changed.add(alert.id)
        self._touched.add(alert.id)
        return True

    def _alert_to(self, alert: Alert, event: AEvent, now: float) -> None:
        old = alert.state
        alert.state = next_alert_state(old, event)
        self._out.alerts.append(AlertTransition(alert.id, old, event, alert.state, now))
        self._out.changed.add(alert.id)
        if alert.state is not AState.DISPATCHING and alert.state is not AState.PENDING_APPROVAL:
            self._out.settled.add(alert.id)

    # -- internals: deliveries ------------------------------------------------------------
    def _ask(self, alert: Alert, d: Delivery, now: float) -> None:
        """`d` wants its terminal: take it, pre-empt a lower holder, or wait for the holder."""
        if d.finished or alert.closed or now >= alert.expires:
            return  # (past time to live, its expiry timer is due in this very tick)
        code = d.terminal
        holder_id = self.holders.holder_of(code)
        if holder_id is None:
            # free, but maybe only for this event: an update that lowered this alert's priority
            # released the terminal it held, and a waiter may now rank above it
            rival = self.holders.best(code, functools.partial(self._waits, code=code, now=now))
            if rival is not None and rival != alert.id and self._before(self.alerts[rival], alert):
                self.holders.pop_best(code, functools.partial(self._waits, code=code, now=now))
                self._ask(self.alerts[rival], self.alerts[rival].deliveries[code], now)
                holder_id = self.holders.holder_of(code)
        if holder_id is not None and holder_id != alert.id:
            holder = self.alerts[holder_id]
            if alert.rank <= holder.rank:
                event = DEvent.BLOCK
                why = f"waiting: the terminal plays alert {holder_id}"
                if d.state is DState.PREEMPTED:
                    why = d.cause or why
                self._move(alert, d, event, now, cause=why, due=None)
                self.holders.wait(code, alert.id, alert.rank, alert.order)
                return
            self._preempt(holder, holder.deliveries[code], alert, now)
        self.holders.take(code, alert.id)
        self._move(
            alert,
            d,
            DEvent.SEND,
            now,
            due=now + self.policy.ack_timeout_s,
            attempts=d.attempts + 1,
            cause=None,
        )
        self._sent_n += 1
        d.sent_n = self._sent_n
        self._last_sent[code] = (self._sent_n, alert.id)
        self._plays.setdefault((alert.id, alert.revision, d.resume), []).append(code)

    def _preempt(self, loser: Alert, d: Delivery, winner: Alert, now: float) -> None:
        self.holders.release(d.terminal, loser.id)  # the winner takes it at once
        self._lose(loser, d, winner, now)

    def _lose(self, loser: Alert, d: Delivery, winner: Alert, now: float) -> None:
        """`winner` took the terminal before `d` finished: resume it later, or end it (policy)."""
        why = f"pre-empted by alert {winner.id}"
        if self.policy.preempted == "end":
            self._move(loser, d, DEvent.PREEMPT, now, cause=why, due=None)
            self._move(loser, d, DEvent.CANCEL, now, cause=f"ended: {why}", finished=True)
            return
        # resume: play it again when the terminal is free, if it had (or may have) started
        self._move(loser, d, DEvent.PREEMPT, now, cause=why, due=None, resume=True, budget_base=d.attempts)
        self.holders.wait(d.terminal, loser.id, loser.rank, loser.order)

    def _release(self, code: str, alert_id: str) -> None:
        if self.holders.release(code, alert_id):
            self._freed.append(code)

    def _acknowledged(self, alert: Alert, d: Delivery, progress: Progress, now: float) -> None:
        done = progress is Progress.DONE
        waiting = d.state in (DState.WAITING, DState.PREEMPTED)
        if (
            d.acked
            and _RANK[progress] <= _RANK[d.progress]
            and (d.state is DState.ACKNOWLEDGED or (waiting and not done))
        ):
            return  # nothing new (a late 'received' after 'playing')
        holder = self.holders.holder_of(d.terminal)
        taker = None if done else self._taker(alert, d, holder)
        playing = not done and not alert.closed and d.state not in (DState.CANCELLED, DState.EXPIRED)
        hold = playing and taker is None and holder in (None, alert.id)
        due = now + self.policy.max_play_s if hold else None
        first = not d.acked
        forward = d.state is not DState.ACKNOWLEDGED or _RANK[progress] > _RANK[d.progress]
        best = progress if forward else d.progress
        if not self._move(
            alert, d, DEvent.ACK, now, progress=best, acked=True, due=due, resume=False,
            finished=True if done else None,
            cause=None if d.state is not DState.CANCELLED else d.cause,
        ):  # fmt: skip
            return
        if first:
            d.acked_at = now
        if alert.closed and alert.state in (AState.CANCELLED, AState.REJECTED) and not d.finished:
            # it plays after all (a refusal, then a late acknowledgement): stop it as the cancel would have
            why = alert.reason or "cancelled"
            self._stop_if_playing(alert, d, why)
            self._cancel(alert, d, why, now)
        elif taker is not None:
            # a late acknowledgement of an attempt the terminal was since taken from (by the holder,
            # or by whoever ebcd sent it after giving up on this one): it counts, and the broadcast
            # the terminal did not finish is pre-empted, not forgotten
            self._lose(alert, d, self.alerts[taker], now)
            self._ask(alert, d, now)  # resume: take it back from a lower holder, or wait for it
        elif due is not None and self.holders.holder_of(d.terminal) is None:
            self.holders.take(d.terminal, alert.id)

    def _taker(self, alert: Alert, d: Delivery, holder: str | None) -> str | None:
        """The alert that took `d`'s terminal after `d`'s latest attempt went out, if any."""
        if alert.closed:
            return None  # nothing is resumed for an alert that is over
        if d.state in (DState.WAITING, DState.PREEMPTED):
            return holder if holder is not None and holder != alert.id else None
        if d.state in (DState.SENT, DState.UNCERTAIN, DState.REFUSED) and holder != alert.id:
            last = self._last_sent.get(d.terminal)
            if last is not None and last[0] > d.sent_n and last[1] != alert.id:
                return holder if holder is not None else last[1]
        return None

    def _timed_out(self, alert: Alert, d: Delivery, now: float, cause: str) -> None:
        retry_at: float | None = None
        if d.attempts - d.budget_base < self.policy.max_attempts:
            retry_at = now + self.policy.backoff.delay(d.attempts, self.rng)
            if retry_at >= alert.expires:
                retry_at = None
        self._move(alert, d, DEvent.TIMEOUT, now, cause=cause, due=retry_at)

    def _fire(self, alert: Alert, d: Delivery, now: float) -> None:
        if d.state is DState.SENT:
            self._timed_out(alert, d, now, f"no acknowledgement after attempt {d.attempts}")
        elif d.state is DState.UNCERTAIN:
            self._ask(alert, d, now)  # the retry: sent, or waiting for a higher holder
        elif d.state is DState.ACKNOWLEDGED:
            self._move(alert, d, DEvent.ACK, now, due=None)
            self._out.effects.append(
                Note(
                    "play_hold_timeout", alert.id, d.terminal, f"no 'done' within {self.policy.max_play_s} s"
                )
            )

    def _gone(self, code: str, why: str, now: float) -> None:
        """The terminal is not there: nothing plays on it, so whoever waits may go."""
        holder_id = self.holders.holder_of(code)
        if holder_id is None:
            return
        holder = self.alerts[holder_id]
        d = holder.deliveries[code]
        if d.state is DState.ACKNOWLEDGED and d.due is not None:
            self._move(holder, d, DEvent.ACK, now, due=None, cause=why)  # it plays no more
        self._release(code, holder_id)

    def _reopen(self, code: str, now: float, why: str) -> None:
        # by priority: the first one asked takes the terminal, and a lower one would be sent only
        # to be pre-empted by the next (or, as equals, would keep it from an earlier alert)
        targeting = (self.alerts[a] for a in self._by_terminal.get(code, ()))
        for alert in sorted(targeting, key=lambda a: (tuple(-r for r in a.rank), a.order)):
            d = alert.deliveries[code]
            if alert.closed or now >= alert.expires or alert.state is AState.PENDING_APPROVAL:
                continue  # (past time to live its expiry is due: a re-opened delivery would miss acks)
            if d.finished or (d.acked and not d.resume):  # what it never confirmed, or a resume
                continue
            if d.state in (DState.SENT, DState.UNCERTAIN, DState.REFUSED):
                self._move(alert, d, DEvent.REOPEN, now, cause=why, due=None, budget_base=d.attempts)
                self._ask(alert, d, now)

    def _cancel(self, alert: Alert, d: Delivery, why: str, now: float) -> None:
        """End an open delivery cancelled; an acknowledged one keeps its ack (and history)."""
        if d.state in (DState.REFUSED, DState.CANCELLED, DState.EXPIRED):
            return
        if d.state is DState.ACKNOWLEDGED:
            if not d.finished:
                self._move(alert, d, DEvent.CANCEL, now, progress=Progress.STOPPED, finished=True, due=None)
            return
        self._move(alert, d, DEvent.CANCEL, now, cause=why, finished=True, due=None)

    def _stop_if_playing(self, alert: Alert, d: Delivery, why: str) -> None:
        """A stop to every terminal the alert went out to and that did not end it already: one that
        said `done` may still repeat it, and a stop is harmless where nothing plays."""
        stopped = (
            d.state in (DState.REFUSED, DState.CANCELLED, DState.EXPIRED) or d.progress is Progress.STOPPED
        )
        if d.attempts > 0 and not stopped:
            self._stops.setdefault((alert.id, alert.revision, why), []).append(d.terminal)

    # -- internals: alerts ----------------------------------------------------------------
    def _approve(self, alert: Alert, now: float) -> None:
        self._alert_to(alert, AEvent.APPROVE, now)
        self._touched.add(alert.id)  # settles at once when there is nothing to send
        for d in alert.deliveries.values():
            self._ask(alert, d, now)

    def _end(self, alert: Alert, event: AEvent, why: str, now: float) -> None:
        """Cancel or reject: every open delivery ends cancelled, every playing one gets a stop."""
        for d in alert.deliveries.values():
            self._stop_if_playing(alert, d, why)
            self._cancel(alert, d, why, now)
        alert.reason = why
        self._alert_to(alert, event, now)
        self._close(alert)

    def _expire(self, alert: Alert, now: float) -> None:
        why = "time to live ended"
        settled = alert.state in (AState.COMPLETED, AState.PARTIAL)
        for d in alert.deliveries.values():
            if d.state in (DState.SENT, DState.UNCERTAIN):
                self._stops.setdefault((alert.id, alert.revision, why), []).append(d.terminal)
            if d.state in (DState.PENDING, DState.WAITING, DState.SENT, DState.UNCERTAIN, DState.PREEMPTED):
                self._move(alert, d, DEvent.EXPIRE, now, cause=why, due=None)
            elif d.due is not None:  # acknowledged and still playing: it ends by itself
                self._move(alert, d, DEvent.ACK, now, due=None)
        if settled and (alert.counts[Bucket.ACKED] or alert.state is AState.COMPLETED):  # (no targets)
            self._alert_to(alert, AEvent.CLOSE, now)
        else:
            alert.reason = why
            self._alert_to(alert, AEvent.EXPIRE, now)
        self._close(alert)

    def _close(self, alert: Alert) -> None:
        alert.closed = True
        alert.gen += 1
        for code in alert.deliveries:
            self._release(code, alert.id)
            targeting = self._by_terminal.get(code)
            if targeting is not None:
                targeting.discard(alert.id)
        self._out.settled.add(alert.id)

    def _settle(self, alert: Alert, now: float) -> None:
        if alert.closed or alert.state is AState.PENDING_APPROVAL:
            return
        all_acked = alert.counts[Bucket.ACKED] == alert.targets
        if alert.open == 0:
            if all_acked and alert.state is not AState.COMPLETED:
                self._alert_to(alert, AEvent.ALL_ACKED, now)
            elif not all_acked and alert.state is AState.DISPATCHING:
                self._alert_to(alert, AEvent.SETTLED, now)
        elif alert.state is AState.PARTIAL:
            self._alert_to(alert, AEvent.REOPENED, now)

    def _finish(self, now: float) -> None:
        """End of one event: hand freed terminals to their best waiter, settle, batch commands."""
        while self._freed:
            code = self._freed.pop()
            if self.holders.holder_of(code) is not None:
                continue
            best = self.holders.pop_best(code, functools.partial(self._waits, code=code, now=now))
            if best is not None:
                alert = self.alerts[best]
                self._ask(alert, alert.deliveries[code], now)
        for alert_id in self._touched:
            self._settle(self.alerts[alert_id], now)
        self._touched.clear()
        for (alert_id, revision, resume), asked in self._plays.items():
            alert = self.alerts[alert_id]
            # only what is still in flight: an attempt the same event pre-empted does not go out
            codes = [
                c
                for c in dict.fromkeys(asked)
                if (d := alert.deliveries.get(c)) is not None
                and d.state is DState.SENT
                and d.resume is resume
            ]
            if not codes or revision != alert.revision:
                continue
            first = not resume and all(alert.deliveries[c].attempts == 1 for c in codes)
            self._out.effects.append(Play(alert_id, revision, tuple(codes), resume, first))
        self._plays.clear()
        for (alert_id, revision, why), codes in self._stops.items():
            self._out.effects.append(Stop(alert_id, revision, tuple(codes), why))
        self._stops.clear()

    def _waits(self, alert_id: str, alert_rank: tuple[int, ...], *, code: str, now: float) -> bool:
        """Whether a queue entry still stands: the alert waits, at the rank it was queued with."""
        alert = self.alerts.get(alert_id)
        d = alert.deliveries.get(code) if alert else None
        return (
            alert is not None
            and d is not None
            and not alert.closed
            and now < alert.expires
            and alert.rank == alert_rank  # an update re-queued it at its new rank
            and d.state in (DState.WAITING, DState.PREEMPTED)
            and not d.finished
        )

    @staticmethod
    def _before(a: Alert, b: Alert) -> bool:
        """Whether `a` gets a free terminal before `b`: higher rank, then accepted first."""
        return (a.rank, -a.order) > (b.rank, -b.order)

    # -- internals: bookkeeping -----------------------------------------------------------
    def _get(self, alert_id: str) -> Alert:
        alert = self.alerts.get(alert_id)
        if alert is None:
            raise Refused("unknown_alert", f"no alert with id {alert_id!r}")
        return alert

    def _add_delivery(self, alert: Alert, d: Delivery) -> None:
        alert.deliveries[d.terminal] = d
        alert.count(d.terminal, d.bucket, 1)
        alert.open += int(d.open)
        self._by_terminal.setdefault(d.terminal, set()).add(alert.id)
        alert.left.pop(d.terminal, None)

    def _drop_delivery(self, alert: Alert, code: str, now: float) -> None:
        d = alert.deliveries.pop(code)
        # journalled as having left, whatever its state: its row no longer counts for the alert
        self._out.transitions.append(
            Transition(d.state, None, d.record(alert.id, alert.revision, left=True), now)
        )
        alert.count(code, d.bucket, -1)
        alert.open -= int(d.open)
        alert.left[code] = d
        self._release(code, alert.id)
        targeting = self._by_terminal.get(code)
        if targeting is not None:
            targeting.discard(alert.id)

    def _arm_alert(self, alert: Alert) -> None:
        alert.gen += 1
        self._push(alert.expires, alert.id, None, alert.gen)

    def _push(self, due: float, alert_id: str, terminal: str | None, gen: int) -> None:
        self._timer_n += 1
        heapq.heappush(self._timers, (due, self._timer_n, alert_id, terminal, gen))

    def _timer_live(self, alert_id: str, terminal: str | None, gen: int) -> bool:
        alert = self.alerts.get(alert_id)
        if alert is None:
            return False
        if terminal is None:
            return not alert.closed and alert.gen == gen
        d = alert.deliveries.get(terminal)
        return d is not None and d.gen == gen and d.due is not None
