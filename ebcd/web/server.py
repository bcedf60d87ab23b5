"""A read-only HTTP server for the wall screen: the page, the ledger, and a server-sent event stream.

On aiohttp, as the EBD link is (one HTTP library in ebcd). GET and HEAD only, nothing writes.
Beyond loopback every request needs the token of `[web] token_file` (`Authorization: Bearer T`,
or `?token=T`, which the page's EventSource has to use). `/events` streams one snapshot of the
duty room now and at each publication of alert states, at least every `refresh_s`; `?alert=ID`
adds that alert's per-terminal state (else the newest in flight, or the newest). At most
`MAX_CONNECTIONS` requests are served at once (event streams stay open): more are answered 503,
logged and counted in `ebcd_dropped_messages_total{where="web_connections"}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final

import structlog
from aiohttp import web

from ebcd.metrics import Metrics
from ebcd.tiers.district import District
from ebcd.tiers.hull import convex_hull

log = structlog.get_logger("ebcd.web")

MAX_REQUEST_BYTES: Final = 16_384  # a request line or header; bodies are never read
MAX_CONNECTIONS: Final = 32
STATIC: Final = {"/": ("index.html", "text/html"), "/app.js": ("app.js", "text/javascript")}
NO_STORE: Final = {"Cache-Control": "no-store"}

Snapshot = Callable[[str | None], dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
        self._runner: web.AppRunner | None = None
        self._open = 0
        self._streams: set[asyncio.Event] = set()
        self._closing = asyncio.Event()
        self.bound_port = port

    async def start(self) -> None:
        """Bind; OSError when the address is taken or not ours."""
        limits = {"max_line_size": MAX_REQUEST_BYTES, "max_field_size": MAX_REQUEST_BYTES}
        app = web.Application(middlewares=[self._guard], handler_args=limits, client_max_size=1024)
        app.router.add_get("/", self._static)
        app.router.add_get("/app.js", self._static)
        app.router.add_get("/ledger.json", self._ledger)
        app.router.add_get("/events", self._events, allow_head=False)
        app.router.add_route("*", "/{tail:.*}", self._other)
        # an open event stream ends within refresh_s + min_interval_s of close(): no 60 s default wait
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=2 * self.refresh_s + 1
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server  # the bound port, for listen = "HOST:0"
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = int(sockets[0].getsockname()[1]) if sockets else self.port
        log.info("web.listening", url=f"http://{self.host}:{self.bound_port}/", token=self.token is not None)

    async def close(self) -> None:
        """Stop listening and end every open stream."""
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return _text(405, "read-only: GET and HEAD only\n", Allow="GET, HEAD")
        if self.token is not None and not self._authorised(request):
            return _text(401, "token needed\n")
        if self._open >= MAX_CONNECTIONS:
            self.metrics.dropped.labels("web_connections").inc()
            log.warning("web.busy", connections=self._open, limit=MAX_CONNECTIONS)
            return _text(503, "busy\n")
        self._open += 1
        try:
            return await handler(request)
        finally:
            self._open -= 1

    def _authorised(self, request: web.Request) -> bool:
        given = request.query.get("token", "")
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[7:]
        return hmac.compare_digest(given.encode(), (self.token or "").encode())

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name, kind = STATIC[request.path]
        data = resources.files("ebcd.web").joinpath("static", name).read_bytes()
        return web.Response(body=data, content_type=kind, charset="utf-8", headers=NO_STORE)

    async def _ledger(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=self.ledger, content_type="application/json", charset="utf-8", headers=NO_STORE
        )

    async def _other(self, request: web.Request) -> web.StreamResponse:
        return _text(404, "not found\n")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **NO_STORE})
        await response.prepare(request)
        alert_id = request.query.get("alert")
        changed = self.watch()
        try:
            while not self._closing.is_set():
                changed.clear()
                doc = json.dumps(self.snapshot(alert_id), ensure_ascii=False)
                await response.write(f"data: {doc}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.refresh_s):
                        await changed.wait()
                await asyncio.sleep(self.min_interval_s)
        except ConnectionError:
            pass  # the page went away
        finally:
            self.unwatch(changed)
        return response


def _text(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text, headers={**NO_STORE, **headers})


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
