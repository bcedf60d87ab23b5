"""The demo's own MQTT broker: Mosquitto when the machine has it, else amqtt in this process.

Mosquitto is the broker a real district runs and holds the demo's 574 MQTT terminals without
effort; amqtt is pure Python, needs nothing installed, speaks MQTT 3.1.1 only and shares the
demo's event loop, so it is the fallback, not the default.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
SBIN = "/usr/sbin:/usr/local/sbin"  # where Debian puts it, often off a user's PATH


def find_mosquitto() -> str | None:
    """The Mosquitto binary on PATH or in the sbin folders, if installed."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path=SBIN)


class DemoBroker:
    """A broker on 127.0.0.1:`port` for one demo; `describe()` says which one it is."""

    def __init__(self, port: int, folder: Path, *, embedded: bool = False) -> None:
        self.port, self.folder = port, folder
        self.log = folder / "mosquitto.log"
        self.binary = None if embedded else find_mosquitto()
        self.proc: subprocess.Popen[bytes] | None = None
        self._amqtt: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def speaks_v5(self) -> bool:
        return self.binary is not None

    def describe(self) -> str:
        if self.binary is not None:
            return f"Mosquitto ({self.binary}) on {self.url}, log in {self.log}"
        return f"embedded MQTT broker (amqtt, MQTT 3.1.1) on {self.url}"

    async def start(self) -> None:
        if self.binary is None:
            self._amqtt = await start_amqtt(self.port)
            return
        conf = self.folder / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            # the daemon's burst to 574 terminals at once: nothing queued is dropped
            "max_queued_messages 100000\nmax_inflight_messages 0\n"
            # started as root, Mosquitto would turn into the `mosquitto` user: stay who we are
            f"user {getpass.getuser()}\n"
            "log_type error\nlog_type warning\nconnection_messages false\n"
        )
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603, ASYNC220 - returns at once; waited on below
                [self.binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"ebcd demo: mosquitto exited with {self.proc.returncode}; see {self.log}"
                    " (or run with --embedded-broker)"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return
        self.proc.kill()
        raise SystemExit(f"ebcd demo: mosquitto did not listen on {self.port} within {START_TIMEOUT_S:.0f} s")

    async def stop(self) -> None:
        if self._amqtt is not None:
            await self._amqtt.shutdown()
            self._amqtt = None
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()


async def start_amqtt(port: int) -> Any:
    """amqtt listening on 127.0.0.1:`port`, in this process's event loop."""
    from amqtt.broker import Broker

    for name in ("amqtt", "transitions"):  # clients leaving at the end make it log PUBACK time-outs
        logging.getLogger(name).setLevel(logging.CRITICAL)
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "max_connections": 5000}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
    )
    await broker.start()
    return broker
