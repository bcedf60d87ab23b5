"""Journal size per alert and the time to rebuild the delivery core from it at start-up.

    python -m bench.recovery [--alerts 100] [--village]

Accepts N alerts (district-wide, or one village each with --village) into a daemon on the shipped
district, with no broker and no terminals (so every delivery stays in flight: the worst case for
a rebuild), stops it, and starts a second daemon on the same journal: prints the journal's size
per alert and per 1,000 deliveries, and the time from start to serving (journal opened, every
alert and delivery rebuilt, holders and waiters derived, in-flight attempts queued to be re-sent).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from ebcd.config import load_config, shipped_config_path
from ebcd.daemon.daemon import Daemon
from ebcd.model.alert import AlertRequest, parse_target
from ebcd.tiers.loader import load_district

NO_BROKER = "mqtt://127.0.0.1:9"  # nothing listens: the link retries in the background


async def _fill(daemon: Daemon, n: int, villages: list[str]) -> int:
    deliveries = 0
    for i in range(n):
        target = f"village:{villages[i % len(villages)]}" if villages else "all"
        request = AlertRequest(
            level=1 + i % 4, event_type="11B03", targets=[parse_target(target)], text=f"bench {i}"
        )
        alert = await daemon.submit(request, source="bench", actor="bench")
        deliveries += alert.targets
    await daemon.journal.flush()
    return deliveries


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=100)
    parser.add_argument("--village", action="store_true", help="one village per alert, not the district")
    opts = parser.parse_args()
    config = load_config(shipped_config_path())
    district = load_district(config)
    villages = [v.code for v in district.villages()] if opts.village else []
    state = Path(tempfile.mkdtemp(prefix="ebcd-bench-recovery-"))

    first = Daemon(config, district, state_dir=state, broker=NO_BROKER, metrics_port=-1)
    task = asyncio.create_task(first.run())
    await first.ready.wait()
    deliveries = await _fill(first, opts.alerts, villages)
    first.stop()
    await asyncio.wait_for(task, 60)
    size = sum(p.stat().st_size for p in state.glob("journal.sqlite3*"))

    started = time.perf_counter()
    second = Daemon(config, district, state_dir=state, broker=NO_BROKER, metrics_port=-1)
    task = asyncio.create_task(second.run())
    await second.ready.wait()
    took = time.perf_counter() - started
    active = sum(1 for a in second.runner.alerts.values() if not a.closed)
    second.stop()
    await asyncio.wait_for(task, 60)

    print(
        f"{opts.alerts} alerts, {deliveries} deliveries ({'a village' if villages else 'the district'} each)"
    )
    per_delivery = size / deliveries
    print(
        f"journal: {size / 1e6:.2f} MB; {size / opts.alerts / 1e3:.1f} kB per alert; "
        f"{per_delivery:.0f} B per delivery"
    )
    print(f"restart to serving with {active} active alerts: {took:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
