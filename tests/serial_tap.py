"""A byte-level tap on a serial line, for tests: an attacker (or a line analyser) between ebcd's bus
master and the bus.

The tap opens a pty pair of its own, whose slave end (reached through a symlink) is where the bus
master believes its port is, and opens the bus's port (a `SerialBusSimulator`'s pty) as a client.
Every byte is forwarded both ways unchanged; the frames crossing each way are recorded, byte for
byte; and `inject` puts any bytes on the line towards the bus, as a device clipped onto the RS-485
pair could, waiting for the line to be quiet so as not to garble a frame of the master's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from ebcd.protocols.serial.frame import Frame, FrameDecoder, encode_frame

READ_CHUNK_BYTES = 4096


@dataclass(slots=True)
class _Direction:
    """The bytes crossing the tap one way: a decoder for the frames, and the raw stream."""

    decoder: FrameDecoder = field(default_factory=FrameDecoder)
    raw: bytearray = field(default_factory=bytearray)
    frames: list[Frame] = field(default_factory=list)

    def feed(self, data: bytes) -> None:
        self.raw += data
        self.decoder.feed(data)
        self.frames.extend(self.decoder)


class SerialTap:
    """Forwards a serial line both ways through a pty, recording frames and injecting bytes."""

    def __init__(self, bus_port: str | os.PathLike[str]) -> None:
        self.bus_port = Path(bus_port)
        self.to_bus = _Direction()  # what the master sent (and what was injected)
        self.from_bus = _Direction()  # what the terminals answered
        self.injected: list[bytes] = []  # what `inject` put on the line, apart from the master's bytes
        self._changed = asyncio.Event()
        self._master_fd: int | None = None  # our end of the master-facing pty
        self._slave_fd: int | None = None  # kept open so the pty survives the master reopening it
        self._bus_fd: int | None = None
        self._link: Path | None = None

    async def start(self, link: str | os.PathLike[str]) -> None:
        """Put the master-facing pty at `link` (a symlink) and connect to the bus's port."""
        self._bus_fd = os.open(self.bus_port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._bus_fd)
        master_fd, slave_fd = os.openpty()
        tty.setraw(slave_fd)
        os.set_blocking(master_fd, False)
        self._master_fd, self._slave_fd = master_fd, slave_fd
        loop = asyncio.get_running_loop()
        loop.add_reader(master_fd, self._forward, master_fd, self._bus_fd, self.to_bus)
        loop.add_reader(self._bus_fd, self._forward, self._bus_fd, master_fd, self.from_bus)
        self._link = Path(link)
        tmp = self._link.with_name(f".{self._link.name}.tap")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave_fd))
        tmp.replace(self._link)

    async def close(self) -> None:
        """Stop forwarding, close every descriptor, remove the symlink."""
        loop = asyncio.get_running_loop()
        for fd in (self._master_fd, self._bus_fd):
            if fd is not None:
                loop.remove_reader(fd)
        for fd in (self._master_fd, self._slave_fd, self._bus_fd):
            if fd is not None:
                os.close(fd)
        self._master_fd = self._slave_fd = self._bus_fd = None
        if self._link is not None and self._link.is_symlink():
            self._link.unlink()

    def _forward(self, src: int, dst: int, direction: _Direction) -> None:
        try:
            data = os.read(src, READ_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # EIO: nobody has the other end open (the master between reconnects)
            return
        with contextlib.suppress(OSError):  # nobody reading on the other side: the line drops it
            os.write(dst, data)
        direction.feed(data)
        self._changed.set()

    async def inject(self, data: bytes, timeout_s: float = 5.0) -> None:
        """Put `data` on the line towards the bus once no frame of the master's is half sent."""
        await self.until(lambda: not self.to_bus.decoder.buffered, timeout_s)
        assert self._bus_fd is not None, "the tap is not started"
        os.write(self._bus_fd, data)
        self.injected.append(data)

    def captured(self, frame: Frame) -> bytes:
        """The bytes of a frame recorded on the line, exactly as they crossed it."""
        data = encode_frame(frame)  # the codec is deterministic: a valid frame re-encodes to its bytes
        assert data in self.to_bus.raw or data in self.from_bus.raw, "this frame never crossed the tap"
        return data

    async def until(self, condition: Callable[[], bool], timeout_s: float) -> None:
        """Wait, without polling, until `condition()` holds after some bytes crossed."""
        async with asyncio.timeout(timeout_s):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def serial_tap(
    link: str | os.PathLike[str], bus_port: str | os.PathLike[str]
) -> AsyncIterator[SerialTap]:
    """A tap whose master-facing port is `link`, forwarding to the bus at `bus_port`, until the block ends."""
    tap = SerialTap(bus_port)
    await tap.start(link)
    try:
        yield tap
    finally:
        await tap.close()
