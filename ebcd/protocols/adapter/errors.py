"""The adapter codec's one exception tree: we misused the format, or the peer broke it (h11 style)."""

from __future__ import annotations


class AdapterFrameError(Exception):
    """Base of every error the adapter codec raises."""


class LocalProtocolError(AdapterFrameError):
    """We asked the codec for something the frame format cannot carry (a bug on our side)."""


class RemoteProtocolError(AdapterFrameError):
    """Bytes from the peer are not a valid frame."""


class TruncatedFrameError(RemoteProtocolError):
    """Fewer bytes than the frame needs."""


class MalformedFrameError(RemoteProtocolError):
    """The bytes break the layout: head, version, lengths, BCD codes or body fields."""


class OversizeFrameError(MalformedFrameError):
    """The declared body length exceeds the largest body accepted."""


class CrcError(RemoteProtocolError):
    """The CRC-32/MPEG-2 in the frame does not match its bytes."""

    def __init__(self, expected: int, found: int) -> None:
        super().__init__(f"CRC mismatch: computed 0x{expected:08X}, frame carries 0x{found:08X}")
        self.expected = expected
        self.found = found
