"""The serial terminal frame: typed frames, their bytes, and a streaming decoder (pure: no I/O).

Layout (big-endian), modelled on the 大喇叭 terminal back-channel frame of DOMAIN.md:

    offset  size  field
    0       2     header 0xFE 0xFD
    2       2     version 0x0100
    4       4     session: the sender's sequence; a reply echoes its request's
    8       1     frame type: 1 request/unsolicited, 2 reply; bit 7 set = signature block present
    9       2     total length of the frame, header to CRC inclusive
    11      12    source EBRID (BCD, leading 0xF nibble)
    23      2     N, the number of targets
    25      12·N  target EBRIDs
    ..      1     business type
    ..      2     data length
    ..      L     data (the business body)
    ..      2+S   only when bit 7 of the frame type is set: u16 S + S signature bytes
    ..      4     CRC-32/MPEG-2 of everything from the header to before the CRC

Business types: 0x10, 0x11, 0x13, 0x14, 0x15, 0x16 are the field's back-channel codes; 0x01
broadcast start, 0x02 broadcast stop and 0x03 query are ebcd's own choices for the forward
direction (the field's forward codes are not public). Bodies are in `frame_bodies`.

Errors: `LocalProtocolError` when we ask to encode something the format cannot carry,
`RemoteProtocolError` (and subclasses) when bytes from the line are not a valid frame. The
streaming `FrameDecoder` never raises on line bytes: it skips, counts and resynchronises.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from enum import IntEnum

from ebcd.protocols.bcd import EBRID_BCD_BYTES, BcdError, pack_ebrid, unpack_ebrid
from ebcd.protocols.crc import crc32_mpeg2
from ebcd.protocols.errors import (
    CrcError,
    FrameError,
    LocalProtocolError,
    MalformedFrameError,
    OversizeFrameError,
    RemoteProtocolError,
    TruncatedFrameError,
)
from ebcd.protocols.serial.bodies import (
    MAX_REMAINING_S,
    Body,
    BroadcastResult,
    BroadcastStart,
    BroadcastStop,
    BusinessType,
    ContentKind,
    FaultKind,
    FaultReport,
    Heartbeat,
    Query,
    RawBody,
    ResultStatus,
    TerminalState,
    body_command,
    command_body,
    decode_body,
    encode_body,
    report_result,
    result_report,
)
from ebcd.protocols.stream import DecoderStats, StreamDecoder

__all__ = [
    "CRC_BYTES",
    "FRAME_HEADER",
    "FRAME_VERSION",
    "MAX_FRAME_BYTES",
    "MAX_REMAINING_S",
    "MIN_FRAME_BYTES",
    "Body",
    "BroadcastResult",
    "BroadcastStart",
    "BroadcastStop",
    "BusinessType",
    "ContentKind",
    "CrcError",
    "DecoderStats",
    "FaultKind",
    "FaultReport",
    "Frame",
    "FrameDecoder",
    "FrameDescription",
    "FrameError",
    "FrameType",
    "Heartbeat",
    "LocalProtocolError",
    "MalformedFrameError",
    "OversizeFrameError",
    "Query",
    "RawBody",
    "RemoteProtocolError",
    "ResultStatus",
    "TerminalState",
    "TruncatedFrameError",
    "body_command",
    "command_body",
    "decode_body",
    "decode_frame",
    "describe",
    "describe_hex",
    "encode_body",
    "encode_frame",
    "max_targets_per_frame",
    "render_description",
    "report_result",
    "result_report",
]

FRAME_HEADER = b"\xfe\xfd"
FRAME_VERSION = 0x0100
SIGNED_FLAG = 0x80
FRAME_TYPE_MASK = 0x7F
MAX_FRAME_BYTES = 4096
MAX_SESSION = 0xFFFFFFFF
CRC_BYTES = 4

_PREFIX = struct.Struct(">2sHIBH")  # header, version, session, type byte, total length
PREFIX_BYTES = _PREFIX.size
_U16 = struct.Struct(">H")
_CRC = struct.Struct(">I")
_BODY_HEAD = struct.Struct(">BH")  # business type, data length
# prefix + source + N + business type + data length + CRC, with no targets, data or signature
MIN_FRAME_BYTES = PREFIX_BYTES + EBRID_BCD_BYTES + _U16.size + _BODY_HEAD.size + CRC_BYTES


class FrameType(IntEnum):
    """Frame direction: a request (or unsolicited frame), or a reply echoing a request's session."""

    REQUEST = 1
    REPLY = 2


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: addresses are 23-digit resource codes, the body a typed business message."""

    source: str
    targets: tuple[str, ...]
    body: Body
    session: int = 0
    frame_type: FrameType = FrameType.REQUEST
    signature: bytes | None = None
    version: int = FRAME_VERSION

    @property
    def business_type(self) -> int:
        """The business type code the body is carried under."""
        return int(self.body.business_type)


def max_targets_per_frame(data_bytes: int, signature_bytes: int | None = None) -> int:
    """How many target EBRIDs fit in one frame next to `data_bytes` of body (and a signature)."""
    room = MAX_FRAME_BYTES - MIN_FRAME_BYTES - data_bytes
    if signature_bytes is not None:
        room -= _U16.size + signature_bytes
    return max(0, room // EBRID_BCD_BYTES)


def encode_frame(frame: Frame) -> bytes:
    """The frame's bytes with length and CRC filled in; LocalProtocolError if it cannot be carried."""
    if not 0 <= frame.session <= MAX_SESSION:
        raise LocalProtocolError(f"session {frame.session} does not fit in u32")
    if not 0 <= frame.version <= 0xFFFF:
        raise LocalProtocolError(f"version {frame.version} does not fit in u16")
    if len(frame.targets) > 0xFFFF:
        raise LocalProtocolError(f"{len(frame.targets)} targets do not fit the u16 count")
    try:
        addresses = [pack_ebrid(frame.source), *(pack_ebrid(t) for t in frame.targets)]
    except BcdError as exc:
        raise LocalProtocolError(f"bad address: {exc}") from None
    data = encode_body(frame.body)
    if len(data) > 0xFFFF:
        raise LocalProtocolError(f"body of {len(data)} bytes does not fit the u16 data length")
    tail = b""
    type_byte = int(frame.frame_type)
    if frame.signature is not None:
        if len(frame.signature) > 0xFFFF:
            raise LocalProtocolError(f"signature of {len(frame.signature)} bytes does not fit u16")
        tail = _U16.pack(len(frame.signature)) + frame.signature
        type_byte |= SIGNED_FLAG
    total = (
        PREFIX_BYTES
        + EBRID_BCD_BYTES * len(addresses)
        + _U16.size
        + _BODY_HEAD.size
        + len(data)
        + len(tail)
        + CRC_BYTES
    )
    if total > MAX_FRAME_BYTES:
        raise LocalProtocolError(f"frame of {total} bytes exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}")
    out = bytearray(_PREFIX.pack(FRAME_HEADER, frame.version, frame.session, type_byte, total))
    out += addresses[0]
    out += _U16.pack(len(frame.targets))
    for address in addresses[1:]:
        out += address
    out += _BODY_HEAD.pack(int(frame.body.business_type), len(data))
    out += data
    out += tail
    out += _CRC.pack(crc32_mpeg2(out))
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Prefix:
    """The fixed first 11 bytes, enough to know how long the frame says it is."""

    version: int
    session: int
    frame_type: FrameType
    signed: bool
    total_length: int


def parse_prefix(data: bytes | bytearray | memoryview) -> Prefix:
    """Check header, version, frame type and declared length; RemoteProtocolError saying which is wrong."""
    if len(data) < PREFIX_BYTES:
        raise TruncatedFrameError(f"{len(data)} bytes, a frame needs at least {MIN_FRAME_BYTES}")
    header, version, session, type_byte, total = _PREFIX.unpack_from(data)
    if header != FRAME_HEADER:
        raise MalformedFrameError(f"header is {header.hex(' ').upper()}, expected FE FD")
    if version != FRAME_VERSION:
        raise MalformedFrameError(f"version 0x{version:04X} is not supported (0x{FRAME_VERSION:04X})")
    try:
        frame_type = FrameType(type_byte & FRAME_TYPE_MASK)
    except ValueError:
        raise MalformedFrameError(f"frame type 0x{type_byte:02X} is neither 1 nor 2") from None
    if total < MIN_FRAME_BYTES:
        raise MalformedFrameError(f"declared length {total} is below the minimum {MIN_FRAME_BYTES}")
    if total > MAX_FRAME_BYTES:
        raise OversizeFrameError(f"declared length {total} exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}")
    return Prefix(version, session, frame_type, bool(type_byte & SIGNED_FLAG), total)


def frame_crc(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(expected, found) CRC of a whole frame: computed over all but the last 4 bytes, and those bytes."""
    view = memoryview(data)
    return crc32_mpeg2(view[:-CRC_BYTES]), _CRC.unpack_from(view, len(view) - CRC_BYTES)[0]


def decode_frame(data: bytes | bytearray | memoryview, *, check_crc: bool = True) -> Frame:
    """Exactly one frame from `data`; RemoteProtocolError (CrcError, ...) saying why it is not one."""
    prefix = parse_prefix(data)
    if len(data) < prefix.total_length:
        raise TruncatedFrameError(f"{len(data)} bytes, the frame declares {prefix.total_length}")
    if len(data) > prefix.total_length:
        raise MalformedFrameError(
            f"{len(data)} bytes, the frame declares {prefix.total_length}: "
            f"{len(data) - prefix.total_length} trailing bytes"
        )
    view = memoryview(data)
    if check_crc:
        expected, found = frame_crc(view)
        if expected != found:
            raise CrcError(expected, found)
    end = prefix.total_length - CRC_BYTES
    pos = PREFIX_BYTES

    def take(size: int, what: str) -> memoryview:
        nonlocal pos
        if pos + size > end:
            raise MalformedFrameError(f"{what} runs past the end of the frame (offset {pos}, {size} bytes)")
        chunk = view[pos : pos + size]
        pos += size
        return chunk

    try:
        source = unpack_ebrid(take(EBRID_BCD_BYTES, "source EBRID"))
        (count,) = _U16.unpack(take(_U16.size, "target count"))
        targets = tuple(unpack_ebrid(take(EBRID_BCD_BYTES, f"target {i + 1}")) for i in range(count))
    except BcdError as exc:
        raise MalformedFrameError(f"address: {exc}") from None
    business_type, data_length = _BODY_HEAD.unpack(take(_BODY_HEAD.size, "business type and data length"))
    body_bytes = bytes(take(data_length, "data"))
    signature = None
    if prefix.signed:
        (sig_length,) = _U16.unpack(take(_U16.size, "signature length"))
        signature = bytes(take(sig_length, "signature"))
    if pos != end:
        raise MalformedFrameError(f"{end - pos} unexplained bytes before the CRC")
    return Frame(
        source=source,
        targets=targets,
        body=decode_body(business_type, body_bytes),
        session=prefix.session,
        frame_type=prefix.frame_type,
        signature=signature,
        version=prefix.version,
    )


@dataclass(slots=True)
class FrameDecoder(StreamDecoder[Frame]):
    """Frames out of a byte stream in any chunking; skips, counts and resynchronises on bad bytes.

    Use like h11: `feed(data)`, then `next_frame()` until it returns None (or iterate).
    """

    max_frame_bytes: int = MAX_FRAME_BYTES

    SKIP_WHOLE_MALFORMED = True  # the CRC matched, so these are the sender's bytes: skip the frame

    def __post_init__(self) -> None:
        if not MIN_FRAME_BYTES <= self.max_frame_bytes <= MAX_FRAME_BYTES:
            raise LocalProtocolError(
                f"max_frame_bytes must be within {MIN_FRAME_BYTES}..{MAX_FRAME_BYTES}, "
                f"got {self.max_frame_bytes}"
            )

    def flush_partial(self) -> list[Frame]:
        """The line went quiet: give up on an incomplete frame and return complete ones buffered behind it."""
        frames: list[Frame] = []
        while self._buffer:
            frame = self.next_frame()
            if frame is not None:
                frames.append(frame)
            elif self._buffer:
                self._discard(1)
        return frames

    def _find_start(self, buffer: bytearray) -> int:
        return buffer.find(FRAME_HEADER)

    def _partial_start(self, buffer: bytearray) -> int:
        # a trailing 0xFE may be the first half of a header split across chunks
        return 1 if buffer.endswith(FRAME_HEADER[:1]) else 0

    def _frame_length(self, buffer: bytearray) -> int | None:
        if len(buffer) < PREFIX_BYTES:
            return None
        total = parse_prefix(buffer).total_length
        if total > self.max_frame_bytes:
            raise OversizeFrameError(f"declared length {total} exceeds {self.max_frame_bytes}")
        return total

    def _decode(self, data: bytes) -> Frame:
        return decode_frame(data)


@dataclass(frozen=True, slots=True)
class FrameDescription:
    """What `describe` read from some bytes: fields in wire order, the CRC verdict, and every error."""

    fields: dict[str, object]
    crc_expected: int | None = None
    crc_found: int | None = None
    errors: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        """True when the bytes are exactly one well-formed frame with a matching CRC."""
        return not self.errors

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict of everything described."""
        crc_ok = None if self.crc_expected is None else self.crc_expected == self.crc_found
        return {
            "valid": self.valid,
            **self.fields,
            "crc": {"expected": self.crc_expected, "found": self.crc_found, "ok": crc_ok},
            "errors": list(self.errors),
        }


def _plain(value: object) -> object:
    if isinstance(value, IntEnum):
        return value.name.lower()
    if isinstance(value, bytes):
        return value.hex(" ").upper()
    return value


def describe(data: bytes) -> FrameDescription:
    """Every field of a captured frame for a field engineer, reading as far as the bytes allow."""
    fields: dict[str, object] = {"bytes_given": len(data)}
    try:
        prefix = parse_prefix(data)
    except RemoteProtocolError as exc:
        at = data.find(FRAME_HEADER, 1)
        hint = f" (a header FE FD appears at offset {at})" if at > 0 else ""
        return FrameDescription(fields, errors=(f"not a frame: {exc}{hint}",))
    fields |= {
        "header": FRAME_HEADER.hex(" ").upper(),
        "version": f"0x{prefix.version:04X}",
        "session": prefix.session,
        "frame_type": prefix.frame_type.name.lower(),
        "signed": prefix.signed,
        "total_length": prefix.total_length,
    }
    total = prefix.total_length
    if len(data) != total:
        more = "missing" if len(data) < total else "trailing"
        error = f"declared length {total}, {len(data)} bytes given ({abs(total - len(data))} {more})"
        if len(data) < total:
            return FrameDescription(fields, errors=(error,))
        errors = [error]
    else:
        errors = []
    expected, found = frame_crc(data[:total])
    try:
        frame = decode_frame(data[:total], check_crc=False)
    except RemoteProtocolError as exc:
        errors.insert(0, str(exc))
    else:
        body = frame.body
        data_at = PREFIX_BYTES + EBRID_BCD_BYTES * (1 + len(frame.targets)) + _U16.size + 1
        business = int(body.business_type)
        known = {int(b): b.name.lower() for b in BusinessType}
        fields |= {
            "source": frame.source,
            "targets": list(frame.targets),
            "business_type": business,
            "business_type_name": known.get(business, "unknown").replace("_", " "),
            "data_length": _U16.unpack_from(data, data_at)[0],
            "message": {f.name: _plain(getattr(body, f.name)) for f in dataclasses.fields(body)},
        }
        if frame.signature is not None:
            fields["signature"] = frame.signature.hex(" ").upper()
    if expected != found:
        errors.append(str(CrcError(expected, found)))
    return FrameDescription(fields, expected, found, tuple(errors))


def describe_hex(text: str) -> FrameDescription:
    """`describe` for hex text as engineers paste it (spaces, colons, dashes and 0x prefixes allowed)."""
    cleaned = text.replace("0x", "").replace("0X", "")
    cleaned = "".join(c for c in cleaned if c not in " \t\r\n:-,")
    try:
        data = bytes.fromhex(cleaned)
    except ValueError:
        bad = next((c for c in cleaned if c not in "0123456789abcdefABCDEF"), None)
        why = f"character {bad!r} is not hex" if bad else f"odd number of hex digits ({len(cleaned)})"
        return FrameDescription({}, errors=(f"not hex: {why}",))
    return describe(data)


def render_description(desc: FrameDescription) -> list[str]:
    """Human text lines for a FrameDescription, one field a line."""
    lines = [f"frame: {'valid' if desc.valid else 'INVALID'}"]
    labels = {"bytes_given": "bytes given", "frame_type": "frame type", "total_length": "total length"}
    for key, value in desc.fields.items():
        if key == "targets" and isinstance(value, list):
            lines.append(f"  {'targets':<14}{len(value)}")
            lines += [f"    [{i}] {target}" for i, target in enumerate(value, 1)]
        elif key == "message" and isinstance(value, dict):
            lines.append("  message")
            lines += [f"    {k:<14}{v!r}" for k, v in value.items()]
        elif key == "business_type" and isinstance(value, int):
            lines.append(f"  {'business type':<14}0x{value:02X} {desc.fields.get('business_type_name')}")
        elif key == "session" and isinstance(value, int):
            lines.append(f"  {'session':<14}{value} (0x{value:08X})")
        elif key != "business_type_name":
            lines.append(f"  {labels.get(key, key.replace('_', ' ')):<14}{value}")
    if desc.crc_expected is not None:
        verdict = (
            f"0x{desc.crc_found:08X} ok"
            if desc.crc_expected == desc.crc_found
            else f"MISMATCH: found 0x{desc.crc_found:08X}, expected 0x{desc.crc_expected:08X}"
        )
        lines.append(f"  {'CRC-32/MPEG-2':<14}{verdict}")
    lines += [f"error: {error}" for error in desc.errors]
    return lines
