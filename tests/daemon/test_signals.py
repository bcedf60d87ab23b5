"""SIGTERM reaches a loop whose self-pipe is full (what a burst of MQTT writes does to it).

With `loop.add_signal_handler` the same sequence loses the signal: the wait below times out.
"""

from __future__ import annotations

import asyncio
import os
import signal

from ebcd.daemon.signals import on_stop_signals


def _fill_self_pipe_then_signal(loop: asyncio.AbstractEventLoop) -> None:
    # each call writes a byte to the loop's self-pipe and the loop does not read it before this
    # callback returns: a few hundred fill a Unix socket's buffer
    for _ in range(20_000):
        loop.call_soon_threadsafe(lambda: None)
    os.kill(os.getpid(), signal.SIGTERM)


async def test_sigterm_stops_even_when_the_self_pipe_is_full() -> None:
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    before = signal.getsignal(signal.SIGTERM)
    undo = on_stop_signals(loop, stopped.set)
    try:
        loop.call_soon(_fill_self_pipe_then_signal, loop)
        await asyncio.wait_for(stopped.wait(), 10)
    finally:
        undo()
    assert signal.getsignal(signal.SIGTERM) == before  # undone when the daemon stops
