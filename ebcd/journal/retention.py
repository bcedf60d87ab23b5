"""Retention: the journal forgets what `[journal]` says it may, once per `retention_interval_s`.

What goes and what stays is `Journal.prune`'s contract: judged raw payloads older than
`raw_retention_days` are cleared (their rows and verdicts stay); with `alert_retention_days`, final
alerts unchanged for that long go with their deliveries, transitions and dedupe claims. An unjudged
message and an alert that is not final are never pruned. Ages are on the wall clock, the journal's
times being wall-clock times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Final

import structlog

from ebcd.config import JournalConfig
from ebcd.journal.journal import Journal, JournalError, PruneResult

log = structlog.get_logger(__name__)

DAY_S: Final = 86_400.0

OnPruned = Callable[[PruneResult], None]


def cutoffs(config: JournalConfig, now: float) -> tuple[float, float | None]:
    """(raw_before, alerts_before) at wall-clock time `now`; alerts_before None: alerts are kept."""
    alerts_before = None
    if config.alert_retention_days is not None:
        alerts_before = now - config.alert_retention_days * DAY_S
    return now - config.raw_retention_days * DAY_S, alerts_before


async def run_retention(
    journal: Journal,
    config: JournalConfig,
    *,
    on_pruned: OnPruned | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Prune the journal at once, then every `retention_interval_s`, forever (cancel to stop).

    Logs one line (`journal.pruned`) per pass that pruned anything, and calls `on_pruned` after
    every pass that completed, with what it pruned (possibly nothing). A pass the journal fails is
    logged (`journal.prune_failed`) and the next one tries again; it never ends the loop.
    """
    if not journal.enabled:
        return  # a NullJournal keeps nothing to prune
    while True:
        raw_before, alerts_before = cutoffs(config, clock())
        try:
            result = await journal.prune(raw_before, alerts_before)
        except JournalError as e:
            log.warning("journal.prune_failed", error=str(e))
        else:
            if result.rows:
                log.info(
                    "journal.pruned",
                    payloads=result.payloads,
                    alerts=result.alerts,
                    deliveries=result.deliveries,
                    transitions=result.transitions,
                    dedupe=result.dedupe,
                    ebd_sent=result.ebd_sent,
                    ebd_seen=result.ebd_seen,
                    bytes_freed=result.bytes_freed,
                    raw_before=raw_before,
                    alerts_before=alerts_before,
                )
            if on_pruned is not None:
                on_pruned(result)
        await asyncio.sleep(config.retention_interval_s)
