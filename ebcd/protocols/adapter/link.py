"""The command connection to one adapter: kept open, reopened with backoff, one exchange at a time.

Theory of operation. `run` owns the TCP connection to the adapter's address: it connects,
reads frames into a `FrameDecoder` and, when the connection fails or closes, connects again
after a capped, jittered backoff (`ebcd.model.backoff`). `exchange` writes one command frame
and waits for the adapter's 0x12 general reply; the protocol has no sequence numbers, so
exchanges are serialised (a FIFO lock) and a reply matches the command in flight. A reply with
no command in flight is dropped and counted; any other frame the adapter sends on this
connection (a report, a heartbeat) goes to `on_frame`, as if it came to the listener.

A command for an adapter that has no connection waits `connect_timeout_s` for one, then fails
with `AdapterDownError` naming why (its last connection error), so the alert's report says it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import structlog

from ebcd.model.backoff import Backoff
from ebcd.protocols.adapter.address import Address, AddressError, room_port_file
from ebcd.protocols.adapter.bodies import Reply, decode_body
from ebcd.protocols.adapter.frame import HEAD_ADAPTER, Frame, FrameDecoder, ProtocolType
from ebcd.protocols.errors import RemoteProtocolError

log = structlog.get_logger("ebcd.adapter")

READ_CHUNK_BYTES = 4096


class AdapterDownError(ConnectionError):
    """No connection to the adapter within the connect timeout; `cause` says why."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class ReplyTimeoutError(TimeoutError):
    """The adapter took the command's bytes but sent no 0x12 reply in time."""


class AdapterLink:
    """The kept connection to one adapter room."""

    def __init__(
        self,
        room: str,
        address: Address,
        *,
        backoff: Backoff,
        connect_timeout_s: float,
        reply_timeout_s: float,
        on_frame: Callable[[Frame], None],
        on_drop: Callable[[str], None],
        max_garbage_bytes: int = 65_536,
    ) -> None:
        self.room = room
        self.address = address
        self._backoff = backoff
        self._connect_timeout_s = connect_timeout_s
        self._reply_timeout_s = reply_timeout_s
        self._on_frame = on_frame
        self._on_drop = on_drop
        self._max_garbage = max_garbage_bytes
        self._lock = asyncio.Lock()
        self._writer: asyncio.StreamWriter | None = None
        self._waiter: asyncio.Future[Reply] | None = None
        self.connected = asyncio.Event()
        self.last_error = "not connected yet"
        self.connects = 0
        self._rng = random.Random()
        self._log = log.bind(room=room)

    @property
    def where(self) -> str:
        """The address as configured, for logs and causes."""
        if self.address.port is not None:
            return f"{self.address.host}:{self.address.port}"
        return f"{self.address.host}:<{self.address.port_dir}/{room_port_file(self.room)}>"

    async def run(self) -> None:
        """Keep the connection open until cancelled."""
        attempt = 0
        while True:
            try:
                host, port = self.address.resolve(room_port_file(self.room))
                async with asyncio.timeout(self._connect_timeout_s):
                    reader, writer = await asyncio.open_connection(host, port)
            except (OSError, TimeoutError, AddressError) as exc:
                attempt += 1
                self.last_error = f"cannot connect to adapter {self.room} at {self.where}: {exc or 'timeout'}"
                if attempt in (1, 10) or attempt % 100 == 0:
                    self._log.warning("adapter.connect_failed", attempt=attempt, error=str(exc) or "timeout")
                await asyncio.sleep(self._backoff.delay(attempt, self._rng))
                continue
            attempt = 0
            self.connects += 1
            self._writer = writer
            self.connected.set()
            self._log.info("adapter.connected", address=f"{host}:{port}")
            try:
                await self._read(reader)
                self.last_error = f"adapter {self.room} closed the connection"
            except (OSError, _TooMuchGarbage) as exc:
                self.last_error = f"adapter {self.room} connection lost: {exc}"
            finally:
                self.connected.clear()
                self._writer = None
                if self._waiter is not None and not self._waiter.done():
                    self._waiter.set_exception(AdapterDownError(self.last_error))
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self._log.warning("adapter.disconnected", why=self.last_error)
            await asyncio.sleep(self._backoff.delay(1, self._rng))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        decoder = FrameDecoder(heads=(HEAD_ADAPTER,))
        while data := await reader.read(READ_CHUNK_BYTES):
            decoder.feed(data)
            for frame in decoder:
                self._frame(frame)
            if decoder.garbage_run > self._max_garbage:
                self._on_drop("garbage")
                raise _TooMuchGarbage(f"{decoder.garbage_run} bytes without a valid frame")
            if decoder.last_error is not None:
                self._on_drop("bad_frame")
                self._log.warning("adapter.bad_frame", error=str(decoder.last_error))
                decoder.last_error = None

    def _frame(self, frame: Frame) -> None:
        if frame.protocol_type != ProtocolType.REPLY:
            self._on_frame(frame)
            return
        try:
            reply = decode_body(frame.protocol_type, frame.body)
        except RemoteProtocolError as exc:
            self._on_drop("bad_reply")
            self._log.warning("adapter.bad_reply", error=str(exc))
            return
        if self._waiter is None or self._waiter.done() or not isinstance(reply, Reply):
            self._on_drop("unexpected_reply")
            self._log.info("adapter.unexpected_reply", result=getattr(reply, "result", None))
            return
        self._waiter.set_result(reply)

    async def exchange(self, data: bytes) -> Reply:
        """Write one command frame and return the adapter's reply; AdapterDownError, ReplyTimeoutError."""
        async with self._lock:
            if not self.connected.is_set():
                try:
                    async with asyncio.timeout(self._connect_timeout_s):
                        await self.connected.wait()
                except TimeoutError:
                    raise AdapterDownError(self.last_error) from None
            writer = self._writer
            if writer is None:
                raise AdapterDownError(self.last_error)
            waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                writer.write(data)
                try:
                    async with asyncio.timeout(self._reply_timeout_s):
                        await writer.drain()
                        return await waiter
                except TimeoutError:
                    raise ReplyTimeoutError(
                        f"adapter {self.room} sent no reply within {self._reply_timeout_s:g} s"
                    ) from None
            except AdapterDownError:
                raise
            except (OSError, RuntimeError) as exc:  # RuntimeError: the transport closed under us
                raise AdapterDownError(f"adapter {self.room}: write failed: {exc}") from None
            finally:
                self._waiter = None


class _TooMuchGarbage(Exception):
    """The adapter sent more bytes than allowed without one valid frame."""
