"""The local control socket: the duty officer's CLI talks to the running daemon through it.

JSON lines over a Unix socket in the state dir (mode 0660, so a group such as `ebcd` can be given
access). Each request is one line `{"op": ..., ...}`; each answer one line `{"ok": true, ...}` or
`{"ok": false, "error": CODE, "message": TEXT}`; `watch` streams states until the alert settles.
The daemon learns the OS user of every request from the socket (SO_PEERCRED) for its audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("ebcd.control")

SOCKET_NAME = "ebcd.sock"
MAX_REQUEST_BYTES = 1024 * 1024


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


def peer_of(writer: asyncio.StreamWriter) -> Peer:
    """The peer's credentials (SO_PEERCRED)."""
    sock: socket.socket | None = writer.get_extra_info("socket")
    if sock is None:
        return Peer(0, -1, -1)
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


async def serve(path: Path, handler: Handler, mode: int = 0o660) -> asyncio.Server:
    """Listen on `path`, replacing a stale socket file, and answer requests with `handler`."""
    _remove_stale(path)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # a line over the reader's limit
                    await _write(writer, {"ok": False, "error": "too_large", "message": "request too large"})
                    return
                if not line:
                    return
                await _answer(line, peer, handler, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(on_client, path=str(path), limit=MAX_REQUEST_BYTES)
    os.chmod(path, mode)
    return server


def _remove_stale(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()


async def _answer(line: bytes, peer: Peer, handler: Handler, writer: asyncio.StreamWriter) -> None:
    try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            raise ControlError("bad_request", "a request is a JSON object with an 'op'")
        answer = await handler(request, peer)
    except ControlError as e:
        await _write(writer, {"ok": False, "error": e.code, "message": e.message, **e.extra})
        return
    except (ValueError, RecursionError) as e:
        await _write(writer, {"ok": False, "error": "bad_request", "message": f"not JSON: {e}"})
        return
    if isinstance(answer, dict):
        await _write(writer, {"ok": True, **answer})
        return
    async for item in answer:
        await _write(writer, {"ok": True, **item})


async def _write(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    try:
        line = json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate from the request: escape it instead
        line = json.dumps(obj).encode()
    writer.write(line + b"\n")
    await writer.drain()


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
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_REQUEST_BYTES)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise NoDaemon(
                f"no daemon on {self.path} ({e.strerror}): is ebcd running? "
                "(ebcd run, or systemctl status ebcd)"
            ) from None
        except PermissionError:
            raise NoDaemon(f"no permission to use {self.path}: are you in the ebcd group?") from None
        try:
            request = {"op": op, **args}
            if self.token is not None:
                request["token"] = self.token
            writer.write(json.dumps(request, ensure_ascii=False).encode() + b"\n")
            await writer.drain()
            while line := await reader.readline():
                answer = json.loads(line)
                yield answer
                if not answer.get("ok") or not answer.get("more"):
                    return
        finally:
            writer.close()
