"""Frames out of a byte stream, for both frame codecs (serial and adapter): pure, no I/O.

A codec says where a frame may start, how long the frame starting there is (from its header)
and how to decode those bytes; this does the rest, as h11 does for HTTP: `feed(data)` with
bytes in any chunking, then `next_frame()` until None. Peer bytes never raise: garbage is
skipped to the next possible start and counted, a frame whose CRC fails is skipped one byte at
a time (its length may itself be corrupt), a declared length beyond the bound is refused without
waiting for it. `garbage_run` is how many bytes were discarded since the last good frame, for a
link that disconnects a peer talking nonsense.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ebcd.protocols.errors import CrcError, LocalProtocolError, OversizeFrameError, RemoteProtocolError

F = TypeVar("F")


@dataclass(slots=True)
class DecoderStats:
    """What a frame decoder has seen: frames, CRC failures, garbage and bad frames (all counts)."""

    frames: int = 0
    crc_errors: int = 0
    discarded_bytes: int = 0
    oversize: int = 0
    malformed: int = 0


@dataclass(slots=True)
class StreamDecoder(Generic[F]):
    """The resynchronising loop; a codec's decoder supplies `_find_start`, `_frame_length`, `_decode`."""

    stats: DecoderStats = field(default_factory=DecoderStats)
    last_error: RemoteProtocolError | None = field(default=None, init=False)
    garbage_run: int = field(default=0, init=False)
    _buffer: bytearray = field(default_factory=bytearray, init=False, repr=False)

    # a frame whose CRC matched but whose fields are bad: skip all of it (the sender's bytes), or
    # only its first byte (a format whose CRC does not cover what made it bad)
    SKIP_WHOLE_MALFORMED = False

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the peer."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise LocalProtocolError(f"feed() takes bytes, not {type(data).__name__}")
        self._buffer += data

    def __iter__(self) -> Iterator[F]:
        """Every complete frame buffered so far."""
        while (frame := self.next_frame()) is not None:
            yield frame

    def next_frame(self) -> F | None:
        """The next complete valid frame, or None until more bytes are fed."""
        buffer = self._buffer
        while True:
            start = self._find_start(buffer)
            if start < 0:
                self._discard(len(buffer) - self._partial_start(buffer))
                return None
            self._discard(start)
            try:
                total = self._frame_length(buffer)
            except OversizeFrameError as exc:
                self._bad(exc, "oversize", 1)
                continue
            except RemoteProtocolError:
                self._discard(1)  # a start byte inside garbage: not a frame start
                continue
            if total is None or len(buffer) < total:
                return None
            try:
                frame = self._decode(bytes(buffer[:total]))
            except CrcError as exc:
                self._bad(exc, "crc_errors", 1)  # the length may itself be corrupt: rescan from the next byte
                continue
            except RemoteProtocolError as exc:
                self._bad(exc, "malformed", total if self.SKIP_WHOLE_MALFORMED else 1)
                continue
            del buffer[:total]
            self.stats.frames += 1
            self.garbage_run = 0
            return frame

    # -- what a codec supplies -------------------------------------------------------------
    def _find_start(self, buffer: bytearray) -> int:
        """Index of the first byte where a frame may start, -1 if none."""
        raise NotImplementedError

    def _partial_start(self, buffer: bytearray) -> int:
        """With no start found: how many trailing bytes may begin one split across chunks."""
        return 0

    def _frame_length(self, buffer: bytearray) -> int | None:
        """The length of the frame at the start of `buffer`, None until its header is all there;
        OversizeFrameError past the bound, RemoteProtocolError if no frame starts here."""
        raise NotImplementedError

    def _decode(self, data: bytes) -> F:
        """The frame in exactly these bytes; RemoteProtocolError (CrcError first) if they are not one."""
        raise NotImplementedError

    # -- internals -------------------------------------------------------------------------
    def _bad(self, exc: RemoteProtocolError, counter: str, skip: int) -> None:
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.last_error = exc
        self._discard(skip)

    def _discard(self, count: int) -> None:
        if count > 0:
            del self._buffer[:count]
            self.stats.discarded_bytes += count
            self.garbage_run += count
