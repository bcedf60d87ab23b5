"""Carrying commands to serial rooms: one bus master per village room's port.

Every answer a terminal gives reaches the engine through the bus master's own callbacks. What
this adds is the word when a command cannot go out on a bus at all (its port is down or gone, the
room has no bus master, the master stopped, the frame cannot carry the command): `on_failed`
receives the alert, its revision, the terminals missed and the cause, so that the cause reaches
the alert's report instead of a bare "no acknowledgement".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from ebcd.metrics import Metrics
from ebcd.protocols.messages import Command
from ebcd.protocols.serial.bus import BusClosedError, BusDownError, SerialBusMaster
from ebcd.protocols.serial.frame import FrameError
from ebcd.tiers.terminal import Terminal

log = structlog.get_logger("ebcd.transport")

OnFailed = Callable[[str, int, list[str], str], None]  # (alert id, revision, terminal codes, cause)


class SerialTransport:
    """Commands to serial rooms: one bus master per village room's port."""

    name = "serial"

    def __init__(self, masters: dict[str, SerialBusMaster], metrics: Metrics, on_failed: OnFailed) -> None:
        self._masters = masters  # room code -> its bus master
        self._metrics = metrics
        self._on_failed = on_failed
        self._jobs: set[asyncio.Task[None]] = set()

    def send(self, cmd: Command, terminals: Sequence[Terminal], *, first: bool) -> None:
        """Queue `cmd` on the bus of each room; the bus master reports every answer itself."""
        by_room: dict[str, list[str]] = {}
        for t in terminals:
            by_room.setdefault(t.room, []).append(t.code)
        for room, codes in by_room.items():
            master = self._masters.get(room)
            if master is not None:
                self._metrics.commands.labels("serial").inc()
            # a task even for a failure: on_failed never runs inside the caller's own send()
            task = asyncio.create_task(self._dispatch(room, master, cmd, codes), name=f"serial-{room}")
            self._jobs.add(task)
            task.add_done_callback(self._jobs.discard)

    async def _dispatch(
        self, room: str, master: SerialBusMaster | None, cmd: Command, codes: list[str]
    ) -> None:
        if master is None:
            log.error("serial.no_bus", room=room, terminals=len(codes))
            self._failed(cmd, codes, f"room {room} has no serial bus")
            return
        try:
            outcome = await master.dispatch(cmd, codes)
        except BusDownError as e:
            log.warning("serial.bus_down", alert_id=cmd.alert_id, port=master.url, cause=e.cause)
            self._failed(cmd, list(e.terminals), e.cause)
            return
        except BusClosedError as e:
            log.warning("serial.bus_closed", alert_id=cmd.alert_id, port=master.url, error=str(e))
            self._failed(cmd, codes, str(e))
            return
        except FrameError as e:  # a command the frame format cannot carry: our bug, never silent
            log.error("serial.cannot_encode", alert_id=cmd.alert_id, port=master.url, error=str(e))
            self._metrics.dropped.labels("serial_encode").inc()
            self._failed(cmd, codes, f"the command cannot be carried in a serial frame: {e}")
            return
        if outcome.unanswered:
            log.info(
                "serial.unanswered",
                alert_id=cmd.alert_id,
                port=master.url,
                terminals=list(outcome.unanswered),
            )

    def _failed(self, cmd: Command, codes: list[str], cause: str) -> None:
        if not codes:
            return
        try:
            self._on_failed(cmd.alert_id, cmd.revision, codes, cause)
        except Exception:  # a failing consumer must not break the transport: logged with its traceback
            log.exception("serial.on_failed_callback", alert_id=cmd.alert_id, cause=cause)

    async def close(self) -> None:
        """Cancel the dispatches still queued."""
        for task in list(self._jobs):
            task.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
