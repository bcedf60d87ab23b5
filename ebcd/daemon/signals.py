"""SIGTERM and SIGINT that reach the event loop however busy it is.

`loop.add_signal_handler` learns of a signal from a byte written to the loop's self-pipe. That
pipe also carries a byte for every `call_soon_threadsafe`, which aiomqtt makes for each socket it
asks to be watched for writing: during a burst of publishes (a fleet of simulated terminals
reporting, the daemon acknowledging thousands of reports) a Unix socket's buffer fills after a few
hundred such bytes, the signal's byte cannot be written ("Exception ignored when trying to write to
the signal wakeup fd: BlockingIOError") and the signal is lost: the process ignores SIGTERM. A
Python-level handler (`signal.signal`) runs in the main thread between bytecodes whether or not
that byte was written; it hands the stop to the loop with `call_soon_threadsafe`, whose callback is
queued even when its wake-up byte is not.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def on_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], object]) -> Callable[[], None]:
    """Call `stop` in `loop` on SIGTERM or SIGINT (from the main thread); returns the undo."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(stop)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
