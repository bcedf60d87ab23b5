"""ebcd's listener for adapters (`[adapter] listen`): heartbeats and task reports, into the engine.

Theory of operation. Adapters connect and send 0x50 frames. Each connection has its own
`FrameDecoder` (0x50 heads only) and task; nothing it sends is awaited by anyone else, so a slow
or hostile peer holds only its own connection. A peer is disconnected when it sends more than
`max_garbage_bytes` without a valid frame, or nothing for `idle_timeout_s`; at most
`max_connections` are open at once. Every frame ebcd cannot use is dropped with a log line and
counted in `ebcd_dropped_messages_total{where="adapter"}` (and by why in
`ebcd_unexpected_messages_total{kind="adapter_*"}`).

- 0x20 heartbeat (the adapter names its room by its code): the room's terminals are online,
  answered with 0x21 (result 0). State 3 (fault) makes the transport refuse new starts to that
  room with that cause until a heartbeat says otherwise. A room silent for three heartbeat
  periods is unknown (`sweep`).
- 0x18 task start: the covered terminals are `playing`, answered with 0x22 (result 0; 1 for a
  broadcast ebcd did not send that room). 0x19 task end: the terminals it covered are `done`.
- Frames from an adapter whose public key is in `keys_dir` must verify; without a key, all-zero
  (and any other) blocks are accepted, logged once per adapter as not verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ebcd.metrics import Metrics
from ebcd.protocols.adapter.address import LISTEN_PORT_FILE, Address, publish_port
from ebcd.protocols.adapter.bodies import (
    AdapterState,
    Body,
    Heartbeat,
    Reply,
    TaskEnd,
    TaskStart,
    TaskStartReply,
    decode_body,
    encode_body,
)
from ebcd.protocols.adapter.frame import (
    HEAD_ADAPTER,
    HEAD_PLATFORM,
    SOURCE_PLATFORM,
    Frame,
    FrameDecoder,
    ProtocolType,
    SignedData,
    encode_frame,
    sign_frame,
    verify_frame,
)
from ebcd.protocols.adapter.transport import AdapterTransport
from ebcd.protocols.errors import RemoteProtocolError
from ebcd.protocols.messages import AckStatus, Liveness, TerminalPresence, TerminalReport
from ebcd.security.signing import SecurityError, Signer, Verifier, load_verifier
from ebcd.tiers.district import District

log = structlog.get_logger("ebcd.adapter")

READ_CHUNK_BYTES = 4096
SILENT_AFTER_HEARTBEATS = 3
SWEEP_S = 1.0
CLOSE_TIMEOUT_S = 2.0  # for the handlers of open connections to finish at shutdown


@dataclass(slots=True)
class _Room:
    codes: tuple[str, ...]
    session: int = 0
    last_heartbeat: float | None = None  # monotonic
    state: int | None = None
    warned_unverified: bool = False
    silent: bool = False


def adapter_verifiers(keys_dir: str | None, base: Path, scheme: str, rooms: list[str]) -> dict[str, Verifier]:
    """The public key of each room that has `<keys_dir>/<room>.pub`; SecurityError if one is unusable."""
    if keys_dir is None or scheme == "none":
        return {}
    folder = base / keys_dir
    found = {}
    for room in rooms:
        path = folder / f"{room}.pub"
        if path.exists():
            found[room] = load_verifier(path, scheme)
    return found


class AdapterListener:
    """The listener adapters report to."""

    def __init__(
        self,
        listen: Address,
        district: District,
        transport: AdapterTransport,
        metrics: Metrics,
        *,
        on_report: Callable[[TerminalReport], None],
        on_presence: Callable[[TerminalPresence], None],
        on_unknown: Callable[[list[str], str], None],
        signer: Signer | None,
        verifiers: Mapping[str, Verifier],
        variant: SignedData = SignedData.HEADER_BODY,
        heartbeat_s: float = 30.0,
        max_connections: int = 256,
        max_garbage_bytes: int = 65_536,
        idle_timeout_s: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.listen = listen
        self.transport = transport
        self._metrics = metrics
        self._on_report = on_report
        self._on_presence = on_presence
        self._on_unknown = on_unknown
        self._signer = signer
        self._verifiers = dict(verifiers)
        self._variant = variant
        self._heartbeat_s = heartbeat_s
        self._max_connections = max_connections
        self._max_garbage = max_garbage_bytes
        self._idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._wall = wall
        self.rooms = {
            v.code: _Room(tuple(t.code for t in v.terminals))
            for v in district.villages()
            if v.link == "adapter"
        }
        self.open_connections = 0
        self._serving: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}  # open connections
        self.bound_port: int | None = None
        self.ready = asyncio.Event()
        metrics.dropped.labels("adapter")

    async def run(self) -> None:
        """Serve until cancelled."""
        port = self.listen.port if self.listen.port is not None else 0
        server = await asyncio.start_server(self._serve, self.listen.host, port)
        self.bound_port = int(server.sockets[0].getsockname()[1])
        if self.listen.port_dir is not None:
            publish_port(self.listen.port_dir, LISTEN_PORT_FILE, self.bound_port)
        log.info("adapter.listening", host=self.listen.host, port=self.bound_port)
        self.ready.set()
        try:
            async with server:
                while True:
                    await asyncio.sleep(SWEEP_S)
                    self.sweep()
        finally:
            server.close()
            await self._close_connections()

    async def _close_connections(self) -> None:
        """End every open connection and let its handler finish: one left blocked in a read would
        be cancelled by the loop's shutdown, which asyncio's stream server reports as an error."""
        serving = dict(self._serving)
        for writer in serving:
            writer.close()
        if serving:
            await asyncio.wait(serving.values(), timeout=CLOSE_TIMEOUT_S)

    def sweep(self) -> None:
        """Rooms silent for three heartbeat periods: their terminals are unknown."""
        now = self._clock()
        for code, room in self.rooms.items():
            if room.last_heartbeat is None or room.silent:
                continue
            if now - room.last_heartbeat > SILENT_AFTER_HEARTBEATS * self._heartbeat_s:
                room.silent = True
                log.warning("adapter.silent", room=code, heartbeats_missed=SILENT_AFTER_HEARTBEATS)
                self._on_unknown(list(room.codes), f"adapter {code} silent")

    # -- one connection ------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self.open_connections >= self._max_connections:
            self._drop("too_many_connections", peer=str(peer))
            writer.close()
            return
        self.open_connections += 1
        task = asyncio.current_task()
        if task is not None:  # always, in a handler the server started
            self._serving[writer] = task
        decoder = FrameDecoder(heads=(HEAD_ADAPTER,))
        seen: set[str] = set()  # rooms heard on this connection: a new connection is a new session
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_timeout_s):
                        data = await reader.read(READ_CHUNK_BYTES)
                except TimeoutError:
                    log.info("adapter.idle_closed", peer=str(peer), idle_s=self._idle_timeout_s)
                    break
                if not data:
                    break
                decoder.feed(data)
                for frame in decoder:
                    for out in self.handle(frame, seen):
                        writer.write(out)
                if decoder.last_error is not None:
                    self._drop("bad_frame", peer=str(peer), error=str(decoder.last_error))
                    decoder.last_error = None
                if decoder.garbage_run > self._max_garbage:
                    self._drop("garbage", peer=str(peer), bytes=decoder.garbage_run)
                    break
                try:
                    async with asyncio.timeout(self._idle_timeout_s):
                        await writer.drain()
                except TimeoutError:  # a peer that does not read its answers holds nothing for long
                    self._drop("not_reading", peer=str(peer))
                    break
        except OSError as exc:
            log.info("adapter.connection_lost", peer=str(peer), error=str(exc))
        finally:
            self.open_connections -= 1
            self._serving.pop(writer, None)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def handle(self, frame: Frame, seen: set[str] | None = None) -> list[bytes]:
        """What one frame from an adapter means; returns the frames to answer with."""
        try:
            body = decode_body(frame.protocol_type, frame.body)
        except RemoteProtocolError as exc:
            self._drop("malformed", error=str(exc))
            return []
        if not isinstance(body, Heartbeat | TaskStart | TaskEnd):
            self._drop("unexpected_type", protocol_type=f"0x{frame.protocol_type:02X}")
            return []
        room = self.rooms.get(body.adapter)
        if room is None:
            self._drop("unknown_adapter", adapter=body.adapter)
            return []
        if not self._trusted(body.adapter, room, frame):
            return []
        if isinstance(body, Heartbeat):
            return self._heartbeat(body, room, seen)
        if isinstance(body, TaskStart):
            return self._task_start(body, room)
        self._task_end(body, room)
        return []

    def _trusted(self, code: str, room: _Room, frame: Frame) -> bool:
        verifier = self._verifiers.get(code)
        if verifier is None:
            if not room.warned_unverified:
                room.warned_unverified = True
                log.warning(
                    "adapter.unverified", room=code, hint="no key in [adapter] keys_dir: not verified"
                )
            return True
        try:
            verify_frame(frame, verifier, variant=self._variant)
        except SecurityError as exc:
            self._drop("bad_signature", adapter=code, error=str(exc))
            return False
        return True

    def _heartbeat(self, hb: Heartbeat, room: _Room, seen: set[str] | None) -> list[bytes]:
        if seen is None:  # on the command connection: a new session only the first time
            room.session = max(room.session, 1)
        elif hb.adapter not in seen:
            room.session += 1
            seen.add(hb.adapter)
        room.last_heartbeat, room.silent = self._clock(), False
        if hb.state == AdapterState.FAULT:
            if room.state != AdapterState.FAULT:
                log.warning("adapter.fault", room=hb.adapter)
            self.transport.faults[hb.adapter] = f"adapter {hb.adapter} reports a fault (heartbeat state 3)"
        else:
            self.transport.faults.pop(hb.adapter, None)
        room.state = hb.state
        for code in room.codes:
            self._emit_presence(TerminalPresence(code, Liveness.ONLINE, room.session, heartbeat=True))
        return [
            self._answer(ProtocolType.HEARTBEAT_REPLY, Reply(0, protocol_type=ProtocolType.HEARTBEAT_REPLY))
        ]

    def _task_start(self, ts: TaskStart, room: _Room) -> list[bytes]:
        sent = self.transport.ledger.lookup(ts.adapter, ts.ebmid)
        if sent is None:
            self._drop("unknown_broadcast", adapter=ts.adapter, ebmid=ts.ebmid)
            return [self._answer(ProtocolType.TASK_START_REPLY, TaskStartReply(1))]
        ours = set(room.codes)
        covered = tuple(c for c in ts.codes if c in ours)
        if len(covered) < len(ts.codes):
            self._drop("unknown_terminal", adapter=ts.adapter, terminals=len(ts.codes) - len(covered))
        sent.covered = covered
        for code in covered:
            self._emit_report(TerminalReport(code, sent.alert_id, sent.revision, AckStatus.PLAYING))
        return [self._answer(ProtocolType.TASK_START_REPLY, TaskStartReply(0))]

    def _task_end(self, te: TaskEnd, room: _Room) -> None:
        sent = self.transport.ledger.lookup(te.adapter, te.ebmid)
        if sent is None:
            self._drop("unknown_broadcast", adapter=te.adapter, ebmid=te.ebmid)
            return
        for code in sent.covered or sent.codes:
            self._emit_report(TerminalReport(code, sent.alert_id, sent.revision, AckStatus.DONE))

    def _answer(self, ptype: ProtocolType, body: Body) -> bytes:
        now = int(self._wall())
        frame = Frame(HEAD_PLATFORM, ptype, encode_body(body), source=SOURCE_PLATFORM)
        return encode_frame(sign_frame(frame, self._signer, now=now, variant=self._variant))

    def _drop(self, why: str, **detail: object) -> None:
        self._metrics.dropped.labels("adapter").inc()
        self._metrics.unexpected.labels(f"adapter_{why}").inc()
        log.warning("adapter.dropped", why=why, **detail)

    def _emit_report(self, report: TerminalReport) -> None:
        try:
            self._on_report(report)
        except Exception:  # a failing consumer must not stop the listener: logged with its traceback
            log.exception("adapter.on_report_callback", terminal=report.terminal)

    def _emit_presence(self, presence: TerminalPresence) -> None:
        try:
            self._on_presence(presence)
        except Exception:  # a failing consumer must not stop the listener: logged with its traceback
            log.exception("adapter.on_presence_callback", terminal=presence.terminal)
