"""`alert list`, `alert status` and `report` from the journal: the daemon down, or no longer holding an alert.

The real `ebcd` command as a subprocess, on a state dir with a real journal (tests/journal/test_reader.py's
`make_journal`) and the shipped district. Without a daemon the commands read the journal read-only and
say so on stderr; with --json stdout stays JSON only and gains "source": "journal". One test puts a
stand-in daemon on the control socket (the real control framing, `ebcd.control.socket.serve`) that
holds one alert and answers `unknown_alert` for the others: the CLI then asks the journal.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ebcd.control.socket import SOCKET_NAME, ControlError, Peer, serve
from ebcd.journal.reader import JOURNAL_FILE, JournalReader
from ebcd.tiers.district import District
from tests.journal.test_reader import CONTRACT_KEYS, History, files_of, make_journal, read_only

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "ebcd.toml"
COMMAND_TIMEOUT_S = 60.0


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NO_COLOR": "1"}


def ebcd(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ebcd ARGS --state-dir DIR -c SHIPPED` as the duty officer would type it."""
    return subprocess.run(
        [sys.executable, "-m", "ebcd", *args, "--state-dir", str(state_dir), "-c", str(SHIPPED)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        cwd=ROOT,
        env=_env(),
        check=False,
    )


def _explain(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}"


def _note(state_dir: Path) -> str:
    return f"ebcd is not running: read from the journal {state_dir / JOURNAL_FILE} (read-only)"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory, district: District) -> History:
    """A state dir with the daemon's journal, cleanly closed, and no daemon."""
    return make_journal(tmp_path_factory.mktemp("history") / "state", district)


@pytest.fixture(scope="module")
def state_dir(history: History) -> Path:
    return history.path.parent


def _json(state_dir: Path, *args: str) -> Any:
    """Run a command with --json: exit 0, JSON only on stdout, the note on stderr."""
    done = ebcd(state_dir, *args, "--json")
    assert done.returncode == 0, _explain(done)
    assert _note(state_dir) in done.stderr
    return json.loads(done.stdout)


# -- the daemon down ---------------------------------------------------------------------------
def test_alert_list_without_a_daemon_lists_every_alert_of_the_journal(
    state_dir: Path, history: History
) -> None:
    done = ebcd(state_dir, "alert", "list")
    assert done.returncode == 0, _explain(done)
    assert _note(state_dir) in done.stderr
    for alert in history.alerts:
        assert alert.id in done.stdout
    assert "cancelled" in done.stdout
    assert done.stdout.index(history.scheduled.id) < done.stdout.index(history.completed.id)  # newest first


def test_alert_list_json_without_a_daemon_is_json_only_with_source_journal(
    state_dir: Path, history: History
) -> None:
    alerts = _json(state_dir, "alert", "list")
    assert [a["id"] for a in alerts] == [a.id for a in reversed(history.alerts)]
    assert all(a["source"] == "journal" and set(a) >= CONTRACT_KEYS for a in alerts)
    assert {a["state"] for a in alerts} == {"completed", "partial", "cancelled", "dispatching"}


def test_alert_status_json_of_a_cancelled_alert_without_a_daemon(state_dir: Path, history: History) -> None:
    state = _json(state_dir, "alert", "status", history.cancelled.id)
    assert set(state) >= CONTRACT_KEYS
    assert (state["id"], state["state"], state["ebm_state"], state["source"]) == (
        history.cancelled.id,
        "cancelled",
        5,
        "journal",
    )
    assert state["targets"] == len(history.cancelled.deliveries)


def test_alert_status_without_a_daemon_shows_the_coverage_table(state_dir: Path, history: History) -> None:
    done = ebcd(state_dir, "alert", "status", history.completed.id)
    assert done.returncode == 0, _explain(done)
    assert _note(state_dir) in done.stderr
    assert f"alert {history.completed.id}: completed" in done.stdout
    assert "100.0%" in done.stdout


def test_report_json_without_a_daemon_has_towns_villages_problems_and_refusals(
    state_dir: Path, history: History, district: District
) -> None:
    with JournalReader(history.path, district) as reader:
        expected = reader.report(history.legacy.id)
    assert expected is not None
    report = _json(state_dir, "report", history.legacy.id)
    assert report["source"] == "journal"
    assert report["state"]["id"] == history.legacy.id
    assert {k: v for k, v in report.items() if k != "state"} == {
        k: v for k, v in expected.items() if k != "state"
    }
    assert [p["state"] for p in report["problems"]] == ["refused", "refused", "uncertain"]
    assert all(p["liveness"] == "unknown" for p in report["problems"])
    assert report["refusals"] == [{"terminal": t, "cause": c} for t, c in history.legacy.refused]


def test_report_csv_without_a_daemon_has_one_row_per_village(state_dir: Path, history: History) -> None:
    done = ebcd(state_dir, "report", history.completed.id, "--csv")
    assert done.returncode == 0, _explain(done)
    assert _note(state_dir) in done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert len(rows) == 21  # 桃溪镇: its own terminals, then its 20 villages
    assert sum(int(r["targets"]) for r in rows) == 103
    assert all(r["acked"] == r["targets"] for r in rows)


def test_report_without_a_daemon_shows_the_terminals_without_acknowledgement(
    state_dir: Path, history: History
) -> None:
    done = ebcd(state_dir, "report", history.scheduled.id)
    assert done.returncode == 0, _explain(done)
    assert _note(state_dir) in done.stderr
    assert "2 terminal(s) without acknowledgement" in done.stdout
    for code, (state, _, _) in history.scheduled.deliveries.items():
        assert (code in done.stdout) == (state != "acknowledged")


@pytest.mark.parametrize("command", ["status", "report"])
def test_an_alert_the_journal_does_not_hold_exits_2_naming_it(state_dir: Path, command: str) -> None:
    args = ["alert", "status"] if command == "status" else ["report"]
    done = ebcd(state_dir, *args, "20991231-9999", "--json")
    assert done.returncode == 2, _explain(done)
    assert done.stdout == ""
    assert "no alert with id '20991231-9999'" in done.stderr
    assert str(state_dir / JOURNAL_FILE) in done.stderr


@pytest.mark.parametrize(
    "command", [["alert", "list"], ["alert", "status", "20261126-0001"], ["report", "20261126-0001"]]
)
def test_no_daemon_and_no_journal_exits_2_naming_both(tmp_path: Path, command: list[str]) -> None:
    done = ebcd(tmp_path, *command)
    assert done.returncode == 2, _explain(done)
    assert done.stdout == ""
    assert f"no daemon on {tmp_path / SOCKET_NAME}" in done.stderr
    assert "is ebcd running?" in done.stderr
    assert f"no journal at {tmp_path / JOURNAL_FILE}" in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_socket_left_by_a_killed_daemon_sends_the_cli_to_the_journal(
    tmp_path: Path, history: History
) -> None:
    state = tmp_path / "state"
    shutil.copytree(history.path.parent, state)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(state / SOCKET_NAME))  # nobody listens: connection refused
    alerts = _json(state, "alert", "list")
    assert len(alerts) == len(history.alerts)


def test_the_journal_is_not_modified_and_is_read_in_a_read_only_directory(
    tmp_path: Path, history: History
) -> None:
    state = tmp_path / "state"
    shutil.copytree(history.path.parent, state)
    before = files_of(state)
    with read_only(state):
        assert len(_json(state, "alert", "list")) == len(history.alerts)
        assert _json(state, "alert", "status", history.active.id)["state"] == "dispatching"
        assert _json(state, "report", history.legacy.id)["problems"]
        done = ebcd(state, "report", history.legacy.id, "--csv")
        assert done.returncode == 0, _explain(done)
    assert files_of(state) == before


# -- the daemon up, but without the alert ------------------------------------------------------------
class StandIn:
    """A daemon on the control socket that holds one alert (its live state) and forgot the others."""

    def __init__(self, live: dict[str, Any]) -> None:
        self.live = live
        self.ops: list[str] = []

    async def handle(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.ops.append(req["op"])
        if req["op"] == "list":
            return {"alerts": [self.live]}
        if req.get("id") != self.live["id"]:
            raise ControlError(
                "unknown_alert", f"no alert with id {req.get('id')!r} (ebcd alert list shows them)"
            )
        if req["op"] == "status":
            return {"state": self.live}
        return {"state": self.live, "towns": [], "problems": []}


@pytest.fixture
async def stand_in(tmp_path: Path, history: History) -> AsyncIterator[tuple[Path, StandIn]]:
    state = tmp_path / "state"
    shutil.copytree(history.path.parent, state)
    with JournalReader(history.path) as reader:
        live = reader.alert_state(history.active.id)
    assert live is not None
    live = {k: v for k, v in live.items() if k != "source"} | {"acked": 3, "text": "live from the daemon"}
    daemon = StandIn(live)
    server = await serve(state / SOCKET_NAME, daemon.handle)
    try:
        yield state, daemon
    finally:
        server.close()
        await server.wait_closed()


async def _run(state_dir: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ebcd", *args, "--state-dir", str(state_dir), "-c", str(SHIPPED),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=_env(),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_daemon_without_the_alert_sends_status_and_report_to_the_journal(
    stand_in: tuple[Path, StandIn], history: History
) -> None:
    state, daemon = stand_in
    code, out, err = await _run(state, "alert", "status", history.cancelled.id, "--json")
    assert code == 0, err
    assert json.loads(out)["source"] == "journal"
    path = state / JOURNAL_FILE
    assert (
        f"the daemon does not hold alert {history.cancelled.id}: read from the journal {path} (read-only)"
        in err
    )

    code, out, err = await _run(state, "report", history.legacy.id, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["source"], len(report["problems"])) == ("journal", 3)

    code, out, err = await _run(state, "alert", "status", history.active.id, "--json")  # the daemon holds it
    assert code == 0, err
    live = json.loads(out)
    assert "source" not in live
    assert live["text"] == "live from the daemon"
    assert "journal" not in err

    code, out, err = await _run(state, "alert", "status", "20991231-9999")
    assert code == 2
    assert "no alert with id '20991231-9999'" in err
    assert daemon.ops == ["status", "report", "status", "status"]


async def test_alert_list_with_a_daemon_adds_the_alerts_only_the_journal_holds(
    stand_in: tuple[Path, StandIn], history: History
) -> None:
    state, _ = stand_in
    code, out, err = await _run(state, "alert", "list", "--json")
    assert code == 0, err
    alerts = json.loads(out)
    assert [a["id"] for a in alerts] == [a.id for a in reversed(history.alerts)]
    by_id = {a["id"]: a for a in alerts}
    assert by_id[history.active.id]["text"] == "live from the daemon"  # the daemon's own state wins
    assert "source" not in by_id[history.active.id]
    assert all(a["source"] == "journal" for a in alerts if a["id"] != history.active.id)
    assert f"{len(history.alerts) - 1} alert(s) the daemon does not hold: read from the journal" in err
