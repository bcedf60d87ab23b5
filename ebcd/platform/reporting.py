"""What ebcd sends to the platform above: every package through the journal's outbox, in order.

A package leaves the outbox only when the platform above answered it, so a platform that is down,
or an ebcd that restarts, loses nothing. Broadcasts from above are polled each
`report_interval_s`: a change of state or coverage makes an EBMStateResponse, the end of a
broadcast the last one and its EBMBrdLog (in one journal transaction with marking it reported).
Terminal states are polled likewise (EBRDTState, only the changed ones); the inventory
(EBRDTInfo) goes up at start and on request; ConnectionCheck goes up every `heartbeat_s`
directly, not through the outbox (a stale heartbeat means nothing).
"""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET  # builds our own documents
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import structlog

from ebcd.config import EbdConfig
from ebcd.delivery.alerts import Alert
from ebcd.delivery.core import Core
from ebcd.delivery.runner import Runner
from ebcd.delivery.state import EBM_STATE, AState, Bucket
from ebcd.journal.journal import Journal, JournalError
from ebcd.metrics import Metrics
from ebcd.platform import reports
from ebcd.platform.metrics import EbdMetrics
from ebcd.platform.uplink import Uplink
from ebcd.protocols.ebd.documents import Header
from ebcd.protocols.ebd.envelope import seal
from ebcd.protocols.ebd.signature import TrustedKey
from ebcd.security.signing import Signer
from ebcd.tiers.district import District

log = structlog.get_logger("ebcd.platform")

ENDED = frozenset({AState.COMPLETED, AState.PARTIAL, AState.CANCELLED, AState.EXPIRED, AState.REJECTED})


class Reporting:
    """The outbox up, the state reports of broadcasts from above, terminal states, heartbeats."""

    def __init__(
        self,
        cfg: EbdConfig,
        *,
        upstream_code: str,
        district: District,
        runner: Runner,
        core: Core,
        metrics: Metrics,
        ebd_metrics: EbdMetrics,
        journal: Callable[[], Journal],
        signer: Signer | None,
        keys: list[TrustedKey],
    ) -> None:
        self.cfg = cfg
        self.upstream_code = upstream_code
        self.district = district
        self.runner = runner
        self.core = core
        self.metrics = metrics
        self.ebd_metrics = ebd_metrics
        self._journal = journal
        self.signer = signer
        self.zone = ZoneInfo(cfg.timezone)
        self.uplink = Uplink(cfg, ebd_metrics, keys)
        self._outbox_id = 0
        self._outbox_wake = asyncio.Event()
        self._broadcasts: dict[str, str] = {}  # alert id -> EBMID, until its end is reported
        self._reported: dict[str, tuple[int, ...]] = {}  # alert id -> what its last report said
        self._terminal_states: dict[str, str] = {}

    # -- identifiers and headers -----------------------------------------------------------------------
    def ebdid(self, seq: int) -> str:
        """EBDID = "10" + our EBRID + yyyyMMdd + 8 digits (GS `EBDcodeUtil`)."""
        day = datetime.now(self.zone).strftime("%Y%m%d")
        return f"10{self.district.code}{day}{seq % 100_000_000:08d}"

    def header(self, ebdid: str, ebd_type: str, related: str | None = None) -> Header:
        return Header(
            ebdid=ebdid,
            ebd_type=ebd_type,
            src=self.district.code,
            dest=self.upstream_code,
            time=reports.local(time.time(), self.zone),
            src_url=self.cfg.own_url,
            related=related,
        )

    # -- life cycle ------------------------------------------------------------------------
    async def load(self) -> None:
        """Outbox numbering and the broadcasts whose end is still to report, from the journal."""
        journal = self._journal()
        self._outbox_id = await journal.ebd_last_outbox_id()
        for alert_id, ebmid in await journal.ebd_open_broadcasts():
            self._broadcasts[alert_id] = ebmid

    async def resume(self) -> None:
        """After the packages left unjudged were judged: what ended while ebcd was down, the inventory."""
        await self._report_ended_while_down()
        await self.enqueue(
            "EBRDTInfo", reports.terminal_info(self.district.terminals(), time.time(), self.zone)
        )

    async def _report_ended_while_down(self) -> None:
        """Broadcasts from above that ended (final in the journal) before their end was reported."""
        journal = self._journal()
        for alert_id, ebmid in list(self._broadcasts.items()):
            if alert_id in self.runner.alerts:
                continue
            doc = await journal.get_alert(alert_id)
            state = AState((doc or {}).get("state", AState.EXPIRED.value))
            desc = f"ended while ebcd was down ({state.value})"
            body = reports.waiting_state_response(
                ebmid, EBM_STATE[state], time.time(), self.zone, self.cfg.state_codes, desc
            )
            await self.enqueue("EBMStateResponse", body, ended=alert_id)
            del self._broadcasts[alert_id]

    async def track(self, alert: Alert, ebmid: str) -> None:
        """A broadcast from above: reported up until its end (journalled, so a restart goes on)."""
        await self._journal().ebd_broadcast(alert.id, ebmid)
        self._broadcasts[alert.id] = ebmid
        await self.report(alert, ebmid, force=True)

    async def close(self) -> None:
        """Close the HTTP client."""
        await self.uplink.close()

    # -- what goes up ----------------------------------------------------------------------
    async def enqueue(self, ebd_type: str, body: ET.Element, *, ended: str | None = None) -> None:
        """Build, sign and journal a package to send up (in order); with `ended`, that broadcast's end."""
        self._outbox_id += 1
        seq = self._outbox_id
        ebdid = self.ebdid(2 * seq)
        package = seal(self.signer, self.header(ebdid, ebd_type), body)
        await self._journal().ebd_enqueue(seq, ebdid, ebd_type, package, ended=ended)
        self._outbox_wake.set()

    async def report(self, alert: Alert, ebmid: str, *, force: bool = False) -> None:
        """An EBMStateResponse if anything it says changed (or `force`); at the end, the log too."""
        key = (EBM_STATE[alert.state], alert.targets, *(alert.counts[b] for b in Bucket))
        now = time.time()
        if force or key != self._reported.get(alert.id):
            self._reported[alert.id] = key
            body = reports.ebm_state_response(
                alert, ebmid, self.district, now, self.zone, self.cfg.state_codes
            )
            ended = alert.state in ENDED
            if not ended:
                await self.enqueue("EBMStateResponse", body)
                return
            await self.enqueue("EBMStateResponse", body)
            if alert.id in self._broadcasts:
                log_body = reports.brd_log(alert, ebmid, self.district, now, self.zone, self.cfg.state_codes)
                await self.enqueue("EBMBrdLog", log_body, ended=alert.id)
                del self._broadcasts[alert.id]

    async def report_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.report_interval_s)
            for alert in list(self.runner.alerts.values()):
                if alert.source != "ebd" or alert.request.identifier is None:
                    continue
                if alert.id in self._broadcasts or alert.id in self._reported:
                    await self._report_safely(alert, alert.request.identifier)
                    if alert.closed and alert.id not in self._broadcasts:
                        self._reported.pop(alert.id, None)  # past its time to live: nothing changes any more

    async def _report_safely(self, alert: Alert, ebmid: str) -> None:
        try:
            await self.report(alert, ebmid)
        except JournalError as e:
            self.metrics.journal_failures.labels("ebd_outbox").inc()
            log.error("ebd.report_not_journalled", alert_id=alert.id, error=str(e))

    async def terminal_loop(self) -> None:
        while True:
            states = {t.code: self.core.liveness.state(t.code).value for t in self.district.terminals()}
            changed = {c: s for c, s in states.items() if self._terminal_states.get(c) != s}
            if changed:
                try:
                    await self.enqueue("EBRDTState", reports.terminal_state(changed, time.time(), self.zone))
                    self._terminal_states.update(changed)
                except JournalError as e:
                    self.metrics.journal_failures.labels("ebd_outbox").inc()
                    log.error("ebd.terminal_states_not_journalled", terminals=len(changed), error=str(e))
            await asyncio.sleep(self.cfg.terminal_state_interval_s)

    async def heartbeat_loop(self) -> None:
        while True:
            seq = int(time.time())  # heartbeats are not journalled; "01" + EBRID + zeros is GS's form
            ebdid = f"01{self.district.code}{seq % 10**16:016d}"
            package = seal(
                self.signer,
                self.header(ebdid, "ConnectionCheck"),
                reports.connection_check(time.time(), self.zone),
            )
            await self.uplink.post(ebdid, package)
            await asyncio.sleep(self.cfg.heartbeat_s)

    async def send_loop(self) -> None:
        if self.cfg.upstream_url is None:
            log.warning(
                "ebd.no_upstream_url", hint="[ebd] upstream_url unset: reports stay in the journal's outbox"
            )
            return
        while True:
            batch = await self._journal().ebd_unsent(100)
            self.ebd_metrics.outbox.set(len(batch))
            if not batch:
                self._outbox_wake.clear()
                try:
                    async with asyncio.timeout(5.0):
                        await self._outbox_wake.wait()
                except TimeoutError:
                    pass
                continue
            for outbox_id, ebdid, ebd_type, package in batch:
                result = await self.uplink.deliver(ebdid, package)
                await self._journal().ebd_sent(outbox_id, result)
                self.ebd_metrics.sent.labels(ebd_type).inc()
