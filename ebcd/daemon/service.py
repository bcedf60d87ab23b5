"""Running the daemon as a service: asyncio loop, systemd notification, exit codes."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
from pathlib import Path

import structlog

from ebcd import log as logsetup
from ebcd.admission.authority import AuthorityError
from ebcd.config import Config
from ebcd.daemon import sdnotify
from ebcd.daemon.daemon import Daemon
from ebcd.security.mqtt_auth import MqttAuthError
from ebcd.security.signing import SecurityError
from ebcd.tiers.district import District

log = structlog.get_logger("ebcd.service")


def run_daemon(
    config: Config,
    district: District,
    *,
    broker: str | None,
    state_dir: Path | None,
    metrics_port: int | None,
    journal: bool = True,
) -> int:
    """Run until SIGTERM; 0 on a clean stop, 1 if the daemon failed."""
    directory = state_dir or Path(config.daemon.state_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        log.error(
            "daemon.state_dir_not_writable",
            state_dir=str(directory),
            hint="run as the ebcd user, or pass --state-dir DIR",
        )
        return 1
    try:
        daemon = Daemon(
            config, district, state_dir=directory, broker=broker, metrics_port=metrics_port, journal=journal
        )
    except MqttAuthError as e:  # a password, CA, certificate or key file of [mqtt]
        log.error("daemon.mqtt_credentials", error=str(e))
        return 1
    except AuthorityError as e:  # [[upstream.senders]] or [[operators]]
        log.error("daemon.authority", error=str(e))
        return 1
    except SecurityError as e:
        log.error("daemon.signing_key", error=str(e))
        return 1
    except ValueError as e:  # [web]: listen beyond localhost without token_file
        log.error("daemon.web", error=str(e))
        return 1
    try:
        asyncio.run(_serve(daemon))
    except Exception:
        log.exception("daemon.failed")
        return 1
    return 0


async def _serve(daemon: Daemon) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` dumps every stack to stderr
    # `kill -USR2` logs every asyncio task and what it awaits
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, logsetup.log_tasks)
    notifier = sdnotify.Notifier.from_env()

    async def watchdog() -> None:
        interval = sdnotify.watchdog_interval_s()
        if interval is None:
            return
        while True:
            await asyncio.sleep(interval / 2)
            notifier.send("WATCHDOG=1")

    def ready() -> None:
        notifier.send(f"READY=1\nSTATUS=serving {len(daemon.district)} terminals\nMAINPID={os.getpid()}")

    wd = asyncio.create_task(watchdog(), name="watchdog")
    stop_watch = asyncio.create_task(_notify_stopping(daemon, notifier), name="notify-stopping")
    try:
        await daemon.run(on_ready=ready)
    finally:
        wd.cancel()
        stop_watch.cancel()


async def _notify_stopping(daemon: Daemon, notifier: sdnotify.Notifier) -> None:
    await daemon.stopping.wait()
    notifier.send("STOPPING=1")
