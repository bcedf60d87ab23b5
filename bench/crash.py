#!/usr/bin/env python3
"""Crash benchmark: N seeded runs of the crash harness (tests/crash_harness.py), a table of them.

A private Mosquitto, one `ebcd simulate` for the whole district (short play time, fixed seed)
and, per run, `ebcd run` killed with SIGKILL at a moment its seed picks, restarted on the same
state dir, settled, checked and stopped with SIGTERM. Run i uses seed S + i; the seed picks the
scenario (send, fanout, waiting, flood) and its timing, so `--runs 1 --seed K` replays run K.
Prints a line per run as it ends, then the table and the totals; exit code 1 if a run failed.
Work files (logs, journal) stay in the printed folder for whoever reads a failure.

    python bench/crash.py [--runs 20] [--seed 1] [--scenario flood] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.* from a checkout

from ebcd.config import load_config
from ebcd.tiers.loader import load_district
from tests.conftest import make_mosquitto
from tests.crash_harness import SCENARIOS, CrashHarness, RunResult, plan_run, prepare_config, table


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1, help="the first run's seed; run i uses seed + i")
    parser.add_argument(
        "--scenario", choices=SCENARIOS, help="only this scenario (timings still from the seed)"
    )
    parser.add_argument("-c", "--config", type=Path, help="config file (default: the shipped district)")
    parser.add_argument("--play-time", type=float, default=1.0, help="seconds a simulated broadcast plays")
    parser.add_argument("--faults", default="slow=10%", help="the simulator's fault profile")
    parser.add_argument("--sim-seed", type=int, default=7, help="the simulator's --seed")
    parser.add_argument("--settle-timeout", type=float, default=120.0)
    parser.add_argument(
        "--max-play-s",
        type=float,
        help="[delivery] max_play_s for the daemon (default: the config's, 600 s): how long a terminal"
        " whose `done` never comes stays held; lower it to see what fails besides",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder even if every run passed")
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ebcd-crash-"))
    print(f"work folder {work}", flush=True)
    overrides = {} if opts.max_play_s is None else {"max_play_s": opts.max_play_s}
    config_file = prepare_config(work / "district", opts.config, **overrides)
    district = load_district(load_config(config_file))
    broker = make_mosquitto(work)
    broker.start()
    t0 = time.monotonic()
    results: list[RunResult] = []
    try:
        async with CrashHarness(
            config_file,
            district,
            broker.host,
            broker.port,
            work,
            sim_seed=opts.sim_seed,
            play_time_s=opts.play_time,
            faults=opts.faults,
            settle_timeout_s=opts.settle_timeout,
            say=lambda line: print(line, flush=True),
        ) as harness:
            for i in range(opts.runs):
                results.append(await harness.run(plan_run(opts.seed + i, district, opts.scenario)))
    finally:
        broker.stop()
    print()
    print(table(results))
    print(f"wall time {time.monotonic() - t0:.0f} s")
    failed = [r for r in results if not r.passed]
    for r in failed:
        print(f"FAILED {r.reproduce()}\n  why: {r.why}\n  notes: {'; '.join(r.notes)}")
        print(f"  logs: {', '.join(str(p) for p in r.logs)}, {work / 'logs' / 'simulate.log'}")
    if failed or opts.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
