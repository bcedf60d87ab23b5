"""The frame codecs' one exception tree (serial and adapter): we misused the format, or the peer broke it
(h11 style)."""

from __future__ import annotations


class FrameError(Exception):
    """Base of every error a frame codec raises."""


class LocalProtocolError(FrameError):
    """We asked the codec for something the frame format cannot carry (a bug on our side)."""


class RemoteProtocolError(FrameError):
    """Bytes from the peer (a serial line, an adapter's connection) are not a valid frame."""


class TruncatedFrameError(RemoteProtocolError):
    """Fewer bytes than the frame needs."""


class MalformedFrameError(RemoteProtocolError):
    """The bytes break the layout: header, version, lengths, BCD codes or addresses, body fields."""


class OversizeFrameError(MalformedFrameError):
    """The declared length exceeds the largest frame or body accepted."""


class CrcError(RemoteProtocolError):
    """The CRC-32/MPEG-2 in the frame does not match its bytes."""

    def __init__(self, expected: int, found: int) -> None:
        super().__init__(f"CRC mismatch: computed 0x{expected:08X}, frame carries 0x{found:08X}")
        self.expected = expected
        self.found = found
