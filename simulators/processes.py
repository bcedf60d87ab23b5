"""`ebcd simulate --processes N`: the simulated terminals spread over N child processes.

Each child is `ebcd simulate --share I/N` (see `simulators.runner.share_of`), its own interpreter
and event loop, so ten thousand connections use more than one core. This process only supervises:
SIGTERM or SIGINT is passed on to every child; a child that ends on its own ends the others, and
its exit code (the first non-zero one) is this process's.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from types import FrameType

import structlog

log = structlog.get_logger("ebcd.simulator")


def run_processes(commands: Sequence[Sequence[str]]) -> int:
    """Start one child per command, wait for all of them; the first non-zero exit code, else 0."""
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(_signum: int = signal.SIGTERM, _frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        for command in commands:
            p = subprocess.Popen(list(command))  # noqa: S603  (our own interpreter and arguments)
            procs[p.pid] = p
            if stopping:  # a signal came while starting: this one too
                stop()
        log.info("simulator.processes", processes=len(procs), pids=sorted(procs))
        alive = set(procs)
        while alive:
            pid, status = os.wait()
            if pid not in alive:
                continue
            alive.discard(pid)
            procs[pid].returncode = os.waitstatus_to_exitcode(status)
            returncode = procs[pid].returncode
            if not stopping:
                log.warning(
                    "simulator.process_ended", pid=pid, exit_code=returncode, stopping_others=len(alive)
                )
                stop()
            if returncode and not code:
                code = returncode if returncode > 0 else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
