"""The HTTP server for packages from above (aiohttp): any path, POST only, the body bounded."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

log = structlog.get_logger("ebcd.platform")

Receive = Callable[[bytes, str, int | None], Awaitable[bytes]]
READ_CHUNK_BYTES = 64 * 1024


class EbdServer:
    """Answers every POST, at any path, with the tar `receive` returns."""

    def __init__(self, receive: Receive, *, max_body_bytes: int) -> None:
        self._receive = receive
        self.max_body_bytes = max_body_bytes
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (port 0: any free one, then in `self.port`)."""
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server  # the bound port, for listen = "HOST:0"
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        log.info("ebd.listening", host=host, port=self.port)

    async def stop(self) -> None:
        """Stop listening and close connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method != "POST":
            return web.Response(
                status=405, text="POST an EBD package (multipart/form-data with a tar part)\n"
            )
        body = bytearray()
        too_large = None
        async for chunk in request.content.iter_chunked(READ_CHUNK_BYTES):
            if len(body) + len(chunk) > self.max_body_bytes:
                too_large = self.max_body_bytes  # the rest is not read: aiohttp drains or drops it
                break
            body += chunk
        answer = await self._receive(bytes(body), request.headers.get("Content-Type", ""), too_large)
        return web.Response(body=answer, content_type="application/x-tar")
