"""Scheduled test broadcasts: send each configured `[[test_broadcast]]` when due, then record
which of its terminals missed it (when (`due`) and what (`TestOutcome`) are `ebcd.admission.schedule`'s)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import structlog

from ebcd.admission.admission import Admission
from ebcd.admission.schedule import TestOutcome, due, previous_fire
from ebcd.config import Config
from ebcd.delivery.runner import Runner
from ebcd.delivery.state import AState, Bucket
from ebcd.ingest import IngestError
from ebcd.metrics import Metrics

log = structlog.get_logger("ebcd.scheduler")

TEST_SCHEDULE_TICK_S = 1.0


class Scheduler:
    """Runs the enabled test broadcasts of the config and keeps their outcomes by alert id."""

    def __init__(self, *, config: Config, runner: Runner, admission: Admission, metrics: Metrics) -> None:
        self.config = config
        self.runner = runner
        self.admission = admission
        self.metrics = metrics
        self.wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.outcomes: dict[str, TestOutcome] = {}

    async def run(self) -> None:
        """Send each configured test broadcast when due; report the terminals that missed it."""
        schedules = [s for s in self.config.test_broadcast if s.enabled]
        last_fired = dict.fromkeys(range(len(schedules)), self.wall_clock())  # never fire on installation
        watching: dict[str, datetime] = {}
        while True:
            now = self.wall_clock()
            for i, spec in enumerate(schedules):
                if not due(spec, last_fired[i], now):
                    continue
                last_fired[i] = now
                try:
                    run = await self.admission.submit(
                        spec.to_request(), source="schedule", actor=f"test_broadcast[{i}]"
                    )
                except IngestError as e:
                    log.error("test_broadcast.refused", schedule=i, reason=e.reason.value, detail=e.detail)
                    continue
                watching[run.id] = previous_fire(spec, now)
                log.info("test_broadcast.sent", alert_id=run.id, schedule=i, targets=len(run.deliveries))
            for alert_id, slot in list(watching.items()):
                run = self.runner.alerts[alert_id]
                if run.state in (AState.DISPATCHING, AState.PENDING_APPROVAL):
                    continue
                del watching[alert_id]
                acked = [t for t, d in run.deliveries.items() if d.bucket is Bucket.ACKED]
                outcome = TestOutcome.of(alert_id, run.deliveries, acked, slot)
                self.outcomes[alert_id] = outcome
                self.metrics.missed_tests.set(len(outcome.missed))
                if outcome.missed:
                    log.warning("test_broadcast.missed", **outcome.to_log_fields())
                else:
                    log.info("test_broadcast.complete", **outcome.to_log_fields())
            await asyncio.sleep(TEST_SCHEDULE_TICK_S)
