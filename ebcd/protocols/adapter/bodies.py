"""Bodies of the adapter frame, field by field as FIELD-PROTOCOLS.md §1 lays them out (pure).

"code" is 12 bytes: one F nibble then the 23 BCD digits of a resource code; "EBM id" is 18 bytes:
one F nibble then 35 digits. All integers big-endian.

    0x04 start/stop  EBM id, u8 switch (1 start, 2 stop), u8 class, 5 ASCII event type, u8 level,
                     u32 start, u32 end, u8 volume, u8 address type (1 logical), u8 code count,
                     u8 code length (12), codes, u8 language count, per language: 3 ASCII language,
                     u8 character set, u16 text length, text, u8 agency length, agency, u8 auxiliary
                     count (+ per auxiliary u8 type, u32 length, data), u8 input channel, u8 output
                     count, output ids (u8 each)
    0x12 reply       i32 result, u32 description length, description (UTF-8)
    0x18 task start  code of the adapter, EBM id, u8 program source, u8 class, u8 level, 5 ASCII
                     event type, u8 input channel, u8 output count, per output u8 type + u8 id,
                     u8 telephone length, number (ASCII), u8 volume, u8 code count, u8 code length,
                     codes covered
    0x19 task end    code of the adapter, EBM id
    0x20 heartbeat   u8 code length (12), code of the adapter, u8 state (1 idle, 2 working, 3 fault),
                     [u8 auxiliary: TE only, told by the body length], u32 connection time
    0x21 hb reply    i32 result, u32 data length, data
    0x22 ts reply    u8 result (0 success, 1 failure), u32 IPv4, u16 port
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ebcd.protocols.adapter.frame import ProtocolType
from ebcd.protocols.bcd import (
    EBMID_BCD_BYTES,
    EBRID_BCD_BYTES,
    FILL_NIBBLE,
    BcdError,
    pack_ebmid,
    pack_ebrid,
    unpack_ebmid,
    unpack_ebrid,
)
from ebcd.protocols.errors import LocalProtocolError, MalformedFrameError

EVENT_TYPE_CHARS = 5
LANGUAGE_CHINESE = "zho"
ADDRESS_LOGICAL = 1
MAX_CODES_PER_FRAME = 0xFF  # the u8 code count
CLASS_SIMULATED_DRILL = 2
CLASS_EMERGENCY = 4
CLASS_DAILY = 5


class Switch(IntEnum):
    """0x04's power switch: 开播 / 停播."""

    START = 1
    STOP = 2


class Charset(IntEnum):
    """0x04's character set of a language block."""

    GB2312 = 0
    GB18030 = 1
    GB13000 = 2
    GB21669 = 3
    GB16959 = 4


_CODECS = {Charset.GB2312: "gb2312", Charset.GB18030: "gb18030", Charset.GB13000: "utf-16-be"}


class AdapterState(IntEnum):
    """0x20's working state of the adapter."""

    IDLE = 1
    WORKING = 2
    FAULT = 3


class ResultCode(IntEnum):
    """0x12/0x21 result codes."""

    UNKNOWN_ERROR = -1
    SUCCESS = 0
    LENGTH_ERROR = 1
    VERSION_ERROR = 2
    COMMAND_CONFLICT = 3


RESULT_MEANING = {
    -1: "unknown error",
    0: "success",
    1: "data length error",
    2: "version error",
    3: "command conflict",
}


def result_meaning(code: int) -> str:
    """The words of a result code (4-1000 are reserved)."""
    return RESULT_MEANING.get(code, "reserved code")


@dataclass(frozen=True, slots=True)
class Auxiliary:
    """An auxiliary data item of a language block (audio, picture, stream)."""

    kind: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Language:
    """One language block of 0x04: its text in its character set, the agency name."""

    code: str = LANGUAGE_CHINESE
    charset: int = Charset.GB18030
    text: str = ""
    agency: str = ""
    auxiliary: tuple[Auxiliary, ...] = ()


@dataclass(frozen=True, slots=True)
class StartStop:
    """0x04: start or stop a broadcast on the addressed codes."""

    ebmid: str
    switch: Switch
    ebm_class: int
    event_type: str
    level: int
    start: int
    end: int
    volume: int
    codes: tuple[str, ...]
    languages: tuple[Language, ...] = ()
    address_type: int = ADDRESS_LOGICAL
    input_channel: int = 0
    outputs: tuple[int, ...] = ()
    protocol_type: ProtocolType = ProtocolType.START_STOP


@dataclass(frozen=True, slots=True)
class Reply:
    """0x12 (adapter's general reply) or 0x21 (platform's reply to a heartbeat)."""

    result: int
    description: str = ""
    protocol_type: ProtocolType = ProtocolType.REPLY

    @property
    def meaning(self) -> str:
        """The words of the result code."""
        return result_meaning(self.result)


@dataclass(frozen=True, slots=True)
class TaskStart:
    """0x18: the adapter started playing a broadcast on the covered codes."""

    adapter: str
    ebmid: str
    codes: tuple[str, ...]
    program_source: int = 1
    ebm_class: int = CLASS_EMERGENCY
    level: int = 0
    event_type: str = "00000"
    input_channel: int = 0
    outputs: tuple[tuple[int, int], ...] = ()
    telephone: str = ""
    volume: int = 0
    protocol_type: ProtocolType = ProtocolType.TASK_START


@dataclass(frozen=True, slots=True)
class TaskEnd:
    """0x19: the adapter finished a broadcast."""

    adapter: str
    ebmid: str
    protocol_type: ProtocolType = ProtocolType.TASK_END


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """0x20: the adapter is there, in this state; `auxiliary` is TE's extra byte (None: LY's layout)."""

    adapter: str
    state: int
    connection_time: int = 0
    auxiliary: int | None = None
    protocol_type: ProtocolType = ProtocolType.HEARTBEAT


@dataclass(frozen=True, slots=True)
class TaskStartReply:
    """0x22: the platform took a task start report; where to send a stream (0.0.0.0:0: none)."""

    result: int = 0
    ipv4: int = 0
    port: int = 0
    protocol_type: ProtocolType = ProtocolType.TASK_START_REPLY


Body = StartStop | Reply | TaskStart | TaskEnd | Heartbeat | TaskStartReply

_I32U32 = struct.Struct(">iI")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_TSR = struct.Struct(">BIH")


# -- encoding ---------------------------------------------------------------------------------
def _code(code: str) -> bytes:
    try:
        return pack_ebrid(code)
    except BcdError as exc:
        raise LocalProtocolError(f"resource code: {exc}") from None


def _ebmid(ebmid: str) -> bytes:
    try:
        return pack_ebmid(ebmid)
    except BcdError as exc:
        raise LocalProtocolError(f"EBM id: {exc}") from None


def _ascii(text: str, size: int, what: str) -> bytes:
    raw = text.encode("ascii", "replace")
    if len(raw) != size:
        raise LocalProtocolError(f"{what} {text!r} must be {size} ASCII characters")
    return raw


def _u8(value: int, what: str) -> bytes:
    if not 0 <= value <= 0xFF:
        raise LocalProtocolError(f"{what} {value} does not fit in u8")
    return bytes((value,))


def _codes(codes: tuple[str, ...]) -> bytes:
    if len(codes) > MAX_CODES_PER_FRAME:
        raise LocalProtocolError(f"{len(codes)} codes exceed the u8 count ({MAX_CODES_PER_FRAME})")
    return bytes((len(codes), EBRID_BCD_BYTES)) + b"".join(_code(c) for c in codes)


def _codec(charset: int) -> str:
    try:
        return _CODECS.get(Charset(charset), "gb18030")
    except ValueError:
        return "gb18030"


def encode_text(text: str, charset: int) -> bytes:
    """`text` in a language block's character set (GB 18030 for anything else ebcd does not know)."""
    try:
        return text.encode(_codec(charset))
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"text cannot be written in character set {charset}: {exc}") from None


def encode_body(body: Body) -> bytes:
    """The body's bytes; LocalProtocolError if a field does not fit."""
    if isinstance(body, StartStop):
        out = bytearray(_ebmid(body.ebmid))
        out += _u8(int(body.switch), "switch") + _u8(body.ebm_class, "class")
        out += _ascii(body.event_type, EVENT_TYPE_CHARS, "event type") + _u8(body.level, "level")
        out += _U32.pack(body.start) + _U32.pack(body.end) + _u8(body.volume, "volume")
        out += _u8(body.address_type, "address type") + _codes(body.codes)
        out += _u8(len(body.languages), "language count")
        for lang in body.languages:
            text = encode_text(lang.text, lang.charset)
            agency = lang.agency.encode("gb18030")
            if len(text) > 0xFFFF or len(agency) > 0xFF:
                raise LocalProtocolError(f"text of {len(text)} or agency of {len(agency)} bytes is too long")
            out += _ascii(lang.code, 3, "language code") + _u8(lang.charset, "character set")
            out += _U16.pack(len(text)) + text + bytes((len(agency),)) + agency
            out += _u8(len(lang.auxiliary), "auxiliary count")
            for aux in lang.auxiliary:
                out += _u8(aux.kind, "auxiliary type") + _U32.pack(len(aux.data)) + aux.data
        out += _u8(body.input_channel, "input channel") + _u8(len(body.outputs), "output count")
        out += b"".join(_u8(o, "output id") for o in body.outputs)
        return bytes(out)
    if isinstance(body, Reply):
        text = body.description.encode("utf-8")
        return _I32U32.pack(body.result, len(text)) + text
    if isinstance(body, TaskStart):
        out = bytearray(_code(body.adapter) + _ebmid(body.ebmid))
        out += bytes((body.program_source, body.ebm_class, body.level))
        out += _ascii(body.event_type, EVENT_TYPE_CHARS, "event type")
        out += _u8(body.input_channel, "input channel") + _u8(len(body.outputs), "output count")
        for kind, ident in body.outputs:
            out += _u8(kind, "output type") + _u8(ident, "output id")
        phone = body.telephone.encode("ascii")
        out += _u8(len(phone), "telephone length") + phone + _u8(body.volume, "volume")
        out += _codes(body.codes)
        return bytes(out)
    if isinstance(body, TaskEnd):
        return _code(body.adapter) + _ebmid(body.ebmid)
    if isinstance(body, Heartbeat):
        extra = b"" if body.auxiliary is None else _u8(body.auxiliary, "auxiliary")
        head = bytes((EBRID_BCD_BYTES,)) + _code(body.adapter) + _u8(body.state, "state")
        return head + extra + _U32.pack(body.connection_time)
    return _TSR.pack(body.result, body.ipv4, body.port)


# -- decoding ---------------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, size: int, field: str) -> bytes:
        if self.pos + size > len(self.data):
            raise MalformedFrameError(
                f"{self.what}: {field} runs past the end of the body (offset {self.pos}, {size} bytes, "
                f"body of {len(self.data)})"
            )
        chunk = self.data[self.pos : self.pos + size]
        self.pos += size
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(_U16.unpack(self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(_U32.unpack(self.take(4, field))[0])

    def i32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big", signed=True)

    def ascii(self, size: int, field: str) -> str:
        raw = self.take(size, field)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedFrameError(f"{self.what}: {field} {raw.hex()} is not ASCII") from None

    def code(self, field: str) -> str:
        at = self.pos
        raw = self.take(EBRID_BCD_BYTES, field)
        return _decode_code(raw, f"{self.what}: {field} at body offset {at}")

    def codes(self, field: str) -> tuple[str, ...]:
        count = self.u8(f"{field} count")
        length = self.u8(f"{field} length")
        if count and length != EBRID_BCD_BYTES:
            raise MalformedFrameError(
                f"{self.what}: {field} length {length}, expected {EBRID_BCD_BYTES} (logical codes)"
            )
        return tuple(self.code(f"{field} {i + 1}") for i in range(count))

    def ebmid(self) -> str:
        at = self.pos
        raw = self.take(EBMID_BCD_BYTES, "EBM id")
        try:
            return unpack_ebmid(raw)
        except BcdError as exc:
            raise MalformedFrameError(f"{self.what}: EBM id at body offset {at}: {exc}") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MalformedFrameError(
                f"{self.what}: {len(self.data) - self.pos} unexplained bytes at the end of the body"
            )


def _decode_code(raw: bytes, where: str) -> str:
    """A 12-byte logical code; the field's 'FF' + 23 digits (last digit lost) refused by name."""
    if raw[0] == (FILL_NIBBLE << 4 | FILL_NIBBLE):
        raise MalformedFrameError(
            f"{where}: code {raw.hex().upper()} starts with two F nibbles: 25 nibbles packed into 12 "
            "bytes (an 'FF' prefix), so the last digit of the resource code was dropped"
        )
    try:
        return unpack_ebrid(raw)
    except BcdError as exc:
        raise MalformedFrameError(f"{where}: {exc}") from None


def decode_text(raw: bytes, charset: int) -> str:
    """A language block's text from its character set (undecodable bytes shown as U+FFFD)."""
    return raw.decode(_codec(charset), "replace")


def decode_body(protocol_type: int, body: bytes) -> Body | None:
    """The typed body of a protocol type ebcd knows; None for others; MalformedFrameError if broken."""
    if protocol_type == ProtocolType.START_STOP:
        return _start_stop(_Reader(body, "0x04 start/stop"))
    if protocol_type in (ProtocolType.REPLY, ProtocolType.HEARTBEAT_REPLY):
        r = _Reader(body, f"0x{protocol_type:02X} reply")
        result = r.i32("result code")
        length = r.u32("description length")
        text = r.take(length, "description").decode("utf-8", "replace")
        r.end()
        return Reply(result, text, ProtocolType(protocol_type))
    if protocol_type == ProtocolType.TASK_START:
        r = _Reader(body, "0x18 task start")
        adapter, ebmid = r.code("adapter code"), r.ebmid()
        source, ebm_class, level = r.u8("program source"), r.u8("class"), r.u8("level")
        event = r.ascii(EVENT_TYPE_CHARS, "event type")
        channel = r.u8("input channel")
        outputs = tuple((r.u8("output type"), r.u8("output id")) for _ in range(r.u8("output count")))
        phone = r.ascii(r.u8("telephone length"), "telephone number")
        volume = r.u8("volume")
        codes = r.codes("code")
        r.end()
        return TaskStart(
            adapter, ebmid, codes, source, ebm_class, level, event, channel, outputs, phone, volume
        )
    if protocol_type == ProtocolType.TASK_END:
        r = _Reader(body, "0x19 task end")
        adapter, ebmid = r.code("adapter code"), r.ebmid()
        r.end()
        return TaskEnd(adapter, ebmid)
    if protocol_type == ProtocolType.HEARTBEAT:
        r = _Reader(body, "0x20 heartbeat")
        length = r.u8("code length")
        if length != EBRID_BCD_BYTES:
            raise MalformedFrameError(f"0x20 heartbeat: code length {length}, expected {EBRID_BCD_BYTES}")
        adapter, state = r.code("adapter code"), r.u8("state")
        aux = r.u8("auxiliary") if len(body) == 1 + EBRID_BCD_BYTES + 1 + 1 + 4 else None
        connected = r.u32("connection time")
        r.end()
        return Heartbeat(adapter, state, connected, aux)
    if protocol_type == ProtocolType.TASK_START_REPLY:
        r = _Reader(body, "0x22 task start reply")
        result, ipv4, port = _TSR.unpack(r.take(_TSR.size, "result, IPv4 and port"))
        r.end()
        return TaskStartReply(result, ipv4, port)
    return None


def _start_stop(r: _Reader) -> StartStop:
    ebmid = r.ebmid()
    raw_switch = r.u8("switch")
    try:
        switch = Switch(raw_switch)
    except ValueError:
        raise MalformedFrameError(
            f"0x04 start/stop: switch {raw_switch} is neither 1 (start) nor 2 (stop)"
        ) from None
    ebm_class, event, level = r.u8("class"), r.ascii(EVENT_TYPE_CHARS, "event type"), r.u8("level")
    start, end, volume = r.u32("start time"), r.u32("end time"), r.u8("volume")
    address_type = r.u8("address type")
    codes = r.codes("code")
    languages = []
    for i in range(r.u8("language count")):
        what = f"language {i + 1}"
        code = r.ascii(3, f"{what} code")
        charset = r.u8(f"{what} character set")
        text = decode_text(r.take(r.u16(f"{what} text length"), f"{what} text"), charset)
        agency = r.take(r.u8(f"{what} agency length"), f"{what} agency").decode("gb18030", "replace")
        aux = []
        for _ in range(r.u8(f"{what} auxiliary count")):
            kind = r.u8("auxiliary type")
            aux.append(Auxiliary(kind, r.take(r.u32("auxiliary length"), "auxiliary data")))
        languages.append(Language(code, charset, text, agency, tuple(aux)))
    channel = r.u8("input channel")
    outputs = tuple(r.u8("output id") for _ in range(r.u8("output count")))
    r.end()
    return StartStop(
        ebmid, switch, ebm_class, event, level, start, end, volume, codes, tuple(languages), address_type,
        channel, outputs,
    )  # fmt: skip
