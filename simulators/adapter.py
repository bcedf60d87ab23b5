"""A simulated vendor adapter: the room's address, 0x04 in, 0x12 out, heartbeats and task reports.

It speaks through the production codec (`ebcd.protocols.adapter`), like a real adapter would:

- listens on the room's address (a free port published in the run folder for `tcp://HOST:{run_dir}`),
  and serves a kept connection and one connection per command alike;
- checks each command's CRC and signature (with ebcd's public key, `[security] public_key`) and
  refuses what fails with a 0x12 of code -1 naming why; refuses with code 3 (command conflict)
  under the `refuse` fault; else answers code 0, reports 0x18 task start to ebcd's listener,
  plays for the play time, reports 0x19 task end;
- keeps a connection to ebcd's listener and sends a 0x20 heartbeat every heartbeat period.

Faults (`AdapterFaults.parse`, `ebcd simulate --adapter-faults`): `refuse=ROOM|all` answers code 3,
`silence=ROOM|all` sends no heartbeat and no report, `drop=ROOM|all` closes the connection instead
of answering, `fault=ROOM|all` says state 3 in its heartbeats, `corrupt=P%` flips a byte in that
share of the frames it sends, `slow=SECONDS` answers that late.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from ebcd.model.backoff import Backoff
from ebcd.protocols.adapter.address import (
    LISTEN_PORT_FILE,
    Address,
    AddressError,
    publish_port,
    room_port_file,
)
from ebcd.protocols.adapter.bodies import (
    AdapterState,
    Body,
    Heartbeat,
    Reply,
    ResultCode,
    StartStop,
    Switch,
    TaskEnd,
    TaskStart,
    decode_body,
    encode_body,
)
from ebcd.protocols.adapter.frame import (
    HEAD_ADAPTER,
    HEAD_PLATFORM,
    SOURCE_DEVICE,
    Frame,
    FrameDecoder,
    ProtocolType,
    SignedData,
    encode_frame,
    verify_frame,
)
from ebcd.protocols.errors import RemoteProtocolError
from ebcd.security.signing import SecurityError, Verifier

log = structlog.get_logger("ebcd.simulator.adapter")

READ_CHUNK_BYTES = 4096
TASK_START_DELAY_S = 0.05  # from the 0x12 reply to the 0x18 report
MAX_PENDING_REPORTS = 256


_EBMID_ALERTS: OrderedDict[str, str] = OrderedDict()  # EBM id -> alert id heard over MQTT in this process
MAX_EBMIDS_REMEMBERED = 10_000


def note_alert(ebmid: str, alert_id: str) -> None:
    """An MQTT terminal of this process heard `alert_id` under `ebmid` (adapters hear EBM ids only)."""
    _EBMID_ALERTS[ebmid] = alert_id
    _EBMID_ALERTS.move_to_end(ebmid)
    while len(_EBMID_ALERTS) > MAX_EBMIDS_REMEMBERED:
        _EBMID_ALERTS.popitem(last=False)


def alert_of(ebmid: str) -> str:
    """The alert id heard with `ebmid` in this process, else the EBM id itself."""
    return _EBMID_ALERTS.get(ebmid, ebmid)


def _content(start: StartStop) -> StartStop:
    """A start without its times and codes: a copy re-sent later, or to more codes, is the same broadcast."""
    return replace(start, start=0, end=0, codes=())


def _running(b: _Broadcast) -> bool:
    return b.task is not None and not b.task.done()


class AdapterFaultSpecError(ValueError):
    """An adapter fault profile that cannot be read."""


@dataclass(frozen=True, slots=True)
class AdapterFaults:
    """What simulated adapters do wrong; room sets hold codes or "all"."""

    refuse: frozenset[str] = frozenset()
    silence: frozenset[str] = frozenset()
    drop: frozenset[str] = frozenset()
    fault: frozenset[str] = frozenset()
    corrupt: float = 0.0
    slow_s: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> AdapterFaults:
        """`refuse=CODE,silence=all,corrupt=10%,slow=1.5`; AdapterFaultSpecError saying what is wrong."""
        rooms: dict[str, set[str]] = {"refuse": set(), "silence": set(), "drop": set(), "fault": set()}
        corrupt, slow = 0.0, 0.0
        for item in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not value:
                raise AdapterFaultSpecError(f"adapter fault {item!r}: expected KIND=VALUE")
            if key in rooms:
                if value != "all" and not (value.isdigit() and len(value) == 23):
                    raise AdapterFaultSpecError(
                        f"adapter fault {item!r}: expected a 23-digit room code or all"
                    )
                rooms[key].add(value)
            elif key == "corrupt":
                try:
                    corrupt = float(value[:-1]) / 100 if value.endswith("%") else float(value)
                except ValueError:
                    raise AdapterFaultSpecError(
                        f"adapter fault {item!r}: expected a share like 10%"
                    ) from None
                if not 0 <= corrupt <= 1:
                    raise AdapterFaultSpecError(f"adapter fault {item!r}: share outside 0..100%")
            elif key == "slow":
                try:
                    slow = float(value)
                except ValueError:
                    raise AdapterFaultSpecError(f"adapter fault {item!r}: expected seconds") from None
                if slow < 0:
                    raise AdapterFaultSpecError(f"adapter fault {item!r}: seconds must not be negative")
            else:
                raise AdapterFaultSpecError(
                    f"unknown adapter fault {key!r}: expected refuse, silence, drop, fault, corrupt or slow"
                )
        return cls(
            frozenset(rooms["refuse"]),
            frozenset(rooms["silence"]),
            frozenset(rooms["drop"]),
            frozenset(rooms["fault"]),
            corrupt,
            slow,
        )

    def has(self, kind: str, room: str) -> bool:
        """Whether `room` has the room fault `kind`."""
        rooms: frozenset[str] = getattr(self, kind)
        return "all" in rooms or room in rooms


@dataclass(slots=True)
class _Broadcast:
    body: bytes
    codes: tuple[str, ...]  # the loudspeakers it plays on
    start: StartStop
    done: bool = False
    task: asyncio.Task[None] | None = None


@dataclass
class AdapterSimulator:
    """One simulated adapter room."""

    room: str
    codes: tuple[str, ...]
    address: Address
    listener: Address | None
    verifier: Verifier | None
    variant: SignedData = SignedData.HEADER_BODY
    play_time_s: float = 1.0
    heartbeat_s: float = 30.0
    faults: AdapterFaults = field(default_factory=AdapterFaults)
    seed: int = 0
    # what it saw, for tests and logs
    commands: int = 0
    refused: list[str] = field(default_factory=list)
    plays: dict[str, int] = field(default_factory=dict)  # EBM id -> distinct starts played
    played: list[tuple[str, str, int]] = field(default_factory=list)  # (terminal, EBM id, n-th start)
    bound_port: int | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.seed}-{self.room}")
        self._broadcasts: dict[str, _Broadcast] = {}
        self._server: asyncio.Server | None = None
        self._up: asyncio.StreamWriter | None = None  # the connection to ebcd's listener
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: deque[Body] = deque(maxlen=MAX_PENDING_REPORTS)  # reports while the listener is away
        self._peers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}  # serving ebcd's connections
        self._closing = asyncio.Event()
        self._connected_at = int(time.time())
        self._log = log.bind(room=self.room)

    # -- life cycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen on the room's address, and start heartbeating to ebcd's listener."""
        self._closing.clear()
        port = self.address.port if self.address.port is not None else 0
        self._server = await asyncio.start_server(self._serve, self.address.host, port)
        self.bound_port = int(self._server.sockets[0].getsockname()[1])
        if self.address.port_dir is not None:
            publish_port(self.address.port_dir, room_port_file(self.room), self.bound_port)
        self._spawn(self._uplink(), "uplink")
        self._log.info("adapter_sim.listening", port=self.bound_port)

    async def close(self) -> None:
        """Stop serving and cancel everything it runs."""
        if self._server is not None:
            self._server.close()
        self._closing.set()
        peers = list(self._peers.items())
        for _, writer in peers:  # as a killed adapter: its connections go too
            writer.close()
        await asyncio.gather(*(task for task, _ in peers), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._up is not None:
            self._up.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"adapter-sim-{self.room}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def now_playing(self, ebmid: str) -> StartStop | None:
        """The start of `ebmid` the loudspeakers play now, None when they do not."""
        b = self._broadcasts.get(ebmid)
        return b.start if b is not None and b.task is not None and not b.task.done() else None

    def finished(self, ebmid: str) -> bool:
        """Whether `ebmid` played to its end (a stop ends it without finishing it)."""
        b = self._broadcasts.get(ebmid)
        return b is not None and b.done

    # -- commands from ebcd --------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(heads=(HEAD_PLATFORM,))
        crc_errors = 0
        me = asyncio.current_task()
        if me is not None:
            self._peers[me] = writer
        try:
            while data := await reader.read(READ_CHUNK_BYTES):
                decoder.feed(data)
                for frame in decoder:
                    answer = await self._command(frame)
                    if answer is None:  # the drop fault
                        return
                    writer.write(answer)
                if decoder.stats.crc_errors > crc_errors:
                    crc_errors = decoder.stats.crc_errors
                    self.refused.append("crc")
                    self._log.warning("adapter_sim.crc_error", error=str(decoder.last_error))
                    writer.write(self._reply(ResultCode.UNKNOWN_ERROR, f"CRC mismatch: {decoder.last_error}"))
                await writer.drain()
        except OSError:
            pass
        finally:
            if me is not None:
                self._peers.pop(me, None)
            writer.close()

    async def _command(self, frame: Frame) -> bytes | None:
        self.commands += 1
        if self.faults.slow_s:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.faults.slow_s):
                    await self._closing.wait()
        if self._closing.is_set() or self.faults.has("drop", self.room):
            self._log.info("adapter_sim.drop")
            return None
        if frame.protocol_type != ProtocolType.START_STOP:
            return self._reply(
                ResultCode.UNKNOWN_ERROR, f"protocol type 0x{frame.protocol_type:02X} not supported"
            )
        if (why := self._signature_problem(frame)) is not None:
            self.refused.append("signature")
            self._log.warning("adapter_sim.signature_refused", why=why)
            return self._reply(ResultCode.UNKNOWN_ERROR, why)
        try:
            body = decode_body(frame.protocol_type, frame.body)
        except RemoteProtocolError as exc:
            self.refused.append("malformed")
            return self._reply(ResultCode.LENGTH_ERROR, str(exc))
        assert isinstance(body, StartStop)  # noqa: S101 - decode_body's type for 0x04
        if body.switch is Switch.STOP:  # those loudspeakers stop; the broadcast ends with the last one
            current = self._broadcasts.get(body.ebmid)
            if current is not None:
                current.codes = tuple(c for c in current.codes if body.codes and c not in body.codes)
                if not current.codes and current.task is not None:
                    current.task.cancel()
            return self._reply(ResultCode.SUCCESS, "stopped")
        if self.faults.has("refuse", self.room):
            self.refused.append("conflict")
            return self._reply(ResultCode.COMMAND_CONFLICT, "command conflict (simulated)")
        mine = tuple(c for c in body.codes if c in self.codes)
        self._start(body, frame.body, mine)
        return self._reply(ResultCode.SUCCESS, "")

    def _signature_problem(self, frame: Frame) -> str | None:
        if self.verifier is None:
            return None
        if frame.unsigned:
            return "unsigned command: the signature block is all zero"
        try:
            verify_frame(frame, self.verifier, variant=self.variant)
        except SecurityError as exc:
            return f"signature check failed: {exc}"
        return None

    def _start(self, start: StartStop, raw: bytes, codes: tuple[str, ...]) -> None:
        old = self._broadcasts.get(start.ebmid)
        same = old is not None and _content(old.start) == _content(start)
        fresh = codes if old is None or not same else tuple(c for c in codes if c not in old.codes)
        if old is not None and same and not fresh and (old.done or _running(old)):
            self._spawn(self._resay(old), "resay")  # a re-sent copy: say again where it stands
            return
        if old is not None and same and _running(old):  # more loudspeakers join what plays
            old.codes += fresh
            self._played(start.ebmid, fresh)
            self._spawn(self._resay(old), "resay")
            return
        if old is not None and old.task is not None:
            old.task.cancel()
        if not same or old is None:
            self.plays[start.ebmid] = self.plays.get(start.ebmid, 0) + 1
            fresh = codes
        b = _Broadcast(raw, tuple(dict.fromkeys((*(old.codes if same and old else ()), *codes))), start)
        self._broadcasts[start.ebmid] = b
        self._played(start.ebmid, fresh)
        b.task = asyncio.create_task(self._play(b), name=f"adapter-sim-{self.room}-play")
        self._tasks.add(b.task)
        b.task.add_done_callback(self._tasks.discard)

    def _played(self, ebmid: str, codes: tuple[str, ...]) -> None:
        nth = self.plays[ebmid]
        self.played += [(code, ebmid, nth) for code in codes]
        for code in codes:  # the same event the MQTT terminals log, for whoever reads the log
            log.info("terminal.played", terminal=code, alert_id=alert_of(ebmid), ebmid=ebmid, revision=nth)

    async def _play(self, b: _Broadcast) -> None:
        await asyncio.sleep(TASK_START_DELAY_S)
        await self._report(self._task_start(b))
        await asyncio.sleep(self.play_time_s)
        b.done = True
        await self._report(TaskEnd(self.room, b.start.ebmid))

    async def _resay(self, b: _Broadcast) -> None:
        await asyncio.sleep(TASK_START_DELAY_S)
        await self._report(self._task_start(b))
        if b.done:
            await self._report(TaskEnd(self.room, b.start.ebmid))

    def _task_start(self, b: _Broadcast) -> TaskStart:
        s = b.start
        return TaskStart(self.room, s.ebmid, b.codes, 1, s.ebm_class, s.level, s.event_type, volume=s.volume)

    def _reply(self, code: int, text: str) -> bytes:
        return self._encode(ProtocolType.REPLY, Reply(int(code), text[:500]))

    def _encode(self, ptype: ProtocolType, body: Body) -> bytes:
        data = bytearray(encode_frame(Frame(HEAD_ADAPTER, ptype, encode_body(body), source=SOURCE_DEVICE)))
        if self.faults.corrupt and self._rng.random() < self.faults.corrupt:
            data[self._rng.randrange(9, len(data))] ^= 0xFF
        return bytes(data)

    # -- heartbeats and reports to ebcd --------------------------------------------------------
    async def _report(self, body: Body) -> None:
        if self.faults.has("silence", self.room):
            return
        up = self._up
        if up is None:  # kept until the listener is back, as far as the queue holds
            if len(self._pending) == self._pending.maxlen:
                self._log.warning("adapter_sim.report_lost", protocol_type=f"0x{int(body.protocol_type):02X}")
            self._pending.append(body)
            return
        with contextlib.suppress(OSError, RuntimeError):
            up.write(self._encode(body.protocol_type, body))
            await up.drain()

    async def _uplink(self) -> None:
        if self.listener is None:
            return
        backoff, attempt = Backoff(0.2, 5.0, 0.2), 0
        while True:
            try:
                host, port = self.listener.resolve(LISTEN_PORT_FILE)
                reader, writer = await asyncio.open_connection(host, port)
            except (OSError, AddressError):
                attempt += 1
                await asyncio.sleep(backoff.delay(attempt, self._rng))
                continue
            attempt = 0
            self._up = writer
            self._connected_at = int(time.time())
            while self._pending:
                body = self._pending.popleft()
                writer.write(self._encode(body.protocol_type, body))
            drain = asyncio.create_task(self._drain_replies(reader), name=f"adapter-sim-{self.room}-replies")
            try:
                while not drain.done():
                    if not self.faults.has("silence", self.room):
                        writer.write(self._encode(ProtocolType.HEARTBEAT, self._heartbeat()))
                        await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.heartbeat_s):
                            await asyncio.shield(drain)
            except (OSError, RuntimeError):
                pass
            finally:
                self._up = None
                drain.cancel()
                writer.close()
            await asyncio.sleep(backoff.delay(1, self._rng))

    def _heartbeat(self) -> Heartbeat:
        playing = any(b.task is not None and not b.task.done() for b in self._broadcasts.values())
        state = AdapterState.FAULT if self.faults.has("fault", self.room) else None
        state = state or (AdapterState.WORKING if playing else AdapterState.IDLE)
        return Heartbeat(self.room, int(state), max(0, int(time.time()) - self._connected_at))

    async def _drain_replies(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder(heads=(HEAD_PLATFORM,))
        while data := await reader.read(READ_CHUNK_BYTES):
            decoder.feed(data)
            for _frame in decoder:
                pass  # 0x21 and 0x22: ebcd took the heartbeat or the report
