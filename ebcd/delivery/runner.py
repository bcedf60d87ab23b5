"""The imperative shell around the delivery core: clock, timers, commands, journal, publication.

Every event reaches the core through one method here, which then drains the core's outbox once:
the commands it decided go to the links (built, numbered and signed here: one signature per
command, whatever the number of terminals), its transitions to the journal's writer queue (never
awaited on the event loop) and the metrics, its changed alerts to the coalescing state publisher.
Operator and upstream decisions (accept, approve, reject, cancel, update) are journalled *before*
the core acts on them, so that nothing goes out that a restart would not know about.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import structlog

from ebcd.delivery.alerts import Alert, Delivery
from ebcd.delivery.core import AlertSpec, Core, ReportVerdict
from ebcd.delivery.liveness import Heard
from ebcd.delivery.records import Note, Outbox, Play, Stop, Transition
from ebcd.delivery.recovery import delivery_row, resend_in_flight
from ebcd.delivery.state import AState, DEvent, DState
from ebcd.journal.journal import Journal
from ebcd.metrics import Metrics
from ebcd.model.alert import AlertRequest
from ebcd.protocols.messages import Command, PlayCommand, StopCommand, TerminalPresence, TerminalReport
from ebcd.security.replay import quantize_command, sign_command
from ebcd.security.signing import Signer
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal

log = structlog.get_logger("ebcd.engine")

_C = TypeVar("_C", PlayCommand, StopCommand)
SEQ_MODULO = 2**32  # command sequence numbers are u32 on every link
SEQ_RESTART_MARGIN = 100_000  # commands that may have gone out after the last journalled one
IDLE_WAKE_S = 60.0

StatePublisher = Callable[[Alert, dict[str, Any]], None]

_OUTCOME = {
    DState.REFUSED: "refused",
    DState.EXPIRED: "expired",
    DState.CANCELLED: "cancelled",
}


class Transport(Protocol):
    """A link kind that can carry commands to terminals."""

    name: str

    def send(self, cmd: Command, terminals: Sequence[Terminal], *, first: bool) -> None:
        """Queue `cmd` for these terminals; `first` allows group addressing."""


class Runner:
    """Drives the core: one timer task, one state publisher, effects performed as decided."""

    def __init__(
        self,
        core: Core,
        district: District,
        *,
        transports: dict[str, Transport],
        metrics: Metrics,
        publish_state: StatePublisher,
        journal: Callable[[], Journal],
        signer: Signer | None = None,
        state_interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.district = district
        self.transports = transports
        self.metrics = metrics
        self.publish_state = publish_state
        self._journal = journal
        self.signer = signer
        self.state_interval_s = state_interval_s
        self.clock = clock
        self.wall = wall
        self._seq = int(wall()) % SEQ_MODULO
        self._poke = asyncio.Event()
        self._wake_at = 0.0
        self._dirty: set[str] = set()
        self._docs: set[str] = set()
        self._started: dict[str, float] = {}  # alert -> monotonic acceptance, for the latency histogram
        self._watchers: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}
        self._room_watchers: list[asyncio.Event] = []  # set at each publication (ebcd top)

    @property
    def alerts(self) -> dict[str, Alert]:
        """Every alert the core holds, by id."""
        return self.core.alerts

    # -- decisions: journalled first ------------------------------------------------------
    async def accept(
        self,
        spec: AlertSpec,
        terminals: Sequence[str],
        *,
        hold: bool,
        dedupe_key: tuple[str, str] | None = None,
    ) -> Alert:
        """Journal the alert with its decision and every delivery, then start it. JournalError
        leaves nothing behind: the core never saw it."""
        now, wall = self.clock(), self.wall()
        journal = self._journal()
        state = AState.PENDING_APPROVAL if hold else AState.DISPATCHING
        doc = _intent_doc(spec, state, now=wall, revision=1, last_seq=self._seq)
        for code in dict.fromkeys(terminals):
            journal.record_delivery(_pending_row(spec.id, code, 1, wall))
        await journal.save_alert(spec.id, doc, dedupe_key=dedupe_key)
        await journal.flush()
        alert = self.core.accept(spec, terminals, now, hold=hold, wall_now=wall)
        self._started[alert.id] = now
        self._docs.add(alert.id)  # the next save replaces the intent with the alert as it stands
        self._perform(self.core.drain())
        return alert

    async def approve(self, alert_id: str) -> Alert:
        """Release an alert held for review (journalled as dispatching first)."""
        alert = self.core.alerts.get(alert_id)
        if alert is not None and alert.state is AState.PENDING_APPROVAL:
            await self._save_intent(alert, AState.DISPATCHING)
        return self._do(lambda now: self.core.approve(alert_id, now))

    async def reject(self, alert_id: str, why: str) -> Alert:
        """Refuse an alert held for review."""
        alert = self.core.alerts.get(alert_id)
        if alert is not None and alert.state is AState.PENDING_APPROVAL:
            await self._save_intent(alert, AState.REJECTED, reason=why, closed=True)
        return self._do(lambda now: self.core.reject(alert_id, why, now))

    async def cancel(self, alert_id: str, why: str) -> Alert:
        """Stop an alert (journalled as cancelled first, so a restart never sends it again)."""
        alert = self.core.alerts.get(alert_id)
        if alert is not None and not alert.closed:
            await self._save_intent(alert, AState.CANCELLED, reason=why, closed=True)
        return self._do(lambda now: self.core.cancel(alert_id, why, now))

    async def update(self, alert_id: str, request: AlertRequest, terminals: Sequence[str]) -> Alert:
        """A new revision: its deliveries are journalled (pending) before anything is sent."""
        alert = self.core.alerts.get(alert_id)
        if alert is not None and not alert.closed and alert.state is not AState.PENDING_APPROVAL:
            journal, wall = self._journal(), self.wall()
            for code in dict.fromkeys(terminals):
                journal.record_delivery(_pending_row(alert_id, code, alert.revision + 1, wall))
            doc = self._doc(alert)
            doc.update(revision=alert.revision + 1, request=request.model_dump(mode="json"))
            doc["expires_at"] = wall + request.ttl_s
            await journal.save_alert(alert_id, doc)
            await journal.flush()
        return self._do(lambda now: self.core.update(alert_id, request, terminals, now))

    async def resend(self, alert_id: str, kinds: Sequence[str], why: str) -> list[str]:
        """A new attempt of the same revision to the terminals that did not acknowledge (`kinds`).

        Journalled first: each re-opened delivery as pending, the alert as dispatching, so a
        restart sends what was asked even if the daemon dies before it goes out. The core's
        `Refused` for an alert past its time to live, ended, or with nothing to resend.
        """
        chosen = self.core.resendable(alert_id, kinds, self.clock())
        alert = self.core.alerts[alert_id]
        journal, wall = self._journal(), self.wall()
        for d in chosen:
            intent = replace(
                d.record(alert_id, alert.revision), state=DState.PENDING, cause=why, budget_base=d.attempts,
                retry=False,
            )  # fmt: skip
            journal.record_delivery(delivery_row(Transition(d.state, DEvent.RESEND, intent, 0.0), wall))
        if alert.state is not AState.DISPATCHING:
            await self._save_intent(alert, AState.DISPATCHING)
        await journal.flush()
        now = self.clock()
        codes = self.core.resend(alert_id, kinds, why, now)
        self._perform(self.core.drain())
        return codes

    async def _save_intent(
        self, alert: Alert, state: AState, *, reason: str | None = None, closed: bool = False
    ) -> None:
        doc = self._doc(alert)
        doc.update(state=state.value, reason=reason or alert.reason, closed=closed, final=closed)
        await self._journal().save_alert(alert.id, doc)

    def _do(self, call: Callable[[float], Alert]) -> Alert:
        alert = call(self.clock())
        self._perform(self.core.drain())
        return alert

    # -- what the links hear --------------------------------------------------------------
    def on_report(self, report: TerminalReport) -> None:
        """A terminal acknowledged, refused or stopped."""
        verdict = self.core.report(report, self.clock())
        if verdict != ReportVerdict.APPLIED:
            self.metrics.unexpected.labels("report" if verdict == ReportVerdict.UNMATCHED else verdict).inc()
            log.debug("report.ignored", alert_id=report.alert_id, terminal=report.terminal, why=verdict)
        elif report.cause:
            log.warning(
                "terminal.refused", alert_id=report.alert_id, terminal=report.terminal, cause=report.cause
            )
        self._perform(self.core.drain())

    def on_presence(self, p: TerminalPresence) -> None:
        """Birth, heartbeat or last will."""
        heard = self.core.presence(p, self.clock())
        if heard is Heard.UNKNOWN_TERMINAL:
            self.metrics.unexpected.labels("presence").inc()
        elif heard is Heard.STALE:
            log.info("terminal.stale_presence", terminal=p.terminal, session=p.session)
        elif heard is Heard.WENT_OFFLINE:
            log.info("terminal.offline", terminal=p.terminal, session=p.session)
        elif heard is Heard.REFUSED:
            self.metrics.unexpected.labels("session_jump").inc()
            log.warning("terminal.session_jump_refused", terminal=p.terminal, session=p.session)
        self._perform(self.core.drain())

    def send_failed(self, alert_id: str, revision: int, terminals: list[str], cause: str) -> None:
        """A link could not carry a command: those attempts are uncertain now, with its cause."""
        log.warning("delivery.send_failed", alert_id=alert_id, terminals=len(terminals), cause=cause)
        self.core.send_failed(alert_id, revision, terminals, cause, self.clock())
        self._perform(self.core.drain())

    def terminals_unknown(self, terminals: Sequence[str], why: str) -> None:
        """A room's link is down: its terminals are unknown, and free for whoever waits."""
        self.core.terminals_unknown(terminals, self.clock(), why)
        self._perform(self.core.drain())

    def sweep(self, silent_after_s: float) -> None:
        """Terminals silent for too long become unknown."""
        for code in self.core.sweep(self.clock(), silent_after_s):
            log.info("terminal.silent", terminal=code)
        self._perform(self.core.drain())

    def recovered(self) -> None:
        """After a rebuild: re-send what was in flight, republish every state."""
        self._perform(self.core.drain())
        now = self.clock()
        wall = self.wall()
        for alert in self.core.alerts.values():
            self._started.setdefault(alert.id, now - max(0.0, wall - alert.accepted_at))
        self._perform(Outbox(list(resend_in_flight(self.core)), [], [], set(), set()))
        self.republish_all()

    # -- the clock ------------------------------------------------------------------------
    async def run_timers(self) -> None:
        """Fire the core's timers when due, until cancelled."""
        while True:
            self.core.tick(self.clock())
            self._perform(self.core.drain())
            wake = self.core.next_wake()
            now = self.clock()
            self._wake_at = min(wake, now + IDLE_WAKE_S) if wake is not None else now + IDLE_WAKE_S
            self._poke.clear()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set, and this loop would then outlive the daemon
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self._wake_at - now)):
                    await self._poke.wait()

    # -- effects --------------------------------------------------------------------------
    def _perform(self, out: Outbox) -> None:
        for effect in out.effects:
            if isinstance(effect, Play):
                self._send_play(effect)
            elif isinstance(effect, Stop):
                self._send_stop(effect)
            else:
                self._note(effect)
        if out.transitions:
            self._journal_and_count(out.transitions)
        if out.changed:
            self._dirty |= out.changed
            self._docs |= out.changed
        if out.settled:
            self._publish(out.settled)  # a final state goes out at once, not at the next tick
        wake = self.core.next_wake()
        if wake is not None and wake < self._wake_at:
            self._poke.set()

    def _send_play(self, p: Play) -> None:
        alert = self.core.alerts[p.alert_id]
        r = alert.request
        cmd = self._sign(
            PlayCommand(
                resume=p.resume,
                alert_id=alert.id,
                ebmid=alert.ebmid,
                revision=p.revision,
                seq=self._next_seq(),
                level=r.level,
                event_type=r.event_type,
                text=r.text,
                ttl_s=max(0.0, alert.expires - self.clock()),
                volume=r.volume,
                test=r.test,
                issued_at=self.wall(),
            )
        )
        self._dispatch(alert.id, cmd, p.terminals, first=p.first)

    def _send_stop(self, s: Stop) -> None:
        alert = self.core.alerts[s.alert_id]
        cmd = self._sign(StopCommand(alert.id, alert.ebmid, s.revision, self._next_seq(), s.why, self.wall()))
        self._dispatch(alert.id, cmd, s.terminals, first=True)

    def _dispatch(self, alert_id: str, cmd: Command, codes: Sequence[str], *, first: bool) -> None:
        by_link: dict[str, list[Terminal]] = {}
        for code in codes:
            term = self.district.terminal(code)
            if term is not None:
                by_link.setdefault(term.link, []).append(term)
        for link, terms in by_link.items():
            transport = self.transports.get(link)
            if transport is None:
                log.error("transport.missing", alert_id=alert_id, link=link, terminals=len(terms))
                self.metrics.dropped.labels(f"no_{link}_link").inc()
                continue
            transport.send(cmd, terms, first=first)

    def _note(self, note: Note) -> None:
        log.warning(
            f"delivery.{note.kind}", alert_id=note.alert_id, terminal=note.terminal, detail=note.detail
        )
        self.metrics.unexpected.labels(note.kind).inc()

    def _journal_and_count(self, transitions: list[Transition]) -> None:
        wall = self.wall()
        self._journal().record_deliveries([delivery_row(t, wall) for t in transitions])
        for t in transitions:
            r = t.record
            if t.old is r.state and t.event is not DEvent.ACK:
                continue
            link = self._link_of(r.terminal)
            if t.event is DEvent.SEND and r.attempts > 1:
                self.metrics.retries.labels(link).inc()
            if t.event is DEvent.ACK and r.acked and not t.was_acked:
                self.metrics.deliveries.labels("acked", link).inc()
                started = self._started.get(r.alert_id)
                if started is not None:
                    self.metrics.latency.observe(t.at - started)
            elif t.event is DEvent.TIMEOUT and not r.retry:
                self.metrics.deliveries.labels("uncertain", link).inc()
            elif (outcome := _OUTCOME.get(r.state)) is not None and t.old is not r.state and not r.acked:
                self.metrics.deliveries.labels(outcome, link).inc()

    def _link_of(self, code: str) -> str:
        term = self.district.terminal(code)
        return term.link if term else "mqtt"

    # -- commands -------------------------------------------------------------------------
    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % SEQ_MODULO
        return self._seq

    @property
    def last_seq(self) -> int:
        """The sequence number of the last command sent."""
        return self._seq

    def resume_seq(self, last: int) -> None:
        """Continue command sequence numbers after `last` (from the journal), never going back."""
        self._seq = max(self._seq, min(last + SEQ_RESTART_MARGIN, SEQ_MODULO - 1))

    def _sign(self, cmd: _C) -> _C:
        """The command in the whole seconds every link carries, with its signature block if we sign."""
        if self.signer is None:
            return cmd
        cmd = quantize_command(cmd)
        return replace(cmd, signature=sign_command(self.signer, cmd))

    # -- publication ----------------------------------------------------------------------
    async def run_publisher(self) -> None:
        """Publish changed alert states at most every `state_interval_s`, and feed watchers."""
        while True:
            await asyncio.sleep(self.state_interval_s)
            self.flush_states()

    def flush_states(self) -> None:
        """Publish every changed alert state now."""
        if self._dirty:
            dirty, self._dirty = self._dirty, set()
            self._publish(dirty)

    def _publish(self, alert_ids: set[str]) -> None:
        now = self.clock()
        if alert_ids:
            for event in self._room_watchers:
                event.set()
        for alert_id in alert_ids:
            self._dirty.discard(alert_id)
            alert = self.core.alerts.get(alert_id)
            if alert is None:
                continue
            doc = alert.state_doc(self.district, now)
            self.publish_state(alert, doc)
            for q in self._watchers.get(alert_id, []):
                if q.full():
                    q.get_nowait()  # a watcher only needs the newest state
                q.put_nowait(doc)
        counts: dict[str, int] = {}
        for alert in self.core.alerts.values():
            counts[alert.state.value] = counts.get(alert.state.value, 0) + 1
        for state in AState:
            self.metrics.alerts_by_state.labels(state.value).set(counts.get(state.value, 0))

    def republish_all(self) -> None:
        """Mark every alert for republishing (after a reconnect)."""
        self._dirty.update(self.core.alerts)

    def watch(self, alert_id: str) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives the alert's state each time it is published."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1)
        self._watchers.setdefault(alert_id, []).append(q)
        return q

    def watch_room(self) -> asyncio.Event:
        """An event set whenever alert states are published (a whole-room view redraws then)."""
        event = asyncio.Event()
        self._room_watchers.append(event)
        return event

    def unwatch_room(self, event: asyncio.Event) -> None:
        """Stop setting a whole-room watcher's event."""
        if event in self._room_watchers:
            self._room_watchers.remove(event)

    def unwatch(self, alert_id: str, q: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop feeding a watcher."""
        qs = self._watchers.get(alert_id, [])
        if q in qs:
            qs.remove(q)
        if not qs:
            self._watchers.pop(alert_id, None)

    # -- the journal's alert documents ----------------------------------------------------
    def take_docs(self) -> dict[str, dict[str, Any]]:
        """The journal documents of the alerts changed since the last call."""
        docs, self._docs = self._docs, set()
        return {a: self._doc(self.core.alerts[a]) for a in docs if a in self.core.alerts}

    def doc(self, alert: Alert) -> dict[str, Any]:
        """The journal's document of an alert as it stands."""
        return self._doc(alert)

    def _doc(self, alert: Alert) -> dict[str, Any]:
        return alert_doc(alert, self.district, self.clock(), self._seq)


def alert_doc(alert: Alert, district: District, now: float, last_seq: int) -> dict[str, Any]:
    """The journal's document of an alert: its record, its published state, and `final`."""
    rec = alert.record()
    return {
        "id": alert.id,
        "ebmid": alert.ebmid,
        "revision": alert.revision,
        "state": alert.state.value,
        "request": rec.request,
        "accepted_at": alert.accepted_at,
        "expires_at": alert.expires_at,
        "order": alert.order,
        "closed": alert.closed,
        "final": alert.closed,
        "counts": {b.value: n for b, n in alert.counts.items()},
        "last_seq": last_seq,
        "source": alert.source,
        "actor": alert.actor,
        "reason": alert.reason,
        "state_doc": alert.state_doc(district, now),
    }


def _intent_doc(
    spec: AlertSpec, state: AState, *, now: float, revision: int, last_seq: int
) -> dict[str, Any]:
    req = spec.request
    return {
        "id": spec.id,
        "ebmid": spec.ebmid,
        "revision": revision,
        "state": state.value,
        "request": req.model_dump(mode="json"),
        "accepted_at": spec.accepted_at,
        "expires_at": now + req.ttl_s,
        "order": 0,
        "closed": False,
        "final": False,
        "counts": {},
        "last_seq": last_seq,
        "source": spec.source,
        "actor": spec.actor,
        "reason": None,
        # no "state_doc": until the daemon saves the alert as it stands, readers of the journal
        # rebuild its state from the pending deliveries journalled with it
    }


def _pending_row(alert_id: str, code: str, revision: int, wall: float) -> dict[str, Any]:
    d = Delivery(code)
    t = Transition(DState.PENDING, DEvent.RENEW, d.record(alert_id, revision), 0.0)
    return delivery_row(t, wall)
