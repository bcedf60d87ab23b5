"""The local control socket: the duty officer's CLI talks to the running daemon through it.

JSON lines over a Unix socket in the state dir (mode 0660, so a group such as `ebcd` can be given
access). Each request is one line `{"op": ..., ...}`; each answer one line `{"ok": true, ...}` or
`{"ok": false, "error": CODE, "message": TEXT}`; `watch` streams states until the alert settles.
The daemon learns the OS user of every request from the socket (SO_PEERCRED) for its audit log.

Theory of operation. Whoever may open the socket must not be able to starve the daemon of file
descriptors, memory or log space. One accept task takes each connection; when `max_connections`
are open it answers the new one `busy` and closes it at once, before it costs a task or a buffer.
A connection then has `idle_timeout_s` to send each whole request line, and as long again to read
each answer line; one that misses either is closed (`idle`, `stalled`). A request in progress,
such as a `watch` waiting for the alert's next change, is never idle. A line longer than
`max_request_bytes` is refused `too_large` and the connection closed, having buffered at most
twice that. An accept that fails for want of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM) pauses
accepting, from ACCEPT_BACKOFF_MIN_S doubling to ACCEPT_BACKOFF_MAX_S, instead of retrying at
once. Every refusal and failed accept is counted; each kind is logged at most once per
LOG_INTERVAL_S, with the number left unlogged since the last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import pwd
import resource
import socket
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:  # the CLI's client side needs no metrics (prometheus_client) to start
    from ebcd.metrics import Metrics


log = structlog.get_logger("ebcd.control")

SOCKET_NAME = "ebcd.sock"
# The longest request line. The longest the CLI makes, `alert send` with MAX_TARGETS (1000)
# terminal targets of 52 bytes each and a text of MAX_TEXT_CHARS (2000) Chinese characters of
# 3 bytes each, is about 64 KB: twice that leaves it room. A connection buffers at most twice the
# limit before it is refused, so 64 connections hold at most 16 MiB of requests.
MAX_REQUEST_BYTES = 128 * 1024
# The longest answer line the client reads: a report or terminal list of a large district. A
# terminal takes ~160 bytes of `ebcd terminals`: 10,000 are ~1.6 MB, this holds ~200,000.
MAX_ANSWER_BYTES = 32 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT_S = 10.0
# File descriptors. Each open control connection holds one, and a refused one holds one for the
# moment it takes to answer `busy`: at most max_connections + 1, plus the listening socket. The
# rest of the daemon needs few and a bounded number: the MQTT connection (1, and one more while
# it resolves and reconnects), the journal (sqlite3: database, -wal, -shm), one per serial port
# (19 in the shipped district), the metrics listener and its scrapes, stdio and the journald
# stream, the event loop's epoll and self-pipe, the notify socket: under 100 for the shipped
# district. FD_RESERVE (256) leaves room for a district with more serial rooms. So the cap is
# safe while max_connections + FD_RESERVE stays under RLIMIT_NOFILE: 64 + 256 = 320, against
# LimitNOFILE=4096 in systemd/ebcd.service (and even the usual default soft limit of 1024).
# `serve` logs a warning at start when it does not hold.
DEFAULT_MAX_CONNECTIONS = 64
FD_RESERVE = 256
LISTEN_BACKLOG = 100
ACCEPT_BACKOFF_MIN_S = 0.1
ACCEPT_BACKOFF_MAX_S = 2.0
LOG_INTERVAL_S = 10.0
# How long the client keeps trying to connect while the daemon's listen backlog is full.
CONNECT_WAIT_S = 5.0
CONNECT_RETRY_S = 0.05
RESOURCE_ERRNOS = {
    errno.EMFILE: "emfile",
    errno.ENFILE: "enfile",
    errno.ENOBUFS: "enobufs",
    errno.ENOMEM: "enomem",
}


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of the control socket."""

    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        """The OS user name, or the uid when it has none."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)


class ControlError(Exception):
    """A request the daemon refused; `code` is machine-readable."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any] | AsyncIterator[dict[str, Any]]]]


@dataclass(frozen=True, slots=True)
class Limits:
    """What the control socket grants: connections open at once, idle time, request size."""

    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_request_bytes: int = MAX_REQUEST_BYTES

    def __post_init__(self) -> None:
        if self.idle_timeout_s <= 0 or self.max_connections < 1 or self.max_request_bytes < 1:
            raise ValueError(f"control socket limits must be positive: {self}")


def peer_of(writer: asyncio.StreamWriter) -> Peer:
    """The peer's credentials (SO_PEERCRED)."""
    sock: socket.socket | None = writer.get_extra_info("socket")
    return Peer(0, -1, -1) if sock is None else _peer_cred(sock)


def _peer_cred(sock: socket.socket) -> Peer:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return Peer(0, -1, -1)
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


async def serve(
    path: Path,
    handler: Handler,
    mode: int = 0o660,
    *,
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    metrics: Metrics | None = None,
) -> ControlServer:
    """Listen on `path`, replacing a stale socket file, and answer requests with `handler`."""
    limits = Limits(idle_timeout_s, max_connections, max_request_bytes)
    _remove_stale(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, mode)  # before listen(): nobody connects while the umask's mode holds
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    _check_file_limit(max_connections)
    if metrics is None:
        from ebcd.metrics import Metrics

        metrics = Metrics()
    return ControlServer(listener, handler, limits, metrics)


def _remove_stale(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()


def _check_file_limit(max_connections: int) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and max_connections + FD_RESERVE > soft:
        log.warning(
            "control.file_limit_low",
            max_connections=max_connections,
            fd_reserve=FD_RESERVE,
            nofile=soft,
            hint="raise LimitNOFILE= (systemd/ebcd.service) or lower [daemon] control_max_connections",
        )


class _Stalled(Exception):
    """The peer has not read its answers for the idle timeout."""


class ControlServer(asyncio.AbstractServer):
    """The listening control socket, its limits and its open connections."""

    def __init__(self, listener: socket.socket, handler: Handler, limits: Limits, metrics: Metrics) -> None:
        self.limits = limits
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._handler = handler
        self._metrics = metrics
        self._throttle = _Throttle(LOG_INTERVAL_S)
        self._connections: set[asyncio.Task[None]] = set()
        self._idle: set[asyncio.Task[Any]] = set()  # connections waiting for their next request
        self._closed = asyncio.Event()
        metrics.control_connections.set(0)
        self._accepting = asyncio.create_task(self._accept_loop(), name="control-accept")
        self._accepting.add_done_callback(_accept_loop_ended)

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    # -- asyncio.AbstractServer ----------------------------------------------------------------
    def close(self) -> None:
        """Stop accepting; close the connections that wait for a request, let the others finish."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._accepting.cancel()
        self._loop.remove_reader(self._listener.fileno())  # what a pending accept waits on
        self._listener.close()
        for task in self._idle:
            task.cancel()

    def close_clients(self) -> None:
        """End every open connection, a request in progress or not."""
        for task in self._connections:
            task.cancel()

    def abort_clients(self) -> None:
        """End every open connection, a request in progress or not."""
        self.close_clients()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on."""
        return self._loop

    def is_serving(self) -> bool:
        """True until `close()`."""
        return not self._closed.is_set()

    async def start_serving(self) -> None:
        """Nothing to do: the server accepts from the moment `serve` returns it."""

    async def serve_forever(self) -> None:
        """Serve until cancelled or closed; then close."""
        try:
            await self._closed.wait()
        finally:
            self.close()

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every connection has ended."""
        await self._closed.wait()
        await asyncio.wait([self._accepting, *self._connections])

    # -- accepting -----------------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        backoff_s = ACCEPT_BACKOFF_MIN_S
        while True:
            try:
                conn, _ = await self._loop.sock_accept(self._listener)
            except ConnectionAbortedError:  # the peer left before it was taken
                continue
            except OSError as e:
                self._accept_failed(e, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(2 * backoff_s, ACCEPT_BACKOFF_MAX_S)
                continue
            backoff_s = ACCEPT_BACKOFF_MIN_S
            if len(self._connections) >= self.limits.max_connections:
                self._refuse_busy(conn)
                continue
            task = asyncio.create_task(self._connection(conn), name="control-connection")
            self._connections.add(task)
            task.add_done_callback(self._connection_ended)
            self._metrics.control_connections.set(len(self._connections))

    def _accept_failed(self, e: OSError, backoff_s: float) -> None:
        kind = RESOURCE_ERRNOS.get(e.errno or 0, "other")
        self._metrics.resource_errors.labels(kind).inc()
        suppressed = self._throttle.due(f"accept_{kind}", self._loop.time())
        if suppressed is not None:
            log.error(
                "control.accept_failed",
                error=errno.errorcode.get(e.errno or 0, type(e).__name__),
                detail=e.strerror or str(e),
                connections=len(self._connections),
                backoff_s=backoff_s,
                suppressed=suppressed,
            )

    def _refuse_busy(self, conn: socket.socket) -> None:
        n = self.limits.max_connections
        busy = {"ok": False, "error": "busy", "message": f"{n} connections open, the most allowed: try again"}
        try:
            with contextlib.suppress(OSError):  # a fresh socket takes one short line, unless the peer left
                conn.send(_encode({**busy, "max_connections": n}))
            self._refused("busy", _peer_cred(conn))
        finally:
            conn.close()

    def _refused(self, reason: str, peer: Peer, **detail: Any) -> None:
        self._metrics.control_refused.labels(reason).inc()
        suppressed = self._throttle.due(reason, self._loop.time())
        if suppressed is None:
            return
        say = log.info if reason in ("idle", "stalled") else log.warning
        say("control.refused", reason=reason, user=peer.user, pid=peer.pid, suppressed=suppressed, **detail)

    def _connection_ended(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        self._idle.discard(task)
        self._metrics.control_connections.set(len(self._connections))

    # -- one connection ------------------------------------------------------------------------
    async def _connection(self, conn: socket.socket) -> None:
        peer = _peer_cred(conn)
        try:
            reader, writer = await asyncio.open_unix_connection(
                sock=conn, limit=self.limits.max_request_bytes
            )
        except BaseException:
            conn.close()
            raise
        linger_s = self.limits.idle_timeout_s
        try:
            while (line := await self._next_request(reader, writer, peer)) is not None:
                await self._answer(line, peer, writer)
        except _Stalled:
            self._refused("stalled", peer)
            linger_s = 0.0
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # a handler's bug ends its own connection (logged), never the server
            suppressed = self._throttle.due("handler_failed", self._loop.time())
            if suppressed is not None:
                log.exception("control.handler_failed", user=peer.user, suppressed=suppressed)
            _say(writer, {"ok": False, "error": "internal", "message": "the daemon failed (see its log)"})
        finally:
            await _close(writer, linger_s)

    async def _next_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer
    ) -> bytes | None:
        """The next request line; None when the connection is to end (EOF, idle, too large, closing)."""
        if self._closed.is_set():
            return None
        me = _this_task()
        self._idle.add(me)
        try:
            async with asyncio.timeout(self.limits.idle_timeout_s):
                line = await reader.readline()
        except TimeoutError:
            self._refused("idle", peer)
            t = self.limits.idle_timeout_s
            _say(writer, {"ok": False, "error": "idle", "message": f"no request in {t:g} s"})
            return None
        except ValueError:  # a line over the reader's limit
            n = self.limits.max_request_bytes
            self._refused("too_large", peer)
            message = f"request too large: a request is one line of at most {n} bytes"
            _say(writer, {"ok": False, "error": "too_large", "message": message, "max_bytes": n})
            return None
        finally:
            self._idle.discard(me)
        return line or None

    async def _answer(self, line: bytes, peer: Peer, writer: asyncio.StreamWriter) -> None:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ControlError("bad_request", "a request is a JSON object with an 'op'")
            answer = await self._handler(request, peer)
        except ControlError as e:
            await self._write(writer, {"ok": False, "error": e.code, "message": e.message, **e.extra})
            return
        except (ValueError, RecursionError) as e:
            await self._write(writer, {"ok": False, "error": "bad_request", "message": f"not JSON: {e}"})
            return
        if isinstance(answer, dict):
            await self._write(writer, {"ok": True, **answer})
            return
        try:
            async for item in answer:
                await self._write(writer, {"ok": True, **item})
        finally:  # a stream cut short lets go of what it watches now, not when collected
            aclose = getattr(answer, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _write(self, writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
        writer.write(_encode(obj))
        try:
            async with asyncio.timeout(self.limits.idle_timeout_s):
                await writer.drain()
        except TimeoutError:
            raise _Stalled from None


def _this_task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("not called from a task")
    return task


def _accept_loop_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("control.accept_stopped", exc_info=task.exception())


def _encode(obj: dict[str, Any]) -> bytes:
    try:
        line = json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate from the request: escape it instead
        line = json.dumps(obj).encode()
    return line + b"\n"


def _say(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    """Write a last line without waiting for it: `_close` gives it its time."""
    with contextlib.suppress(ConnectionError):
        writer.write(_encode(obj))


async def _close(writer: asyncio.StreamWriter, linger_s: float) -> None:
    """Close the connection, giving what is still buffered `linger_s` to go out; then drop it."""
    writer.close()
    try:
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(linger_s):
                await writer.wait_closed()
    finally:
        writer.transport.abort()  # nothing once closed; else drops what the peer did not read


class _Throttle:
    """Lets a repeated event through once per interval, counting the ones held back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def due(self, key: str, now: float) -> int | None:
        """None: stay quiet; else log now, with this many held back since the last line."""
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


class NoDaemon(Exception):
    """No daemon answers on the control socket."""


class ControlClient:
    """The CLI's side of the control socket."""

    def __init__(self, path: Path, token: str | None = None) -> None:
        self.path = path
        self.token = token  # an operator credential ([[operators]] token_file), sent with each request

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request, return the one answer."""
        async with contextlib.aclosing(self.stream(op, **args)) as answers:
            async for answer in answers:
                return answer
        raise NoDaemon(f"the daemon on {self.path} closed the connection without answering")

    async def stream(self, op: str, **args: Any) -> AsyncGenerator[dict[str, Any]]:
        """Send one request, yield each answer line until the daemon closes or says `last`."""
        request = {"op": op, **args}
        if self.token is not None:
            request["token"] = self.token
        line = _encode(request)
        if (size := len(line) - 1) > MAX_REQUEST_BYTES:
            message = f"the request is {size} bytes, more than the {MAX_REQUEST_BYTES} the daemon takes"
            yield {"ok": False, "error": "too_large", "message": message, "max_bytes": MAX_REQUEST_BYTES}
            return
        sock = await self._connect()
        try:
            # A daemon that refuses the connection (busy) says so and closes, perhaps before the
            # request is written: what it said is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await asyncio.get_running_loop().sock_sendall(sock, line)
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_ANSWER_BYTES)
        except BaseException:
            sock.close()
            raise
        try:
            while answer_line := await reader.readline():
                answer = json.loads(answer_line)
                yield answer
                if not answer.get("ok") or not answer.get("more"):
                    return
        except ConnectionError as e:
            raise NoDaemon(f"the daemon on {self.path} broke the connection ({e})") from None
        finally:
            writer.close()

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_WAIT_S
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                # a Unix socket connects at once or not at all: no EINPROGRESS to wait for (and
                # asyncio's sock_connect takes a full backlog for a connection)
                sock.connect(str(self.path))
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as e:
                sock.close()
                raise NoDaemon(
                    f"no daemon on {self.path} ({e.strerror}): is ebcd running? "
                    "(ebcd run, or systemctl status ebcd)"
                ) from None
            except PermissionError:
                sock.close()
                raise NoDaemon(f"no permission to use {self.path}: are you in the ebcd group?") from None
            except OSError as e:
                sock.close()
                # EAGAIN: the daemon's listen backlog is full, for it is not accepting just now;
                # it may be again in a moment.
                if e.errno != errno.EAGAIN or loop.time() >= deadline:
                    raise NoDaemon(
                        f"the daemon on {self.path} takes no connections ({e.strerror}): is it overloaded?"
                    ) from None
            except BaseException:
                sock.close()
                raise
            await asyncio.sleep(CONNECT_RETRY_S)
