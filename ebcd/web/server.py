"""A read-only HTTP server for the wall screen: the page, the ledger, and a server-sent event stream.

h11 parses and frames HTTP/1.1; one request per connection. GET and HEAD only, nothing writes.
Beyond loopback every request needs the token of `[web] token_file` (`Authorization: Bearer T`,
or `?token=T`, which the page's EventSource has to use). `/events` streams one snapshot of the
duty room now and at each publication of alert states, at least every `refresh_s`; `?alert=ID`
adds that alert's per-terminal state (else the newest in flight, or the newest).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
from collections.abc import Callable
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import h11
import structlog

from ebcd.metrics import Metrics
from ebcd.tiers.district import District
from ebcd.tiers.hull import convex_hull

log = structlog.get_logger("ebcd.web")

REQUEST_TIMEOUT_S: Final = 10.0
MAX_REQUEST_BYTES: Final = 16_384
MAX_CONNECTIONS: Final = 32
STATIC: Final = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript")}

Snapshot = Callable[[str | None], dict[str, Any]]


class WebServer:
    """Serves the page; every answer is read-only."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str | None,
        ledger: dict[str, Any],
        snapshot: Snapshot,
        watch: Callable[[], asyncio.Event],
        unwatch: Callable[[asyncio.Event], None],
        metrics: Metrics,
        refresh_s: float = 1.0,
        min_interval_s: float = 0.25,
    ) -> None:
        if token is None and not _loopback(host):
            raise ValueError(f"[web] listen = {host}:{port} is beyond localhost: set [web] token_file")
        self.host, self.port, self.token = host, port, token
        self.ledger = json.dumps(ledger, ensure_ascii=False).encode()
        self.snapshot, self.watch, self.unwatch = snapshot, watch, unwatch
        self.metrics = metrics
        self.refresh_s, self.min_interval_s = refresh_s, min_interval_s
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.bound_port = port

    async def start(self) -> None:
        """Bind; OSError when the address is taken or not ours."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_REQUEST_BYTES)
        self.bound_port = int(self._server.sockets[0].getsockname()[1])
        log.info("web.listening", url=f"http://{self.host}:{self.bound_port}/", token=self.token is not None)

    def close(self) -> None:
        """Stop listening and end every open stream."""
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._conns.add(me)
        try:
            if len(self._conns) > MAX_CONNECTIONS:
                self.metrics.dropped.labels("web_connections").inc()
                log.warning("web.busy", connections=len(self._conns), limit=MAX_CONNECTIONS)
                return
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    request = await _next_request(conn, reader)
            except (h11.RemoteProtocolError, TimeoutError) as e:
                log.info("web.bad_request", error=str(e) or "timeout")
                self.metrics.unexpected.labels("web_request").inc()
                with contextlib.suppress(h11.LocalProtocolError, ConnectionError):
                    await _send(writer, conn, 400, b"bad request\n", "text/plain")
                return
            if request is not None:
                await self._answer(conn, writer, request)
        except (ConnectionError, h11.LocalProtocolError):
            pass
        finally:
            if me is not None:
                self._conns.discard(me)
            writer.close()
            with contextlib.suppress(ConnectionError, RuntimeError):
                await writer.wait_closed()

    async def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter, req: h11.Request) -> None:
        target = urlsplit(req.target.decode("ascii", "replace"))
        query = parse_qs(target.query)
        method = req.method.decode("ascii", "replace")
        if method not in ("GET", "HEAD"):
            await _send(writer, conn, 405, b"read-only: GET and HEAD only\n", "text/plain", allow="GET, HEAD")
            return
        if self.token is not None and not self._authorised(req, query):
            await _send(writer, conn, 401, b"token needed\n", "text/plain")
            return
        body = method == "GET"
        if target.path in STATIC:
            name, kind = STATIC[target.path]
            data = resources.files("ebcd.web").joinpath("static", name).read_bytes()
            await _send(writer, conn, 200, data if body else b"", kind)
        elif target.path == "/ledger.json":
            await _send(writer, conn, 200, self.ledger if body else b"", "application/json")
        elif target.path == "/events" and body:
            picked = query.get("alert")
            await self._events(conn, writer, picked[0] if picked else None)
        else:
            await _send(writer, conn, 404, b"not found\n", "text/plain")

    def _authorised(self, req: h11.Request, query: dict[str, list[str]]) -> bool:
        given = (query.get("token") or [""])[0]
        for name, value in req.headers:
            if name == b"authorization" and value.startswith(b"Bearer "):
                given = value[7:].decode("ascii", "replace")
        return hmac.compare_digest(given.encode(), (self.token or "").encode())

    async def _events(self, conn: h11.Connection, writer: asyncio.StreamWriter, alert_id: str | None) -> None:
        headers = [("content-type", "text/event-stream"), ("cache-control", "no-store")]
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)) or b"")
        changed = self.watch()
        try:
            while True:
                changed.clear()
                doc = json.dumps(self.snapshot(alert_id), ensure_ascii=False)
                writer.write(conn.send(h11.Data(data=f"data: {doc}\n\n".encode())) or b"")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.refresh_s):
                        await changed.wait()
                await asyncio.sleep(self.min_interval_s)
        finally:
            self.unwatch(changed)


async def _next_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(MAX_REQUEST_BYTES)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # the peer closed


async def _send(
    writer: asyncio.StreamWriter, conn: h11.Connection, status: int, data: bytes, kind: str, **extra: str
) -> None:
    headers = [("content-type", f"{kind}; charset=utf-8"), ("content-length", str(len(data))),
               ("connection", "close"), ("cache-control", "no-store")]  # fmt: skip
    headers += list(extra.items())
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    if data:
        writer.write(conn.send(h11.Data(data=data)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await writer.drain()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:8470` for IPv6) -> (host, port); ValueError saying what is wrong."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"[web] listen = {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8470")
    return host.strip("[]") or "127.0.0.1", int(port)


def ledger_doc(district: District) -> dict[str, Any]:
    """What the page draws once: every terminal where it hangs, every town's outline and label."""
    towns = []
    for town in district.towns.values():
        points = [(t.lon, t.lat) for t in town.terminals()]
        if not points:
            continue
        towns.append(
            {
                "code": town.code,
                "name": town.name,
                "lon": sum(p[0] for p in points) / len(points),
                "lat": max(p[1] for p in points),
                "hull": [list(p) for p in convex_hull(points)],
            }
        )
    terminals = [
        {"code": t.code, "name": t.name, "town": t.town, "lat": t.lat, "lon": t.lon}
        for t in district.terminals()
    ]
    return {
        "district": {"code": district.code, "name": district.name},
        "towns": towns,
        "terminals": terminals,
    }
