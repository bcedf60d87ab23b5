"""The delivery engine: turns accepted alerts into commands, acks into states, time into retries.

It never sees bytes: commands go out through `Transport`s (one per link kind), reports come in
as typed messages. One timer task drives every alert (`AlertRun` is sans-IO); one publisher task
coalesces state updates so hundreds of acks make a few publishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import structlog

from ebcd.alert_run import AlertRun, AlertState, RetryPolicy
from ebcd.delivery import Delivery, DState, Progress
from ebcd.metrics import Metrics
from ebcd.model.alert import AlertRequest, rank
from ebcd.protocols.messages import (
    AckStatus,
    Command,
    Liveness,
    PlayCommand,
    StopCommand,
    TerminalPresence,
    TerminalReport,
)
from ebcd.security.replay import quantize_command, sign_command
from ebcd.security.signing import Signer
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal

log = structlog.get_logger("ebcd.engine")

_C = TypeVar("_C", PlayCommand, StopCommand)
# causes with which a terminal refuses a command it cannot trust (simulators.terminal.CommandCheck)
SECURITY_REFUSALS = ("unsigned", "signature", "replayed", "stale")
MAX_REFUSALS_KEPT = 1000  # per alert, for its report
SEQ_MODULO = 2**32  # command sequence numbers are u32 on every link
SEQ_RESTART_MARGIN = 100_000  # commands that may have gone out after the last journalled one


class Transport(Protocol):
    """A link kind that can carry commands to terminals."""

    name: str

    def send(self, cmd: Command, terminals: Sequence[Terminal], *, first: bool) -> None:
        """Queue `cmd` for these terminals; `first` allows group addressing."""


StatePublisher = Callable[[AlertRun, dict[str, Any]], None]
TransitionSink = Callable[[str, str, str, str | None, float], None]


@dataclass(slots=True)
class TerminalLiveness:
    """What ebcd knows about a terminal being there: unknown until it speaks."""

    state: str = "unknown"
    session: int = -1
    last_seen: float = 0.0


@dataclass
class Engine:
    """Every accepted alert and its deliveries, driven to their final states."""

    district: District
    policy: RetryPolicy
    transports: dict[str, Transport]
    metrics: Metrics
    publish_state: StatePublisher
    record_transition: TransitionSink | None = None
    state_interval_s: float = 0.25
    priority_order: tuple[str, ...] = ("emergency", "tier", "level")
    preempted_policy: str = "resume"  # or "end"
    signer: Signer | None = None  # signs every command once, whatever the number of terminals
    clock: Callable[[], float] = time.monotonic
    runs: dict[str, AlertRun] = field(default_factory=dict)
    liveness: dict[str, TerminalLiveness] = field(default_factory=dict)
    _poke: asyncio.Event = field(default_factory=asyncio.Event)
    _dirty: set[str] = field(default_factory=set)
    _watchers: dict[str, list[asyncio.Queue[dict[str, Any]]]] = field(default_factory=dict)
    _seq: int = field(default_factory=lambda: int(time.time()))
    # terminal -> the alert it plays now (a terminal plays one broadcast at a time)
    holder: dict[str, str] = field(default_factory=dict)
    # terminal -> alerts whose delivery waits for it (so a release wakes the timer loop only if needed)
    _waiting: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for t in self.district.terminals():
            self.liveness.setdefault(t.code, TerminalLiveness())

    # -- accepting ---------------------------------------------------------------------------
    def accept(
        self,
        request: AlertRequest,
        terminals: Sequence[Terminal],
        *,
        alert_id: str,
        ebmid: str,
        hold: bool = False,
        deliveries: dict[str, Delivery] | None = None,
        expires_in_s: float | None = None,
        accepted_at: float | None = None,
        revision: int = 1,
    ) -> AlertRun:
        """Register an alert and start its fan-out (unless `hold`, for manual review)."""
        now = self.clock()
        run = AlertRun(
            id=alert_id,
            ebmid=ebmid,
            request=request,
            deliveries=deliveries or {t.code: Delivery(t.code) for t in terminals},
            accepted_at=accepted_at if accepted_at is not None else time.time(),
            started=now,
            expires=now + (expires_in_s if expires_in_s is not None else request.ttl_s),
            revision=revision,
            state=AlertState.PENDING_APPROVAL if hold else AlertState.DISPATCHING,
        )
        self.runs[alert_id] = run
        run.settle(now)
        self._mark(run)
        self._poke.set()
        log.info(
            "alert.accepted",
            alert_id=alert_id,
            targets=len(run.deliveries),
            level=request.level,
            event_type=request.event_type,
            state=run.state.value,
        )
        return run

    def approve(self, alert_id: str) -> AlertRun | None:
        """Release an alert held for manual review."""
        run = self.runs.get(alert_id)
        if run is None or run.state is not AlertState.PENDING_APPROVAL:
            return None
        run.state = AlertState.DISPATCHING
        self._mark(run)
        self._poke.set()
        return run

    def update(self, alert_id: str, request: AlertRequest, terminals: Sequence[Terminal]) -> AlertRun | None:
        """Apply an update: stop the terminals that left the area, send the new revision to the rest."""
        run = self.runs.get(alert_id)
        if run is None or not run.active or run.state is AlertState.PENDING_APPROVAL:
            return None
        now = self.clock()
        stop = self._stop(run, "left the alert's area")
        before = {t: d.state for t, d in run.deliveries.items()}
        to_stop = run.revise(request, [t.code for t in terminals], now)
        kept = {t: s for t, s in before.items() if t in run.deliveries}
        self._after_transitions(run, kept, now)
        for code in before.keys() - kept.keys():
            if self.record_transition is not None:
                self.record_transition(run.id, code, run.left[code].state.value, run.left[code].cause, now)
        if to_stop:
            self._send(run, stop, to_stop, first=False)
        for code in run.left:
            self._release(code, run.id)
        self._mark(run)
        self._poke.set()
        log.info(
            "alert.updated",
            alert_id=alert_id,
            revision=run.revision,
            targets=len(run.deliveries),
            stopped=len(to_stop),
        )
        return run

    def cancel(self, alert_id: str, why: str, state: AlertState = AlertState.CANCELLED) -> AlertRun | None:
        """End an alert: stop every terminal that has it, end its open deliveries."""
        run = self.runs.get(alert_id)
        if run is None or not run.active:
            return None
        if state is AlertState.REJECTED and run.state is not AlertState.PENDING_APPROVAL:
            return None  # only an alert still in review can be rejected
        now = self.clock()
        before = {t: d.state for t, d in run.deliveries.items()}
        to_stop = run.end(state, now, why)
        self._after_transitions(run, before, now)
        for code in run.deliveries:
            self._release(code, run.id)
        if to_stop:
            self._send(run, self._stop(run, why), to_stop, first=True)
        self._mark(run)
        log.info("alert.ended", alert_id=alert_id, state=run.state.value, reason=why, stopped=len(to_stop))
        return run

    # -- incoming ----------------------------------------------------------------------------
    def on_report(self, report: TerminalReport) -> None:
        """A terminal acknowledged or refused a command."""
        run = self.runs.get(report.alert_id)
        if run is None or report.terminal not in run.deliveries:
            self.metrics.unexpected.labels("report").inc()
            log.debug("report.unmatched", alert_id=report.alert_id, terminal=report.terminal)
            return
        if report.status in (AckStatus.STOPPED, AckStatus.DONE):
            self._release(report.terminal, run.id)
        if report.status is AckStatus.STOPPED:
            return
        if report.revision != run.revision:
            self.metrics.unexpected.labels("stale_revision").inc()
            return
        now = self.clock()
        d = run.deliveries[report.terminal]
        before = d.state
        if report.status is AckStatus.REFUSED:
            cause = report.cause or "refused"
            run.refusals.append((report.terminal, cause))
            del run.refusals[:-MAX_REFUSALS_KEPT]  # each one is also a log line
            log.warning("terminal.refused", alert_id=run.id, terminal=report.terminal, cause=cause)
            if before is DState.ACKNOWLEDGED and cause.startswith(SECURITY_REFUSALS):
                self._mark(run)  # a forged or replayed copy was refused: the delivery itself stands
                return
        first_ack = d.acked_at is None
        if not run.on_report(report, now):
            return
        self._after_transitions(run, {report.terminal: before}, now)
        if first_ack and d.acked_at is not None:
            self.metrics.latency.observe(now - run.started)
        if run.counts["pending"] == 0:
            run.settle(now)
        self._mark(run)
        self._live(report.terminal, now)

    def on_presence(self, p: TerminalPresence) -> None:
        """Birth, heartbeat or last will: track liveness, re-send what a returning terminal missed."""
        live = self.liveness.get(p.terminal)
        if live is None:
            self.metrics.unexpected.labels("presence").inc()
            return
        now = self.clock()
        if p.session < live.session:
            log.info("terminal.stale_presence", terminal=p.terminal, session=p.session, current=live.session)
            return
        if p.state is Liveness.OFFLINE:
            live.state, live.session = "offline", p.session
            log.info("terminal.offline", terminal=p.terminal, session=p.session)
            return
        returning = live.state != "online" or p.session > live.session
        live.session, live.last_seen = p.session, now
        live.state = "online"
        if returning:  # a birth, or a heartbeat of a session whose birth we missed (broker restart)
            self._reopen(p.terminal, now, f"terminal back online (session {p.session})")

    def _live(self, terminal: str, now: float) -> None:
        live = self.liveness.get(terminal)
        if live is not None:
            live.last_seen = now
            if live.state != "online":
                live.state = "online"

    def mark_unknown(self, terminals: Sequence[str]) -> None:
        """A room went silent: its terminals' liveness is unknown again."""
        for code in terminals:
            if code in self.liveness:
                self.liveness[code].state = "unknown"

    def _reopen(self, terminal: str, now: float, why: str) -> None:
        for run in self.runs.values():
            d = run.deliveries.get(terminal)
            if d is None or not run.active or d.state is DState.ACKNOWLEDGED:
                continue
            before = d.state
            if run.reopen(terminal, now, why):
                self._after_transitions(run, {terminal: before}, now)
                run.settle(now)
                self._mark(run)
                self._poke.set()

    # -- the timer loop ----------------------------------------------------------------------
    async def run_timers(self) -> None:
        """Send, time out, retry and expire, for every alert, until cancelled."""
        while True:
            now = self.clock()
            wake = now + 60.0
            for run in sorted(self.runs.values(), key=self._rank, reverse=True):
                if run.active:
                    self._step(run, now)
                if run.active and run.state is not AlertState.PENDING_APPROVAL:
                    wake = min(wake, run.next_wake())
                elif run.state is AlertState.PENDING_APPROVAL:
                    wake = min(wake, run.expires)
            self._poke.clear()
            timeout = max(0.0, wake - self.clock())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set, and this loop would then outlive the daemon
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._poke.wait()

    def _step(self, run: AlertRun, now: float) -> None:
        if now >= run.expires:
            self.cancel(run.id, "time to live ended", AlertState.EXPIRED)
            return
        if run.state is AlertState.PENDING_APPROVAL:
            return
        before = {t: d.state for t, d in run.deliveries.items()}
        timed_out = run.check_timers(now, self.policy)
        due = self._claim(run, run.to_send(now), now)
        if due:
            retry = [t for t in due if run.deliveries[t].attempts > 0]
            for t in retry:
                term = self.district.terminal(t)
                self.metrics.retries.labels(term.link if term else "mqtt").inc()
            resumed = [t for t in due if run.deliveries[t].resuming]
            fresh = [t for t in due if not run.deliveries[t].resuming]
            run.mark_sent(due, now, self.policy)
            if fresh:
                first = not retry and len(fresh) == len(run.deliveries)
                self._send(run, self._play(run, now), fresh, first=first)
            if resumed:
                self._send(run, self._play(run, now, resume=True), resumed, first=False)
        if timed_out or due:
            self._after_transitions(run, before, now)
            run.settle(now)
            self._mark(run)

    # -- one broadcast per terminal ---------------------------------------------------------
    def _rank(self, run: AlertRun) -> tuple[int, ...]:
        return rank(run.request, self.priority_order)

    def _claim(self, run: AlertRun, due: list[str], now: float) -> list[str]:
        """The due terminals this alert may play on now; pre-empts lower-priority holders."""
        allowed = []
        for code in due:
            other = self._holding(code)
            if other is not None and other is not run:
                if self._rank(run) <= self._rank(other):
                    run.deliveries[code].cause = f"waiting: the terminal plays alert {other.id}"
                    self._waiting.setdefault(code, set()).add(run.id)
                    continue  # stays pending until the terminal is free
                self._preempt(other, code, run, now)
            self.holder[code] = run.id
            allowed.append(code)
        return allowed

    def _holding(self, code: str) -> AlertRun | None:
        """The active alert that occupies a terminal (sent, unanswered or still playing), if any."""
        alert_id = self.holder.get(code)
        run = self.runs.get(alert_id) if alert_id else None
        d = run.deliveries.get(code) if run else None
        if run is None or d is None or not run.active or not _occupies(d):
            self.holder.pop(code, None)
            return None
        return run

    def _preempt(self, loser: AlertRun, code: str, winner: AlertRun, now: float) -> None:
        before = {code: loser.deliveries[code].state}
        if loser.preempt(code, now, winner.id, end=self.preempted_policy == "end"):
            self._after_transitions(loser, before, now)
            loser.settle(now)
            self._mark(loser)
            log.info(
                "delivery.preempted",
                alert_id=loser.id,
                terminal=code,
                by=winner.id,
                policy=self.preempted_policy,
            )

    def _release(self, code: str, alert_id: str) -> None:
        """`alert_id` no longer occupies the terminal: resume the best pre-empted alert on it."""
        if self.holder.get(code) != alert_id:
            return
        del self.holder[code]
        now = self.clock()
        preempted = [
            r
            for r in self.runs.values()
            if r.active and code in r.deliveries and r.deliveries[code].state is DState.PREEMPTED
        ]
        if preempted:
            best = max(preempted, key=self._rank)
            before = {code: best.deliveries[code].state}
            if best.resume(code, now):
                self._after_transitions(best, before, now)
                best.settle(now)
                self._mark(best)
        blocked = self._waiting.pop(code, set())
        if preempted or blocked:
            self._poke.set()  # only then is there something to send on this terminal now

    # -- commands ----------------------------------------------------------------------------
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

    def _play(self, run: AlertRun, now: float, *, resume: bool = False) -> PlayCommand:
        r = run.request
        return self._sign(
            PlayCommand(
                resume=resume,
                alert_id=run.id,
                ebmid=run.ebmid,
                revision=run.revision,
                seq=self._next_seq(),
                level=r.level,
                event_type=r.event_type,
                text=r.text,
                ttl_s=max(0.0, run.expires - now),
                volume=r.volume,
                test=r.test,
                issued_at=time.time(),
            )
        )

    def _stop(self, run: AlertRun, why: str, revision: int | None = None) -> StopCommand:
        rev = run.revision if revision is None else revision
        return self._sign(StopCommand(run.id, run.ebmid, rev, self._next_seq(), why, time.time()))

    def _sign(self, cmd: _C) -> _C:
        """The command in the whole seconds every link carries, with its signature block if we sign."""
        if self.signer is None:
            return cmd
        cmd = quantize_command(cmd)
        return replace(cmd, signature=sign_command(self.signer, cmd))

    def _send(self, run: AlertRun, cmd: Command, codes: Sequence[str], *, first: bool) -> None:
        by_link: dict[str, list[Terminal]] = {}
        for code in codes:
            term = self.district.terminal(code)
            if term is not None:
                by_link.setdefault(term.link, []).append(term)
        for link, terms in by_link.items():
            transport = self.transports.get(link)
            if transport is None:
                log.error("transport.missing", alert_id=run.id, link=link, terminals=len(terms))
                continue
            transport.send(cmd, terms, first=first)

    # -- bookkeeping -------------------------------------------------------------------------
    def _after_transitions(self, run: AlertRun, before: dict[str, DState], now: float) -> None:
        """Journal and count what changed since `before` (acks' progress is journalled too)."""
        for code, old in before.items():
            d = run.deliveries[code]
            if d.state is old and not (old is DState.ACKNOWLEDGED and d.history and d.history[-1][0] == now):
                continue
            if self.record_transition is not None:
                detail = d.progress.value if d.state is DState.ACKNOWLEDGED and d.progress else d.cause
                self.record_transition(run.id, code, d.state.value, detail, now)
            outcome = _OUTCOME.get(d.state)
            if d.state is old or outcome is None or (outcome == "uncertain" and d.retry_at is not None):
                continue
            term = self.district.terminal(code)
            self.metrics.deliveries.labels(outcome, term.link if term else "mqtt").inc()

    def _mark(self, run: AlertRun) -> None:
        self._dirty.add(run.id)

    async def run_publisher(self) -> None:
        """Publish dirty alert states at most every `state_interval_s`, and feed watchers."""
        while True:
            await asyncio.sleep(self.state_interval_s)
            self.flush_states()

    def flush_states(self) -> None:
        """Publish every changed alert state now."""
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        now = self.clock()
        for alert_id in dirty:
            run = self.runs.get(alert_id)
            if run is None:
                continue
            doc = run.state_doc(self.district, now)
            self.publish_state(run, doc)
            for q in self._watchers.get(alert_id, []):
                if q.full():
                    q.get_nowait()  # a watcher only needs the newest state
                q.put_nowait(doc)
        counts: dict[str, int] = {}
        for run in self.runs.values():
            counts[run.state.value] = counts.get(run.state.value, 0) + 1
        for state in AlertState:
            self.metrics.alerts_by_state.labels(state.value).set(counts.get(state.value, 0))

    def republish_all(self) -> None:
        """Mark every alert for republishing (after a reconnect)."""
        self._dirty.update(self.runs)

    def watch(self, alert_id: str) -> asyncio.Queue[dict[str, Any]]:
        """A queue that receives the alert's state each time it is published."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1)
        self._watchers.setdefault(alert_id, []).append(q)
        return q

    def unwatch(self, alert_id: str, q: asyncio.Queue[dict[str, Any]]) -> None:
        """Stop feeding a watcher."""
        qs = self._watchers.get(alert_id, [])
        if q in qs:
            qs.remove(q)
        if not qs:
            self._watchers.pop(alert_id, None)

    def liveness_counts(self) -> dict[str, int]:
        """Terminals per liveness state."""
        out = {"unknown": 0, "online": 0, "offline": 0}
        for live in self.liveness.values():
            out[live.state] += 1
        return out


def _occupies(d: Delivery) -> bool:
    """A delivery in flight or playing keeps its terminal busy; a finished one does not."""
    if d.state in (DState.SENT, DState.UNCERTAIN):
        return True
    return d.state is DState.ACKNOWLEDGED and d.progress is not Progress.DONE


_OUTCOME = {
    DState.ACKNOWLEDGED: "acked",
    DState.REFUSED: "refused",
    DState.UNCERTAIN: "uncertain",
    DState.EXPIRED: "expired",
    DState.CANCELLED: "cancelled",
}
