"""Journal figures: size per 1,000 deliveries, 769-terminal fan-out on vs off, commit latency.

Run from the project root: `.venv/bin/python -m bench.journal [--dir DIR]`; DIR should be on the
filesystem the daemon's state dir will use (fsync cost is the filesystem's).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import structlog

from ebcd.journal.journal import Journal, NullJournal, Synchronous

TERMINALS = 769
FAN_OUT_ROUNDS = 40
SERIAL_WRITES = 500
SIZE_ALERTS = 13  # 13 x 769 = 9,997 deliveries
STATES_PER_DELIVERY = ("sending", "sent", "acked")
DOC = {
    "final": False,
    "revision": 1,
    "request": {"event": "11B03", "level": 1, "text": "暴雨红色预警：请立即转移到安全地带。" * 8},
    "targets": ["all"],
    "accepted_at": 1_700_000_000.0,
    "ttl_s": 3600.0,
}


def _terminal(n: int) -> str:
    """A 23-digit EBRID."""
    return f"43415230000000314010{n:03d}"


def _alert_id(n: int) -> str:
    """A 35-digit EBMID (EBRID + YYYYMMDD + sequence), as the daemon would use."""
    return f"4341523000000031401030120261126{n:04d}"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _fan_out(journal: Journal, alert_id: str) -> float:
    """Seconds to record one transition per terminal and flush."""
    await journal.save_alert(alert_id, DOC)
    started = time.perf_counter()
    for n in range(TERMINALS):
        journal.record_transition(alert_id, _terminal(n), "sending", None, time.time(), attempt=True)
    await journal.flush()
    return time.perf_counter() - started


async def _fan_out_times(journal: Journal) -> list[float]:
    return [await _fan_out(journal, _alert_id(r)) for r in range(FAN_OUT_ROUNDS)]


async def _size_per_1000_deliveries(path: Path) -> tuple[float, int]:
    empty = await Journal.open(path)
    await empty.close()
    base = (await asyncio.to_thread(path.stat)).st_size
    journal = await Journal.open(path)
    for a in range(SIZE_ALERTS):
        await journal.save_alert(_alert_id(a), DOC)
        for state in STATES_PER_DELIVERY:
            for n in range(TERMINALS):
                journal.record_transition(
                    _alert_id(a), _terminal(n), state, None, time.time(), attempt=state == "sending"
                )
        await journal.flush()
    await journal.close()  # checkpoints the WAL into the main file
    deliveries = SIZE_ALERTS * TERMINALS
    size = (await asyncio.to_thread(path.stat)).st_size
    return (size - base) / deliveries * 1000, deliveries


async def _measure(directory: Path, synchronous: Synchronous) -> tuple[list[float], list[float], list[float]]:
    """Fan-out times, fan-out commit latencies and single-write commit latencies."""
    latencies: list[float] = []
    journal = await Journal.open(
        directory / f"{synchronous}.sqlite3",
        synchronous=synchronous,
        on_commit=lambda latency_s, _rows: latencies.append(latency_s),
    )
    try:
        times = await _fan_out_times(journal)
        fan_out_latencies, latencies = latencies, []
        for n in range(SERIAL_WRITES):
            await journal.save_alert(_alert_id(1000 + n), DOC)
        return times, fan_out_latencies, latencies
    finally:
        await journal.close()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f} ms"


async def main(directory: Path) -> None:
    """Print the journal's figures."""
    null_times = await _fan_out_times(await NullJournal.open())
    null_median = statistics.median(null_times)
    per_1000, deliveries = await _size_per_1000_deliveries(directory / "size.sqlite3")
    print(f"journal size: {per_1000:,.0f} bytes per 1,000 deliveries")
    print(
        f"  ({deliveries:,} deliveries, {len(STATES_PER_DELIVERY)} transitions each, one alert doc per 769)"
    )
    print(f"fan-out: {TERMINALS} transitions + flush, median of {FAN_OUT_ROUNDS} rounds")
    print(f"  NullJournal      {_ms(null_median)}")
    for synchronous in ("FULL", "NORMAL"):
        times, fan_out_latencies, serial = await _measure(directory, synchronous)
        median = statistics.median(times)
        print(
            f"  {synchronous:<6} journal   {_ms(median)}  (p99 {_ms(_pct(times, 0.99))},"
            f" {median / null_median:,.0f}x NullJournal,"
            f" {len(fan_out_latencies) / FAN_OUT_ROUNDS:.1f} commits per fan-out)"
        )
        print(
            f"    commit latency, fan-out: p50 {_ms(_pct(fan_out_latencies, 0.5))}"
            f" p99 {_ms(_pct(fan_out_latencies, 0.99))};"
            f" single awaited write: p50 {_ms(_pct(serial, 0.5))} p99 {_ms(_pct(serial, 0.99))}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="where to put the journals (default: a temporary dir)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(main(args.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="ebcd-bench-") as tmp:
            asyncio.run(main(Path(tmp)))
