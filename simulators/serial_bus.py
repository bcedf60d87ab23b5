"""A virtual RS-485 multi-drop bus of emergency broadcast terminals speaking ebcd's serial frames.

The bus is reached through a pty pair (this side keeps the master end; a `SerialBusMaster` opens
the slave path, optionally through a stable symlink) or a TCP listener for pyserial's `socket://`
URLs. Frames go through `ebcd.protocols.serial.frame`, the production codec. The line is paced at the
configured baud rate: every byte crossing it, either way, occupies it for bits-per-character /
baud seconds, and a reply goes out only when the line is free, so a 9600-baud bus takes as long
as a real one. Terminals act on broadcast starts and stops addressed to them and answer a query
or heartbeat only when it names them alone (several terminals answering at once would collide).
A terminal that refuses a command (unsigned, bad signature, stale, replayed) cannot say so at once
(commands are never answered): it keeps the refusal and answers its next heartbeat poll with it,
a broadcast result with status refused and the cause, one a poll, so that the master also hears
of forged or replayed frames it never sent. A query that returns the refusal reports it as well.
A terminal still playing says how long it has left (the result's `remaining_s`, rounded up).

Usable in-process (`SerialBusSimulator`) or on its own:
    python -m simulators.serial_bus --terminals CODE:ADDR,... --pty-link PATH --baud 9600
        [--listen HOST:PORT] [--faults corrupt=0.1,loss=0.05,echo,garbage=0.02,slow=CODE:0.5,dead=CODE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import tty
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from ebcd.daemon.signals import on_stop_signals
from ebcd.protocols.serial.frame import (
    MAX_REMAINING_S,
    Body,
    BroadcastResult,
    BroadcastStart,
    BroadcastStop,
    FaultKind,
    FaultReport,
    Frame,
    FrameDecoder,
    FrameType,
    Heartbeat,
    Query,
    ResultStatus,
    TerminalState,
    body_command,
    encode_frame,
)
from ebcd.security.replay import REPLAY_WINDOW_S
from ebcd.security.signing import Verifier
from simulators.terminal import DUPLICATE, CachingVerifier, CommandCheck

log = structlog.get_logger("simulators.serial_bus")

BITS_PER_CHAR_8N1 = 10
READ_CHUNK_BYTES = 4096
MAX_GARBAGE_BYTES = 32
MAX_UNREPORTED_REFUSALS = 32  # refusals a terminal keeps for its next polls; the oldest go first
DESCRIPTION = "A virtual RS-485 multi-drop bus of emergency broadcast terminals."


@dataclass(frozen=True, slots=True)
class BusFaults:
    """Faults to inject; rates are probabilities per frame (and per terminal where one is involved)."""

    corrupt_rate: float = 0.0  # a frame to a terminal fails its CRC (ignored); a reply gets a flipped bit
    loss_rate: float = 0.0  # a terminal does not hear a frame addressed to it
    echo: bool = False  # the line echoes every byte the master sends (2-wire RS-485 adapter)
    garbage_rate: float = 0.0  # 1..32 random bytes on the line before a reply
    slow: Mapping[str, float] = field(default_factory=dict)  # extra seconds before a terminal answers
    dead: frozenset[str] = frozenset()  # terminals that neither hear nor answer

    @classmethod
    def parse(cls, spec: str) -> BusFaults:
        """Faults from `corrupt=R,loss=R,echo,garbage=R,slow=CODE:S,dead=CODE`; R is 0.1 or 10%."""
        rates: dict[str, float] = {}
        slow: dict[str, float] = {}
        dead: set[str] = set()
        echo = False
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, value = item.partition("=")
            if name == "echo" and not value:
                echo = True
            elif name in ("corrupt", "loss", "garbage") and value:
                rates[f"{name}_rate"] = float(value[:-1]) / 100 if value.endswith("%") else float(value)
            elif name == "slow" and ":" in value:
                code, _, delay = value.rpartition(":")
                slow[code] = float(delay)
            elif name == "dead" and value:
                dead.add(value)
            else:
                raise ValueError(f"unknown fault {item!r}")
        if any(not 0.0 <= rate <= 1.0 for rate in rates.values()):
            raise ValueError(f"fault rates must be within 0..1: {rates}")
        return cls(echo=echo, slow=slow, dead=frozenset(dead), **rates)


@dataclass(frozen=True, slots=True)
class PlayRecord:
    """One broadcast a terminal started playing."""

    terminal: str
    alert_id: str
    revision: int
    ebmid: str
    text: str
    at: float


@dataclass(slots=True)
class _Task:
    start: BroadcastStart
    started_at: float
    stopped_seq: int | None = None
    refused: str | None = None


class SimulatedTerminal:
    """One terminal: plays each (alert id, revision) once, answers queries and heartbeats."""

    def __init__(
        self,
        code: str,
        address: int,
        *,
        play_time_s: float = 0.0,
        check: CommandCheck | None = None,
        says_remaining: bool = True,
    ) -> None:
        self.code = code
        self.says_remaining = says_remaining  # False: older firmware, results without remaining_s
        self.check = check  # None: obeys unsigned commands (a bench without keys)
        self.address = address
        self.play_time_s = play_time_s
        self.plays: list[PlayRecord] = []
        self.refused: list[tuple[str, str]] = []  # (alert id, cause) of every command refused
        self._tasks: dict[tuple[str, int], _Task] = {}
        self._stops: dict[str, BroadcastStop] = {}
        self._unreported: deque[BroadcastResult] = deque(maxlen=MAX_UNREPORTED_REFUSALS)
        self._fault: FaultReport | None = None
        self._fault_reported = False
        self._log = log.bind(terminal=code, address=address)

    def set_fault(self, code: int, description: str = "") -> None:
        """Enter a fault: the next heartbeat poll is answered with a fault report."""
        self._fault = FaultReport(FaultKind.FAULT, code, description)
        self._fault_reported = False

    def handle(self, frame: Frame, now: float) -> Body | None:
        """Act on a frame heard on the line; the body to answer with, or None to stay silent."""
        if self.code not in frame.targets or frame.frame_type is not FrameType.REQUEST:
            return None
        body = frame.body
        if isinstance(body, BroadcastStart | BroadcastStop) and self.check is not None:
            cmd = replace(body_command(body, frame.targets), signature=frame.signature or b"")
            verdict = self.check(cmd, handled=self._handled(body))
            if verdict is not None and verdict != DUPLICATE:
                self._refuse(body, verdict, now)
                return None
        if isinstance(body, BroadcastStart):
            self._start(body, now)
        elif isinstance(body, BroadcastStop):
            self._stops[body.alert_id] = body
            for (alert_id, _), task in self._tasks.items():
                if alert_id == body.alert_id and task.stopped_seq is None:
                    task.stopped_seq = body.seq
        elif frame.targets == (self.code,):
            if isinstance(body, Query):
                return self.result(body, now)
            if isinstance(body, Heartbeat) and body.state is None:
                return self._heartbeat(now)
        return None

    def _handled(self, body: BroadcastStart | BroadcastStop) -> bool:
        """Whether this terminal already acted on the command's (alert, revision) and still holds it:
        a repeated copy of it is then a duplicate to acknowledge, not a replay to refuse."""
        if isinstance(body, BroadcastStop):
            return body.alert_id in self._stops
        task = self._tasks.get((body.alert_id, body.revision))
        return task is not None and task.refused is None and body.alert_id not in self._stops

    def _refuse(self, body: BroadcastStart | BroadcastStop, cause: str, now: float) -> None:
        """Refuse a command: remember why for a query about it, and for the next heartbeat poll."""
        self._log.warning("sim.refused", alert_id=body.alert_id, revision=body.revision, why=cause)
        self.refused.append((body.alert_id, cause))
        key = (body.alert_id, body.revision)
        if isinstance(body, BroadcastStart) and key not in self._tasks:
            self._tasks[key] = _Task(body, now, refused=cause)
        if len(self._unreported) == self._unreported.maxlen:
            forgotten = self._unreported[0]
            self._log.warning("sim.refusal_unreported", alert_id=forgotten.alert_id, why=forgotten.cause)
        self._unreported.append(
            BroadcastResult(body.ebmid, body.alert_id, body.revision, body.seq, ResultStatus.REFUSED, cause)
        )

    def _reported(self, result: BroadcastResult) -> None:
        """A query carried this refusal to the master: the next poll need not carry it again."""
        for kept in self._unreported:
            if (kept.alert_id, kept.revision, kept.seq, kept.cause) == (
                result.alert_id, result.revision, result.seq, result.cause,
            ):  # fmt: skip
                self._unreported.remove(kept)
                return

    def result(self, query: Query, now: float) -> BroadcastResult:
        """This terminal's result for the broadcast a query names."""
        task = self._tasks.get((query.alert_id, query.revision))
        stop = self._stops.get(query.alert_id)
        if task is None:
            if stop is not None:
                return BroadcastResult(
                    query.ebmid, query.alert_id, query.revision, stop.seq, ResultStatus.STOPPED
                )
            return BroadcastResult(query.ebmid, query.alert_id, query.revision, 0, ResultStatus.UNKNOWN)
        seq, cause = task.start.seq, task.refused
        if task.refused is not None:
            refusal = BroadcastResult(
                query.ebmid, query.alert_id, query.revision, seq, ResultStatus.REFUSED, cause
            )
            self._reported(refusal)
            return refusal
        remaining_s = None
        ends_at = task.started_at + self.play_time_s
        if task.stopped_seq is not None:
            status, seq = ResultStatus.STOPPED, task.stopped_seq
        elif now < ends_at:
            status = ResultStatus.PLAYING
            if self.says_remaining:
                remaining_s = min(MAX_REMAINING_S, math.ceil(ends_at - now))
        else:
            status = ResultStatus.DONE
        return BroadcastResult(query.ebmid, query.alert_id, query.revision, seq, status, cause, remaining_s)

    def _start(self, start: BroadcastStart, now: float) -> None:
        key = (start.alert_id, start.revision)
        known = self._tasks.get(key)
        played_out = (
            known is not None
            and known.refused is None
            and known.stopped_seq is None
            and now >= known.started_at + self.play_time_s
        )
        if (
            known is not None
            and known.refused is None
            and (not (start.resume and start.seq != known.start.seq) or played_out)
        ):
            # a re-sent copy: never play twice; a resume (a new command) plays a pre-empted broadcast
            # again, never one played to the end (its result says done)
            self._log.debug("sim.duplicate_start", alert_id=start.alert_id, revision=start.revision)
            return
        task = _Task(start, now)
        self._tasks[key] = task
        if start.alert_id in self._stops:
            task.stopped_seq = self._stops[start.alert_id].seq  # a stop already heard wins
        elif start.ttl_s <= 0:
            task.refused = "expired"
        else:
            self.plays.append(
                PlayRecord(self.code, start.alert_id, start.revision, start.ebmid, start.content, now)
            )
            self._log.info(
                "sim.play", alert_id=start.alert_id, revision=start.revision, text=start.content,
                resume=start.resume,
            )  # fmt: skip

    def _heartbeat(self, now: float) -> Body:
        if self._unreported:  # a refusal the master has not heard of yet comes before the state
            return self._unreported.popleft()
        if self._fault is not None:
            if not self._fault_reported:
                self._fault_reported = True
                return self._fault
            return Heartbeat(TerminalState.FAULT)
        playing = any(
            t.refused is None and t.stopped_seq is None and now < t.started_at + self.play_time_s
            for t in self._tasks.values()
        )
        return Heartbeat(TerminalState.WORKING if playing else TerminalState.IDLE)


class SerialBusSimulator:
    """A paced multi-drop bus of simulated terminals behind a pty or a TCP listener."""

    def __init__(
        self,
        terminals: Mapping[str, int],
        *,
        baudrate: int = 9600,
        bits_per_char: int = BITS_PER_CHAR_8N1,
        play_time_s: float = 0.0,
        faults: BusFaults | None = None,
        seed: int | None = None,
        record_frames: bool = False,
        verifier: Verifier | None = None,
        replay_window_s: float = REPLAY_WINDOW_S,
        says_remaining: bool = True,
    ) -> None:
        shared = CachingVerifier(verifier) if verifier is not None else None
        self.terminals = {
            code: SimulatedTerminal(
                code,
                address,
                play_time_s=play_time_s,
                check=CommandCheck(shared, window_s=replay_window_s) if shared is not None else None,
                says_remaining=says_remaining,
            )
            for code, address in terminals.items()
        }
        self.baudrate = baudrate
        self.bits_per_char = bits_per_char
        self.faults = faults or BusFaults()
        self.url: str | None = None
        self.frames_heard = self.replies_sent = self.write_failures = 0
        self.heard: list[Frame] | None = [] if record_frames else None  # every frame heard, in order
        self._rng = random.Random(seed)
        self._decoder = FrameDecoder()
        self._line_free_at = 0.0
        self._write: Callable[[bytes], None] | None = None
        self._replies: set[asyncio.Task[None]] = set()
        self._master_fd: int | None = None
        self._slave_fd: int | None = None
        self._link: Path | None = None
        self._pty_path: str | None = None
        self._server: asyncio.Server | None = None
        self._client: asyncio.StreamWriter | None = None

    @property
    def plays(self) -> list[PlayRecord]:
        """Every play on the bus, in time order."""
        return sorted((p for t in self.terminals.values() for p in t.plays), key=lambda p: p.at)

    def airtime_s(self, byte_count: int) -> float:
        """Seconds `byte_count` bytes occupy this bus's line."""
        return byte_count * self.bits_per_char / self.baudrate

    async def start_pty(self, link: str | os.PathLike[str] | None = None) -> str:
        """Open a pty pair, serve its master end; return the slave path (or `link`, a symlink to it)."""
        master_fd, slave_fd = os.openpty()
        tty.setraw(slave_fd)  # no echo, no line editing, no CR/LF mapping until the client sets its own
        os.set_blocking(master_fd, False)
        self._master_fd, self._slave_fd = master_fd, slave_fd  # keeping the slave open avoids EIO on close
        asyncio.get_running_loop().add_reader(master_fd, self._pty_readable)
        self._write = self._pty_write
        path = self._pty_path = os.ttyname(slave_fd)
        if link is not None:
            self._link = Path(link)
            tmp = self._link.with_name(f".{self._link.name}.{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(path)
            tmp.replace(self._link)
            path = str(self._link)
        self.url = path
        log.info("sim.serial_bus.ready", url=path, pty=os.ttyname(slave_fd), terminals=len(self.terminals))
        return path

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen for one bus master at a time on TCP; return its `socket://host:port` URL."""
        self._server = await asyncio.start_server(self._serve_client, host, port)
        bound_port = self._server.sockets[0].getsockname()[1]
        self.url = f"socket://{host}:{bound_port}"
        log.info("sim.serial_bus.ready", url=self.url, terminals=len(self.terminals))
        return self.url

    async def close(self) -> None:
        """Stop serving; remove the symlink if it still leads to this bus; cancel pending replies."""
        for task in list(self._replies):
            task.cancel()
        await asyncio.gather(*self._replies, return_exceptions=True)
        if self._master_fd is not None:
            asyncio.get_running_loop().remove_reader(self._master_fd)
            for fd in (self._master_fd, self._slave_fd):
                if fd is not None:
                    os.close(fd)
            self._master_fd = self._slave_fd = None
        if self._link is not None and self._owns_link(self._link):
            self._link.unlink()
        self._link = None
        if self._client is not None:
            self._client.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._write = None

    async def __aenter__(self) -> SerialBusSimulator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _owns_link(self, link: Path) -> bool:
        """Whether `link` is still the symlink to this bus's pty (another bus may have taken its place)."""
        try:
            return os.readlink(link) == self._pty_path
        except OSError:  # gone, or not a symlink
            return False

    def _pty_readable(self) -> None:
        assert self._master_fd is not None  # noqa: S101 - the reader is removed before the fd is closed
        try:
            data = os.read(self._master_fd, READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO: no client has the slave open
            log.debug("sim.pty_read_failed", error=str(exc))
            return
        self._bytes_in(data)

    def _pty_write(self, data: bytes) -> None:
        assert self._master_fd is not None  # noqa: S101 - set together with this writer
        try:
            os.write(self._master_fd, data)
        except OSError as exc:  # the pty buffer is full: no client is reading
            self.write_failures += 1
            log.warning("sim.write_failed", error=str(exc), size=len(data))

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._client is not None:
            self._client.close()  # one master per bus: the newest connection owns it
        self._client = writer
        self._write = writer.write
        self._decoder = FrameDecoder(stats=self._decoder.stats)
        try:
            while data := await reader.read(READ_CHUNK_BYTES):
                self._bytes_in(data)
        except ConnectionError as exc:
            log.info("sim.client_lost", error=str(exc))
        finally:
            if self._client is writer:
                self._client = None
                self._write = None
            writer.close()

    def _bytes_in(self, data: bytes) -> None:
        now = asyncio.get_running_loop().time()
        self._line_free_at = max(now, self._line_free_at) + self.airtime_s(len(data))
        if self.faults.echo and self._write is not None:
            self._write(data)
        self._decoder.feed(data)
        for frame in self._decoder:
            self.frames_heard += 1
            if self.heard is not None:
                self.heard.append(frame)
            self._frame_in(frame, now)

    def _frame_in(self, frame: Frame, now: float) -> None:
        faults, rng = self.faults, self._rng
        for code in frame.targets:
            terminal = self.terminals.get(code)
            if terminal is None or code in faults.dead:
                continue
            if rng.random() < faults.loss_rate or rng.random() < faults.corrupt_rate:
                log.debug("sim.not_heard", terminal=code, business_type=frame.business_type)
                continue
            body = terminal.handle(frame, now)
            if body is None:
                continue
            reply = bytearray(
                encode_frame(Frame(code, (frame.source,), body, frame.session, FrameType.REPLY))
            )
            if rng.random() < faults.corrupt_rate:
                reply[rng.randrange(len(reply))] ^= 1 << rng.randrange(8)
            if rng.random() < faults.garbage_rate:
                reply[:0] = rng.randbytes(rng.randint(1, MAX_GARBAGE_BYTES))
            ready = now + faults.slow.get(code, 0.0)
            starts = max(ready, self._line_free_at)
            self._line_free_at = starts + self.airtime_s(len(reply))
            task = asyncio.create_task(self._send_at(self._line_free_at, bytes(reply)))
            self._replies.add(task)
            task.add_done_callback(self._replies.discard)

    async def _send_at(self, when: float, data: bytes) -> None:
        await asyncio.sleep(max(0.0, when - asyncio.get_running_loop().time()))
        if self._write is not None:
            self._write(data)
            self.replies_sent += 1


def parse_terminals(spec: str) -> dict[str, int]:
    """Terminals from `CODE:ADDR,CODE:ADDR,...`."""
    terminals: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        code, sep, address = item.partition(":")
        if not sep:
            raise ValueError(f"terminal {item!r} is not CODE:ADDR")
        terminals[code] = int(address)
    return terminals


async def _serve(args: argparse.Namespace) -> None:
    sim = SerialBusSimulator(
        parse_terminals(args.terminals),
        baudrate=args.baud,
        play_time_s=args.play_time,
        faults=BusFaults.parse(args.faults),
        seed=args.seed,
    )
    stop = asyncio.Event()
    on_stop_signals(asyncio.get_running_loop(), stop.set)  # for the life of this process
    async with sim:
        if args.listen:
            host, _, port = args.listen.rpartition(":")
            await sim.start_tcp(host or "127.0.0.1", int(port))
        else:
            await sim.start_pty(args.pty_link)
        await stop.wait()
    log.info("sim.serial_bus.stopped", frames_heard=sim.frames_heard, plays=len(sim.plays))


def main(argv: Sequence[str] | None = None) -> int:
    """Run a simulated bus until SIGINT or SIGTERM; exit 0 on a clean stop."""
    parser = argparse.ArgumentParser(prog="python -m simulators.serial_bus", description=DESCRIPTION)
    parser.add_argument(
        "--terminals", required=True, help="CODE:ADDR,... (23-digit resource code, bus address)"
    )
    parser.add_argument("--pty-link", help="create a symlink to the pty slave at this path")
    parser.add_argument("--listen", help="HOST:PORT: serve socket:// on TCP instead of a pty")
    parser.add_argument("--baud", type=int, default=9600)
    parser.add_argument("--play-time", type=float, default=0.0, help="seconds each broadcast plays")
    parser.add_argument("--faults", default="", help="e.g. corrupt=0.1,loss=0.05,echo,garbage=0.02,dead=CODE")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
