"""The serial bus master: the only module that opens serial ports (RS-485 multi-drop, RS-232 rooms).

Theory of operation. One owner task per port (`run`) opens it, feeds received bytes to a
`FrameDecoder` and does the bus's work one exchange at a time, half duplex. Alert jobs queued by
`dispatch` run first, in the order queued; follow-up and routine polling run only when no alert
job waits, so an alert waits for at most one such exchange. An alert job sends its command once to
all its terminals (nobody answers a frame with several targets), then queries each terminal in
address order until it answers with a broadcast result or the attempts run out; a terminal that
answers "never received it" gets the command again, addressed to it alone. Replies are matched by
(terminal EBRID, session): the waiter is registered before the write and removed in `finally`;
any other frame is dropped and counted.

Follow-up: a result still in progress (received, playing) is queried again when it should have
changed: after the play time the terminal said it had left (the result's `remaining_s`), or
`busy_poll_s` later when it did not say (doubling while it gives no answer), never more than
`poll_interval_s` apart, until it is final or the broadcast's ttl has passed. So the engine learns
within moments that a terminal finished and is free for the next alert, not at the next round of
routine polling: a heartbeat to every terminal each `poll_interval_s`.

When the port fails the owner reopens it with capped, jittered backoff, forgets what it knew about
liveness (unknown, not offline) and resumes the job it was running, re-sending its command
(terminals play each (alert, revision) once). When opening the port fails, the master is down
(`down_cause` says why, e.g. the path does not exist): the jobs queued fail with `BusDownError`
naming the cause and the terminals they did not reach, and so does every `dispatch` until the port
opens again, at once rather than after the acknowledgement timeouts.

A terminal may answer a heartbeat poll with a broadcast result instead of its state: a report it
could not give when it happened, typically its refusal of a command the master never sent (a
forged, stale or replayed frame injected on the line). The master hands it on as a report, without
touching what it follows for its own commands, and polls that terminal again later in the same
round, at most `MAX_RESULTS_PER_POLL_ROUND` times, until it answers with its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import serial_asyncio_fast
import structlog

from ebcd.protocols.messages import (
    AckStatus,
    Command,
    Liveness,
    PlayCommand,
    TerminalPresence,
    TerminalReport,
)
from ebcd.protocols.serial.frame import (
    Body,
    BroadcastResult,
    BroadcastStart,
    BroadcastStop,
    FaultReport,
    Frame,
    FrameDecoder,
    FrameType,
    Heartbeat,
    LocalProtocolError,
    Query,
    ResultStatus,
    TerminalState,
    command_body,
    encode_body,
    encode_frame,
    max_targets_per_frame,
    result_report,
)
from ebcd.protocols.serial.ports import RUN_DIR_PLACEHOLDER

log = structlog.get_logger("ebcd.serial")

RESPONSE_TIMEOUT_S = 0.5
ATTEMPTS_PER_EXCHANGE = 3
INTER_FRAME_GAP_S = 0.005
POLL_INTERVAL_S = 30.0
BUSY_POLL_S = 2.0  # re-query of a result in progress whose terminal did not say how long it has left
MIN_REQUERY_S = 0.1  # a result in progress is queried again no sooner than this
OFFLINE_AFTER_MISSES = 3
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
CLOSE_TIMEOUT_S = 2.0
REPLY_ALLOWANCE_BYTES = 128  # airtime allowed for a reply, on top of the response timeout
MAX_RESULTS_PER_POLL_ROUND = 16  # broadcast results one terminal may hand over in a poll round
MAX_SESSION = 0xFFFFFFFF
_T = TypeVar("_T")
_FINAL_STATUSES = frozenset({AckStatus.DONE, AckStatus.REFUSED, AckStatus.STOPPED})


class BusClosedError(Exception):
    """The bus cannot carry a dispatched command: its master stopped (or, BusDownError, its port is down)."""


class BusDownError(BusClosedError):
    """The port could not be opened, so a dispatched command cannot go out; `cause` says why."""

    def __init__(self, cause: str, terminals: tuple[str, ...]) -> None:
        super().__init__(cause)
        self.cause = cause
        self.terminals = terminals  # the terminals it did not reach


class PortLostError(ConnectionError):
    """The serial port (or socket) went away while in use."""


@dataclass(frozen=True, slots=True)
class BusCounters:
    """A snapshot of a bus master's counters (all monotonic counts)."""

    frames_sent: int
    frames_received: int
    bytes_sent: int
    bytes_received: int
    crc_errors: int
    discarded_bytes: int
    malformed: int
    timeouts: int
    retries: int
    dropped: int
    echo_bytes_dropped: int
    port_failures: int
    callback_errors: int
    faults_reported: int


@dataclass(frozen=True, slots=True)
class DispatchOutcome:
    """What became of one dispatched command on this bus."""

    reports: dict[str, AckStatus]
    unanswered: tuple[str, ...]
    unknown: tuple[str, ...]


@dataclass(slots=True)
class _Watch:
    """A broadcast result still in progress on one terminal, queried again at `due_at`."""

    query: Query
    last: AckStatus
    expires_at: float
    due_at: float
    misses: int = 0  # re-queries in a row without a usable answer


@dataclass(slots=True)
class _Terminal:
    code: str
    address: int
    log: Any
    live: Liveness | None = None  # None: unknown
    session: int = 0
    misses: int = 0
    watches: dict[tuple[str, int], _Watch] = field(default_factory=dict)
    results_this_round: int = 0  # broadcast results it answered heartbeat polls with, this round


@dataclass(slots=True)
class _Job:
    body: BroadcastStart | BroadcastStop
    remaining: deque[str]
    done: asyncio.Future[DispatchOutcome]
    unknown: tuple[str, ...]
    ttl_s: float
    signature: bytes | None = None  # the command's signature block, carried in every frame of it
    sent: bool = False
    reports: dict[str, AckStatus] = field(default_factory=dict)
    unanswered: list[str] = field(default_factory=list)

    def outcome(self) -> DispatchOutcome:
        return DispatchOutcome(dict(self.reports), tuple(self.unanswered), self.unknown)


class _BusProtocol(asyncio.Protocol):
    """Hands the port's bytes and its loss to the master."""

    def __init__(self, master: SerialBusMaster) -> None:
        self._master = master
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._master._data_received(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._master._connection_lost(self, exc)


class SerialBusMaster:
    """Owns one serial bus: sends alerts at priority, polls terminals, reports what they answer."""

    def __init__(
        self,
        url: str,
        *,
        source: str,
        terminals: Mapping[str, int],
        on_report: Callable[[TerminalReport], None],
        on_presence: Callable[[TerminalPresence], None] | None = None,
        baudrate: int = 9600,
        parity: str = "N",
        bytesize: int = 8,
        stopbits: float = 1,
        response_timeout_s: float = RESPONSE_TIMEOUT_S,
        attempts: int = ATTEMPTS_PER_EXCHANGE,
        inter_frame_gap_s: float = INTER_FRAME_GAP_S,
        echo_suppression: bool = False,
        poll_interval_s: float | None = POLL_INTERVAL_S,
        busy_poll_s: float = BUSY_POLL_S,
        offline_after_misses: int = OFFLINE_AFTER_MISSES,
        reconnect_min_s: float = RECONNECT_MIN_S,
        reconnect_max_s: float = RECONNECT_MAX_S,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if busy_poll_s <= 0:
            raise ValueError("busy_poll_s must be positive")
        encode_frame(Frame(source, tuple(terminals), Heartbeat()))  # every code must be an EBRID
        self.url = url
        self._source = source
        self._log = log.bind(port=url)
        self._terminals = {
            code: _Terminal(code, address, self._log.bind(terminal=code, address=address))
            for code, address in sorted(terminals.items(), key=lambda item: item[1])
        }
        self._on_report = on_report
        self._on_presence = on_presence
        self._serial_kwargs: dict[str, Any] = {
            "baudrate": baudrate,
            "parity": parity,
            "bytesize": bytesize,
            "stopbits": stopbits,
        }
        self._char_bits = 1 + bytesize + (0 if parity == "N" else 1) + stopbits
        self._baudrate = baudrate
        self._response_timeout_s = response_timeout_s
        self._attempts = attempts
        self._gap_s = inter_frame_gap_s
        self._echo_suppression = echo_suppression
        self._poll_interval_s = poll_interval_s
        self._busy_poll_s = busy_poll_s
        self._offline_after = offline_after_misses
        self._reconnect_s = (reconnect_min_s, reconnect_max_s)

        self._decoder = FrameDecoder()
        self._jobs: deque[_Job] = deque()
        self._poll_queue: deque[_Terminal] = deque()  # heartbeat polls of the round under way
        self._next_round_at = 0.0
        self._wakeup = asyncio.Event()
        self._waiters: dict[tuple[str, int], asyncio.Future[Frame]] = {}
        self._protocol: _BusProtocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._lost: PortLostError | None = None
        self._down_cause: str | None = None
        self._echo = b""
        self._echo_matched = 0
        self._session = random.randrange(MAX_SESSION)
        self._heard_since_open = False
        self._closed = False
        self.frames_sent = self.frames_received = self.bytes_sent = self.bytes_received = 0
        self.timeouts = self.retries = self.dropped = self.echo_bytes_dropped = 0
        self.port_failures = self.callback_errors = self.faults_reported = 0

    @property
    def connected(self) -> bool:
        """True while the port is open."""
        return self._transport is not None and self._lost is None

    @property
    def down_cause(self) -> str | None:
        """Why the port is down (the last attempt to open it failed); None while open or reopening."""
        return self._down_cause

    @property
    def counters(self) -> BusCounters:
        """A snapshot of every counter, including the decoder's."""
        stats = self._decoder.stats
        return BusCounters(
            self.frames_sent, self.frames_received, self.bytes_sent, self.bytes_received,
            stats.crc_errors, stats.discarded_bytes, stats.malformed + stats.oversize, self.timeouts,
            self.retries, self.dropped, self.echo_bytes_dropped, self.port_failures,
            self.callback_errors, self.faults_reported,
        )  # fmt: skip

    def airtime_s(self, byte_count: int) -> float:
        """Seconds `byte_count` bytes occupy the line at this bus's baud rate and character format."""
        return byte_count * self._char_bits / self._baudrate

    async def dispatch(self, cmd: Command, terminals: Sequence[str]) -> DispatchOutcome:
        """Queue a command at alert priority for these terminals; return once each answered or gave up."""
        if self._closed:
            raise BusClosedError(f"bus master on {self.url} has stopped")
        body = command_body(cmd)
        if max_targets_per_frame(len(encode_body(body))) < 1:  # encode_body raises if it cannot carry
            raise LocalProtocolError("command body leaves no room for a target in one frame")
        unknown = tuple(dict.fromkeys(t for t in terminals if t not in self._terminals))
        if unknown:
            self._log.warning("serial.unknown_terminals", alert_id=cmd.alert_id, terminals=list(unknown))
        known = sorted(
            {t for t in terminals if t in self._terminals}, key=lambda t: self._terminals[t].address
        )
        loop = asyncio.get_running_loop()
        ttl_s = cmd.ttl_s if isinstance(cmd, PlayCommand) else 0.0
        job = _Job(body, deque(known), loop.create_future(), unknown, ttl_s, cmd.signature or None)
        if not known:
            return job.outcome()
        if self._down_cause is not None:
            raise BusDownError(self._down_cause, tuple(known))
        self._jobs.append(job)
        self._wakeup.set()
        return await job.done

    async def run(self) -> None:
        """Own the port until cancelled: open it, serve the bus, reopen with capped jittered backoff."""
        self._closed = False
        failures = 0
        try:
            while True:
                try:
                    await self._serve_connection()
                except OSError as exc:  # serial.SerialException and PortLostError are OSErrors
                    self.port_failures += 1
                    failures = 1 if self._heard_since_open else failures + 1
                    low, high = self._reconnect_s
                    delay = min(high, low * 2 ** min(failures - 1, 16)) * random.uniform(0.5, 1.0)
                    self._log.warning("serial.port_failed", error=str(exc), retry_in_s=round(delay, 3))
                    await asyncio.sleep(delay)
        finally:
            self._closed = True
            while self._jobs:
                job = self._jobs.popleft()
                if not job.done.done():
                    job.done.set_exception(BusClosedError(f"bus master on {self.url} stopped"))

    async def _serve_connection(self) -> None:
        loop = asyncio.get_running_loop()
        self._heard_since_open = False
        try:
            transport, protocol = await serial_asyncio_fast.create_serial_connection(
                loop, lambda: _BusProtocol(self), self.url, **self._serial_kwargs
            )
        except OSError as exc:  # serial.SerialException is an OSError
            self._port_down(exc)
            raise
        self._down_cause = None
        assert isinstance(protocol, _BusProtocol)  # noqa: S101 - create_serial_connection returns our factory's protocol
        self._transport, self._protocol, self._lost = transport, protocol, None
        self._decoder = FrameDecoder(stats=self._decoder.stats)
        self._poll_queue.clear()
        self._next_round_at = loop.time()
        if self._jobs:
            self._jobs[0].sent = False  # the command may not have crossed before the port failed
        self._log.info("serial.connected", baudrate=self._baudrate)
        try:
            await self._work()
        finally:
            self._protocol = None
            self._transport = None
            transport.close()
            with contextlib.suppress(TimeoutError):  # the port closes in an executor thread
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await protocol.closed
            self._echo = b""
            for terminal in self._terminals.values():
                terminal.live, terminal.misses = None, 0

    def _port_down(self, exc: OSError) -> None:
        """Opening the port failed: record why, and fail the jobs waiting for it with that cause."""
        cause = port_down_cause(self.url, exc)
        if cause != self._down_cause:
            self._log.warning("serial.port_down", cause=cause, jobs=len(self._jobs))
        self._down_cause = cause
        while self._jobs:
            job = self._jobs.popleft()
            if not job.done.done():
                job.done.set_exception(BusDownError(cause, tuple(job.remaining)))

    async def _work(self) -> None:
        while True:
            self._wakeup.clear()
            if self._lost is not None:
                raise self._lost
            if self._jobs:
                await self._run_job(self._jobs[0])
                self._jobs.popleft()
                continue
            if await self._poll_step():
                continue
            wake_at = self._next_wake_at()
            timeout = None if wake_at is None else max(0.0, wake_at - asyncio.get_running_loop().time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()

    async def _run_job(self, job: _Job) -> None:
        body = job.body
        if not job.sent:
            self._log.info(
                "serial.command",
                alert_id=body.alert_id,
                revision=body.revision,
                kind=body.business_type.name.lower(),
                terminals=len(job.remaining),
            )
            await self._send_unanswered(body, list(job.remaining), job.signature)
            job.sent = True
        while job.remaining:
            code = job.remaining[0]
            report = await self._collect(job, self._terminals[code])
            job.remaining.popleft()
            if report is None:
                job.unanswered.append(code)
            else:
                job.reports[code] = report.status
        if not job.done.done():
            job.done.set_result(job.outcome())

    async def _collect(self, job: _Job, terminal: _Terminal) -> TerminalReport | None:
        body = job.body
        query = Query(body.ebmid, body.alert_id, body.revision)
        tlog = terminal.log.bind(alert_id=body.alert_id, revision=body.revision)
        for attempt in range(self._attempts):
            if attempt:
                self.retries += 1
            reply = await self._exchange(terminal, query)
            result = self._matching_result(reply, query, tlog)
            if result is None:
                continue
            accepted = result.status is not ResultStatus.UNKNOWN and (
                isinstance(body, BroadcastStart)
                or result.status in (ResultStatus.STOPPED, ResultStatus.REFUSED)
            )
            if not accepted:
                tlog.info("serial.resend", status=result.status.name.lower())
                await self._send_unanswered(body, [terminal.code], job.signature)
                continue
            report = result_report(terminal.code, result)
            if report is not None:
                expires_at = asyncio.get_running_loop().time() + job.ttl_s if job.ttl_s > 0 else None
                self._report(terminal, report, query, expires_at, result.remaining_s)
                return report
        tlog.warning("serial.no_result", attempts=self._attempts)
        return None

    def _matching_result(self, reply: Frame | None, query: Query, tlog: Any) -> BroadcastResult | None:
        if reply is None:
            return None
        result, wanted = reply.body, (query.alert_id, query.revision)
        if isinstance(result, BroadcastResult) and (result.alert_id, result.revision) == wanted:
            return result
        self.dropped += 1
        tlog.warning("serial.unexpected_answer", business_type=reply.business_type)
        return None

    def _report(
        self,
        terminal: _Terminal,
        report: TerminalReport,
        query: Query,
        expires_at: float | None,
        remaining_s: int | None,
    ) -> None:
        """Hand a report on; follow a result in progress until `expires_at` (None: do not follow it)."""
        terminal.log.info("serial.report", alert_id=report.alert_id, status=str(report.status))
        if report.status is AckStatus.STOPPED:
            for key in [k for k in terminal.watches if k[0] == report.alert_id]:
                del terminal.watches[key]
        key = (report.alert_id, report.revision)
        if report.status in _FINAL_STATUSES:
            terminal.watches.pop(key, None)
        elif expires_at is not None:
            due_at = asyncio.get_running_loop().time() + self._requery_delay_s(remaining_s, 0)
            terminal.watches[key] = _Watch(query, report.status, expires_at, due_at)
        self._emit(self._on_report, report)

    def _requery_delay_s(self, remaining_s: int | None, misses: int) -> float:
        """When to ask again about a result in progress: when its play should be over, else soon."""
        delay = float(remaining_s) if remaining_s else self._busy_poll_s * 2 ** min(misses, 16)
        cap = POLL_INTERVAL_S if self._poll_interval_s is None else self._poll_interval_s
        return max(MIN_REQUERY_S, min(delay, cap))

    def _due_watch(self, now: float) -> tuple[_Terminal, _Watch] | None:
        """The result in progress most overdue for a re-query, if any; forgets expired ones."""
        due: tuple[_Terminal, _Watch] | None = None
        for terminal in self._terminals.values():
            for key, watch in list(terminal.watches.items()):
                if watch.expires_at <= now:
                    del terminal.watches[key]
                elif watch.due_at <= now and (due is None or watch.due_at < due[1].due_at):
                    due = (terminal, watch)
        return due

    def _next_wake_at(self) -> float | None:
        """The loop time of the next re-query or poll round, if any is planned."""
        times = [w.due_at for t in self._terminals.values() for w in t.watches.values()]
        if self._poll_interval_s is not None:
            times.append(self._next_round_at)
        return min(times, default=None)

    async def _poll_step(self) -> bool:
        now = asyncio.get_running_loop().time()
        due = self._due_watch(now)
        if due is not None:
            await self._requery(*due)
            return True
        if self._poll_interval_s is None:
            return False
        if not self._poll_queue and now >= self._next_round_at:
            self._next_round_at = now + self._poll_interval_s
            self._queue_poll_round()
        if not self._poll_queue:
            return False
        terminal = self._poll_queue.popleft()
        reply = await self._exchange(terminal, Heartbeat())
        if reply is not None:
            self._note_terminal_state(terminal, reply.body)
        return True

    async def _requery(self, terminal: _Terminal, watch: _Watch) -> None:
        """Ask a terminal again about a result in progress; report a change, plan the next query."""
        result = self._matching_result(await self._exchange(terminal, watch.query), watch.query, terminal.log)
        report = None if result is None else result_report(terminal.code, result)
        now = asyncio.get_running_loop().time()
        if result is None or report is None:  # no answer, or "never received": ask less and less often
            watch.misses += 1
            watch.due_at = now + self._requery_delay_s(None, watch.misses)
        elif report.status != watch.last:
            self._report(terminal, report, watch.query, watch.expires_at, result.remaining_s)
        else:
            watch.misses = 0
            watch.due_at = now + self._requery_delay_s(result.remaining_s, 0)

    def _queue_poll_round(self) -> None:
        """A heartbeat to every terminal."""
        for terminal in self._terminals.values():
            terminal.results_this_round = 0
            self._poll_queue.append(terminal)

    def _note_terminal_state(self, terminal: _Terminal, body: Body) -> None:
        if isinstance(body, FaultReport):
            self.faults_reported += 1
            terminal.log.warning(
                "serial.fault_report",
                kind=body.kind.name.lower(),
                code=body.code,
                description=body.description,
            )
        elif isinstance(body, Heartbeat) and body.state is TerminalState.FAULT:
            terminal.log.warning("serial.terminal_fault")
        elif isinstance(body, BroadcastResult):
            self._late_result(terminal, body)

    def _late_result(self, terminal: _Terminal, result: BroadcastResult) -> None:
        """A result in answer to a heartbeat poll: hand it on, and poll the terminal again this round."""
        report = result_report(terminal.code, result)
        if report is not None:
            terminal.log.info(
                "serial.late_report",
                alert_id=report.alert_id,
                revision=report.revision,
                status=str(report.status),
                cause=report.cause,
            )
            self._emit(self._on_report, report)
        terminal.results_this_round += 1
        if terminal.results_this_round < MAX_RESULTS_PER_POLL_ROUND:
            self._poll_queue.append(terminal)  # it may have more to tell

    async def _exchange(self, terminal: _Terminal, body: Body) -> Frame | None:
        session = self._next_session()
        data = encode_frame(Frame(self._source, (terminal.code,), body, session=session))
        key = (terminal.code, session)
        waiter: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        reply: Frame | None = None
        try:
            self._write(data)
            async with asyncio.timeout(
                self._response_timeout_s + self.airtime_s(len(data) + REPLY_ALLOWANCE_BYTES)
            ):
                reply = await waiter
        except TimeoutError:
            self.timeouts += 1
            self._echo = b""
            for frame in self._decoder.flush_partial():  # give up on a half frame, keep what follows
                self._frame_received(frame)
        finally:
            self._waiters.pop(key, None)
        if reply is None:
            self._note_miss(terminal)
        else:
            self._note_heard(terminal, heartbeat=isinstance(reply.body, Heartbeat | FaultReport))
        await asyncio.sleep(self._gap_s)
        return reply

    async def _send_unanswered(
        self, body: BroadcastStart | BroadcastStop, codes: list[str], signature: bytes | None = None
    ) -> None:
        per_frame = max_targets_per_frame(
            len(encode_body(body)), None if signature is None else len(signature)
        )
        for start in range(0, len(codes), per_frame):
            targets = tuple(codes[start : start + per_frame])
            frame = Frame(self._source, targets, body, session=self._next_session(), signature=signature)
            data = encode_frame(frame)
            self._write(data)
            await asyncio.sleep(self.airtime_s(len(data)) + self._gap_s)

    def _write(self, data: bytes) -> None:
        if self._lost is not None:
            raise self._lost
        if not isinstance(self._transport, asyncio.WriteTransport):
            raise PortLostError(f"{self.url} is not open")
        if self._echo_suppression:
            self._echo, self._echo_matched = data, 0
        self._transport.write(data)
        self.frames_sent += 1
        self.bytes_sent += len(data)

    def _next_session(self) -> int:
        self._session = self._session % MAX_SESSION + 1
        return self._session

    def _data_received(self, protocol: _BusProtocol, data: bytes) -> None:
        if protocol is not self._protocol:
            return
        self.bytes_received += len(data)
        if self._echo:
            data = self._strip_echo(data)
        self._decoder.feed(data)
        for frame in self._decoder:
            self._frame_received(frame)

    def _strip_echo(self, data: bytes) -> bytes:
        """Drop the adapter's echo of what we just sent; hand back anything that is not the echo."""
        expected = self._echo[self._echo_matched :]
        same = 0
        for ours, theirs in zip(expected, data, strict=False):
            if ours != theirs:
                break
            same += 1
        if same == len(expected):  # the whole echo is in: drop it, keep what follows
            self.echo_bytes_dropped += len(self._echo)
            self._echo = b""
            return data[same:]
        if same == len(data):  # so far so good: hold it back until the echo is complete
            self._echo_matched += same
            return b""
        held = self._echo[: self._echo_matched]  # not the echo after all: release what was held
        self._echo = b""
        return held + data

    def _frame_received(self, frame: Frame) -> None:
        self.frames_received += 1
        waiter = self._waiters.get((frame.source, frame.session))
        if frame.frame_type is not FrameType.REPLY or waiter is None or waiter.done():
            self.dropped += 1
            self._log.debug(
                "serial.unexpected_frame",
                source=frame.source,
                session=frame.session,
                business_type=frame.business_type,
                own_echo=frame.source == self._source,
            )
            return
        self._heard_since_open = True
        waiter.set_result(frame)

    def _connection_lost(self, protocol: _BusProtocol, exc: Exception | None) -> None:
        if protocol is not self._protocol:
            return
        self._lost = PortLostError(f"{self.url} lost: {exc or 'closed by peer'}")
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(self._lost)
        self._wakeup.set()

    def _note_heard(self, terminal: _Terminal, *, heartbeat: bool) -> None:
        terminal.misses = 0
        if terminal.live is not Liveness.ONLINE:
            terminal.live = Liveness.ONLINE
            terminal.session += 1
            terminal.log.info("serial.terminal_online", session=terminal.session)
        elif not heartbeat:
            return
        self._presence(terminal, heartbeat=heartbeat)

    def _note_miss(self, terminal: _Terminal) -> None:
        terminal.misses += 1
        if terminal.misses >= self._offline_after and terminal.live is not Liveness.OFFLINE:
            terminal.live = Liveness.OFFLINE
            terminal.log.warning("serial.terminal_offline", misses=terminal.misses)
            self._presence(terminal, heartbeat=False)

    def _presence(self, terminal: _Terminal, *, heartbeat: bool) -> None:
        if self._on_presence is not None and terminal.live is not None:
            presence = TerminalPresence(terminal.code, terminal.live, terminal.session, heartbeat=heartbeat)
            self._emit(self._on_presence, presence)

    def _emit(self, callback: Callable[[_T], None], value: _T) -> None:
        try:
            callback(value)
        except Exception:  # noqa: BLE001 - a failing consumer must not stop the bus; logged and counted
            self.callback_errors += 1
            self._log.exception("serial.callback_failed", value=repr(value))


def port_down_cause(url: str, exc: OSError) -> str:
    """Why a port could not be opened, in words for an alert's report."""
    if "://" not in url:  # a device or pty path, not a pyserial URL
        if RUN_DIR_PLACEHOLDER in url:
            return f"serial port {url} does not exist: its {RUN_DIR_PLACEHOLDER} was never expanded"
        if not os.path.exists(url):
            if os.path.islink(url):
                return f"serial port {url} does not exist (it links to {os.readlink(url)}, which is gone)"
            return f"serial port {url} does not exist"
    return f"serial port {url} is down: {exc}"
