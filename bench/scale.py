#!/usr/bin/env python3
"""Scale benchmark: generated districts of 10,000 terminals and more, all on MQTT, one machine.

    python -m bench.scale [--sizes 10000,30000,50000] [--runs 3] [--processes 4] [--edges auto|K]

For each size: a generated district (50 villages a town, 10 terminals a village, as `ebcd topology
generate` writes it), private brokers (bench/cluster.py: one Mosquitto while one holds every
connection under RLIMIT_NOFILE, else K edge Mosquittos of at most 15,000 terminals bridged to one
core; `--edges K` forces K), `ebcd simulate --share I/N` children each connected to its edge, and
`ebcd run` on the core (journal on, MQTT 5). Prints, per size: which brokers it used and what they
dropped; the ledger load alone; the daemon's start-up (process start to its control socket
answering, and to every terminal's birth seen); the time from `alert send` to the last terminal
acknowledged (= latency of the last ack) and its ratio to a bare aiomqtt fan-out at the same size,
same brokers, same run; the daemon's CPU per acknowledgement (send to the last ack) against the bare
client's, and its CPU to idle after the last 'done'; its resident memory (now and peak); and
recovery: the daemon killed with SIGKILL mid-alert, restarted at once, the time from the kill to
serving again and to the first command it re-sends. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from bench.cluster import Brokers, DoneWatch, Fleet, cpu_s, cpu_when_idle, edges_for, generated
from bench.fanout import measure_bare, send_all, until_acked
from ebcd.config import load_config
from ebcd.control.socket import SOCKET_NAME, ControlClient
from ebcd.tiers.loader import load_district


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def progress(size: int, what: str, seconds: float) -> None:
    print(f"[{size}] {what}: {seconds:.2f} s", file=sys.stderr, flush=True)


async def until_answers(client: ControlClient, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            await client.request("list")
            return
        except Exception:  # noqa: BLE001, S110  (not up yet)
            pass
        await asyncio.sleep(0.01)
    raise SystemExit("the daemon did not answer on its control socket")


async def until_online(client: ControlClient, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        t = await client.request("terminals")
        if sum(1 for x in t["terminals"] if x["state"] == "online") >= count:
            return
        await asyncio.sleep(1.0)
    raise SystemExit(f"fewer than {count} terminals came online")


class Daemon:
    """`ebcd run` as a separate process, as deployed."""

    def __init__(self, config: Path, broker: str, state: Path, log: Path) -> None:
        self.args = [sys.executable, "-m", "ebcd", "run", "-c", str(config), "--broker", broker,
                     "--state-dir", str(state), "--metrics-port", "-1", "--log-level", "warning",
                     "--mqtt-protocol", "5"]  # fmt: skip
        self.log = log
        self.client = ControlClient(state / SOCKET_NAME)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=err)
        return time.perf_counter()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class RecoveryFailed(Exception):
    """The restarted daemon did not resume the alert: said in the table, not a crash of the bench."""


class CommandWatch:
    """A bare client on every command topic: when each command of an alert was seen, and its seq."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.host, self.port, self.prefix = host, port, prefix
        self.seen: list[tuple[float, str, int]] = []  # (time, alert, seq)
        self.ready = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(self.host, self.port, identifier="bench-scale-watch") as c:
            await c.subscribe(f"{self.prefix}/t/+/cmd", qos=0)
            await c.subscribe(f"{self.prefix}/g/+/cmd", qos=0)
            self.ready.set()
            async for m in c.messages:
                body = json.loads(m.payload if isinstance(m.payload, bytes) else b"{}")
                self.seen.append((time.perf_counter(), str(body.get("alert")), int(body.get("seq", 0))))


async def measure_size(size: int, opts: argparse.Namespace, work: Path) -> dict[str, Any] | str:
    try:
        edges = edges_for(size, opts.edges)
    except SystemExit as e:
        return f"skipped: {e}"
    folder = work / f"d{size}"
    config_path = generated(folder, size, opts.ack_timeout)
    t0 = time.perf_counter()
    district = load_district(load_config(config_path))
    ledger_s = time.perf_counter() - t0
    codes = [t.code for t in district.terminals()]
    brokers = Brokers(folder, district.code, edges)
    await brokers.start()
    port = brokers.core.port
    sims = Fleet(config_path, brokers, opts.processes, folder / "sim.log").start()
    watch = DoneWatch(port, f"ebc/v1/{district.code}", size)
    await watch.start()
    daemon = Daemon(config_path, f"mqtt://127.0.0.1:{port}", folder / "state", folder / "daemon.log")
    out: dict[str, Any] = {"terminals": size, "ledger_s": ledger_s, "brokers": brokers.describe()}
    out["shares"] = sims.shares
    try:
        t_start = daemon.start()
        await until_answers(daemon.client)
        out["startup_s"] = time.perf_counter() - t_start
        progress(size, "serving", time.perf_counter() - t_start)
        await until_online(daemon.client, size, max(300.0, size / 50))
        out["all_online_s"] = time.perf_counter() - t_start
        progress(size, "all online", time.perf_counter() - t_start)
        times, cpus, done_cpus, sim_cpus, broker_cpus = [], [], [], [], []
        for i in range(opts.runs):
            c0, s0, b0, t0 = cpu_s(daemon.pid), sims.cpu_s(), brokers.cpu_s(), time.perf_counter()
            alert = await send_all(daemon.client, f"scale {i}")
            await until_acked(daemon.client, alert, size)
            times.append(time.perf_counter() - t0)
            cpus.append(cpu_s(daemon.pid) - c0)
            sim_cpus.append(sims.cpu_s() - s0)
            broker_cpus.append(brokers.cpu_s() - b0)
            progress(size, "alert acked", times[-1])
            await watch.until_done(alert, 60 + size / 100)
            done_cpu, _ = await cpu_when_idle(daemon.pid)
            done_cpus.append(done_cpu - c0)
        out["median_s"], out["max_s"] = statistics.median(times), max(times)
        out["cpu_s"], out["done_cpu_s"] = statistics.median(cpus), statistics.median(done_cpus)
        out["sim_cpu_s"], out["broker_cpu_s"] = statistics.median(sim_cpus), statistics.median(broker_cpus)
        out["rss_mb"], out["peak_rss_mb"] = rss_mb(daemon.pid)
        progress(size, "daemon CPU to idle after the last 'done'", out["done_cpu_s"])
        try:
            out.update(await measure_recovery(daemon, district.code, port, size))
            progress(size, "kill -9 to the first re-send", out["recovery_resend_s"])
        except RecoveryFailed as e:  # the figures above still stand: print them with the failure
            out["recovery_failed"] = str(e)
            progress(size, f"recovery failed: {e}", 0.0)
        daemon.stop()
        try:
            out["bare"] = await measure_bare("127.0.0.1", port, district.code, codes, opts.runs)
            progress(size, "bare fan-out", out["bare"]["median_s"])
        except SystemExit as e:  # not every terminal answered the bare client: no baseline at this size
            out["bare_failed"] = str(e)
            progress(size, f"bare fan-out failed: {e}", 0.0)
        out["dropped"] = await brokers.dropped()
    finally:
        daemon.stop()
        await watch.stop()
        sims.stop()
        brokers.stop()
    return out


async def measure_recovery(daemon: Daemon, district_code: str, port: int, size: int) -> dict[str, float]:
    """Kill the daemon with a tenth of an alert acknowledged; restart it; time to serving and re-send."""
    watch = CommandWatch("127.0.0.1", port, f"ebc/v1/{district_code}")
    task = asyncio.create_task(watch.run(), name="watch")
    try:
        await asyncio.wait_for(watch.ready.wait(), 30)
        alert = await send_all(daemon.client, "scale recovery")
        await until_acked(daemon.client, alert, size // 10)
        killed = time.perf_counter()
        daemon.kill()
        before = max((seq for _, a, seq in watch.seen if a == alert), default=0)
        daemon.start()
        await until_answers(daemon.client)
        serving = time.perf_counter() - killed
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            resent = [t for t, a, seq in watch.seen if a == alert and seq > before and t > killed]
            if resent:
                break
            await asyncio.sleep(0.01)
        else:
            raise RecoveryFailed(f"nothing re-sent within 60 s (serving after {serving:.2f} s)")
        await until_acked(daemon.client, alert, size)
        return {"recovery_serving_s": serving, "recovery_resend_s": min(resent) - killed}
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,30000,50000", help="terminals, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=4, help="simulator processes (at least one an edge)")
    parser.add_argument("--edges", default="auto", help="edge brokers: auto (past the file limit) or K")
    parser.add_argument(
        "--ack-timeout", type=float, default=30.0, help="[delivery] ack_timeout_s (shipped: 5, for 769)"
    )
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ebcd-scale-"))
    print(
        f"{os.cpu_count()} cores, journal on, MQTT 5, {opts.runs} alerts each, "
        f"{opts.processes} simulator processes (at least one an edge)",
        flush=True,
    )
    for size in (int(s) for s in opts.sizes.split(",")):
        report(size, await measure_size(size, opts, work))


def report(size: int, r: dict[str, Any] | str) -> None:
    """One size's figures, printed as soon as they are measured."""
    if isinstance(r, str):
        print(f"{size:9} {r}", flush=True)
        return
    print(
        f"{size:9} terminals on {r['brokers']}, simulators in {r['shares']} processes; CPU seconds "
        f"during one alert to its last ack: daemon {r['cpu_s']:.2f} ({r['done_cpu_s']:.2f} to idle after "
        f"the last 'done'), simulators {r['sim_cpu_s']:.2f}, Mosquitto {r['broker_cpu_s']:.2f}; bare "
        f"client {r['bare']['cpu_s'] if 'bare' in r else r['bare_failed']}; "
        f"messages the brokers dropped: {r['dropped']}"
    )
    print(
        f"{'terminals':>9} {'ledger s':>8} {'start s':>7} {'online s':>8} {'last ack s':>10} {'bare s':>7} "
        f"{'time/bare':>9} {'ms cpu/ack':>10} {'bare':>6} {'cpu/bare':>8} {'RSS MB':>7} {'peak MB':>7} "
        f"{'kill->serve s':>13} {'kill->resend s':>14}"
    )
    b = r.get("bare")
    bare_s = f"{b['median_s']:7.3f} {r['median_s'] / b['median_s']:9.2f}" if b else f"{'-':>7} {'-':>9}"
    no = f"{'-':>6} {'-':>8}"
    bare_cpu = f"{1000 * b['cpu_s'] / size:6.3f} {r['cpu_s'] / b['cpu_s']:8.2f}" if b else no
    print(
        f"{size:9} {r['ledger_s']:8.2f} {r['startup_s']:7.2f} {r['all_online_s']:8.1f} "
        f"{r['median_s']:10.3f} {bare_s} {1000 * r['cpu_s'] / size:10.3f} {bare_cpu} {r['rss_mb']:7.0f} "
        f"{r['peak_rss_mb']:7.0f} "
        + (
            f"{r['recovery_serving_s']:13.2f} {r['recovery_resend_s']:14.2f}"
            if "recovery_failed" not in r
            else f"recovery failed: {r['recovery_failed']}"
        ),
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
