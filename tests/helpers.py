"""Helpers for tests that run the daemon and the simulators in-process, over a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import aiomqtt

from ebcd.config import Config
from ebcd.daemon.daemon import Daemon
from ebcd.protocols.adapter import address as adapter_address
from ebcd.protocols.adapter.frame import SignedData
from ebcd.security.bench import verifier_from
from ebcd.security.signing import Verifier
from ebcd.tiers.district import District
from ebcd.tiers.terminal import Terminal
from simulators.adapter import AdapterFaults, AdapterSimulator
from simulators.faults import FaultPlan
from simulators.mqtt_fleet import MqttFleet, fleet_login, fleet_signers
from simulators.serial_bus import BusFaults, SerialBusSimulator


@contextlib.asynccontextmanager
async def running_daemon(
    config: Config, district: District, broker: str, state_dir: Path, **kwargs: Any
) -> AsyncIterator[Daemon]:
    """A daemon serving until the block ends, connected to the broker."""
    wall_clock = kwargs.pop("wall_clock", None)
    daemon = Daemon(
        config,
        district,
        state_dir=state_dir,
        broker=broker,
        metrics_port=kwargs.pop("metrics_port", -1),
        **kwargs,
    )
    if wall_clock is not None:
        daemon.scheduler.wall_clock = wall_clock
    task = asyncio.create_task(daemon.run(), name="daemon")
    try:
        await asyncio.wait_for(daemon.ready.wait(), 20)
        await asyncio.wait_for(daemon.link.connected.wait(), 20)
        yield daemon
    finally:
        daemon.stop()
        try:
            await asyncio.wait_for(task, 30)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def running_fleet(
    config: Config,
    district: District,
    terminals: Sequence[Terminal],
    host: str,
    port: int,
    plan: FaultPlan | None = None,
    bus_faults: BusFaults | None = None,
    verifier: Verifier | Literal["config"] | None = "config",
    bus_ports: Mapping[str, str] | None = None,
    tls: bool = False,
    adapter_faults: AdapterFaults | None = None,
) -> AsyncIterator[MqttFleet]:
    """Every given terminal simulated on its own link: MQTT ones connected (but the offline ones),
    serial ones on a simulated bus at their room's port, when the block starts.

    `bus_ports` moves the bus of a room (by room code) to another port, e.g. behind a `SerialTap`
    that the room's port then leads to. `tls`: the broker is mqtts://. The terminals log in with
    the config's credentials, as `ebcd simulate` does (`[simulator] credentials_dir`, `[mqtt] ca_file`),
    and sign their reports and presence with the keys of `[simulator] terminal_keys_dir` when it is set."""
    wanted = {t.code for t in terminals}
    sec = config.security
    if verifier == "config":  # the terminals trust what the config says, as `ebcd simulate` does
        verifier = (
            None if sec.scheme == "none" else verifier_from(sec.public_key, sec.scheme, config.base_dir)
        )
    on_mqtt = [t for t in terminals if t.link == "mqtt"]
    tls_context, passwords = fleet_login(config, [t.code for t in on_mqtt], tls=tls)
    fleet = MqttFleet(
        district,
        on_mqtt,
        host,
        port,
        plan=plan or FaultPlan(),
        play_time_s=config.simulator.play_time_s,
        heartbeat_interval_s=config.simulator.heartbeat_interval_s,
        connect_concurrency=100,
        verifier=verifier,
        replay_window_s=sec.replay_window_s,
        tls_context=tls_context,
        passwords=passwords,
        signers=fleet_signers(config, [t.code for t in on_mqtt]),
    )
    async with contextlib.AsyncExitStack() as stack:
        for village in district.villages():
            on_bus = {t.code: t.bus_address or 0 for t in village.terminals if t.code in wanted}
            if village.link != "serial" or not on_bus or village.port is None:
                continue
            bus = SerialBusSimulator(
                on_bus,
                baudrate=config.serial.baudrate,
                play_time_s=config.simulator.play_time_s,
                faults=bus_faults,
                verifier=verifier,
                replay_window_s=sec.replay_window_s,
            )
            await stack.enter_async_context(bus)
            await bus.start_pty(link=(bus_ports or {}).get(village.code, village.port))
            fleet.buses.append(bus)
        for village in district.villages():
            codes = tuple(t.code for t in village.terminals if t.code in wanted)
            if village.link != "adapter" or not codes or village.port is None:
                continue
            listen = config.adapter.listen
            adapter = AdapterSimulator(
                village.code,
                codes,
                adapter_address.parse(village.port),
                None if listen is None else adapter_address.parse(listen, scheme=False),
                verifier,
                variant=SignedData(config.adapter.signed_data),
                play_time_s=config.simulator.play_time_s,
                heartbeat_s=config.adapter.heartbeat_s,
                faults=adapter_faults or AdapterFaults(),
            )
            await adapter.start()
            stack.push_async_callback(adapter.close)
            fleet.adapters.append(adapter)
        task = asyncio.create_task(fleet.run(), name="fleet")
        try:
            await asyncio.wait_for(fleet.started.wait(), 120)
            yield fleet
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.05) -> None:
    """Wait until predicate() is true; fail with a clear message after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def wait_online(daemon: Daemon, count: int, timeout_s: float = 60) -> None:
    """Wait until the daemon has seen `count` terminals' births."""
    await wait_for(lambda: daemon.core.liveness.counts()["online"] >= count, timeout_s)


async def settle(
    daemon: Daemon, alert_id: str, timeout_s: float = 60, *, until: str | None = None
) -> dict[str, Any]:
    """Wait until the alert leaves `dispatching` (or, with `until`, reaches that state or ends);
    return its state document.

    `until="completed"` is for tests that expect every terminal to answer: on a loaded machine the
    in-process fleet may answer after the last attempt timed out, and its late acknowledgements
    turn `partial` into `completed`, as they would for a user watching the state topic."""
    run = daemon.runner.alerts[alert_id]
    if until is None:
        await wait_for(lambda: run.state.value != "dispatching", timeout_s)
    else:
        ends = {"cancelled", "expired", "rejected"}
        await wait_for(lambda: run.state.value == until or run.state.value in ends, timeout_s)
    daemon.runner.flush_states()
    return run.state_doc(daemon.district, daemon.runner.clock())


@contextlib.asynccontextmanager
async def mqtt_client(
    host: str, port: int, *topics: str, retained: bool = False
) -> AsyncIterator[tuple[aiomqtt.Client, list[tuple[str, Any]]]]:
    """An observer collecting messages on `topics` as (topic, JSON) pairs; retained ones only if asked.

    Tests share one broker, so a retained alert state of an earlier test would otherwise show up here.
    """
    seen: list[tuple[str, Any]] = []
    async with aiomqtt.Client(host, port) as client:
        for t in topics:
            await client.subscribe(t, qos=1)

        async def collect() -> None:
            async for m in client.messages:
                if m.retain and not retained:
                    continue
                try:
                    body = json.loads(m.payload if isinstance(m.payload, bytes | str) else b"")
                except ValueError:
                    body = None
                seen.append((m.topic.value, body))

        task = asyncio.create_task(collect(), name="observer")
        try:
            yield client, seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
