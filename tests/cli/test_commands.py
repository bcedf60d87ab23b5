"""The duty officer's CLI against a running daemon and simulated terminals, as real subprocesses.

One daemon (`ebcd run`) and one simulator process (`ebcd simulate --only town:…`, the 103 MQTT
terminals of 桃溪镇) serve the whole module. The daemon runs on a copy of the shipped config with
short acknowledgement timers, so an alert that cannot complete ends `partial` in about 2 s, not 30.
Commands that never reach the daemon (input refused up front, topology, frame decoding) run
in-process through typer's CliRunner. One in-process test replays a race in the daemon's `watch`
(what `--wait` follows): its last answer must be the settled state.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from ebcd.cli.commands import app
from ebcd.config import Config
from ebcd.control.socket import SOCKET_NAME, Peer
from ebcd.model.alert import AlertRequest
from ebcd.model.events import TEST_EVENT
from ebcd.protocols.serial.frame import BroadcastStart, Frame, encode_frame
from ebcd.tiers.district import District
from ebcd.tiers.loader import load_district
from tests.conftest import ROOT, Mosquitto, fast_config
from tests.helpers import running_daemon, wait_for

SHIPPED = ROOT / "config" / "ebcd.toml"
TOWN_AREA = "341523104000"  # 桃溪镇: every one of its villages is on MQTT
TOWN_CODE = "53415231040000314010101"
UNSIMULATED_TOWN = "53415231050000314010101"  # 万佛湖镇: no simulator answers for it
ALERT_ID = re.compile(r"^\d{8}-\d{4}$")
STATES = {"pending_approval", "dispatching", "completed", "partial", "cancelled", "expired", "rejected"}
START_TIMEOUT_S = 90.0
COMMAND_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0

# Timers for the daemon under test: ack timeout 1 s, two attempts -> a hopeless alert settles in ~2.5 s.
# Simulated terminals heartbeat every 2 s, so one whose birth the daemon missed is online soon after.
FAST_TIMERS = {
    "ack_timeout_s": "1.0",
    "max_attempts": "2",
    "retry_initial_s": "0.2",
    "retry_max_s": "0.5",
    "state_publish_interval_s": "0.1",
    "play_time_s": "0.2",
    "heartbeat_interval_s": "2.0",
    "terminal_heartbeat_s": "2.0",
}


def fast_config_file(directory: Path) -> Path:
    """The shipped config with short timers, written to `directory` with its ledgers.

    The serial rooms' ports move into `directory` too (where nothing listens), so this daemon never
    opens the ptys of a serial simulator another run may have in its run directory.
    """
    text = SHIPPED.read_text(encoding="utf-8")
    for key, value in FAST_TIMERS.items():
        text, n = re.subn(rf"(?m)^{key}\s*=\s*[^#\n]*", f"{key} = {value} ", text)
        assert n == 1, f"{key} not found once in {SHIPPED}"
    rooms = (SHIPPED.parent / "rooms.csv").read_text(encoding="utf-8")
    rooms, n = re.subn(r",\{run_dir\}/", f",{directory}/no-serial/", rooms)
    assert n == 19, "the shipped serial rooms moved: update this test"
    (directory / "rooms.csv").write_text(rooms, encoding="utf-8")
    shutil.copyfile(SHIPPED.parent / "terminals.csv", directory / "terminals.csv")
    path = directory / "ebcd.toml"
    path.write_text(text, encoding="utf-8")
    return path


def ask(sock: Path, op: str, **args: Any) -> dict[str, Any]:
    """One request on the daemon's control socket, without asyncio (fixtures here are synchronous)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    answer: dict[str, Any] = json.loads(buf)
    return answer


@dataclass
class Cli:
    """The running daemon and simulators, and a way to run `ebcd` commands against them."""

    config: Path
    state_dir: Path
    daemon: subprocess.Popen[bytes]
    daemon_log: Path
    sim_log: Path
    simulated: set[str]
    sims: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.state_dir / SOCKET_NAME

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`ebcd ARGS --state-dir DIR -c CONFIG` against this daemon."""
        return ebcd(*args, "--state-dir", str(self.state_dir), "-c", str(self.config))

    def json(self, *args: str) -> Any:
        """Run a command with --json, expect exit 0 and JSON only on stdout."""
        done = self.run(*args, "--json")
        assert done.returncode == 0, _explain(done)
        return json.loads(done.stdout)

    def send(
        self, target: str, *extra: str, text: str = "桃溪镇例行测试广播"
    ) -> subprocess.CompletedProcess[str]:
        return self.run(
            "alert", "send", "--level", "4", "--event", TEST_EVENT, "--target", target, "--text", text,
            "--test", *extra,
        )  # fmt: skip

    def logs(self) -> str:
        daemon, sims = _read(self.daemon_log)[-3000:], _read(self.sim_log)[-3000:]
        return f"--- daemon log\n{daemon}\n--- simulator log\n{sims}"


def ebcd(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ebcd ARGS` as the duty officer would type it."""
    return subprocess.run(
        [sys.executable, "-m", "ebcd", *args],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        cwd=ROOT,
        env=_env(),
        check=False,
    )


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NO_COLOR": "1"}


def _explain(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}"


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ebcd", *args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=_env()
        )


def _poll(cli: Cli, what: str, predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for name, proc in (("daemon", cli.daemon), ("simulators", cli.sims)):
            if proc is not None and proc.poll() is not None:
                pytest.fail(
                    f"the {name} exited with {proc.returncode} while waiting for {what}\n{cli.logs()}"
                )
        try:
            if predicate():
                return
        except (OSError, ValueError):  # not listening yet, or a half-written answer
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s\n{cli.logs()}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes] | None, stacks_on_usr1: bool = False) -> int:
    """SIGTERM and wait; a process still there after STOP_TIMEOUT_S is killed (-9).

    With `stacks_on_usr1` (`ebcd simulate` registers faulthandler on SIGUSR1) a hung process
    first dumps every thread's stack into its log, to show where it hangs.
    """
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        if stacks_on_usr1:
            proc.send_signal(signal.SIGUSR1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)
        proc.kill()
        proc.wait()
        return -9


@pytest.fixture(scope="module")
def cli(mosquitto: Mosquitto, district: District, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """`ebcd run` and `ebcd simulate --only town:…` as subprocesses, with every simulated terminal online."""
    work = tmp_path_factory.mktemp("cli")
    config = fast_config_file(work)
    state_dir = work / "state"
    town = district.towns[TOWN_CODE]
    simulated = {t.code for t in town.terminals()}
    assert {t.link for t in town.terminals()} == {"mqtt"}
    run = ["run", "-c", str(config), "--broker", mosquitto.url, "--state-dir", str(state_dir)]
    daemon = _spawn([*run, "--metrics-port", "0"], work / "daemon.log")
    env = Cli(config, state_dir, daemon, work / "daemon.log", work / "simulate.log", simulated)
    try:
        # The daemon first: a terminal's birth is not retained, so the daemon must hear it live.
        connected = lambda: '"mqtt.connected"' in _read(env.daemon_log)  # noqa: E731
        _poll(env, "the daemon connected to the broker", connected, 30)
        env.sims = _spawn(
            ["simulate", "-c", str(config), "--broker", mosquitto.url, "--only", f"town:{TOWN_AREA}"],
            env.sim_log,
        )

        def all_online() -> bool:
            rows = ask(env.socket, "terminals")["terminals"]
            return {r["code"] for r in rows if r["state"] == "online"} == simulated

        _poll(env, f"the {len(simulated)} simulated terminals online", all_online, START_TIMEOUT_S)
        yield env
    finally:
        sims_rc = _stop(env.sims, stacks_on_usr1=True)
        daemon_rc = _stop(env.daemon)
    assert daemon_rc == 0, f"ebcd run exited {daemon_rc} on SIGTERM\n{env.logs()}"
    assert sims_rc == 0, f"ebcd simulate exited {sims_rc} on SIGTERM\n{env.logs()}"


@pytest.fixture(scope="module")
def completed(cli: Cli) -> dict[str, Any]:
    """A test alert to the simulated town, followed to its end with `--wait --json`."""
    done = cli.send(f"town:{TOWN_AREA}", "--wait", "--json")
    assert done.returncode == 0, _explain(done)
    state: dict[str, Any] = json.loads(done.stdout)
    return state


@pytest.fixture(scope="module")
def hopeless_village(district: District) -> tuple[str, set[str]]:
    """A village no simulator answers for, and its terminals."""
    village = next(iter(district.towns[UNSIMULATED_TOWN].villages.values()))
    return village.code, {t.code for t in village.terminals}


@pytest.fixture(scope="module")
def partial(cli: Cli, hopeless_village: tuple[str, set[str]]) -> subprocess.CompletedProcess[str]:
    """`alert send --wait --json` to a village whose terminals are not simulated."""
    return cli.send(f"village:{hopeless_village[0]}", "--wait", "--json", text="无人应答的测试")


runner = CliRunner()


# -- alerts through the daemon ---------------------------------------------------------------------
def test_send_prints_the_alert_id_and_exits_0(cli: Cli) -> None:
    done = cli.send(f"town:{TOWN_AREA}")
    assert done.returncode == 0, _explain(done)
    alert_id = done.stdout.strip()
    assert ALERT_ID.match(alert_id), done.stdout
    assert ask(cli.socket, "status", id=alert_id)["state"]["id"] == alert_id


def test_send_wait_json_follows_a_town_alert_to_full_coverage(cli: Cli, completed: dict[str, Any]) -> None:
    assert completed["state"] == "completed"
    assert ALERT_ID.match(completed["id"])
    assert completed["coverage"] == 1.0
    assert completed["targets"] == completed["acked"] == len(cli.simulated)
    assert (completed["failed"], completed["uncertain"], completed["pending"]) == (0, 0, 0)
    assert completed["ebm_state"] == 3
    assert completed["level"] == 4
    assert completed["test"] is True
    assert list(completed["towns"]) == [TOWN_CODE]
    town = completed["towns"][TOWN_CODE]
    assert (town["targets"], town["acked"]) == (len(cli.simulated), len(cli.simulated))


def test_send_wait_for_an_alert_that_cannot_complete_exits_3_partial(
    cli: Cli, partial: subprocess.CompletedProcess[str], hopeless_village: tuple[str, set[str]]
) -> None:
    assert partial.returncode == 3, _explain(partial)
    state = json.loads(partial.stdout)
    n = len(hopeless_village[1])
    assert state["state"] == "partial"
    assert state["ebm_state"] == 4
    assert (state["targets"], state["acked"], state["coverage"]) == (n, 0, 0.0)
    assert state["uncertain"] + state["failed"] == n
    assert list(state["towns"]) == [UNSIMULATED_TOWN]


def test_alert_status_json_is_the_contract_state(cli: Cli, completed: dict[str, Any]) -> None:
    state = cli.json("alert", "status", completed["id"])
    contract = {"id", "identifier", "state", "ebm_state", "level", "targets", "acked", "failed"}
    contract |= {"uncertain", "pending", "coverage", "towns"}
    assert contract <= set(state)
    assert state["id"] == completed["id"]
    assert state["identifier"] is None
    assert state["state"] in STATES
    assert 0 <= state["ebm_state"] <= 5
    assert 0.0 <= state["coverage"] <= 1.0
    assert (state["targets"], state["acked"]) == (completed["targets"], completed["acked"])
    for town in state["towns"].values():
        assert {"targets", "acked"} <= set(town)


def test_alert_status_without_json_shows_the_coverage_table(cli: Cli, completed: dict[str, Any]) -> None:
    done = cli.run("alert", "status", completed["id"])
    assert done.returncode == 0, _explain(done)
    assert completed["id"] in done.stdout
    assert TOWN_CODE in done.stdout
    assert "100.0%" in done.stdout


def test_alert_list_json_holds_every_alert_sent(
    cli: Cli, completed: dict[str, Any], partial: subprocess.CompletedProcess[str]
) -> None:
    alerts = cli.json("alert", "list")
    by_id = {a["id"]: a for a in alerts}
    hopeless = json.loads(partial.stdout)
    assert by_id[completed["id"]]["state"] == "completed"
    assert by_id[hopeless["id"]]["state"] == "partial"
    assert all(a["state"] in STATES and ALERT_ID.match(a["id"]) for a in alerts)


def test_alert_cancel_exits_0_and_cancelling_again_exits_2_with_a_message(cli: Cli) -> None:
    sent = cli.send(f"town:{TOWN_AREA}")
    assert sent.returncode == 0, _explain(sent)
    alert_id = sent.stdout.strip()

    done = cli.run("alert", "cancel", alert_id)
    assert done.returncode == 0, _explain(done)
    assert done.stdout.strip() == f"{alert_id} cancelled"
    assert ask(cli.socket, "status", id=alert_id)["state"]["state"] == "cancelled"

    again = cli.run("alert", "cancel", alert_id)
    assert again.returncode == 2, _explain(again)
    assert again.stdout == ""
    assert alert_id in again.stderr
    assert "already ended" in again.stderr


def test_report_json_has_every_village_of_the_town(
    cli: Cli, completed: dict[str, Any], district: District
) -> None:
    report = cli.json("report", completed["id"])
    assert report["state"]["id"] == completed["id"]
    assert report["problems"] == []
    [town] = report["towns"]
    assert town["code"] == TOWN_CODE
    assert (town["targets"], town["acked"]) == (len(cli.simulated), len(cli.simulated))
    town_room = district.towns[TOWN_CODE]
    expected = {v.code: len(v.terminals) for v in town_room.villages.values()}
    expected[TOWN_CODE] = len(town_room.own_terminals)  # the town room's own terminals: a row of their own
    assert {v["code"]: v["targets"] for v in town["villages"]} == expected
    assert all(v["acked"] == v["targets"] and v["coverage"] == 1.0 for v in town["villages"])


def test_report_json_names_every_terminal_without_acknowledgement(
    cli: Cli, partial: subprocess.CompletedProcess[str], hopeless_village: tuple[str, set[str]]
) -> None:
    report = cli.json("report", json.loads(partial.stdout)["id"])
    problems = report["problems"]
    assert {p["terminal"] for p in problems} == hopeless_village[1]
    for p in problems:
        assert p["state"] in ("uncertain", "failed", "expired")
        assert p["attempts"] == 2  # FAST_TIMERS' max_attempts
        assert p["liveness"] == "unknown"


def test_report_csv_has_one_row_per_village(cli: Cli, completed: dict[str, Any], district: District) -> None:
    done = cli.run("report", completed["id"], "--csv")
    assert done.returncode == 0, _explain(done)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    town = district.towns[TOWN_CODE]
    own = {TOWN_CODE: len(town.own_terminals)}  # the town room's own terminals: a row of their own
    assert {r["village"]: int(r["targets"]) for r in rows} == {
        **own,
        **{v.code: len(v.terminals) for v in town.villages.values()},
    }
    assert {r["name"] for r in rows} == {f"{town.name}（镇直属）"} | {v.name for v in town.villages.values()}
    assert all(r["town"] == TOWN_CODE for r in rows)
    assert all(r["acked"] == r["targets"] and float(r["coverage"]) == 1.0 for r in rows)
    assert all(int(r["failed"]) == int(r["uncertain"]) == int(r["pending"]) == 0 for r in rows)
    assert sum(int(r["targets"]) for r in rows) == len(cli.simulated)


def test_terminals_state_online_lists_exactly_the_simulated_terminals(cli: Cli) -> None:
    online = cli.json("terminals", "--state", "online")
    assert len(online) == len(cli.simulated)
    assert {t["code"] for t in online} == cli.simulated
    assert all(t["state"] == "online" and t["town"] == TOWN_CODE for t in online)

    by_area = cli.json("terminals", "--town", TOWN_AREA)
    assert {t["code"] for t in by_area} == cli.simulated
    unknown = cli.json("terminals", "--state", "unknown", "--town", UNSIMULATED_TOWN)
    assert unknown
    assert all(t["state"] == "unknown" for t in unknown)


async def test_watch_ends_with_the_settled_state(
    mosquitto: Mosquitto, shipped_config: Config, tmp_path: Path
) -> None:
    """The last answer of a `watch` (what `alert send --wait` prints and exits on) is a settled state.

    Deterministic replay of a race seen about once in 20 runs: the state publisher hands the
    watcher a 'dispatching' state, and the alert settles before the watcher runs.
    """
    config = fast_config(shipped_config)
    district = load_district(config)
    for v in district.villages():
        v.port = None  # no serial bus masters
    village = next(iter(district.towns[UNSIMULATED_TOWN].villages.values()))
    request = AlertRequest.model_validate(
        {"level": 4, "event_type": TEST_EVENT, "targets": [{"kind": "village", "code": village.code}]}
        | {"text": "无人应答的测试", "test": True}
    )
    async with running_daemon(config, district, mosquitto.url, tmp_path) as daemon:
        run = await daemon.submit(request, source="test", actor="pytest")
        answers = await daemon.control.handle({"op": "watch", "id": run.id}, Peer(0, 0, 0))
        assert isinstance(answers, AsyncGenerator)
        async with contextlib.aclosing(answers):
            first = await anext(answers)
            assert (first["state"]["state"], first["more"]) == ("dispatching", True)
            [queue] = daemon.runner._watchers[run.id]
            queue.put_nowait(first["state"])  # the publisher's latest state: still dispatching
            assert await daemon.runner.cancel(run.id, "settled before the watcher ran") is run
            last = first
            async with asyncio.timeout(10):
                async for answer in answers:
                    last = answer
                    if not answer["more"]:
                        break
    assert last["more"] is False
    assert last["state"]["state"] == "cancelled"


async def test_send_while_the_journal_cannot_be_written_exits_2_saying_journal(
    mosquitto: Mosquitto, shipped_config: Config, district: District, tmp_path: Path
) -> None:
    """Another process holds the journal's write lock: the alert is refused `journal` (exit 2), nothing
    is sent, the failure is counted; once the lock is gone the same command is accepted."""
    config = fast_config(shipped_config)
    state_dir = tmp_path / "state"

    async def send(text: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ebcd", "alert", "send", "--level", "4", "--event", TEST_EVENT,
            "--target", f"town:{UNSIMULATED_TOWN}", "--text", text, "--test",
            "--state-dir", str(state_dir), "-c", str(SHIPPED),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT, env=_env(),
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    async with running_daemon(config, district, mosquitto.url, state_dir) as daemon:
        locker = sqlite3.connect(state_dir / "journal.sqlite3", isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            code, out = await send("写不进日志的测试")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert code == 2, out
        assert "journal" in out
        assert not daemon.runner.alerts  # refused before anything went out

        def failed() -> float:  # the health check counts the failed transaction
            value = daemon.metrics.registry.get_sample_value(
                "ebcd_journal_failures_total", {"what": "transaction"}
            )
            return value or 0.0

        await wait_for(lambda: failed() >= 1, 30)

        code, out = await send("日志恢复后的测试")
        assert code == 0, out
        assert ALERT_ID.match(out.strip().splitlines()[-1]), out
        assert len(daemon.runner.alerts) == 1


# -- topology and frames (in-process: they never reach the daemon) --------------------------------
def test_topology_check_prints_the_counts_per_tier() -> None:
    result = runner.invoke(app, ["topology", "check", "-c", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.stdout
    assert re.search(r"towns\s+7\b", result.stdout)
    assert re.search(r"villages\s+149\b", result.stdout)
    assert re.search(r"terminals\s+769\b", result.stdout)

    as_json = runner.invoke(app, ["topology", "check", "-c", str(SHIPPED), "--json"])
    assert as_json.exit_code == 0, as_json.output
    counts = json.loads(as_json.stdout)
    assert counts == {
        "district": 1,
        "towns": 7,
        "villages": 149,
        "terminals": 769,
        "serial_rooms": 19,
        "adapter_rooms": 20,
    }


def test_topology_check_of_a_broken_ledger_exits_2_naming_the_place(tmp_path: Path) -> None:
    rooms = (SHIPPED.parent / "rooms.csv").read_text(encoding="utf-8").splitlines()
    broken = [*rooms, rooms[2]]  # a village listed twice
    (tmp_path / "rooms.csv").write_text("\n".join(broken) + "\n", encoding="utf-8")
    (tmp_path / "terminals.csv").write_bytes((SHIPPED.parent / "terminals.csv").read_bytes())
    (tmp_path / "ebcd.toml").write_bytes(SHIPPED.read_bytes())
    result = runner.invoke(app, ["topology", "check", "-c", str(tmp_path / "ebcd.toml")])
    assert result.exit_code == 2, result.output
    assert f":{len(broken)}" in result.stderr
    assert rooms[2].split(",")[1] in result.stderr


def test_topology_show_prints_the_tree(district: District) -> None:
    result = runner.invoke(app, ["topology", "show", "-c", str(SHIPPED)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for town in district.towns.values():
        assert town.name in result.stdout
    assert "769" in result.stdout


def _frame_hex() -> str:
    frame = Frame(
        "43415230000000104010101",
        ("63415231040010314010401",),
        BroadcastStart(
            "43415230000000104010101202611260001",
            "20261126-0001",
            revision=1,
            seq=7,
            level=4,
            event_type=TEST_EVENT,
            volume=0,
            ttl_s=600,
            content="测试",
            test=True,
        ),
        session=42,
    )
    return encode_frame(frame).hex(" ")


def test_frame_decode_of_a_valid_frame_exits_0_with_the_crc_verdict() -> None:
    result = runner.invoke(app, ["frame", "decode", _frame_hex()])
    assert result.exit_code == 0, result.output
    assert "frame: valid" in result.stdout
    assert re.search(r"CRC-32/MPEG-2\s+0x[0-9A-F]{8} ok", result.stdout)
    assert "63415231040010314010401" in result.stdout
    assert "20261126-0001" in result.stdout


def test_frame_decode_with_a_corrupted_crc_exits_2_saying_the_crc_is_wrong() -> None:
    raw = bytearray.fromhex(_frame_hex())
    raw[-1] ^= 0xFF
    result = runner.invoke(app, ["frame", "decode", raw.hex()])
    assert result.exit_code == 2, result.output
    assert "frame: INVALID" in result.stdout
    assert "MISMATCH" in result.stdout
    assert re.search(
        r"error: CRC mismatch: computed 0x[0-9A-F]{8}, frame carries 0x[0-9A-F]{8}", result.stdout
    )


# -- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["alert", "list"], ["alert", "status", "20260101-0001"], ["terminals"]])
def test_no_daemon_exits_2_and_says_what_to_check(tmp_path: Path, command: list[str]) -> None:
    done = ebcd(*command, "--state-dir", str(tmp_path))
    assert done.returncode == 2, _explain(done)
    assert done.stdout == ""
    assert f"no daemon on {tmp_path / SOCKET_NAME}" in done.stderr
    assert "is ebcd running?" in done.stderr


def test_no_daemon_for_a_valid_send_exits_2(tmp_path: Path) -> None:
    send = ["alert", "send", "--level", "4", "--event", TEST_EVENT, "--target", "all", "--text", "测试"]
    done = ebcd(*send, "--state-dir", str(tmp_path))
    assert done.returncode == 2, _explain(done)
    assert "is ebcd running?" in done.stderr


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_unknown_alert_id_exits_2_naming_the_id(cli: Cli, command: str) -> None:
    done = cli.run("alert", command, "20991231-9999")
    assert done.returncode == 2, _explain(done)
    assert "20991231-9999" in done.stderr
    assert "no alert" in done.stderr


def test_report_of_an_unknown_alert_exits_2(cli: Cli) -> None:
    done = cli.run("report", "20991231-9998", "--json")
    assert done.returncode == 2, _explain(done)
    assert done.stdout == ""
    assert "20991231-9998" in done.stderr


def _send_in_process(level: str = "2", event: str = "11B03", target: str = "all") -> Result:
    """`alert send` in-process, with a state dir no daemon serves: refusals come before any request."""
    send = ["alert", "send", "--level", level, "--event", event, "--target", target, "--text", "测试"]
    return runner.invoke(app, [*send, "--state-dir", "/nonexistent/ebcd-test"])


def test_bad_target_exits_2_and_says_what_targets_look_like() -> None:
    result = _send_in_process(target="county:1")
    assert result.exit_code == 2, result.output
    assert "county:1" in result.stderr
    for form in ("all", "town:CODE", "village:CODE", "terminal:CODE"):
        assert form in result.stderr
    assert "no daemon" not in result.stderr


def test_level_9_exits_2() -> None:
    result = _send_in_process(level="9")
    assert result.exit_code == 2, result.output
    assert "level" in result.stderr
    assert "no daemon" not in result.stderr


def test_unknown_event_code_exits_2_naming_the_code() -> None:
    result = _send_in_process(event="99Z99")
    assert result.exit_code == 2, result.output
    assert "99Z99" in result.stderr
    assert "no daemon" not in result.stderr


def test_unknown_target_code_is_refused_by_the_daemon_with_exit_2(cli: Cli) -> None:
    done = cli.send("village:63415239990010314010101")
    assert done.returncode == 2, _explain(done)
    assert "63415239990010314010101" in done.stderr
