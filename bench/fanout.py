#!/usr/bin/env python3
"""Fan-out benchmark: `alert send` to the last acknowledgement through a real Mosquitto, at the
shipped district (769 terminals, every room on MQTT) and a generated one of 10,000.

Per size: one private Mosquitto (or, past one broker's file limit, edge brokers bridged to a core:
bench/cluster.py), and per daemon configuration a fresh simulator fleet (`ebcd simulate --share I/N`
children: 1 process at 769, 4 at 10,000) and `ebcd run`, separate processes as deployed. N
district-wide alerts go through the control socket; printed per configuration: the median and
spread of send-to-last-ack time; the daemon's CPU seconds (from /proc) from send to the last ack
and for the whole alert (send to the last 'done' report, when every terminal has played it out);
and both ratios to the baseline of the same size in the same run: a bare aiomqtt client that
publishes one QoS 1 command per terminal and collects one QoS 1 report per terminal (what any MQTT
fan-out costs at minimum). The CPU ratio is of CPU to the last ack (the bare client's terminals
refuse its unsigned commands, so it has no 'done' to wait for). Prints figures; asserts nothing.

    python -m bench.fanout [--sizes 769,10000] [--configs bare,journal,nojournal,mqtt311] [--runs 10]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

from bench.cluster import (
    SHIPPED,
    Brokers,
    DoneWatch,
    Fleet,
    all_mqtt_shipped,
    cpu_s,
    cpu_when_idle,
    edges_for,
    free_port,
    generated,
)
from ebcd.config import load_config
from ebcd.control.socket import SOCKET_NAME, ControlClient
from ebcd.tiers.loader import load_district

__all__ = ["free_port", "measure_bare", "send_until_all_acked", "wait_socket"]

# name -> (journal, MQTT protocol of ebcd)
DAEMONS = {"journal": (True, "5"), "nojournal": (False, "5"), "mqtt311": (True, "3.1.1")}
LABELS = {
    "journal": "ebcd, journal on",
    "nojournal": "ebcd, journal off",
    "mqtt311": "ebcd, journal on, MQTT 3.1.1",
    "bare": "bare aiomqtt fan-out (baseline)",
}


async def send_all(client: ControlClient, text: str = "benchmark") -> str:
    """A district-wide test alert through the control socket; its id."""
    answer = await client.request(
        "send",
        alert={"level": 4, "event_type": "00000", "test": True, "targets": [{"kind": "all"}], "text": text},
    )
    return str(answer["id"])


async def until_acked(client: ControlClient, alert_id: str, count: int) -> None:
    async for update in client.stream("watch", id=alert_id):
        if update["state"]["acked"] >= count:
            return


async def send_until_all_acked(client: ControlClient, terminals: int) -> str:
    """A district-wide test alert through the control socket, followed until `terminals` acked it."""
    alert = await send_all(client)
    await until_acked(client, alert, terminals)
    return alert


async def wait_socket(client: ControlClient, online: int, timeout: float = 120) -> None:
    """Until the daemon answers and sees `online` terminals online (SystemExit after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            t = await client.request("terminals")
            if sum(1 for x in t["terminals"] if x["state"] == "online") >= online:
                return
        except Exception:  # noqa: BLE001, S110  (not up yet)
            pass
        await asyncio.sleep(0.3 if online < 2000 else 1.0)
    raise SystemExit(f"daemon or simulators did not come up: fewer than {online} terminals online")


def online_timeout_s(terminals: int) -> float:
    return max(120.0, terminals / 50)


async def measure_daemon(
    broker: str, work: Path, runs: int, journal: bool, terminals: int, config: Path, protocol: str,
    watch: DoneWatch,
) -> dict[str, float]:  # fmt: skip
    state = work / f"state-{'journal' if journal else 'nojournal'}-{protocol}"
    args = [sys.executable, "-m", "ebcd", "run", "-c", str(config), "--broker", broker,
            "--state-dir", str(state), "--metrics-port", "-1", "--log-level", "warning",
            "--mqtt-protocol", protocol]  # fmt: skip
    if not journal:
        args.append("--no-journal")
    with (work / "daemon.log").open("ab") as err:
        daemon = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
    try:
        client = ControlClient(state / SOCKET_NAME)
        await wait_socket(client, terminals, online_timeout_s(terminals))
        times, cpus, done_times, done_cpus = [], [], [], []
        for _ in range(runs):
            c0 = cpu_s(daemon.pid)
            t0 = time.perf_counter()
            alert = await send_until_all_acked(client, terminals)
            times.append(time.perf_counter() - t0)
            cpus.append(cpu_s(daemon.pid) - c0)
            done_times.append(await watch.until_done(alert, 60 + terminals / 100) - t0)
            cpu, idle = await cpu_when_idle(daemon.pid)
            done_cpus.append(cpu - c0)
            if not idle:
                print("the daemon did not go idle within 60 s of the last 'done'", file=sys.stderr)
        return {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "cpu_s": statistics.median(cpus),
            "done_s": statistics.median(done_times),
            "done_cpu_s": statistics.median(done_cpus),
        }
    finally:
        daemon.terminate()
        daemon.wait(60)


async def measure_bare(
    host: str, port: int, district_code: str, codes: list[str], runs: int
) -> dict[str, float]:
    """A bare aiomqtt fan-out: one command per terminal topic, wait for one report per terminal.

    The commands are unsigned, so verifying terminals answer with a refusal: one report each all
    the same, which is what this baseline counts (the same messages, minus the signing). A first,
    untimed round waits (up to a timeout) until every terminal has answered once: the fleet is up.
    """
    logging.getLogger("mqtt").setLevel(logging.ERROR)  # aiomqtt's "There are N pending publish calls."
    times, cpus = [], []
    async with aiomqtt.Client(host, port, identifier="bench-bare", max_inflight_messages=200) as c:
        await c.subscribe(f"ebc/v1/{district_code}/t/+/report", qos=1)

        async def fan_out(alert: str, seq: int, timeout_s: float) -> None:
            payload = (
                f'{{"v":1,"op":"play","alert":"{alert}","ebmid":"{"0" * 35}","rev":1,"seq":{seq},'
                '"level":4,"event":"00000","text":"bench","ttl_s":60}'
            ).encode()
            sem = asyncio.Semaphore(200)

            async def pub(code: str) -> None:
                async with sem:
                    await c.publish(f"ebc/v1/{district_code}/t/{code}/cmd", payload, qos=1)

            await asyncio.gather(*(pub(code) for code in codes))
            acked: set[str] = set()
            try:
                async with asyncio.timeout(timeout_s):
                    async for m in c.messages:
                        if alert.encode() in (m.payload if isinstance(m.payload, bytes) else b""):
                            acked.add(m.topic.value.split("/")[4])
                            if len(acked) == len(codes):
                                return
            except TimeoutError:
                raise SystemExit(
                    f"bare fan-out {alert}: {len(acked)} of {len(codes)} terminals answered"
                ) from None

        await fan_out("bare-warm", 0, online_timeout_s(len(codes)))
        for i in range(1, runs + 1):
            c0, t0 = time.process_time(), time.perf_counter()
            await fan_out(f"bare-{i}", i, 60 + len(codes) / 100)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            await asyncio.sleep(1.0)  # the broker's and the terminals' work of this round is over
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "cpu_s": statistics.median(cpus),
    }


async def measure_size(size: int, opts: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    folder = work / f"d{size}"
    if size == SHIPPED:
        config_path, processes = all_mqtt_shipped(folder), 1
    else:
        config_path, processes = generated(folder, size, opts.ack_timeout), opts.processes
    district = load_district(load_config(config_path))
    codes = [t.code for t in district.terminals() if t.link == "mqtt"]
    brokers = Brokers(folder, district.code, edges_for(len(codes), opts.edges))
    await brokers.start()
    broker = f"mqtt://127.0.0.1:{brokers.core.port}"
    watch = DoneWatch(brokers.core.port, f"ebc/v1/{district.code}", len(codes))
    await watch.start()
    # fresh simulated terminals for each daemon: a daemon without its journal starts its command
    # sequence afresh, and terminals that heard another daemon would refuse it as a replay
    fleet: Fleet | None = None
    results: dict[str, dict[str, float]] = {}
    try:
        for name in opts.configs:
            if name == "bare":
                continue
            journal, protocol = DAEMONS[name]
            if fleet is not None:
                fleet.stop()
            fleet = Fleet(config_path, brokers, processes, folder / "sim.log").start()
            print(f"[{size}] {LABELS[name]} ...", file=sys.stderr, flush=True)
            results[name] = await measure_daemon(
                broker, folder, opts.runs, journal, len(codes), config_path, protocol, watch
            )
        if "bare" in opts.configs:  # on the last daemon's fleet (its terminals refuse unsigned commands)
            fleet = fleet or Fleet(config_path, brokers, processes, folder / "sim.log").start()
            print(f"[{size}] {LABELS['bare']} ...", file=sys.stderr, flush=True)
            results["bare"] = await measure_bare(
                "127.0.0.1", brokers.core.port, district.code, codes, opts.runs
            )
        dropped = await brokers.dropped()
    finally:
        await watch.stop()
        if fleet is not None:
            fleet.stop()
        brokers.stop()
    print(
        f"\n{len(district)} terminals ({len(codes)} on MQTT), {brokers.describe()}, simulators in "
        f"{fleet.shares if fleet else 0} process(es), {opts.runs} alerts each, {os.cpu_count()} cores; "
        f"messages the brokers dropped: {dropped}"
    )
    base = results.get("bare")
    print(
        f"{'configuration':34} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7} "
        f"{'time/bare':>9} {'cpu/bare':>9} {'done s':>7} {'cpu done s':>10}"
    )
    for name, r in results.items():
        ratios = (
            f"{r['median_s'] / base['median_s']:9.2f} {r['cpu_s'] / base['cpu_s']:9.2f}"
            if base
            else f"{'-':>9} {'-':>9}"
        )
        done = f"{r['done_s']:7.3f} {r['done_cpu_s']:10.3f}" if "done_s" in r else f"{'-':>7} {'-':>10}"
        print(
            f"{LABELS[name]:34} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} {r['cpu_s']:7.3f} "
            f"{ratios} {done}"
        )
    print(
        "cpu s: the daemon's CPU from send to the last ack (the bare client's own, for the baseline); "
        "cpu/bare uses it. done s: to the last 'done' report (the whole alert, played out); cpu done s: "
        "to the daemon idle (no CPU tick in 0.3 s) after it."
    )
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--sizes", default=f"{SHIPPED},10000", help=f"{SHIPPED} (shipped) or multiples of 500"
    )
    parser.add_argument(
        "--configs", default="journal,nojournal,mqtt311,bare", help="of journal,nojournal,mqtt311,bare"
    )
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--processes", type=int, default=4, help="simulator processes of a generated district"
    )
    parser.add_argument("--edges", default="auto", help="edge brokers: auto (past the file limit) or K")
    parser.add_argument(
        "--ack-timeout", type=float, default=30.0, help="generated districts' [delivery] ack_timeout_s"
    )
    opts = parser.parse_args()
    opts.configs = [c.strip() for c in opts.configs.split(",")]
    unknown = set(opts.configs) - set(LABELS)
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="ebcd-bench-"))
    for size in (int(s) for s in opts.sizes.split(",")):
        await measure_size(size, opts, work)


if __name__ == "__main__":
    asyncio.run(main())
