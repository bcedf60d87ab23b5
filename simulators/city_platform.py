"""A simulated platform above (city or province): sends EBMs down, takes what ebcd sends up.

It speaks EBD through ebcd's own codec (`ebcd.protocols.ebd`): it signs its packages with its key,
verifies ebcd's with ebcd's public key, and answers every package with a signed EBDResponse. It
keeps everything it received, in order, for tests and for an engineer rehearsing the link; `down()`
and `up()` stop and restart its HTTP server to play a platform that is away.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import xml.etree.ElementTree as ET  # builds our own documents
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
from aiohttp import web

from ebcd.config import Config
from ebcd.ingest import Reason
from ebcd.protocols.ebd import EbdError, ResultCode
from ebcd.protocols.ebd.documents import Ebm, Header, as_dict, child_text, ebm_body, response_body
from ebcd.protocols.ebd.envelope import open_package, seal
from ebcd.protocols.ebd.package import multipart, tar_name, tar_of_body
from ebcd.protocols.ebd.signature import TrustedKey
from ebcd.security.bench import verifier_from
from ebcd.security.signing import SM2_N, Signer, Sm2SigningKey

BENCH_CITY_CODE = "34152000000000001010101"  # a city platform (level 3, area 341520000000)
_SEED = hashlib.sha256(b"ebcd simulated city platform key - published, not secret").digest()


def ebcd_keys(config: Config) -> list[TrustedKey]:
    """What the city verifies ebcd's packages with: ebcd's [security] public key."""
    sec = config.security
    verifier = verifier_from(sec.public_key, sec.scheme, config.base_dir)
    return [TrustedKey(f"ebcd key {serial}", key) for serial, key in verifier.keys.items()]


def bench_city_signer() -> Signer:
    """The simulated city's published SM2 key (config/ebd/city-bench.pem is its public key)."""
    return Signer(Sm2SigningKey.from_scalar(int.from_bytes(_SEED) % (SM2_N - 2) + 1), "000000000301")


@dataclass(frozen=True, slots=True)
class Got:
    """One package ebcd sent up: its type, envelope, body as plain data, and whose key signed it."""

    ebd_type: str
    header: Header
    body: Any
    signed_by: str | None
    at: float


class CityPlatform:
    """The platform above ebcd, simulated."""

    def __init__(
        self,
        *,
        code: str,
        signer: Signer,
        district_code: str,
        ebcd_keys: Sequence[TrustedKey],
        to_url: str,
        timezone: str = "Asia/Shanghai",
        on_package: Callable[[Got], None] | None = None,
    ) -> None:
        self.code = code
        self.signer = signer
        self.district_code = district_code
        self.ebcd_keys = list(ebcd_keys)
        self.to_url = to_url
        self.zone = ZoneInfo(timezone)
        self.on_package = on_package
        self.got: list[Got] = []
        self.refused: list[str] = []  # packages from ebcd the city could not open, and why
        self.changed = asyncio.Event()
        self._seq = 0
        self._ebm_seq = 0
        self._runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # -- receiving ---------------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen for ebcd's packages (port 0: any free one, then in `self.port`)."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.host, self.port = host, int(sockets[0].getsockname()[1]) if sockets else port

    @property
    def url(self) -> str:
        """Where ebcd sends its packages (its `[ebd] upstream_url`)."""
        return f"http://{self.host}:{self.port}/ebd"

    async def down(self) -> None:
        """Stop answering: ebcd finds the platform above away."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def up(self) -> None:
        """Answer again, on the same port."""
        await self.start(self.host, self.port)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        their = None
        try:
            rec = open_package(tar_of_body(body, request.headers.get("Content-Type", "")), self.ebcd_keys)
            h = rec.document.header
            their = h.ebdid
            doc = rec.document.body
            got = Got(h.ebd_type, h, as_dict(doc) if doc is not None else None, rec.signed_by, time.time())
            self.got.append(got)
            self.changed.set()
            if self.on_package is not None:
                self.on_package(got)
            code, desc = ResultCode.OK, "接收解析及数据校验成功"
        except EbdError as e:
            self.refused.append(e.detail)
            code, desc = e.code, e.detail
        return web.Response(body=self._answer(their, code, desc), content_type="application/x-tar")

    def _answer(self, their: str | None, code: ResultCode, desc: str) -> bytes:
        return seal(self.signer, self._header("EBDResponse", related=their), response_body(code, desc))

    def of_type(self, ebd_type: str) -> list[Got]:
        """What ebcd sent up of one EBDType, in order."""
        return [g for g in self.got if g.ebd_type == ebd_type]

    def states_of(self, ebmid: str) -> list[Got]:
        """The EBMStateResponses ebcd sent about one broadcast, in order."""
        return [g for g in self.of_type("EBMStateResponse") if g.body["EBM"]["EBMID"] == ebmid]

    # -- sending ---------------------------------------------------------------------------
    def _header(self, ebd_type: str, related: str | None = None) -> Header:
        self._seq += 1
        day = datetime.now(self.zone).strftime("%Y%m%d")
        ebdid = f"10{self.code}{day}{(int(time.time() * 1000) * 100 + self._seq) % 10**8:08d}"
        now = datetime.now(self.zone).strftime("%Y-%m-%d %H:%M:%S")
        return Header(
            ebdid=ebdid,
            ebd_type=ebd_type,
            src=self.code,
            dest=self.district_code,
            time=now,
            src_url=self.url if self.port else None,
            related=related,
        )

    def next_ebmid(self) -> str:
        """EBMID = our EBRID + yyyyMMdd + 4 digits (GS `EBDcodeUtil`), unique per run."""
        self._ebm_seq += 1
        day = datetime.now(self.zone).strftime("%Y%m%d")
        return f"{self.code}{day}{(secrets.randbelow(9000) + self._ebm_seq) % 10_000:04d}"

    def ebm(
        self,
        *,
        areas: Sequence[str],
        level: int = 2,
        event: str = "11B03",
        title: str = "暴雨橙色预警",
        desc: str = "请注意防范，远离危险区域。",
        msg_type: int = 1,
        minutes: float = 60.0,
        starts_in_s: float = 0.0,
        ebmid: str | None = None,
        related: str | None = None,
    ) -> Ebm:
        """An EBM as a city platform writes it (times in local time)."""
        now = datetime.now(self.zone).replace(tzinfo=None, microsecond=0)
        start = now + timedelta(seconds=starts_in_s)
        return Ebm(
            ebmid=ebmid or self.next_ebmid(),
            msg_type=msg_type,
            related_ebmid=related,
            sender_name="市应急广播平台",
            sender_code=self.code,
            event_type=event,
            severity=level,
            start=start,
            end=start + timedelta(minutes=minutes),
            language="zho",
            title=title,
            desc=desc,
            area_codes=tuple(areas),
        )

    def package(self, body: ET.Element, ebd_type: str) -> tuple[str, bytes]:
        """(EBDID, tar) of a signed package."""
        header = self._header(ebd_type)
        return header.ebdid, seal(self.signer, header, body)

    async def post(self, ebdid: str, tar: bytes, url: str | None = None) -> tuple[int, str]:
        """POST a package to ebcd; (ResultCode, ResultDesc) of its answer, after checking its signature."""
        body, ctype = multipart(tar, tar_name(ebdid), f"city{secrets.token_hex(8)}")
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
            session.post(url or self.to_url, data=body, headers={"Content-Type": ctype}) as resp,
        ):
            answer = await resp.read()
        rec = open_package(answer, self.ebcd_keys)
        doc = rec.document.body
        if rec.document.header.ebd_type != "EBDResponse" or doc is None:
            what = f"answered with {rec.document.header.ebd_type}, not an EBDResponse"
            raise EbdError(ResultCode.PARSE_FAILURE, Reason.SCHEMA, what)
        return int(child_text(doc, "ResultCode") or 0), child_text(doc, "ResultDesc") or ""

    async def send(self, ebm: Ebm) -> tuple[int, str]:
        """Send an EBM down; ebcd's (ResultCode, ResultDesc)."""
        ebdid, tar = self.package(ebm_body(ebm), "EBM")
        return await self.post(ebdid, tar)

    async def cancel(self, ebmid: str, *, areas: Sequence[str] = ()) -> tuple[int, str]:
        """Cancel a broadcast sent before (MsgType 2, RelatedInfo/EBMID)."""
        return await self.send(self.ebm(areas=areas, msg_type=2, related=ebmid))

    async def request(self, ebd_type: str, **fields: str) -> tuple[int, str]:
        """An EBMStateRequest (EBMID=…) or OMDRequest (OMDType=…)."""
        body = ET.Element(ebd_type)
        for name, value in fields.items():
            if name == "EBMID":
                ET.SubElement(ET.SubElement(body, "EBM"), "EBMID").text = value
            else:
                ET.SubElement(body, name).text = value
        ebdid, tar = self.package(body, ebd_type)
        return await self.post(ebdid, tar)

    async def wait(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Wait until `predicate()` holds, woken by each package; TimeoutError after timeout_s."""
        async with asyncio.timeout(timeout_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


def describe(got: Got) -> str:
    """One line for an engineer: what ebcd sent up."""
    b = got.body or {}
    sig = f"signed by {got.signed_by}" if got.signed_by else "unsigned"
    if got.ebd_type == "EBMStateResponse":
        cov = b.get("Coverage") or {}
        items = (b.get("ResBrdInfo") or {}).get("ResBrdItem") or []
        items = items if isinstance(items, list) else [items]
        rooms = "; ".join(str(i.get("EBRBS", {}).get("BrdStateDesc", "")) for i in items[:8])
        more = f" (+{len(items) - 8} rooms)" if len(items) > 8 else ""
        return (
            f"EBMStateResponse {b['EBM']['EBMID']}: state {b.get('BrdStateCode')} {b.get('BrdStateDesc')}, "
            f"coverage {cov.get('CoverageRate', '-')} ({cov.get('ResBrdStat', '-')}) "
            f"rooms: {rooms}{more} [{sig}]"
        )
    if got.ebd_type == "EBMBrdLog":
        item = b.get("EBMBrdItem") or {}
        cov = item.get("Coverage") or {}
        return (
            f"EBMBrdLog {item.get('EBM', {}).get('EBMID')}: state {item.get('BrdStateCode')} "
            f"{item.get('BrdStateDesc')}, coverage {cov.get('CoverageRate')} [{sig}]"
        )
    if got.ebd_type == "EBRDTInfo":
        dts = b.get("EBRDT") or []
        return f"EBRDTInfo: {len(dts) if isinstance(dts, list) else 1} terminals [{sig}]"
    if got.ebd_type == "EBRDTState":
        dts = b.get("EBRDT") or []
        dts = dts if isinstance(dts, list) else [dts]
        counts: dict[str, int] = {}
        for d in dts:
            counts[d.get("StateDesc", "?")] = counts.get(d.get("StateDesc", "?"), 0) + 1
        return f"EBRDTState: {len(dts)} terminals changed: {counts} [{sig}]"
    if got.ebd_type == "ConnectionCheck":
        return f"ConnectionCheck {b.get('RptTime', '')} [{sig}]"
    return f"{got.ebd_type} [{sig}]"


async def run_city(
    city: CityPlatform,
    *,
    listen: tuple[str, int],
    send: Ebm | None,
    cancel: str | None,
    seconds: float | None,
    say: Callable[[str], None],
) -> int:
    """Listen, send what was asked, print what comes up; 0 unless ebcd refused what was sent (2)."""
    city.on_package = lambda got: say(describe(got))
    await city.start(*listen)
    say(f"city platform {city.code} listening on {city.url}; sending to {city.to_url}")
    code = 0
    try:
        for ebm in [e for e in (send,) if e is not None]:
            result, desc = await city.send(ebm)
            say(f"sent EBM {ebm.ebmid} (MsgType {ebm.msg_type}): ResultCode {result}: {desc}")
            code = code or (0 if result == 1 else 2)
        if cancel is not None:
            result, desc = await city.cancel(cancel)
            say(f"cancelled EBM {cancel}: ResultCode {result}: {desc}")
            code = code or (0 if result == 1 else 2)
        ended = send.ebmid if send is not None and send.msg_type != 2 else None
        try:
            async with asyncio.timeout(seconds):
                if ended is not None and seconds is None:
                    await city.wait(
                        lambda: any(
                            g.body["EBMBrdItem"]["EBM"]["EBMID"] == ended for g in city.of_type("EBMBrdLog")
                        ),
                        24 * 3600,
                    )
                else:
                    await asyncio.Event().wait()
        except TimeoutError:
            pass
    finally:
        await city.down()
    return code
