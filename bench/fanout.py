#!/usr/bin/env python3
"""Fan-out benchmark: `alert send` to the last of 769 acknowledgements through a real Mosquitto.

Starts a private Mosquitto, `ebcd simulate` and `ebcd run` as separate processes (as deployed),
sends N district-wide alerts through the control socket and prints, per configuration:
the median and spread of send-to-last-ack time, and the daemon's CPU seconds per alert (from
/proc). Baseline in the same run: a bare aiomqtt client that publishes one QoS 1 command per
terminal and collects one QoS 1 ack per terminal from the same simulators' broker (what any
MQTT fan-out costs at minimum). Prints figures; asserts nothing.

    python bench/fanout.py [--runs 10] [--no-journal-too]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

from ebcd.config import load_config, shipped_config_path
from ebcd.control.socket import SOCKET_NAME, ControlClient
from ebcd.tiers.loader import load_district

TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def send_until_all_acked(client: ControlClient, terminals: int) -> None:
    """A district-wide test alert through the control socket, followed until `terminals` acked it."""
    answer = await client.request(
        "send",
        alert={
            "level": 4,
            "event_type": "00000",
            "test": True,
            "targets": [{"kind": "all"}],
            "text": "benchmark",
        },
    )
    async for update in client.stream("watch", id=answer["id"]):
        if update["state"]["acked"] == terminals:
            break


async def wait_socket(client: ControlClient, online: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            t = await client.request("terminals")
            if sum(1 for x in t["terminals"] if x["state"] == "online") >= online:
                return
        except Exception:  # noqa: BLE001, S110  (not up yet)
            pass
        await asyncio.sleep(0.3)
    raise SystemExit("daemon or simulators did not come up")


async def measure_daemon(
    broker: str, work: Path, runs: int, journal: bool, terminals: int, config: Path, protocol: str = "5"
) -> dict[str, float]:
    state = work / f"state-{'journal' if journal else 'nojournal'}-{protocol}"
    args = [
        sys.executable,
        "-m",
        "ebcd",
        "run",
        "-c",
        str(config),
        "--broker",
        broker,
        "--state-dir",
        str(state),
        "--metrics-port",
        "-1",
        "--log-level",
        "warning",
        "--mqtt-protocol",
        protocol,
    ]
    if not journal:
        args.append("--no-journal")
    daemon = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=(work / "daemon.log").open("ab"))
    try:
        client = ControlClient(state / SOCKET_NAME)
        await wait_socket(client, terminals)
        times, cpus = [], []
        for _ in range(runs):
            c0 = cpu_s(daemon.pid)
            t0 = time.perf_counter()
            await send_until_all_acked(client, terminals)
            times.append(time.perf_counter() - t0)
            cpus.append(cpu_s(daemon.pid) - c0)
            await asyncio.sleep(1.0)  # let the 'done' reports of this alert pass
        return {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "cpu_s": statistics.median(cpus),
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)


async def measure_bare(
    host: str, port: int, district_code: str, codes: list[str], runs: int
) -> dict[str, float]:
    """A bare aiomqtt fan-out: one command per terminal topic, wait for one report per terminal.

    The commands are unsigned, so verifying terminals answer with a refusal: one report each all
    the same, which is what this baseline counts (the same messages, minus the signing).
    """
    times, cpus = [], []
    async with aiomqtt.Client(host, port, identifier="bench-bare", max_inflight_messages=200) as c:
        await c.subscribe(f"ebc/v1/{district_code}/t/+/report", qos=1)
        for i in range(runs):
            alert = f"bare-{i}"
            payload = (
                f'{{"v":1,"op":"play","alert":"{alert}","ebmid":"{"0" * 35}","rev":1,"seq":{i},'
                '"level":4,"event":"00000","text":"bench","ttl_s":60}'
            ).encode()
            c0, t0 = time.process_time(), time.perf_counter()
            sem = asyncio.Semaphore(200)

            async def pub(code: str, payload: bytes = payload, sem: asyncio.Semaphore = sem) -> None:
                async with sem:
                    await c.publish(f"ebc/v1/{district_code}/t/{code}/cmd", payload, qos=1)

            await asyncio.gather(*(pub(code) for code in codes))
            acked: set[str] = set()
            async for m in c.messages:
                if alert.encode() in (m.payload if isinstance(m.payload, bytes) else b""):
                    acked.add(m.topic.value.split("/")[4])
                    if len(acked) == len(codes):
                        break
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            await asyncio.sleep(1.0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "cpu_s": statistics.median(cpus),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--no-journal-too", action="store_true", help="also measure with the journal off")
    parser.add_argument("--mqtt311-too", action="store_true", help="also measure ebcd speaking MQTT 3.1.1")
    parser.add_argument(
        "--all-mqtt", action="store_true", help="the shipped district, serial and adapter rooms on MQTT"
    )
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ebcd-bench-"))
    config_path = shipped_config_path()
    if opts.all_mqtt:  # every terminal on MQTT, to compare like with like against the bare baseline
        for name in ("ebcd.toml", "terminals.csv"):
            shutil.copy(config_path.parent / name, work / name)
        rooms = (config_path.parent / "rooms.csv").read_text(encoding="utf-8").splitlines()
        rows = [
            ",".join([*r.split(",")[:4], "mqtt", ""]) if ",serial," in r or ",adapter," in r else r
            for r in rooms
        ]
        (work / "rooms.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        config_path = work / "ebcd.toml"
    config = load_config(config_path)
    district = load_district(config)
    mqtt_codes = [t.code for t in district.terminals() if t.link == "mqtt"]
    port = free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
    )
    mosq = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    broker = f"mqtt://127.0.0.1:{port}"
    sim_args = [sys.executable, "-m", "ebcd", "simulate", "-c", str(config_path), "--broker", broker,
                "--play-time", "0.2", "--log-level", "warning"]  # fmt: skip

    def start_sims() -> subprocess.Popen[bytes]:
        # fresh simulated terminals for each daemon: a daemon without its journal starts its command
        # sequence afresh, and terminals that heard another daemon would refuse it as a replay
        return subprocess.Popen(sim_args, stdout=subprocess.DEVNULL, stderr=(work / "sim.log").open("ab"))

    sims = start_sims()
    try:
        results = {
            "ebcd, journal on": await measure_daemon(
                broker, work, opts.runs, True, len(district), config_path
            )
        }
        if opts.no_journal_too:
            sims.send_signal(signal.SIGTERM)
            sims.wait(30)
            sims = start_sims()
            results["ebcd, journal off"] = await measure_daemon(
                broker, work, opts.runs, False, len(district), config_path
            )
        if opts.mqtt311_too:
            sims.send_signal(signal.SIGTERM)
            sims.wait(30)
            sims = start_sims()
            results["ebcd, journal on, MQTT 3.1.1"] = await measure_daemon(
                broker, work, opts.runs, True, len(district), config_path, "3.1.1"
            )
        results["bare aiomqtt fan-out (baseline)"] = await measure_bare(
            "127.0.0.1", port, district.code, mqtt_codes, opts.runs
        )
    finally:
        sims.send_signal(signal.SIGTERM)
        sims.wait(30)
        mosq.terminate()
    base = results["bare aiomqtt fan-out (baseline)"]
    print(
        f"{len(district)} terminals ({len(mqtt_codes)} on MQTT), {opts.runs} alerts each, "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'configuration':34} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7} "
        f"{'time/base':>9} {'cpu/base':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:34} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} {r['cpu_s']:7.3f} "
            f"{r['median_s'] / base['median_s']:9.2f} {r['cpu_s'] / base['cpu_s']:9.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
