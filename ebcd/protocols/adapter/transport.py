"""Carrying commands to adapter rooms: a 0x04 frame per room, its 0x12 reply as the rooms' answer.

A play becomes a 0x04 start, a stop a 0x04 stop, addressed to the room's terminals the command
is for (logical codes, at most 255 a frame), signed once per frame with the daemon's signer.
Reply 0 acknowledges those terminals `received` (a stop: `stopped`); any other code refuses
them with a cause that names the code. An adapter whose last heartbeat said "fault" refuses
new starts at once, with that cause. An adapter that cannot be reached fails the command with
the connection's cause (`on_failed`), so the alert's report says why.

The 0x18/0x19 reports name a broadcast by its EBM id only; `Ledger` remembers, per room, which
alert and revision the last start of each EBM id carried and to which codes, so the listener
can turn a report into the core's terms.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from ebcd.metrics import Metrics
from ebcd.protocols.adapter.bodies import (
    CLASS_EMERGENCY,
    CLASS_SIMULATED_DRILL,
    MAX_CODES_PER_FRAME,
    Language,
    StartStop,
    Switch,
    encode_body,
    result_meaning,
)
from ebcd.protocols.adapter.frame import (
    HEAD_PLATFORM,
    SOURCE_PLATFORM,
    Frame,
    ProtocolType,
    SignedData,
    encode_frame,
    sign_frame,
)
from ebcd.protocols.adapter.link import AdapterDownError, AdapterLink, ReplyTimeoutError
from ebcd.protocols.errors import LocalProtocolError
from ebcd.protocols.messages import AckStatus, Command, PlayCommand, TerminalReport
from ebcd.security.signing import Signer
from ebcd.tiers.terminal import Terminal

log = structlog.get_logger("ebcd.transport")

OnFailed = Callable[[str, int, list[str], str], None]  # (alert id, revision, terminal codes, cause)
MAX_BROADCASTS_PER_ROOM = 64  # EBM ids remembered per room for its reports; the oldest is forgotten


@dataclass(slots=True)
class Sent:
    """What the last start of one EBM id to one room carried."""

    alert_id: str
    revision: int
    codes: tuple[str, ...]
    ebm_class: int = CLASS_EMERGENCY
    event_type: str = "00000"
    level: int = 0
    covered: tuple[str, ...] = ()  # the codes its last 0x18 said were playing


@dataclass(slots=True)
class Ledger:
    """Per room, the broadcasts (by EBM id) it was last sent."""

    rooms: dict[str, OrderedDict[str, Sent]] = field(default_factory=dict)
    forgotten: int = 0

    def started(self, room: str, ebmid: str, sent: Sent) -> None:
        """Remember a start (a newer one of the same EBM id replaces it)."""
        book = self.rooms.setdefault(room, OrderedDict())
        book[ebmid] = sent
        book.move_to_end(ebmid)
        while len(book) > MAX_BROADCASTS_PER_ROOM:
            book.popitem(last=False)
            self.forgotten += 1

    def lookup(self, room: str, ebmid: str) -> Sent | None:
        """The last start of `ebmid` to `room`, or None."""
        book = self.rooms.get(room)
        return None if book is None else book.get(ebmid)


class AdapterTransport:
    """Commands to adapter rooms: one kept connection (`AdapterLink`) per room."""

    name = "adapter"

    def __init__(
        self,
        links: dict[str, AdapterLink],
        metrics: Metrics,
        *,
        signer: Signer | None,
        on_report: Callable[[TerminalReport], None],
        on_failed: OnFailed,
        variant: SignedData = SignedData.HEADER_BODY,
        agency: str = "",
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.links = links
        self.ledger = Ledger()
        self.faults: dict[str, str] = {}  # room -> why it refuses new starts (its heartbeat said fault)
        self._metrics = metrics
        self._signer = signer
        self._on_report = on_report
        self._on_failed = on_failed
        self._variant = variant
        self._agency = agency
        self._wall = wall
        self._jobs: set[asyncio.Task[None]] = set()
        metrics.dropped.labels("adapter")  # the series exists from the start

    def send(self, cmd: Command, terminals: Sequence[Terminal], *, first: bool) -> None:
        """Queue `cmd` to each room's adapter; replies and failures come back through the callbacks."""
        by_room: dict[str, list[str]] = {}
        for t in terminals:
            by_room.setdefault(t.room, []).append(t.code)
        for room, codes in by_room.items():
            for start in range(0, len(codes), MAX_CODES_PER_FRAME):
                chunk = codes[start : start + MAX_CODES_PER_FRAME]
                try:
                    data = self._frame(room, cmd, chunk)
                except LocalProtocolError as exc:  # a command the frame cannot carry: our bug, never silent
                    log.error("adapter.cannot_encode", alert_id=cmd.alert_id, room=room, error=str(exc))
                    self._metrics.dropped.labels("adapter_encode").inc()
                    data = None
                # a task even for a failure: no callback runs inside the caller's own send()
                task = asyncio.create_task(self._dispatch(room, cmd, chunk, data), name=f"adapter-{room}")
                self._jobs.add(task)
                task.add_done_callback(self._jobs.discard)

    def _frame(self, room: str, cmd: Command, codes: list[str]) -> bytes:
        now = int(self._wall())
        if isinstance(cmd, PlayCommand):
            ebm_class = CLASS_SIMULATED_DRILL if cmd.test else CLASS_EMERGENCY
            body = StartStop(
                cmd.ebmid, Switch.START, ebm_class, cmd.event_type, cmd.level, now,
                now + max(1, round(cmd.ttl_s)), cmd.volume, tuple(codes),
                (Language(text=cmd.text, agency=self._agency),),
            )  # fmt: skip
            # remembered before the bytes go out: the adapter's 0x18 may beat its own 0x12
            self.ledger.started(
                room,
                cmd.ebmid,
                Sent(cmd.alert_id, cmd.revision, tuple(codes), ebm_class, cmd.event_type, cmd.level),
            )
        else:
            last = self.ledger.lookup(room, cmd.ebmid)
            if last is not None:  # a later 0x19 is no longer theirs
                last.codes = tuple(c for c in last.codes if c not in codes)
                last.covered = tuple(c for c in last.covered if c not in codes)
            body = StartStop(
                cmd.ebmid, Switch.STOP, last.ebm_class if last else CLASS_EMERGENCY,
                last.event_type if last else "00000", last.level if last else 0, now, now, 0, tuple(codes),
            )  # fmt: skip
        frame = Frame(HEAD_PLATFORM, ProtocolType.START_STOP, encode_body(body), source=SOURCE_PLATFORM)
        return encode_frame(sign_frame(frame, self._signer, now=now, variant=self._variant))

    async def _dispatch(self, room: str, cmd: Command, codes: list[str], data: bytes | None) -> None:
        link = self.links.get(room)
        if data is None:
            self._failed(cmd, codes, "the command cannot be carried in an adapter frame")
            return
        if link is None:
            log.error("adapter.no_link", room=room, terminals=len(codes))
            self._failed(cmd, codes, f"room {room} has no adapter link")
            return
        if isinstance(cmd, PlayCommand) and (fault := self.faults.get(room)) is not None:
            self._reports(cmd, codes, AckStatus.REFUSED, fault)
            return
        self._metrics.commands.labels("adapter").inc()
        try:
            reply = await link.exchange(data)
        except AdapterDownError as exc:
            log.warning("adapter.down", alert_id=cmd.alert_id, room=room, cause=exc.cause)
            self._failed(cmd, codes, exc.cause)
            return
        except ReplyTimeoutError as exc:  # the core's acknowledgement timeout decides what follows
            log.warning("adapter.no_reply", alert_id=cmd.alert_id, room=room, error=str(exc))
            self._metrics.unexpected.labels("adapter_no_reply").inc()
            return
        if reply.result == 0:
            status = AckStatus.RECEIVED if isinstance(cmd, PlayCommand) else AckStatus.STOPPED
            self._reports(cmd, codes, status, None)
            return
        cause = f"adapter refused: code {reply.result} ({result_meaning(reply.result)})"
        if reply.description:
            cause += f": {reply.description[:200]}"
        log.warning("adapter.refused", alert_id=cmd.alert_id, room=room, result=reply.result)
        if isinstance(cmd, PlayCommand):
            self._reports(cmd, codes, AckStatus.REFUSED, cause)

    def _reports(self, cmd: Command, codes: list[str], status: AckStatus, cause: str | None) -> None:
        for code in codes:
            report = TerminalReport(code, cmd.alert_id, cmd.revision, status, cause, cmd.seq)
            try:
                self._on_report(report)
            except Exception:  # a failing consumer must not break the transport: logged with its traceback
                log.exception("adapter.on_report_callback", alert_id=cmd.alert_id, terminal=code)

    def _failed(self, cmd: Command, codes: list[str], cause: str) -> None:
        try:
            self._on_failed(cmd.alert_id, cmd.revision, codes, cause)
        except Exception:  # a failing consumer must not break the transport: logged with its traceback
            log.exception("adapter.on_failed_callback", alert_id=cmd.alert_id, cause=cause)

    async def close(self) -> None:
        """Cancel the dispatches still waiting."""
        for task in list(self._jobs):
            task.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
