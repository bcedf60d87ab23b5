"""The vendors' adapter frame (FIELD-PROTOCOLS.md §1): typed frames, their bytes, a streaming decoder.

Pure: no I/O. Layout (big-endian):

    offset   size  field
    0        1     head: 0x49 platform -> adapter, 0x50 adapter -> platform
    1        2     version 0x0001
    3        1     protocol type (0x04 start/stop, 0x12 reply, 0x18/0x19 task start/end, ...)
    4        1     source: 1 platform software, 2 device
    5        4     L, the body length
    9        L     body (`ebcd.protocols.adapter.bodies`)
    9+L      2     signature length, 74
    11+L     74    signature block: u32 time, 6-byte BCD certificate serial, 64-byte signature
    85+L     4     CRC-32/MPEG-2 of everything before it

The signature covers the 9-byte header and the body, or (the other variant of the field's code)
the header, the body and the block's u32 time: `SignedData` says which, `signed_bytes` builds it.
An all-zero block is what adapters that do not sign send.

`FrameDecoder` takes bytes in any chunking and never raises on peer bytes: it skips to the next
head byte after garbage, counts what it skipped and why, and keeps at most one frame buffered.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from ebcd.protocols.crc import crc32_mpeg2
from ebcd.protocols.errors import (
    CrcError,
    LocalProtocolError,
    MalformedFrameError,
    OversizeFrameError,
    TruncatedFrameError,
)
from ebcd.protocols.stream import StreamDecoder
from ebcd.security.signing import SIGNATURE_BLOCK_BYTES, SignedInfo, Signer, Verifier

HEAD_PLATFORM = 0x49
HEAD_ADAPTER = 0x50
HEADS = (HEAD_PLATFORM, HEAD_ADAPTER)
VERSION = 0x0001
SOURCE_PLATFORM = 1
SOURCE_DEVICE = 2
HEADER_BYTES = 9  # 1 + 2 + 1 + 1 + 4, LY's broadcastMessageHeaderLen
SIG_LENGTH_BYTES = 2
CRC_BYTES = 4
TRAILER_BYTES = SIG_LENGTH_BYTES + SIGNATURE_BLOCK_BYTES + CRC_BYTES
MIN_FRAME_BYTES = HEADER_BYTES + TRAILER_BYTES
MAX_BODY_BYTES = 16 * 1024  # far above any body ebcd sends or reads; a bound, not a field value
ZERO_SIGNATURE = bytes(SIGNATURE_BLOCK_BYTES)

_HEADER = struct.Struct(">BHBBI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class ProtocolType(IntEnum):
    """The protocol types ebcd sends or reads (LY ProtocolTypeEnum); others decode as raw bodies."""

    START_STOP = 0x04
    REPLY = 0x12
    TASK_START = 0x18
    TASK_END = 0x19
    HEARTBEAT = 0x20
    HEARTBEAT_REPLY = 0x21
    TASK_START_REPLY = 0x22


class SignedData(StrEnum):
    """What the signature covers: header + body, or header + body + the block's u32 time (UTCTimeFlag)."""

    HEADER_BODY = "header_body"
    HEADER_BODY_TIME = "header_body_time"


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame with its body as bytes (decode it with `bodies.decode_body`)."""

    head: int
    protocol_type: int
    body: bytes
    signature: bytes = ZERO_SIGNATURE
    source: int = SOURCE_PLATFORM
    version: int = VERSION

    @property
    def header(self) -> bytes:
        """The 9 header bytes as on the wire."""
        return _HEADER.pack(self.head, self.version, self.protocol_type, self.source, len(self.body))

    @property
    def unsigned(self) -> bool:
        """True for the all-zero block of adapters that do not sign."""
        return self.signature == ZERO_SIGNATURE


def signed_bytes(header: bytes, body: bytes, time_s: int, variant: SignedData) -> bytes:
    """The bytes a signature covers in `variant`."""
    if variant is SignedData.HEADER_BODY_TIME:
        return header + body + _U32.pack(time_s)
    return header + body


def encode_frame(frame: Frame) -> bytes:
    """The frame's bytes with lengths and CRC filled in; LocalProtocolError if it cannot be carried."""
    if frame.head not in HEADS:
        raise LocalProtocolError(f"head 0x{frame.head:02X} is neither 0x49 nor 0x50")
    if not 0 <= frame.protocol_type <= 0xFF or not 0 <= frame.source <= 0xFF:
        raise LocalProtocolError("protocol type and source are single bytes")
    if len(frame.body) > MAX_BODY_BYTES:
        raise LocalProtocolError(f"body of {len(frame.body)} bytes exceeds MAX_BODY_BYTES={MAX_BODY_BYTES}")
    if len(frame.signature) != SIGNATURE_BLOCK_BYTES:
        raise LocalProtocolError(
            f"signature block of {len(frame.signature)} bytes, expected {SIGNATURE_BLOCK_BYTES}"
        )
    out = bytearray(frame.header)
    out += frame.body
    out += _U16.pack(SIGNATURE_BLOCK_BYTES)
    out += frame.signature
    out += _U32.pack(crc32_mpeg2(out))
    return bytes(out)


def sign_frame(
    frame: Frame, signer: Signer | None, *, now: int, variant: SignedData = SignedData.HEADER_BODY
) -> Frame:
    """The frame with its block signed by `signer` at `now`; the all-zero block when signer is None."""
    if signer is None:
        return _replace_signature(frame, ZERO_SIGNATURE)
    block = signer.sign(signed_bytes(frame.header, frame.body, now, variant), now=now)
    return _replace_signature(frame, block)


def verify_frame(
    frame: Frame, verifier: Verifier, *, variant: SignedData = SignedData.HEADER_BODY
) -> SignedInfo:
    """The block's time and serial if it signs the frame; SignatureError saying why not otherwise."""
    time_s = _U32.unpack_from(frame.signature)[0] if len(frame.signature) >= _U32.size else 0
    return verifier.verify(signed_bytes(frame.header, frame.body, time_s, variant), frame.signature)


def _replace_signature(frame: Frame, block: bytes) -> Frame:
    return Frame(frame.head, frame.protocol_type, frame.body, block, frame.source, frame.version)


@dataclass(frozen=True, slots=True)
class Header:
    """The fixed 9 bytes: enough to know how long the frame is."""

    head: int
    version: int
    protocol_type: int
    source: int
    body_length: int

    @property
    def total_length(self) -> int:
        """Bytes of the whole frame, CRC included."""
        return HEADER_BYTES + self.body_length + TRAILER_BYTES


def parse_header(
    data: bytes | bytearray | memoryview,
    *,
    heads: tuple[int, ...] = HEADS,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> Header:
    """Check head, version and body length; RemoteProtocolError saying which is wrong."""
    if len(data) < HEADER_BYTES:
        raise TruncatedFrameError(f"{len(data)} bytes, a frame needs at least {MIN_FRAME_BYTES}")
    head, version, ptype, source, length = _HEADER.unpack_from(data)
    if head not in heads:
        expected = " or ".join(f"0x{h:02X}" for h in heads)
        raise MalformedFrameError(f"head is 0x{head:02X}, expected {expected}")
    if version != VERSION:
        raise MalformedFrameError(f"version 0x{version:04X} is not supported (0x{VERSION:04X})")
    if length > max_body_bytes:
        raise OversizeFrameError(f"body length {length} exceeds the bound of {max_body_bytes} bytes")
    return Header(head, version, ptype, source, length)


def frame_crc(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(computed, carried) CRC of a whole frame."""
    view = memoryview(data)
    return crc32_mpeg2(view[:-CRC_BYTES]), _U32.unpack_from(view, len(view) - CRC_BYTES)[0]


def decode_frame(
    data: bytes | bytearray | memoryview, *, check_crc: bool = True, heads: tuple[int, ...] = HEADS
) -> Frame:
    """Exactly one frame from `data`; RemoteProtocolError (CrcError, ...) saying why it is not one."""
    header = parse_header(data, heads=heads)
    total = header.total_length
    if len(data) < total:
        raise TruncatedFrameError(f"{len(data)} bytes, the frame's body length makes it {total}")
    if len(data) > total:
        raise MalformedFrameError(f"{len(data)} bytes, the frame is {total}: {len(data) - total} trailing")
    view = memoryview(data)
    at = HEADER_BYTES + header.body_length
    (sig_length,) = _U16.unpack_from(view, at)
    if sig_length != SIGNATURE_BLOCK_BYTES:
        raise MalformedFrameError(
            f"signature length {sig_length} at offset {at}, expected {SIGNATURE_BLOCK_BYTES}"
        )
    if check_crc:
        expected, found = frame_crc(view)
        if expected != found:
            raise CrcError(expected, found)
    body = bytes(view[HEADER_BYTES:at])
    block = bytes(view[at + SIG_LENGTH_BYTES : at + SIG_LENGTH_BYTES + SIGNATURE_BLOCK_BYTES])
    return Frame(header.head, header.protocol_type, body, block, header.source, header.version)


@dataclass(slots=True)
class FrameDecoder(StreamDecoder[Frame]):
    """Frames out of a byte stream in any chunking; skips, counts and resynchronises on bad bytes.

    `feed(data)`, then `next_frame()` until None (or iterate). `heads` are the head bytes this
    side accepts (ebcd reads 0x50, an adapter 0x49). `garbage_run` is how many bytes were
    discarded since the last good frame: a link disconnects a peer when it grows past its bound.
    """

    heads: tuple[int, ...] = HEADS
    max_body_bytes: int = MAX_BODY_BYTES

    def _find_start(self, buffer: bytearray) -> int:
        found = [i for h in self.heads if (i := buffer.find(h)) >= 0]
        return min(found) if found else -1

    def _frame_length(self, buffer: bytearray) -> int | None:
        if len(buffer) < HEADER_BYTES:
            return None
        return parse_header(buffer, heads=self.heads, max_body_bytes=self.max_body_bytes).total_length

    def _decode(self, data: bytes) -> Frame:
        return decode_frame(data, heads=self.heads)
