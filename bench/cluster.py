"""What the MQTT benchmarks share: districts, a broker or a bridged broker cluster, a simulator
fleet spread over processes and brokers, a watcher of 'done' reports, CPU from /proc.

A broker cluster is what README's "Beyond one process" describes for beyond one machine: K edge
Mosquittos, each holding the connections of a share of the terminals (a Mosquitto needs one file
per connection, and RLIMIT_NOFILE bounds it), each bridged to one core Mosquitto that the daemon and
the bare client connect to. Each bridge carries what terminals publish up (`t/+/report`,
`t/+/presence`, their last wills included) and what the daemon publishes for them down
(`t/+/cmd`, `g/+/cmd`), QoS 1 both ways. Every broker counts what it dropped
(`$SYS/broker/publish/messages/dropped`) and the benches print it.

    python -m bench.cluster done-watch HOST PORT PREFIX COUNT   (the watcher's own process)
"""

from __future__ import annotations

import asyncio
import getpass
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiomqtt

from ebcd.config import shipped_config_path
from ebcd.tiers.generate import generate

TICKS = os.sysconf("SC_CLK_TCK")
VILLAGES_PER_TOWN = 50
TERMINALS_PER_VILLAGE = 10
SHIPPED = 769  # the shipped district, every room on MQTT
FD_HEADROOM = 200  # a broker's own files, listeners, bridges, the daemon's and bench's connections
EDGE_TERMINALS = 15_000  # terminals an edge broker holds, well under the file limit
QUEUED = 1_000_000  # max_queued_messages of every broker: well above one alert's messages
# max_inflight_messages: 0 is no limit; an edge's bridge sends it as its MQTT 5 Receive Maximum,
# and Mosquitto 2.0.11 refuses a bridge that sends 0 or 65535 (protocol error): an edge uses 65534
EDGE_INFLIGHT = 65_534
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def cpu_when_idle(pid: int, quiet_s: float = 0.3, timeout_s: float = 60) -> tuple[float, bool]:
    """The CPU seconds of a process once it has used none (less than a clock tick) for `quiet_s`,
    and whether it got there within `timeout_s` (if not, its CPU at the timeout)."""
    deadline = time.monotonic() + timeout_s
    before = cpu_s(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet_s)
        now = cpu_s(pid)
        if now - before < 1 / TICKS:
            return now, True
        before = now
    return before, False


def file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard one (brokers and simulators inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def edges_for(size: int, edges: str) -> int:
    """Edge brokers for `size` terminals: 0 (one broker, no bridge) when one holds them, else one
    per EDGE_TERMINALS; `edges` a number forces it. SystemExit if a broker would pass the file limit."""
    limit = file_limit()
    k = (
        int(edges)
        if edges != "auto"
        else (0 if size + FD_HEADROOM <= limit else math.ceil(size / EDGE_TERMINALS))
    )
    per_broker = math.ceil(size / max(k, 1))
    if per_broker + FD_HEADROOM > limit:
        raise SystemExit(
            f"{size} terminals over {max(k, 1)} broker(s): {per_broker} connections each, "
            f"RLIMIT_NOFILE here is {limit} (use --edges auto or more)"
        )
    return k


def all_mqtt_shipped(folder: Path) -> Path:
    """The shipped district with its serial and adapter rooms on MQTT (like with like against the
    bare client); returns the config's path."""
    shipped = shipped_config_path()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("ebcd.toml", "terminals.csv"):
        shutil.copy(shipped.parent / name, folder / name)
    rooms = (shipped.parent / "rooms.csv").read_text(encoding="utf-8").splitlines()
    rows = [
        ",".join([*r.split(",")[:4], "mqtt", ""]) if ",serial," in r or ",adapter," in r else r for r in rooms
    ]
    (folder / "rooms.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "ebcd.toml"


def generated(folder: Path, size: int, ack_timeout_s: float) -> Path:
    """A generated district of `size` terminals (50 villages a town, 10 terminals a village), with
    `[delivery] ack_timeout_s` set; returns the config's path."""
    towns, rest = divmod(size, VILLAGES_PER_TOWN * TERMINALS_PER_VILLAGE)
    if rest or not towns:
        raise SystemExit(f"{size}: a generated district has a multiple of 500 terminals (or {SHIPPED})")
    generate(folder, towns, VILLAGES_PER_TOWN, TERMINALS_PER_VILLAGE, config_template=shipped_config_path())
    config_path = folder / "ebcd.toml"
    toml = config_path.read_text(encoding="utf-8")
    assert "ack_timeout_s = 5.0" in toml, (
        "the shipped [delivery] ack_timeout_s moved: update bench/cluster.py"
    )
    config_path.write_text(toml.replace("ack_timeout_s = 5.0", f"ack_timeout_s = {ack_timeout_s}"))
    return config_path


class Broker:
    """One private Mosquitto, logging to a file, publishing $SYS every second."""

    def __init__(self, name: str, folder: Path, extra: str = "", inflight: int = 0) -> None:
        self.name, self.port = name, free_port()
        self.log = folder / f"{name}.log"
        self.conf = folder / f"{name}.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"max_queued_messages {QUEUED}\nmax_inflight_messages {inflight}\nsys_interval 1\n"
            f"log_dest file {self.log}\nlog_type error\nlog_type warning\nlog_type notice\n"
            f"user {getpass.getuser()}\n{extra}"  # as root, stay root: the log is in a private folder
        )
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"mosquitto {self.name} ended ({self.proc.returncode}): see {self.log}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise SystemExit(f"mosquitto {self.name} did not listen on {self.port}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def dropped(self) -> int | None:
        """What this broker counted as dropped ($SYS, updated every second) or its log says; None
        if neither could be read."""
        counted = None
        try:
            async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"bench-sys-{self.name}") as c:
                await c.subscribe("$SYS/broker/publish/messages/dropped")
                async with asyncio.timeout(10):
                    async for m in c.messages:
                        counted = int(m.payload) if isinstance(m.payload, bytes | int) else None
                        break
        except (TimeoutError, aiomqtt.MqttError, ValueError):
            pass
        logged = (
            self.log.read_text(errors="replace").count("are being dropped") if self.log.exists() else None
        )
        if counted is None and logged is None:
            return None
        return max(counted or 0, logged or 0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def bridge_conf(name: str, core_port: int, prefix: str) -> str:
    """An edge's bridge to the core: terminal reports and presence up, commands down, QoS 1."""
    return (
        f"connection {name}\naddress 127.0.0.1:{core_port}\nremote_clientid bench-bridge-{name}\n"
        "bridge_protocol_version mqttv50\ntry_private false\ncleansession true\nrestart_timeout 1\n"
        "notifications true\n"
        f"topic {prefix}/t/+/report out 1\ntopic {prefix}/t/+/presence out 1\n"
        f"topic {prefix}/t/+/cmd in 1\ntopic {prefix}/g/+/cmd in 1\n"
    )


class Brokers:
    """One Mosquitto (edges=0), or `edges` edge Mosquittos bridged to a core one. The daemon and
    the bare client use `core`; simulator share I uses edge I mod K."""

    def __init__(self, folder: Path, district_code: str, edges: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.core = Broker("core", folder)
        prefix = f"ebc/v1/{district_code}"
        self.edges = [
            Broker(f"edge{i}", folder, bridge_conf(f"edge{i}", self.core.port, prefix), EDGE_INFLIGHT)
            for i in range(edges)
        ]

    def __len__(self) -> int:
        return 1 + len(self.edges)

    def describe(self) -> str:
        if not self.edges:
            return "1 Mosquitto"
        return f"{len(self.edges)} edge Mosquittos bridged to 1 core ({len(self)} brokers)"

    async def start(self) -> None:
        await self.core.start()
        if not self.edges:
            return
        async with aiomqtt.Client("127.0.0.1", self.core.port, identifier="bench-bridges") as c:
            await c.subscribe("$SYS/broker/connection/+/state")
            for edge in self.edges:
                await edge.start()
            up: set[str] = set()
            try:
                async with asyncio.timeout(30):
                    async for m in c.messages:
                        if m.payload == b"1":
                            up.add(m.topic.value)
                        if len(up) == len(self.edges):
                            return
            except TimeoutError:
                raise SystemExit(f"{len(up)} of {len(self.edges)} bridges connected to the core") from None

    def url_for(self, share: int) -> str:
        broker = self.edges[share % len(self.edges)] if self.edges else self.core
        return f"mqtt://127.0.0.1:{broker.port}"

    def cpu_s(self) -> float:
        return sum(cpu_s(b.pid) for b in (self.core, *self.edges))

    async def dropped(self) -> str:
        """Per broker, the messages it dropped ("unread" where neither $SYS nor its log answered)."""
        counts = {b.name: await b.dropped() for b in (self.core, *self.edges)}
        return ", ".join(f"{name} {'unread' if n is None else n}" for name, n in counts.items())

    def stop(self) -> None:
        for b in (*self.edges, self.core):
            b.stop()


class Fleet:
    """The simulated terminals: `ebcd simulate --share I/N` children (see simulators.runner.share_of),
    share I connected to the broker `Brokers.url_for(I)`; N at least `processes` and a multiple of
    the edges, so every edge serves the same number of shares. Share I connects from 127.0.0.(2+I):
    paho binds every connection before it connects, so the connections of one address share its
    ephemeral ports (28,232 with the default ip_local_port_range), fewer than 30,000 terminals."""

    def __init__(self, config: Path, brokers: Brokers, processes: int, log: Path) -> None:
        k = max(len(brokers.edges), 1)
        self.shares = math.ceil(max(processes, k) / k) * k
        self.args = [
            [sys.executable, "-m", "ebcd", "simulate", "-c", str(config), "--broker", brokers.url_for(i),
             "--play-time", "0.2", "--log-level", "warning", "--share", f"{i}/{self.shares}",
             "--source-address", f"127.0.0.{2 + i}"]
            for i in range(self.shares)
        ]  # fmt: skip
        self.log = log
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> Fleet:
        with self.log.open("ab") as err:
            self.procs = [subprocess.Popen(a, stdout=subprocess.DEVNULL, stderr=err) for a in self.args]
        return self

    def cpu_s(self) -> float:
        return sum(cpu_s(p.pid) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:  # a child that does not stop is still reported and ended
                print(f"simulator {p.pid} still running 30 s after SIGTERM: killed", file=sys.stderr)
                p.kill()
                p.wait()


class DoneWatch:
    """A separate process subscribed (QoS 0) to every report on the core: it says when `count`
    terminals have reported 'done' for an alert, i.e. when the whole alert, played out, is over.
    Its own process so that its CPU counts neither as the bench's (the bare client's) nor the daemon's."""

    def __init__(self, port: int, prefix: str, count: int) -> None:
        self.args = [sys.executable, "-m", "bench.cluster", "done-watch", "127.0.0.1", str(port), prefix,
                     str(count)]  # fmt: skip
        self.done: dict[str, float] = {}
        self.changed = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise SystemExit(f"the done watcher did not start: {line!r}")
        self.reader = asyncio.create_task(self._read(), name="done-watch")

    async def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.done[line.decode().strip()] = time.perf_counter()
            self.changed.set()

    async def until_done(self, alert_id: str, timeout_s: float) -> float:
        """perf_counter() when the last 'done' of the alert arrived."""
        async with asyncio.timeout(timeout_s):
            while alert_id not in self.done:
                self.changed.clear()
                await self.changed.wait()
        return self.done[alert_id]

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()


async def _done_watch(host: str, port: int, prefix: str, count: int) -> None:
    done: dict[str, set[str]] = {}
    async with aiomqtt.Client(host, port, identifier=f"bench-done-{os.getpid()}") as c:
        await c.subscribe(f"{prefix}/t/+/report", qos=0)
        print("ready", flush=True)
        async for m in c.messages:
            if not isinstance(m.payload, bytes) or b'"done"' not in m.payload:
                continue
            alert = str(json.loads(m.payload).get("alert"))
            terminals = done.setdefault(alert, set())
            terminals.add(m.topic.value.split("/")[4])
            if len(terminals) == count:
                print(alert, flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["done-watch"]:
    host, port, prefix, count = sys.argv[2:6]
    asyncio.run(_done_watch(host, int(port), prefix, int(count)))
