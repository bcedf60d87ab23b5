"""Airtime benchmark: a PlayCommand to 8 terminals on a simulated 9600-baud RS-485 bus over a pty.

Prints the bytes that must cross the line (one command to all, then a query and a result per
terminal), their theoretical airtime (bytes × 10 bits / baud), the measured time from dispatch to
the last acknowledgement, and the ratio. No asserts: figures only.

    .venv/bin/python bench/serial_airtime.py [--baud 9600] [--terminals 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time

import structlog

from ebcd.protocols.messages import PlayCommand, TerminalReport
from ebcd.protocols.serial.bus import SerialBusMaster
from ebcd.protocols.serial.frame import (
    BroadcastResult,
    Frame,
    FrameType,
    Query,
    ResultStatus,
    command_body,
    encode_frame,
)
from simulators.serial_bus import BITS_PER_CHAR_8N1, SerialBusSimulator

SOURCE = "43415230000000314010301"
EBMID = SOURCE + "202406010001"
TEXT = "暴雨红色预警：请沿河低洼地带群众立即转移到安全地点。"


def minimum_bytes(cmd: PlayCommand, codes: list[str]) -> int:
    """Bytes one clean pass must put on the line: the command once, a query and a result per terminal."""
    total = len(encode_frame(Frame(SOURCE, tuple(codes), command_body(cmd))))
    for code in codes:
        total += len(encode_frame(Frame(SOURCE, (code,), Query(EBMID, cmd.alert_id, cmd.revision))))
        result = BroadcastResult(EBMID, cmd.alert_id, cmd.revision, cmd.seq, ResultStatus.DONE)
        total += len(encode_frame(Frame(code, (SOURCE,), result, frame_type=FrameType.REPLY)))
    return total


async def one_round(baud: int, terminals: dict[str, int], n: int) -> tuple[int, int, float]:
    """Dispatch one alert; return (minimum bytes, bytes that crossed, seconds to the last ack)."""
    codes = list(terminals)
    cmd = PlayCommand(f"bench-{n}", EBMID, 1, n, 1, "11B03", TEXT, 600.0)
    reports: list[TerminalReport] = []
    async with SerialBusSimulator(terminals, baudrate=baud) as sim:
        url = await sim.start_pty()
        master = SerialBusMaster(
            url,
            source=SOURCE,
            terminals=terminals,
            on_report=reports.append,
            baudrate=baud,
            poll_interval_s=None,
        )
        task = asyncio.create_task(master.run())
        try:
            started = time.perf_counter()
            outcome = await master.dispatch(cmd, codes)
            elapsed = time.perf_counter() - started
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if len(outcome.reports) != len(codes):
        print(f"round {n}: only {len(outcome.reports)} of {len(codes)} terminals answered")
    crossed = master.counters.bytes_sent + master.counters.bytes_received
    return minimum_bytes(cmd, codes), crossed, elapsed


async def main(baud: int, count: int, rounds: int) -> None:
    """Run the rounds and print the figures."""
    terminals = {f"634152310100103140104{i:02d}": i for i in range(1, count + 1)}
    ratios = []
    print(f"bus: {count} terminals, {baud} baud, {BITS_PER_CHAR_8N1} bits per byte (8N1), pty")
    header = ("round", "min bytes", "line bytes", "min airtime s", "measured s", "ratio")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 9, 10, 13, 10, 6), strict=True)))
    for n in range(1, rounds + 1):
        need, crossed, elapsed = await one_round(baud, terminals, n)
        airtime = need * BITS_PER_CHAR_8N1 / baud
        ratios.append(elapsed / airtime)
        print(f"{n:>5} {need:>9} {crossed:>10} {airtime:>13.3f} {elapsed:>10.3f} {elapsed / airtime:>6.2f}")
    print(f"median ratio measured / theoretical minimum: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="serial bus airtime benchmark")
    parser.add_argument("--baud", type=int, default=9600)
    parser.add_argument("--terminals", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(args.baud, args.terminals, args.rounds))
