"""The control socket's limits: no local user can starve the daemon through it.

A real `ebcd.control.socket.serve` on a real Unix socket, with short timeouts: idle connections are
closed, a watch stream that is sending is not idle, past the cap a client is told `busy` while the
open connections carry on, an oversized line is refused without being buffered, and a flood of
1,100 connections, under the usual limit of 1024 files or with that limit exhausted (EMFILE), leaves
the server answering and the log a few lines long. The floods come from a subprocess, so that the
flooder's sockets do not count against the server's file limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import ValidationError

from ebcd.config import DaemonConfig
from ebcd.control.socket import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    FD_RESERVE,
    MAX_REQUEST_BYTES,
    SOCKET_NAME,
    ControlClient,
    ControlError,
    ControlServer,
    NoDaemon,
    Peer,
    serve,
)
from ebcd.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
FLOOD = 1100
INCIDENT_NOFILE = 1024  # the usual soft limit, under which 1,100 idle connections gave EMFILE
WAIT_S = 20.0  # the longest any condition here may take to come true before the test fails

# Opens N connections to the socket (trying again for `connect_timeout_s` while the backlog is
# full), says how many on stdout, then reports the first line each
# got (or none) once every one has one or `collect_s` has passed, and holds them until stdin
# closes. It raises its own file limit to hold them.
FLOODER = r"""
import json, resource, selectors, socket, sys, time
path, n, connect_timeout_s, collect_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = n + 100
if soft != resource.RLIM_INFINITY and soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
sys.stdin.readline()
socks, failed = [], 0
for _ in range(n):
    deadline = time.monotonic() + connect_timeout_s
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
            socks.append(s)
            break
        except BlockingIOError:  # the backlog is full
            s.close()
            if time.monotonic() >= deadline:
                failed += 1
                break
            time.sleep(0.001)
print(json.dumps({"connected": len(socks), "failed": failed}), flush=True)
sel = selectors.DefaultSelector()
buffers = {}
for s in socks:
    sel.register(s, selectors.EVENT_READ)
    buffers[s] = b""
answers = {}
deadline = time.monotonic() + collect_s
while buffers and time.monotonic() < deadline:
    for key, _ in sel.select(timeout=0.1):
        s = key.fileobj
        try:
            data = s.recv(4096)
        except OSError:
            data = b""
        buffers[s] += data
        if b"\n" in buffers[s] or not data:
            line = buffers.pop(s).split(b"\n")[0]
            error = json.loads(line)["error"] if line else "eof"
            answers[error] = answers.get(error, 0) + 1
            sel.unregister(s)
print(json.dumps({"answers": answers, "silent": len(buffers)}), flush=True)
sys.stdin.readline()
"""


class Handler:
    """`echo` answers the request back; `watch` streams `n` states `gap_s` apart, the last after
    `quiet_s` more; `flood` streams big answers for ever; any other op is refused."""

    def __init__(self) -> None:
        self.flood_released = asyncio.Event()  # the flood stream was closed by the server

    async def __call__(
        self, request: dict[str, Any], peer: Peer
    ) -> dict[str, Any] | AsyncIterator[dict[str, Any]]:
        match request["op"]:
            case "echo":
                return {"echo": request}
            case "watch":
                return self._watch(request["n"], request["gap_s"], request.get("quiet_s", 0.0))
            case "flood":
                return self._flood()
        raise ControlError("unknown_op", f"no op {request['op']!r} here")

    async def _watch(self, n: int, gap_s: float, quiet_s: float) -> AsyncIterator[dict[str, Any]]:
        for i in range(n):
            if i == n - 1:
                await asyncio.sleep(quiet_s)  # the alert changes no more for a while, then settles
            yield {"i": i, "more": i < n - 1}
            await asyncio.sleep(gap_s)

    async def _flood(self) -> AsyncIterator[dict[str, Any]]:
        try:
            while True:
                yield {"pad": "x" * 65536, "more": True}
        finally:
            self.flood_released.set()


@dataclass
class Served:
    path: Path
    server: ControlServer
    metrics: Metrics
    handler: Handler

    def refused(self, reason: str) -> float:
        return self._sample("ebcd_control_refused_total", reason=reason)

    def resource_errors(self, kind: str) -> float:
        return self._sample("ebcd_resource_errors_total", kind=kind)

    def open_gauge(self) -> float:
        return self._sample("ebcd_control_connections")

    def _sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        assert value is not None, (name, labels)
        return value


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for the socket: pytest's tmp_path can exceed the 108 bytes of sun_path."""
    with tempfile.TemporaryDirectory(prefix="ebcd-lim-") as d:
        yield Path(d)


@pytest.fixture
async def start(socket_dir: Path) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """Start a control socket server with the given limits; all of them are closed afterwards."""
    servers: list[ControlServer] = []

    async def _start(**limits: Any) -> Served:
        metrics, handler = Metrics(), Handler()
        path = socket_dir / SOCKET_NAME
        server = await serve(path, handler, metrics=metrics, **limits)
        servers.append(server)
        return Served(path, server, metrics, handler)

    yield _start
    for server in servers:
        server.close_clients()
        server.close()
        await server.wait_closed()


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Wait until `condition()` holds; fail naming `what` if it does not within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():  # noqa: ASYNC110 - counters and gauges have no event to wait on
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None


async def read_all(reader: asyncio.StreamReader) -> list[dict[str, Any]]:
    """Every answer line until the server closes the connection."""
    answers = []
    with contextlib.suppress(ConnectionResetError):
        async with asyncio.timeout(WAIT_S):
            while line := await reader.readline():
                answers.append(json.loads(line))
    return answers


@contextlib.contextmanager
def file_limit(soft: int) -> Iterator[None]:
    """This process's soft RLIMIT_NOFILE set to `soft` for the block."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def open_fds() -> list[int]:
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def limit_leaving_free(free: int) -> int:
    """The soft file limit under which this process can open exactly `free` more descriptors."""
    taken = set(open_fds())
    soft = 0
    while soft - len([fd for fd in taken if fd < soft]) < free:
        soft += 1
    return soft


def need_hard_limit(n: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"the hard file limit ({hard}) is below the {n} files the flood needs")


async def start_flooder(
    path: Path, n: int, *, connect_timeout_s: float, collect_s: float
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        FLOODER,
        str(path),
        str(n),
        str(connect_timeout_s),
        str(collect_s),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def flooder_says(flooder: asyncio.subprocess.Process) -> dict[str, Any]:
    assert flooder.stdout is not None
    async with asyncio.timeout(WAIT_S + 10):
        line = await flooder.stdout.readline()
    assert line, "the flooder died"
    said: dict[str, Any] = json.loads(line)
    return said


async def end_process(proc: asyncio.subprocess.Process) -> None:
    """Close its stdin (what the flooder and the requester wait on) and wait for it to exit."""
    if proc.returncode is None:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            async with asyncio.timeout(WAIT_S):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


# `ControlClient(path).request(op)` made by another process, like the CLI's, when stdin says go.
REQUESTER = """
import asyncio, json, sys
from pathlib import Path
from ebcd.control.socket import ControlClient
sys.stdin.readline()
print(json.dumps(asyncio.run(ControlClient(Path(sys.argv[1])).request(sys.argv[2]))), flush=True)
"""


async def start_requester(path: Path, op: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        REQUESTER,
        str(path),
        op,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )


async def requester_answer(requester: asyncio.subprocess.Process) -> dict[str, Any]:
    assert requester.stdin is not None
    requester.stdin.write(b"go\n")
    async with asyncio.timeout(WAIT_S):
        out, _ = await requester.communicate()
    assert requester.returncode == 0
    answer: dict[str, Any] = json.loads(out)
    return answer


async def still_serves(path: Path) -> None:
    """A normal request on a fresh connection is answered."""
    async with asyncio.timeout(WAIT_S):
        answer = await ControlClient(path).request("echo", n=1)
    assert answer == {"ok": True, "echo": {"op": "echo", "n": 1}}


def control_lines(logs: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if str(e.get("event", "")).startswith("control.")]


def stdlib_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the stdlib loggers said (asyncio's accept loop used to log a traceback per failed accept)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- idle connections ----------------------------------------------------------------------------


async def test_an_idle_connection_is_closed_after_the_timeout(
    start: Callable[..., Awaitable[Served]],
) -> None:
    s = await start(idle_timeout_s=0.3)
    loop = asyncio.get_running_loop()
    opened = loop.time()
    reader, writer = await asyncio.open_unix_connection(str(s.path))
    await eventually(lambda: s.open_gauge() == 1, "the connection is counted open")
    answers = await read_all(reader)
    waited = loop.time() - opened
    writer.close()
    assert [(a["ok"], a["error"]) for a in answers] == [(False, "idle")]
    assert isinstance(answers[0]["message"], str)
    assert 0.3 <= waited < 5
    await eventually(lambda: s.server.connections == 0, "the connection is gone")
    assert (s.refused("idle"), s.open_gauge()) == (1, 0)


async def test_a_half_sent_request_is_idle_too(start: Callable[..., Awaitable[Served]]) -> None:
    """A request line must arrive whole within the timeout: dribbling bytes does not keep it open."""
    s = await start(idle_timeout_s=0.3)
    loop = asyncio.get_running_loop()
    opened = loop.time()
    _, writer = await asyncio.open_unix_connection(str(s.path))
    cut_off = False
    try:
        async with asyncio.timeout(WAIT_S):
            while True:  # a byte every 50 ms, never a newline
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.05)
    except ConnectionError:
        cut_off = True
    writer.close()
    assert cut_off
    assert 0.3 <= loop.time() - opened < 5
    assert s.refused("idle") == 1


async def test_a_client_that_keeps_asking_is_not_idle(start: Callable[..., Awaitable[Served]]) -> None:
    s = await start(idle_timeout_s=0.5)
    reader, writer = await asyncio.open_unix_connection(str(s.path))
    try:
        for i in range(10):  # 10 requests 0.1 s apart: 1 s on one connection, each gap under 0.5 s
            writer.write(json.dumps({"op": "echo", "i": i}).encode() + b"\n")
            await writer.drain()
            answer = json.loads(await reader.readline())
            assert answer == {"ok": True, "echo": {"op": "echo", "i": i}}
            await asyncio.sleep(0.1)
    finally:
        writer.close()
    assert s.refused("idle") == 0


async def test_a_watch_stream_that_is_sending_is_not_idle(start: Callable[..., Awaitable[Served]]) -> None:
    """States every 0.1 s for 0.8 s, then none for 0.6 s (twice the idle timeout) before the last."""
    s = await start(idle_timeout_s=0.3)
    client = ControlClient(s.path)
    states = [a async for a in client.stream("watch", n=9, gap_s=0.1, quiet_s=0.6)]
    assert [a["i"] for a in states] == list(range(9))
    assert states[-1]["more"] is False
    assert s.refused("idle") == s.refused("stalled") == 0


async def test_a_client_that_stops_reading_is_cut_off(start: Callable[..., Awaitable[Served]]) -> None:
    """Answers left unread for the idle timeout: the connection is dropped and its stream closed."""
    s = await start(idle_timeout_s=0.3)
    _, writer = await asyncio.open_unix_connection(str(s.path))
    writer.write(b'{"op":"flood"}\n')
    await writer.drain()
    async with asyncio.timeout(WAIT_S):
        await s.handler.flood_released.wait()
    await eventually(lambda: s.server.connections == 0, "the stalled connection is gone")
    writer.close()
    assert s.refused("stalled") == 1
    await still_serves(s.path)


# -- the connection cap --------------------------------------------------------------------------


async def test_past_the_cap_a_client_is_told_busy(start: Callable[..., Awaitable[Served]]) -> None:
    s = await start(max_connections=3, idle_timeout_s=30)
    held = [await asyncio.open_unix_connection(str(s.path)) for _ in range(3)]
    await eventually(lambda: s.server.connections == 3, "three connections open")
    assert s.open_gauge() == 3

    # the CLI's client gets the answer, in the socket's error shape
    answer = await ControlClient(s.path).request("echo")
    assert answer["ok"] is False
    assert answer["error"] == "busy"
    assert answer["max_connections"] == 3
    assert isinstance(answer["message"], str)
    # so does a raw client that sends nothing, and the connection is closed at once
    reader, writer = await asyncio.open_unix_connection(str(s.path))
    assert [a["error"] for a in await read_all(reader)] == ["busy"]
    writer.close()
    assert s.refused("busy") == 2

    # the connections already open work as before
    for i, (r, w) in enumerate(held):
        w.write(json.dumps({"op": "echo", "i": i}).encode() + b"\n")
        await w.drain()
        assert json.loads(await r.readline()) == {"ok": True, "echo": {"op": "echo", "i": i}}
    # one leaves: a new client is served
    held[0][1].close()
    await eventually(lambda: s.server.connections == 2, "the connection that left is gone")
    await still_serves(s.path)
    for _, w in held[1:]:
        w.close()
    await eventually(lambda: s.open_gauge() == 0, "the gauge is back at 0")


# -- request size --------------------------------------------------------------------------------


async def test_an_oversized_line_is_refused(start: Callable[..., Awaitable[Served]]) -> None:
    s = await start(max_request_bytes=1024)
    reader, writer = await asyncio.open_unix_connection(str(s.path))
    at_limit = b'{"op":"echo","pad":"' + b"p" * (1024 - 22) + b'"}'
    assert len(at_limit) == 1024
    writer.write(at_limit + b"\n" + b"x" * 1025)  # no newline: the server has read all of it
    await writer.drain()
    answers = await read_all(reader)
    writer.close()
    assert [(a["ok"], a.get("error")) for a in answers] == [(True, None), (False, "too_large")]
    assert answers[1]["max_bytes"] == 1024
    assert s.refused("too_large") == 1
    await still_serves(s.path)


async def test_an_endless_line_is_not_buffered(start: Callable[..., Awaitable[Served]]) -> None:
    """64 MiB without a newline: the server refuses and closes long before the client is done."""
    s = await start(max_request_bytes=1024)
    _, writer = await asyncio.open_unix_connection(str(s.path))
    chunk, sent, cut_off = b"y" * 65536, 0, False
    try:
        async with asyncio.timeout(WAIT_S):
            while sent < 64 * 1024 * 1024:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
    except ConnectionError:
        cut_off = True
    writer.close()
    assert cut_off
    # what the socket buffers on both sides held, and the reader's buffer of twice the limit
    assert sent < 8 * 1024 * 1024
    assert s.refused("too_large") == 1
    await still_serves(s.path)


async def test_the_client_does_not_send_what_the_daemon_would_refuse(
    start: Callable[..., Awaitable[Served]],
) -> None:
    s = await start()
    answer = await ControlClient(s.path).request("echo", pad="x" * MAX_REQUEST_BYTES)
    assert (answer["ok"], answer["error"], answer["max_bytes"]) == (False, "too_large", MAX_REQUEST_BYTES)
    assert s.refused("too_large") == 0


# -- floods --------------------------------------------------------------------------------------


async def test_a_flood_under_the_usual_file_limit_leaves_the_server_answering(
    start: Callable[..., Awaitable[Served]], caplog: pytest.LogCaptureFixture
) -> None:
    """The incident: 1,100 idle connections with a soft limit of 1024 files. The cap holds the
    server far below it; the flood is told `busy` or closed as idle, the CLI gets an answer
    throughout, and the log says so in a few lines."""
    need_hard_limit(FLOOD + 200)
    if limit_leaving_free(400) > INCIDENT_NOFILE:
        pytest.skip("this process has too many files open to run under a limit of 1024")
    s = await start(idle_timeout_s=3.0)  # the default cap (64)
    flooder = await start_flooder(s.path, FLOOD, connect_timeout_s=5.0, collect_s=WAIT_S)
    try:
        with structlog.testing.capture_logs() as logs, file_limit(INCIDENT_NOFILE):
            assert flooder.stdin is not None
            flooder.stdin.write(b"go\n")
            assert await flooder_says(flooder) == {"connected": FLOOD, "failed": 0}
            # the CLI is answered at once, while the flood holds every slot
            assert (await ControlClient(s.path).request("echo"))["error"] == "busy"
            said = await flooder_says(flooder)
            # every connection got its answer: busy at once, or idle after the timeout
            assert said["silent"] == 0
            assert said["answers"]["busy"] + said["answers"]["idle"] == FLOOD
            assert said["answers"]["idle"] >= DEFAULT_MAX_CONNECTIONS
            await eventually(lambda: s.server.connections == 0, "the flood's connections are gone")
            await still_serves(s.path)
    finally:
        await end_process(flooder)
    assert s.refused("busy") == said["answers"]["busy"] + 1
    assert s.refused("idle") == said["answers"]["idle"]
    assert s.resource_errors("emfile") == 0
    lines = control_lines(logs)
    assert 2 <= len(lines) <= 4, lines  # busy once, idle once, each with what it held back
    assert {(e["event"], e["reason"]) for e in lines} == {
        ("control.refused", "busy"),
        ("control.refused", "idle"),
    }
    assert stdlib_lines(caplog) == []


async def test_a_flood_that_exhausts_the_file_limit_is_survived(
    start: Callable[..., Awaitable[Served]], caplog: pytest.LogCaptureFixture
) -> None:
    """No cap to protect it and 30 free descriptors: accept fails with EMFILE. The server backs off
    instead of spinning, logs it once, and answers again once the flood goes."""
    need_hard_limit(FLOOD + 200)
    s = await start(max_connections=100_000, idle_timeout_s=30.0)
    # connects that find the backlog full give up at once
    flooder = await start_flooder(s.path, FLOOD, connect_timeout_s=0.0, collect_s=0.0)
    requester = await start_requester(s.path, "echo")  # started now: pipes take descriptors
    try:
        with structlog.testing.capture_logs() as logs, file_limit(limit_leaving_free(30)):
            assert flooder.stdin is not None
            flooder.stdin.write(b"go\n")
            said = await flooder_says(flooder)
            assert said["connected"] > 30
            await eventually(lambda: s.resource_errors("emfile") >= 1, "accept meets EMFILE")
            # Measured over 1.5 s of EMFILE: the accept attempts (backing off from 0.1 s, doubling)
            # and the CPU the process spends. Spinning would be thousands of attempts and 1.5 s.
            errors, cpu_s = s.resource_errors("emfile"), time.process_time()
            await asyncio.sleep(1.5)
            assert s.resource_errors("emfile") - errors <= 6
            assert time.process_time() - cpu_s < 0.5
            await flooder_says(flooder)  # its (empty) report: then it holds until told to go
            await end_process(flooder)
            # the server frees what the flood held and answers, still under the exhausted limit, a
            # client in another process (this one has no descriptor to spare until the server
            # has drained its backlog)
            assert await requester_answer(requester) == {"ok": True, "echo": {"op": "echo"}}
    finally:
        await end_process(flooder)
        await end_process(requester)
    failed = [e for e in control_lines(logs) if e["event"] == "control.accept_failed"]
    assert len(failed) == 1, failed  # once per LOG_INTERVAL_S, however many attempts
    assert (failed[0]["error"], failed[0]["suppressed"]) == ("EMFILE", 0)
    assert len(control_lines(logs)) <= 3, control_lines(logs)
    assert stdlib_lines(caplog) == []


# -- closing, and the numbers the design rests on ------------------------------------------------


async def test_close_ends_idle_connections_and_lets_a_request_finish(
    start: Callable[..., Awaitable[Served]],
) -> None:
    s = await start(idle_timeout_s=30)
    idle_reader, idle_writer = await asyncio.open_unix_connection(str(s.path))
    stream = ControlClient(s.path).stream("watch", n=3, gap_s=0.1)
    first = await anext(stream)
    await eventually(lambda: s.server.connections == 2, "both connections open")
    s.server.close()
    assert await read_all(idle_reader) == []  # closed now, not after 30 s
    idle_writer.close()
    assert [first["i"]] + [a["i"] async for a in stream] == [0, 1, 2]
    async with asyncio.timeout(WAIT_S):
        await s.server.wait_closed()
    with pytest.raises(NoDaemon):
        await ControlClient(s.path).request("echo")


async def test_a_cap_near_the_file_limit_is_warned_about_at_start(
    start: Callable[..., Awaitable[Served]],
) -> None:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no file limit")
    with structlog.testing.capture_logs() as logs:
        await start(max_connections=soft)
    assert [e["event"] for e in control_lines(logs)] == ["control.file_limit_low"]


def test_the_config_defaults_are_the_sockets() -> None:
    daemon = DaemonConfig()
    assert daemon.control_idle_timeout_s == DEFAULT_IDLE_TIMEOUT_S
    assert daemon.control_max_connections == DEFAULT_MAX_CONNECTIONS


def test_no_accepted_cap_breaches_the_units_file_limit() -> None:
    """LimitNOFILE= leaves FD_RESERVE descriptors beside the largest cap the config accepts."""
    unit = (ROOT / "systemd/ebcd.service").read_text().splitlines()
    [limit] = [int(line.partition("=")[2]) for line in unit if line.startswith("LimitNOFILE=")]
    with pytest.raises(ValidationError):
        DaemonConfig(control_max_connections=limit - FD_RESERVE + 1)
    assert DEFAULT_MAX_CONNECTIONS + FD_RESERVE <= INCIDENT_NOFILE <= limit
