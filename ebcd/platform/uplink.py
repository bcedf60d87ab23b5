"""POSTing packages to the platform above (aiohttp client): one try, or until it answers."""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

import aiohttp
import structlog

from ebcd.config import EbdConfig
from ebcd.model.backoff import Backoff
from ebcd.protocols.ebd import EbdError
from ebcd.protocols.ebd.documents import child_text
from ebcd.protocols.ebd.envelope import open_package
from ebcd.protocols.ebd.package import multipart, tar_name
from ebcd.protocols.ebd.signature import TrustedKey

if TYPE_CHECKING:
    from ebcd.platform.metrics import EbdMetrics

log = structlog.get_logger("ebcd.platform")

MAX_ANSWER_BYTES = 1024 * 1024


class Uplink:
    """The HTTP client towards `[ebd] upstream_url`."""

    def __init__(self, cfg: EbdConfig, metrics: EbdMetrics, keys: Sequence[TrustedKey]) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.keys = keys
        self._session: aiohttp.ClientSession | None = None
        self._backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s, 0.2)
        self.up = False
        self._rng = random.Random()

    async def close(self) -> None:
        """Close the client session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.cfg.post_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    def _state(self, up: bool) -> None:
        if up != self.up:
            log.log(
                20 if up else 30, "ebd.upstream_up" if up else "ebd.upstream_down", url=self.cfg.upstream_url
            )
        self.up = up
        self.metrics.upstream_up.set(1 if up else 0)

    async def post(self, ebdid: str, package: bytes) -> str | None:
        """One POST: the answer ("ResultCode: ResultDesc", or a note), None if nobody answered."""
        url = self.cfg.upstream_url
        if url is None:
            return None
        body, ctype = multipart(package, tar_name(ebdid), f"ebcd{secrets.token_hex(12)}")
        try:
            async with self._client().post(url, data=body, headers={"Content-Type": ctype}) as resp:
                answer = await resp.content.read(MAX_ANSWER_BYTES)
                if resp.status // 100 != 2:
                    self.metrics.post_failures.labels("status").inc()
                    log.warning("ebd.post_refused", ebdid=ebdid, status=resp.status, url=url)
                    self._state(False)
                    return None
        except TimeoutError:
            self.metrics.post_failures.labels("timeout").inc()
            self._state(False)
            return None
        except aiohttp.ClientError as e:
            self.metrics.post_failures.labels("connect").inc()
            if self.up:
                log.warning("ebd.post_failed", ebdid=ebdid, url=url, error=str(e)[:200])
            self._state(False)
            return None
        self._state(True)
        return self._read_answer(ebdid, answer)

    def _read_answer(self, ebdid: str, answer: bytes) -> str:
        try:
            got = open_package(answer, self.keys, unsigned_types=frozenset({"EBDResponse"}))
        except EbdError as e:
            log.warning("ebd.answer_unreadable", ebdid=ebdid, detail=e.detail)
            return f"answered, unreadable: {e.detail[:200]}"
        body = got.document.body
        if got.document.header.ebd_type != "EBDResponse" or body is None:
            return f"answered with {got.document.header.ebd_type}"
        code = child_text(body, "ResultCode") or "?"
        desc = child_text(body, "ResultDesc") or ""
        if code != "1":
            log.warning("ebd.refused_above", ebdid=ebdid, result_code=code, desc=desc[:200])
        return f"{code}: {desc[:500]}"

    async def deliver(self, ebdid: str, package: bytes) -> str:
        """POST until the platform above answers (capped, jittered backoff); the answer."""
        attempt = 0
        while True:
            result = await self.post(ebdid, package)
            if result is not None:
                return result
            attempt += 1
            await asyncio.sleep(self._backoff.delay(attempt, self._rng))
