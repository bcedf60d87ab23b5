"""Business bodies of the serial frame (the data field), their bytes, and the messages.py they map to.

Body layouts (big-endian; "str8" is u8 length + bytes, "str16" u16 length + bytes):

    0x01 broadcast start  ebmid(18 BCD) revision u16, seq u32, level u8, event type 5 ASCII,
                          volume u8, ttl_s u32 (relative), flags u8 (bit 0 test, bit 1 content is
                          an audio reference, bit 2 resume: play again after a pre-emption; bits
                          3-7 zero, ignored by decoders), alert id str8 ASCII, content str16 UTF-8
    0x02 broadcast stop   ebmid(18) revision u16, seq u32, alert id str8, reason str8 UTF-8
    0x03 query            ebmid(18) revision u16, alert id str8: "your result for this broadcast?"
    0x10 heartbeat        empty from the master (a poll); u8 state (1 idle, 2 working, 3 fault)
                          from a terminal
    0x13 fault report     kind u8 (1 fault, 2 recovered), fault code u16, description str8 UTF-8
    0x15 broadcast result ebmid(18) revision u16, seq u32, status u8, alert id str8, cause str8
                          UTF-8 (empty = none)[, remaining_s u16]; status 0 means "never received
                          that broadcast"; remaining_s (ebcd's extension, optional: a result
                          without it decodes as before) is the play time left in whole seconds,
                          rounded up, 0xFFFF for that or more, sent by a terminal still playing

0x11 query answer, 0x14 task start/end, 0x16 broadcast log and unknown codes decode to RawBody.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeVar

from ebcd.protocols.bcd import BcdError, pack_ebmid, unpack_ebmid
from ebcd.protocols.errors import LocalProtocolError, MalformedFrameError
from ebcd.protocols.messages import AckStatus, Command, PlayCommand, StopCommand, TerminalReport

EVENT_TYPE_CHARS = 5
MAX_U8 = 0xFF
MAX_U16 = 0xFFFF
MAX_U32 = 0xFFFFFFFF
FLAG_TEST = 0x01
FLAG_AUDIO_REFERENCE = 0x02
FLAG_RESUME = 0x04  # signed: an older terminal that ignores it checks other bytes and refuses (fails safe)
MAX_REMAINING_S = MAX_U16  # a broadcast result's remaining play time saturates here


class BusinessType(IntEnum):
    """Business type codes; 0x01-0x03 are ebcd's choice, 0x10-0x16 the field's back-channel codes."""

    BROADCAST_START = 0x01
    BROADCAST_STOP = 0x02
    QUERY = 0x03
    HEARTBEAT = 0x10
    QUERY_ANSWER = 0x11
    FAULT_REPORT = 0x13
    TASK_EVENT = 0x14
    BROADCAST_RESULT = 0x15
    BROADCAST_LOG = 0x16


class TerminalState(IntEnum):
    """A terminal's state in its heartbeat."""

    IDLE = 1
    WORKING = 2
    FAULT = 3


class ResultStatus(IntEnum):
    """A terminal's status for one broadcast; UNKNOWN means it never received the command."""

    UNKNOWN = 0
    RECEIVED = 1
    PLAYING = 2
    DONE = 3
    REFUSED = 4
    STOPPED = 5


class ContentKind(IntEnum):
    """What a broadcast start's content is: text to speak, or a reference to audio."""

    TEXT = 0
    AUDIO_REFERENCE = 1


class FaultKind(IntEnum):
    """A fault report announces a fault or its recovery."""

    FAULT = 1
    RECOVERED = 2


@dataclass(frozen=True, slots=True)
class BroadcastStart:
    """Start (or re-send) a broadcast; terminals play each (alert_id, revision) once."""

    business_type: ClassVar[BusinessType] = BusinessType.BROADCAST_START
    ebmid: str
    alert_id: str
    revision: int
    seq: int
    level: int
    event_type: str
    volume: int
    ttl_s: int
    content: str
    content_kind: ContentKind = ContentKind.TEXT
    test: bool = False
    resume: bool = False  # play again after a pre-emption, although this (alert, revision) was played


@dataclass(frozen=True, slots=True)
class BroadcastStop:
    """Stop a broadcast."""

    business_type: ClassVar[BusinessType] = BusinessType.BROADCAST_STOP
    ebmid: str
    alert_id: str
    revision: int
    seq: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Query:
    """Ask one terminal for its result of one broadcast; answered by a BroadcastResult."""

    business_type: ClassVar[BusinessType] = BusinessType.QUERY
    ebmid: str
    alert_id: str
    revision: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A heartbeat poll (state None, from the master) or a terminal's heartbeat with its state."""

    business_type: ClassVar[BusinessType] = BusinessType.HEARTBEAT
    state: TerminalState | None = None


@dataclass(frozen=True, slots=True)
class BroadcastResult:
    """A terminal's result for one broadcast (the per-terminal ack)."""

    business_type: ClassVar[BusinessType] = BusinessType.BROADCAST_RESULT
    ebmid: str
    alert_id: str
    revision: int
    seq: int
    status: ResultStatus
    cause: str | None = None
    remaining_s: int | None = None  # play time left (whole seconds, rounded up); None: not said


@dataclass(frozen=True, slots=True)
class FaultReport:
    """A terminal reports a fault or its recovery."""

    business_type: ClassVar[BusinessType] = BusinessType.FAULT_REPORT
    kind: FaultKind
    code: int
    description: str = ""


@dataclass(frozen=True, slots=True)
class RawBody:
    """A body of a business type this codec does not parse, kept as bytes."""

    business_type: int
    data: bytes


Body = BroadcastStart | BroadcastStop | Query | Heartbeat | BroadcastResult | FaultReport | RawBody

_HEAD = struct.Struct(">HI")  # revision, seq
_START_FIXED = struct.Struct(">B5sBIB")  # level, event type, volume, ttl, flags
_LEN8 = struct.Struct(">B")
_LEN16 = struct.Struct(">H")
_E = TypeVar("_E", bound=IntEnum)
_T = TypeVar("_T")


def _check_int(name: str, value: int, maximum: int) -> None:
    if not 0 <= value <= maximum:
        raise LocalProtocolError(f"{name}={value} is outside 0..{maximum}")


def _str(name: str, text: str, encoding: str, size: struct.Struct) -> bytes:
    try:
        raw = text.encode(encoding)
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{name} {text!r} is not {encoding}") from None
    maximum = (1 << (8 * size.size)) - 1
    if len(raw) > maximum:
        raise LocalProtocolError(f"{name} of {len(raw)} bytes exceeds {maximum}")
    return size.pack(len(raw)) + raw


def _ebmid(value: str) -> bytes:
    try:
        return pack_ebmid(value)
    except BcdError as exc:
        raise LocalProtocolError(str(exc)) from None


def _head(ebmid: str, revision: int, seq: int) -> bytes:
    _check_int("revision", revision, MAX_U16)
    _check_int("seq", seq, MAX_U32)
    return _ebmid(ebmid) + _HEAD.pack(revision, seq)


def encode_body(body: Body) -> bytes:
    """The data field for a body; LocalProtocolError if a value does not fit."""
    match body:
        case BroadcastStart():
            _check_int("level", body.level, MAX_U8)
            _check_int("volume", body.volume, MAX_U8)
            _check_int("ttl_s", body.ttl_s, MAX_U32)
            if len(body.event_type) != EVENT_TYPE_CHARS or not body.event_type.isascii():
                raise LocalProtocolError(f"event type {body.event_type!r} is not 5 ASCII characters")
            event = body.event_type.encode("ascii")
            flags = (
                (FLAG_TEST if body.test else 0)
                | (FLAG_AUDIO_REFERENCE if body.content_kind is ContentKind.AUDIO_REFERENCE else 0)
                | (FLAG_RESUME if body.resume else 0)
            )
            return (
                _head(body.ebmid, body.revision, body.seq)
                + _START_FIXED.pack(body.level, event, body.volume, body.ttl_s, flags)
                + _str("alert id", body.alert_id, "ascii", _LEN8)
                + _str("content", body.content, "utf-8", _LEN16)
            )
        case BroadcastStop():
            return (
                _head(body.ebmid, body.revision, body.seq)
                + _str("alert id", body.alert_id, "ascii", _LEN8)
                + _str("reason", body.reason, "utf-8", _LEN8)
            )
        case Query():
            _check_int("revision", body.revision, MAX_U16)
            return (
                _ebmid(body.ebmid)
                + _LEN16.pack(body.revision)
                + _str("alert id", body.alert_id, "ascii", _LEN8)
            )
        case Heartbeat():
            return b"" if body.state is None else _LEN8.pack(body.state)
        case BroadcastResult():
            remaining = b""
            if body.remaining_s is not None:
                _check_int("remaining_s", body.remaining_s, MAX_REMAINING_S)
                remaining = _LEN16.pack(body.remaining_s)
            return (
                _head(body.ebmid, body.revision, body.seq)
                + _LEN8.pack(body.status)
                + _str("alert id", body.alert_id, "ascii", _LEN8)
                + _str("cause", body.cause or "", "utf-8", _LEN8)
                + remaining
            )
        case FaultReport():
            _check_int("fault code", body.code, MAX_U16)
            return (
                bytes([body.kind])
                + _LEN16.pack(body.code)
                + _str("description", body.description, "utf-8", _LEN8)
            )
        case RawBody():
            _check_int("business type", body.business_type, MAX_U8)
            return body.data


class _Reader:
    """Reads fields off a body, raising MalformedFrameError when they run out or do not parse."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, size: int, field: str) -> bytes:
        if self.pos + size > len(self.data):
            raise MalformedFrameError(f"{self.what}: {field} runs past the end of the data")
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    @property
    def more(self) -> bool:
        """Whether any bytes are left (for an optional trailing field)."""
        return self.pos < len(self.data)

    def unpack(self, fmt: struct.Struct, field: str) -> tuple[int, ...]:
        return tuple(fmt.unpack(self.take(fmt.size, field)))

    def ebmid(self) -> str:
        try:
            return unpack_ebmid(self.take(18, "ebmid"))
        except BcdError as exc:
            raise MalformedFrameError(f"{self.what}: ebmid: {exc}") from None

    def text(self, field: str, size: struct.Struct, encoding: str) -> str:
        (length,) = self.unpack(size, f"{field} length")
        raw = self.take(length, field)
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            raise MalformedFrameError(f"{self.what}: {field} is not {encoding}") from None

    def enum(self, kind: type[_E], field: str) -> _E:
        (value,) = self.unpack(_LEN8, field)
        try:
            return kind(value)
        except ValueError:
            raise MalformedFrameError(f"{self.what}: {field} {value} is not a known value") from None

    def done(self, body: _T) -> _T:
        if self.pos != len(self.data):
            raise MalformedFrameError(f"{self.what}: {len(self.data) - self.pos} trailing data bytes")
        return body


def decode_body(business_type: int, data: bytes) -> Body:
    """The typed body for a business type's data; MalformedFrameError if the data does not parse."""
    try:
        kind = BusinessType(business_type)
    except ValueError:
        return RawBody(business_type, data)
    r = _Reader(data, kind.name.lower().replace("_", " "))
    match kind:
        case BusinessType.BROADCAST_START:
            ebmid = r.ebmid()
            revision, seq = r.unpack(_HEAD, "revision and seq")
            level, event_raw, volume, ttl_s, flags = _START_FIXED.unpack(r.take(_START_FIXED.size, "fields"))
            try:
                event = event_raw.decode("ascii")
            except UnicodeDecodeError:
                raise MalformedFrameError(f"{r.what}: event type {event_raw!r} is not ASCII") from None
            alert_id = r.text("alert id", _LEN8, "ascii")
            content = r.text("content", _LEN16, "utf-8")
            kind_of_content = (
                ContentKind.AUDIO_REFERENCE if flags & FLAG_AUDIO_REFERENCE else ContentKind.TEXT
            )
            return r.done(
                BroadcastStart(
                    ebmid, alert_id, revision, seq, level, event, volume, ttl_s, content,
                    kind_of_content, bool(flags & FLAG_TEST), bool(flags & FLAG_RESUME),
                )
            )  # fmt: skip
        case BusinessType.BROADCAST_STOP:
            ebmid = r.ebmid()
            revision, seq = r.unpack(_HEAD, "revision and seq")
            alert_id = r.text("alert id", _LEN8, "ascii")
            return r.done(BroadcastStop(ebmid, alert_id, revision, seq, r.text("reason", _LEN8, "utf-8")))
        case BusinessType.QUERY:
            ebmid = r.ebmid()
            (revision,) = r.unpack(_LEN16, "revision")
            return r.done(Query(ebmid, r.text("alert id", _LEN8, "ascii"), revision))
        case BusinessType.HEARTBEAT:
            if not data:
                return Heartbeat()
            return r.done(Heartbeat(r.enum(TerminalState, "state")))
        case BusinessType.BROADCAST_RESULT:
            ebmid = r.ebmid()
            revision, seq = r.unpack(_HEAD, "revision and seq")
            status = r.enum(ResultStatus, "status")
            alert_id = r.text("alert id", _LEN8, "ascii")
            cause = r.text("cause", _LEN8, "utf-8") or None
            remaining_s = r.unpack(_LEN16, "remaining seconds")[0] if r.more else None
            return r.done(BroadcastResult(ebmid, alert_id, revision, seq, status, cause, remaining_s))
        case BusinessType.FAULT_REPORT:
            fault = r.enum(FaultKind, "kind")
            (code,) = r.unpack(_LEN16, "fault code")
            return r.done(FaultReport(fault, code, r.text("description", _LEN8, "utf-8")))
        case _:
            return RawBody(business_type, data)


_ACK_OF_RESULT = {
    ResultStatus.RECEIVED: AckStatus.RECEIVED,
    ResultStatus.PLAYING: AckStatus.PLAYING,
    ResultStatus.DONE: AckStatus.DONE,
    ResultStatus.REFUSED: AckStatus.REFUSED,
    ResultStatus.STOPPED: AckStatus.STOPPED,
}
_RESULT_OF_ACK = {ack: result for result, ack in _ACK_OF_RESULT.items()}


def command_body(cmd: Command) -> BroadcastStart | BroadcastStop:
    """The body that carries a Play or Stop command (ttl rounded up to whole seconds)."""
    if isinstance(cmd, PlayCommand):
        ttl_s = min(MAX_U32, max(0, math.ceil(cmd.ttl_s)))
        return BroadcastStart(
            cmd.ebmid, cmd.alert_id, cmd.revision, cmd.seq, cmd.level, cmd.event_type, cmd.volume,
            ttl_s, cmd.text, ContentKind.TEXT, cmd.test, cmd.resume,
        )  # fmt: skip
    return BroadcastStop(cmd.ebmid, cmd.alert_id, cmd.revision, cmd.seq, cmd.reason)


def body_command(body: BroadcastStart | BroadcastStop, targets: tuple[str, ...] = ()) -> Command:
    """The Play or Stop command a broadcast start or stop body carries."""
    if isinstance(body, BroadcastStart):
        return PlayCommand(
            alert_id=body.alert_id, ebmid=body.ebmid, revision=body.revision, seq=body.seq,
            level=body.level, event_type=body.event_type, text=body.content, ttl_s=float(body.ttl_s),
            volume=body.volume, test=body.test, targets=targets, resume=body.resume,
        )  # fmt: skip
    return StopCommand(body.alert_id, body.ebmid, body.revision, body.seq, body.reason, targets=targets)


def result_report(terminal: str, body: BroadcastResult) -> TerminalReport | None:
    """The TerminalReport a terminal's result carries; None when it never received the broadcast."""
    ack = _ACK_OF_RESULT.get(body.status)
    if ack is None:
        return None
    return TerminalReport(terminal, body.alert_id, body.revision, ack, body.cause, body.seq)


def report_result(report: TerminalReport, ebmid: str) -> BroadcastResult:
    """The result body that carries a terminal's report about broadcast `ebmid`."""
    return BroadcastResult(
        ebmid, report.alert_id, report.revision, report.seq, _RESULT_OF_ACK[report.status], report.cause
    )
