"""`ebcd demo`: an embedded broker, the daemon, every simulated terminal and a district-wide test alert.

The daemon and the simulators run as child processes, exactly as `ebcd run` and `ebcd simulate`;
the demo talks to the daemon through its control socket like the duty officer's CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from ebcd.cli.broker import DemoBroker
from ebcd.cli.render import follow, print_report
from ebcd.config import load_config
from ebcd.control.socket import SOCKET_NAME, ControlClient, NoDaemon
from ebcd.tiers.loader import load_district

console = Console(stderr=True)
TEST_TEXT = "应急广播系统测试，请勿惊慌。This is a test of the district emergency broadcasting system."
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0  # the daemon's own shutdown grace is 10 s


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(
    *, config_path: Path, broker: str | None, faults: str, state_dir: Path | None, embedded: bool = False
) -> int:
    """Run the whole demonstration; 0 when every reachable terminal acknowledged.

    Without `broker`, the demo starts its own: Mosquitto when installed, else (or with
    `embedded`) amqtt inside this process."""
    config = load_config(config_path)
    district = load_district(config)
    work = state_dir or Path(tempfile.mkdtemp(prefix="ebcd-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]ebcd demo[/]: {config.district.name}, {len(district.towns)} towns, "
        f"{sum(len(t.villages) for t in district.towns.values())} villages, {len(district)} terminals"
    )
    console.print(f"logs, journal and simulated serial buses in {work}")
    return asyncio.run(_demo(config_path, broker, faults, work, len(district), embedded))


async def _demo(
    config_path: Path, broker: str | None, faults: str, work: Path, terminals: int, embedded: bool
) -> int:
    own = None
    if broker is None:
        own = DemoBroker(free_port(), work, embedded=embedded)
        await own.start()
        broker = own.url
        console.print(f"MQTT broker: {own.describe()}")
    procs: list[subprocess.Popen[bytes]] = []
    run_dir = (work / "serial").absolute()  # this demo's buses: never another run's
    web = f"127.0.0.1:{free_port()}"  # the wall screen's page, on for the demo
    try:
        base = [sys.executable, "-m", "ebcd"]
        procs.append(
            _spawn(
                [
                    *base,
                    "run",
                    "-c",
                    str(config_path),
                    "--broker",
                    broker,
                    "--state-dir",
                    str(work),
                    "--metrics-port",
                    "0",
                    "--run-dir",
                    str(run_dir),
                    "--web-listen",
                    web,
                    # amqtt speaks MQTT 3.1.1 only; any other broker gets the config's choice
                    *(["--mqtt-protocol", "3.1.1"] if own is not None and not own.speaks_v5 else []),
                ],
                work / "daemon.log",
            )
        )
        client = ControlClient(work / SOCKET_NAME)
        # the daemon first: it hears every terminal's birth, instead of waiting for its next heartbeat
        await _wait_daemon(client, procs)
        procs.append(
            _spawn(
                [
                    *base,
                    "simulate",
                    "-c",
                    str(config_path),
                    "--broker",
                    broker,
                    "--faults",
                    faults,
                    "--play-time",
                    "0.5",
                    "--run-dir",
                    str(run_dir),
                ],
                work / "simulate.log",
            )
        )
        online = await _wait_online(client, terminals, procs)
        console.print(f"the duty room's wall screen: http://{web}/ (ebcd top --state-dir {work})")
        console.print(f"{online} of {terminals} terminals online; sending a district-wide test alert")
        answer = await client.request(
            "send",
            alert={
                "level": 4,
                "event_type": "00000",
                "targets": [{"kind": "all"}],
                "text": TEST_TEXT,
                "test": True,
                "ttl_s": 600,
            },
        )
        if not answer.get("ok"):
            console.print(f"[red]the daemon refused the test alert: {answer.get('message')}")
            return 2
        alert_id = answer["id"]
        t0 = time.monotonic()
        final = await asyncio.to_thread(follow, client, alert_id, answer["state"], quiet=False)
        took = time.monotonic() - t0
        report = await client.request("report", id=alert_id)
        if report.get("problems"):
            print_report(report)
        missed_online = [p for p in report.get("problems", []) if p["liveness"] == "online"]
        console.print(
            f"{final['acked']} of {final['targets']} terminals acknowledged in {took:.2f} s; "
            f"{len(report.get('problems', []))} without acknowledgement, {len(missed_online)} of them online"
        )
        return 0 if final["state"] == "completed" or (final["acked"] and not missed_online) else 3
    finally:
        await _stop(procs)
        if own is not None:
            await own.stop()


async def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every child and wait for them without blocking the loop: an embedded broker
    serves the daemon's last words (its retained `offline` status) from this very loop."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            await asyncio.wait_for(asyncio.to_thread(p.wait), STOP_TIMEOUT_S)
        except TimeoutError:
            what = " ".join(str(a) for a in p.args[3:5])  # type: ignore[index]
            console.print(f"[yellow]{what} did not stop within {STOP_TIMEOUT_S:.0f} s of SIGTERM; killed")
            p.kill()


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)  # noqa: S603


def _check_alive(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is not None:
            what = " ".join(str(a) for a in p.args[3:5])  # type: ignore[index]
            raise SystemExit(f"ebcd demo: {what} exited with {p.returncode}; see its log")


async def _wait_daemon(client: ControlClient, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with console.status("starting the daemon"):
        while time.monotonic() < deadline:
            _check_alive(procs)
            with contextlib.suppress(NoDaemon, OSError):
                if (await client.request("terminals")).get("ok"):
                    return
            await asyncio.sleep(0.2)
    raise SystemExit(f"ebcd demo: the daemon did not answer within {START_TIMEOUT_S:.0f} s; see its log")


async def _wait_online(client: ControlClient, expected: int, procs: list[subprocess.Popen[bytes]]) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    online, last_change, last = 0, time.monotonic(), -1
    with console.status("starting the simulated terminals") as status:
        while time.monotonic() < deadline:
            _check_alive(procs)
            with contextlib.suppress(NoDaemon, OSError):
                answer = await client.request("terminals")
                online = sum(1 for t in answer.get("terminals", []) if t["state"] == "online")
                status.update(f"{online} of {expected} terminals online")
                if online != last:
                    last, last_change = online, time.monotonic()
                if online >= expected or (online and time.monotonic() - last_change > 5):
                    return online
            await asyncio.sleep(0.3)
    return online
