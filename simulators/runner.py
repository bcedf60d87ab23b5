"""`ebcd simulate`: run the simulated terminals of (part of) a district until SIGTERM.

A serial room's simulated bus is a pty whose slave end is linked at the room's port. The folders
holding those links are this run's: each is locked (`BusDirLock`) for as long as it runs, so a
second simulator refuses to start on them instead of taking the buses over, and on the way out
this one removes only what it made (its own links, its lock file, folders it created and left
empty). Ports that are devices (`/dev/...`) or pyserial URLs (`socket://...`) are not simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import faulthandler
import fcntl
import json
import os
import signal
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog

from ebcd.config import Config, parse_broker_url
from ebcd.daemon.signals import on_stop_signals
from ebcd.log import log_tasks
from ebcd.model.alert import parse_target
from ebcd.protocols.adapter import address as adapter_address
from ebcd.protocols.adapter.frame import SignedData
from ebcd.security.bench import verifier_from
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal
from simulators.adapter import AdapterFaults, AdapterSimulator
from simulators.faults import plan
from simulators.mqtt_fleet import MqttFleet, fleet_login, fleet_signers
from simulators.serial_bus import BusFaults, SerialBusSimulator

log = structlog.get_logger("ebcd.simulator")

LOCK_FILE_NAME = ".ebcd-simulate.lock"
DEVICE_DIR = Path("/dev")


class BusDirError(Exception):
    """A folder for simulated buses cannot be used (held by another simulator, not ours, unwritable)."""


class BusDirBusyError(BusDirError):
    """Another live simulator holds the folder."""


class BusDirLock:
    """This process's hold on one folder of simulated buses: a file with our pid, under flock.

    The kernel drops a flock when its holder dies, so the lock file of a killed simulator never
    blocks the next one; a live holder makes `acquire` raise BusDirBusyError naming its pid.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # folders this lock made, outermost first

    def acquire(self) -> None:
        """Make the folder if need be, check it is ours, and lock it; BusDirError if it cannot be."""
        try:
            self._created = _make_dirs(self.directory)
            info = os.lstat(self.directory)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
                what = f"belongs to uid {info.st_uid}"
                if not stat.S_ISDIR(info.st_mode):
                    what = "is not a plain folder (a symlink?)"
                raise BusDirError(f"serial bus folder {self.directory} {what}; pass --run-dir DIR")
            self._fd = self._lock()
        except OSError as e:
            self._remove_created()
            raise BusDirError(f"serial bus folder {self.directory}: {e.strerror or e}") from None
        except BusDirError:
            self._remove_created()
            raise

    def _lock(self) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise BusDirBusyError(
                    f"another ebcd simulate (pid {holder}) holds the serial buses in {self.directory}; "
                    "stop it, or give this one its own --run-dir DIR"
                ) from None
            if _same_file(fd, self.path):  # not a file its last holder unlinked as we opened it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and the folders this lock made (if left empty); let go of the lock."""
        if self._fd is None:
            return
        if _same_file(self._fd, self.path):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for directory in reversed(self._created):
            with contextlib.suppress(OSError):  # not empty: something else lives there now
                directory.rmdir()
        self._created = []


def _make_dirs(directory: Path) -> list[Path]:
    """Create a folder and its missing parents; the ones this call created, outermost first."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        created.append(folder)
    return created


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


@contextlib.contextmanager
def holding(directories: Sequence[Path]) -> Iterator[None]:
    """Hold every folder of simulated buses for the block; BusDirError if one is not to be had."""
    with contextlib.ExitStack() as stack:
        for directory in sorted(set(directories)):
            lock = BusDirLock(directory)
            lock.acquire()
            stack.callback(lock.release)
        yield


def simulated_link(port: str) -> bool:
    """Whether a room's port is a path the simulator may link a pty at (not a device or a URL)."""
    if "://" in port:
        return False
    path = Path(port).absolute()
    return DEVICE_DIR not in path.parents


def select(district: District, only: Sequence[str]) -> list[Terminal]:
    """The terminals named by `--only` targets, or all of them."""
    if not only:
        return list(district.terminals())
    resolution = district.resolve([parse_target(t) for t in only])
    if resolution.unknown:
        raise ValueError(f"--only names nothing in the district: {', '.join(resolution.unknown)}")
    return list(resolution.terminals)


def parse_share(text: str) -> tuple[int, int]:
    """`I/N` (0 <= I < N) as (I, N); ValueError saying what is wrong."""
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise ValueError(f"--share {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(index), int(count)


def share_of(terminals: Sequence[Terminal], share: tuple[int, int] | None) -> list[Terminal]:
    """The terminals process I of N simulates: every N-th MQTT terminal from the I-th; process 0
    also runs every serial bus and adapter room (their folders and ports are held by one process)."""
    if share is None:
        return list(terminals)
    index, count = share
    mqtt = [t for t in terminals if t.link == "mqtt"]
    rest = [t for t in terminals if t.link != "mqtt"] if index == 0 else []
    return mqtt[index::count] + rest


def run_simulators(
    config: Config,
    district: District,
    *,
    broker: str | None,
    only: Sequence[str],
    faults: str,
    seed: int,
    play_time_s: float | None,
    faults_report: Path | None,
    bus_faults: str = "",
    adapter_faults: str = "",
    share: tuple[int, int] | None = None,
    source_addresses: Sequence[str] = (),
) -> int:
    """Run until SIGTERM/SIGINT; return the exit code. With `share` (I, N): only this process's share."""
    everyone = select(district, only)
    fault_plan = plan([t.code for t in everyone], faults, seed)  # the same faults however many processes
    terminals = share_of(everyone, share)
    if share is not None:
        log.info(
            "simulator.share", share=f"{share[0]}/{share[1]}", terminals=len(terminals), of=len(everyone)
        )
    if faults_report is not None and (share is None or share[0] == 0):
        faults_report.write_text(json.dumps(fault_plan.summary(), indent=1))
    mine = {t.code for t in terminals}
    for fault, codes in fault_plan.summary().items():
        log.info("simulator.faults", fault=fault, terminals=sum(1 for c in codes if c in mine))
    host, port, tls = parse_broker_url(broker or config.mqtt.broker)
    mqtt_terms = [t for t in terminals if t.link == "mqtt"]
    tls_context, passwords = fleet_login(config, [t.code for t in mqtt_terms], tls=tls)
    log.info(
        "simulator.login",
        tls=tls,
        credentials=config.simulator.credentials_dir if passwords is not None else None,
        terminals=len(mqtt_terms),
    )
    sec = config.security
    verifier = None if sec.scheme == "none" else verifier_from(sec.public_key, sec.scheme, config.base_dir)
    signers = fleet_signers(config, [t.code for t in mqtt_terms])
    if signers is not None:
        log.info("simulator.signing", signed=len(signers), unsigned=len(mqtt_terms) - len(signers))
    fleet = MqttFleet(
        district,
        mqtt_terms,
        host,
        port,
        plan=fault_plan,
        play_time_s=config.simulator.play_time_s if play_time_s is None else play_time_s,
        heartbeat_interval_s=config.simulator.heartbeat_interval_s,
        connect_concurrency=config.simulator.connect_concurrency,
        verifier=verifier,
        replay_window_s=sec.replay_window_s,
        tls_context=tls_context,
        passwords=passwords,
        signers=signers,
        source_addresses=source_addresses,
    )
    faults_on_bus = BusFaults.parse(bus_faults) if bus_faults else BusFaults()
    play_time = config.simulator.play_time_s if play_time_s is None else play_time_s
    chosen = {t.code for t in terminals}
    buses = []
    for village in district.villages():
        on_bus = {t.code: t.bus_address or 0 for t in village.terminals if t.code in chosen}
        if village.link == "serial" and village.port and on_bus:
            if not simulated_link(village.port):
                log.warning("simulator.port_not_simulated", room=village.code, port=village.port)
                continue
            bus = SerialBusSimulator(
                on_bus,
                baudrate=config.serial.baudrate,
                play_time_s=play_time,
                faults=faults_on_bus,
                seed=seed,
            )
            buses.append((village.port, bus))
    adapters = _adapters(config, district, chosen, play_time, AdapterFaults.parse(adapter_faults), seed)
    with holding([Path(port).absolute().parent for port, _ in buses]):
        asyncio.run(_run(fleet, buses, adapters))
    return 0


def _adapters(
    config: Config, district: District, chosen: set[str], play_time_s: float, faults: AdapterFaults, seed: int
) -> list[AdapterSimulator]:
    """A simulated adapter for every adapter room with a chosen terminal (AddressError if one is bad)."""
    sec, ac = config.security, config.adapter
    if not any(v.link == "adapter" for v in district.villages()):
        return []
    verifier = None if sec.scheme == "none" else verifier_from(sec.public_key, sec.scheme, config.base_dir)
    listener = None if ac.listen is None else adapter_address.parse(ac.listen, scheme=False)
    if listener is None:
        log.warning("simulator.adapter_no_listener", hint="[adapter] listen unset: no heartbeats or reports")
    out = []
    for village in district.villages():
        codes = tuple(t.code for t in village.terminals if t.code in chosen)
        if village.link != "adapter" or not codes or village.port is None:
            continue
        out.append(
            AdapterSimulator(
                village.code,
                codes,
                adapter_address.parse(village.port),
                listener,
                verifier,
                variant=SignedData(ac.signed_data),
                play_time_s=play_time_s,
                heartbeat_s=ac.heartbeat_s,
                faults=faults,
                seed=seed,
            )
        )
    return out


async def _run(
    fleet: MqttFleet, buses: list[tuple[str, SerialBusSimulator]], adapters: list[AdapterSimulator]
) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` dumps every stack
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, log_tasks)  # `kill -USR2`: every task
    stop = asyncio.Event()
    undo_signals = on_stop_signals(asyncio.get_running_loop(), stop.set)
    task: asyncio.Task[None] | None = None
    try:
        for port, bus in buses:
            await bus.start_pty(link=port)
        if buses:
            log.info(
                "simulator.serial_buses",
                buses=len(buses),
                terminals=sum(len(b.terminals) for _, b in buses),
                folders=sorted({str(Path(port).parent) for port, _ in buses}),
            )
        for adapter in adapters:
            await adapter.start()
        if adapters:
            log.info(
                "simulator.adapters", adapters=len(adapters), terminals=sum(len(a.codes) for a in adapters)
            )
        task = asyncio.create_task(fleet.run(), name="fleet")
        await stop.wait()
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _, bus in buses:
            await bus.close()
        for adapter in adapters:
            await adapter.close()
        undo_signals()
    log.info("simulator.stopped", plays=sum(fleet.plays().values()))
