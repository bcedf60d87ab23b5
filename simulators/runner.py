"""`ebcd simulate`: run the simulated terminals of (part of) a district until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import json
import signal
from collections.abc import Sequence
from pathlib import Path

import structlog

from ebcd.config import Config, parse_broker_url
from ebcd.log import log_tasks
from ebcd.model.alert import parse_target
from ebcd.security.bench import verifier_from
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal
from simulators.faults import plan
from simulators.mqtt_fleet import MqttFleet, fleet_login
from simulators.serial_bus import BusFaults, SerialBusSimulator

log = structlog.get_logger("ebcd.simulator")


def select(district: District, only: Sequence[str]) -> list[Terminal]:
    """The terminals named by `--only` targets, or all of them."""
    if not only:
        return list(district.terminals())
    resolution = district.resolve([parse_target(t) for t in only])
    if resolution.unknown:
        raise ValueError(f"--only names nothing in the district: {', '.join(resolution.unknown)}")
    return list(resolution.terminals)


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
) -> int:
    """Run until SIGTERM/SIGINT; return the exit code."""
    terminals = select(district, only)
    fault_plan = plan([t.code for t in terminals], faults, seed)
    if faults_report is not None:
        faults_report.write_text(json.dumps(fault_plan.summary(), indent=1))
    for fault, codes in fault_plan.summary().items():
        log.info("simulator.faults", fault=fault, terminals=len(codes))
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
    )
    faults_on_bus = BusFaults.parse(bus_faults) if bus_faults else BusFaults()
    play_time = config.simulator.play_time_s if play_time_s is None else play_time_s
    chosen = {t.code for t in terminals}
    buses = []
    for village in district.villages():
        on_bus = {t.code: t.bus_address or 0 for t in village.terminals if t.code in chosen}
        if village.link == "serial" and village.port and on_bus:
            bus = SerialBusSimulator(
                on_bus,
                baudrate=config.serial.baudrate,
                play_time_s=play_time,
                faults=faults_on_bus,
                seed=seed,
            )
            buses.append((village.port, bus))
    asyncio.run(_run(fleet, buses))
    return 0


async def _run(fleet: MqttFleet, buses: list[tuple[str, SerialBusSimulator]]) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` dumps every stack
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, log_tasks)  # `kill -USR2`: every task
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for port, bus in buses:
        Path(port).parent.mkdir(parents=True, exist_ok=True)
        await bus.start_pty(link=port)
    if buses:
        log.info(
            "simulator.serial_buses", buses=len(buses), terminals=sum(len(b.terminals) for _, b in buses)
        )
    task = asyncio.create_task(fleet.run(), name="fleet")
    try:
        await stop.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _, bus in buses:
            await bus.close()
    log.info("simulator.stopped", plays=sum(fleet.plays().values()))
