#!/usr/bin/env python3
"""What the duty room costs the daemon: one `ebcd top` snapshot, against one alert state.

The shipped district (769 terminals) in the pure delivery core, N district-wide alerts in flight:
the first an emergency that holds the terminals, the others waiting for it; half of every
alert's terminals acknowledged. Measures the
`top` op's snapshot (ebcd.control.duty.duty_doc: every alert's state and why its pending wait,
liveness per town) against the baseline the daemon already pays at each publication: the state
document of one alert (Alert.state_doc). Prints the figures and the ratio, measured in one run.

    python bench/duty_room.py [--alerts 10] [--rounds 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ebcd.config import load_config, shipped_config_path
from ebcd.control.duty import duty_doc
from ebcd.delivery.core import AlertSpec, Core, Policy
from ebcd.model.alert import AlertRequest, CodeTarget
from ebcd.protocols.messages import AckStatus, TerminalReport
from ebcd.tiers.loader import load_district


def _best(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    district = load_district(load_config(shipped_config_path()))
    codes = [t.code for t in district.terminals()]
    core = Core(codes, Policy(), seed=1)
    now = 1000.0
    for i in range(args.alerts):
        level = 1 if i == 0 else 4
        req = AlertRequest(level=level, event_type="11B03" if i == 0 else "00000",
                           targets=[CodeTarget(kind="all")], text="测试", test=i > 0)  # fmt: skip
        core.accept(
            AlertSpec(f"A{i}", "1" * 35, req, time.time()), codes, now, hold=False, wall_now=time.time()
        )
        for code in codes[::2]:
            core.report(TerminalReport(code, f"A{i}", 1, AckStatus.RECEIVED), now)
        core.drain()
    alert = core.alerts["A0"]
    state_s = _best(lambda: alert.state_doc(district, now), args.rounds)
    top_s = _best(
        lambda: duty_doc(core, district, now, links=None, rejections=None, recent_alerts=8), args.rounds
    )
    size = len(json.dumps(duty_doc(core, district, now, links=None, rejections=None, recent_alerts=8)))
    print(f"district: {len(codes)} terminals, {args.alerts} alerts in flight, best of {args.rounds}")
    print(f"baseline: one alert state         {state_s * 1e3:8.2f} ms")
    print(f"top snapshot (all alerts, towns)   {top_s * 1e3:8.2f} ms  = {top_s / state_s:.1f} x baseline")
    print(f"top snapshot as JSON               {size / 1024:8.1f} KiB")
    print(f"at the default 4 snapshots/s and 1 viewer: {top_s * 4 * 100:.1f} % of one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
