"""The duty room's commands as the duty officer types them: real `ebcd` subprocesses, a real daemon.

The daemon and the simulators of 桃溪镇 are those of `tests/cli/test_commands.py` (its `cli`
fixture, one set per module); 万佛湖镇 has no simulator, so its terminals never answer.
"""

from __future__ import annotations

import itertools
import json
import os
import pwd
import subprocess
import sys
from typing import Any

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from ebcd.cli.commands import app
from ebcd.model.events import TEST_EVENT
from ebcd.tiers.district import District
from tests.cli.test_commands import (
    COMMAND_TIMEOUT_S,
    ROOT,
    TOWN_AREA,
    TOWN_CODE,
    UNSIMULATED_TOWN,
    Cli,
    _explain,
    cli,
)

__all__ = ["cli"]  # the module's daemon and simulators

runner = CliRunner()
ME = pwd.getpwuid(os.getuid()).pw_name  # who the daemon's control socket sees asking


def piped(c: Cli, *args: str) -> subprocess.CompletedProcess[str]:
    """`ebcd ARGS` with its output to a pipe and no COLUMNS in the environment, as in `ebcd … | grep`."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ebcd", *args, "--state-dir", str(c.state_dir), "-c", str(c.config)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        cwd=ROOT,
        env=env,
        check=False,
    )


def _send_in_process(*extra: str) -> Any:
    """`alert send` in-process, with a state dir no daemon serves: refusals come before any request."""
    send = ["alert", "send", "--level", "4", "--event", TEST_EVENT, "--text", "测试", "--test"]
    if "--target" not in extra:
        send += ["--target", "all"]
    return runner.invoke(app, [*send, *extra, "--state-dir", "/nonexistent/ebcd-test"])


# -- ebcd terminals --------------------------------------------------------------------------------
def test_terminals_json_says_when_each_terminal_was_last_heard(cli: Cli, district: District) -> None:
    rows = {r["code"]: r for r in cli.json("terminals")}
    for code in cli.simulated:  # heartbeats every 2 s: heard within the last minute
        assert rows[code]["last_seen_s"] is not None, rows[code]
        assert 0 <= rows[code]["last_seen_s"] < 60, rows[code]
    silent = [t.code for t in district.towns[UNSIMULATED_TOWN].terminals()]
    assert silent
    assert all(rows[code]["last_seen_s"] is None for code in silent)


def test_terminals_table_to_a_pipe_has_a_last_seen_column_and_whole_codes(
    cli: Cli, district: District
) -> None:
    done = piped(cli, "terminals")
    assert done.returncode == 0, _explain(done)
    lines = done.stdout.splitlines()
    assert any("last seen" in line for line in lines), done.stdout
    by_code = {}
    for t in district.terminals():
        found = [line for line in lines if t.code in line]
        assert len(found) == 1, f"{t.code} is not whole on one line of the table"
        by_code[t.code] = found[0]
    sim = next(iter(cli.simulated))
    assert " s ago" in by_code[sim] or " min ago" in by_code[sim], by_code[sim]
    silent = next(district.towns[UNSIMULATED_TOWN].terminals()).code
    assert "never" in by_code[silent], by_code[silent]


def test_terminals_with_an_unknown_state_exits_2_listing_the_states(cli: Cli) -> None:
    done = cli.run("terminals", "--state", "onlin")
    assert done.returncode == 2, _explain(done)
    assert done.stdout == ""
    assert "--state onlin" in done.stderr
    for state in ("unknown", "online", "offline"):
        assert state in done.stderr


def test_terminals_with_an_unknown_town_exits_2_listing_the_towns(cli: Cli, district: District) -> None:
    done = cli.run("terminals", "--town", "341523999000")
    assert done.returncode == 2, _explain(done)
    assert done.stdout == ""
    assert "--town 341523999000" in done.stderr
    for town in district.towns.values():
        assert town.code in done.stderr
        assert town.area in done.stderr
        assert town.name in done.stderr


@pytest.mark.parametrize("town", [TOWN_AREA, TOWN_CODE])
def test_terminals_of_a_town_by_area_or_resource_code(cli: Cli, town: str) -> None:
    rows = cli.json("terminals", "--town", town)
    assert {r["code"] for r in rows} == cli.simulated


# -- alert send: what is refused before anything is sent --------------------------------------------
@pytest.mark.parametrize("volume", ["101", "254", "-1", "256"])
def test_send_with_a_volume_outside_0_1_100_255_exits_2_naming_the_option(volume: str) -> None:
    result = _send_in_process("--volume", volume)
    assert result.exit_code == 2, result.output
    assert f"--volume {volume}" in result.stderr
    assert "255" in result.stderr
    assert "1-100" in result.stderr
    assert "no daemon" not in result.stderr


@pytest.mark.parametrize("volume", ["0", "1", "100", "255"])
def test_send_with_a_valid_volume_gets_as_far_as_the_daemon(volume: str) -> None:
    result = _send_in_process("--volume", volume)
    assert result.exit_code == 2, result.output
    assert "--volume" not in result.stderr
    assert "no daemon" in result.stderr or "not running" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("target", "needs"),
    [
        ("town:341523104", "12-digit area code"),
        ("village:5341523104001031401010", "23-digit resource code"),
        ("terminal:341523104001", "23-digit resource code"),
    ],
)
def test_send_with_a_code_of_the_wrong_length_says_which_length_it_needs(target: str, needs: str) -> None:
    result = _send_in_process("--target", target)
    assert result.exit_code == 2, result.output
    assert f"--target {target}" in result.stderr
    assert needs in result.stderr
    assert f"got {len(target.partition(':')[2])} digits" in result.stderr


def test_send_with_a_bad_ttl_names_the_option_not_the_field() -> None:
    result = _send_in_process("--ttl", "0")
    assert result.exit_code == 2, result.output
    assert "--ttl" in result.stderr
    assert "ttl_s" not in result.stderr


def test_send_with_a_bad_level_names_the_option() -> None:
    result = _send_in_process("--level", "7")
    assert result.exit_code == 2, result.output
    assert "--level" in result.stderr


def test_a_refused_send_names_the_option_in_json_mode_too(cli: Cli) -> None:
    done = cli.run("alert", "send", "--level", "4", "--event", TEST_EVENT, "--target", "all", "--text",
                   "x", "--volume", "150", "--json")  # fmt: skip
    assert done.returncode == 2, _explain(done)
    assert done.stdout == ""
    assert "--volume 150" in done.stderr


# -- alert watch, and the live line of alert send --wait ----------------------------------------------
def _hopeless(district: District, n: int = 0) -> tuple[str, str, set[str]]:
    """The n-th village of the town no simulator answers for: code, name, terminals."""
    village = list(district.towns[UNSIMULATED_TOWN].villages.values())[n]
    return village.code, village.name, {t.code for t in village.terminals}


def test_watch_of_a_completed_alert_exits_0_with_its_state(cli: Cli) -> None:
    sent = cli.send(f"town:{TOWN_AREA}", "--wait", "--json")
    assert sent.returncode == 0, _explain(sent)
    alert_id = json.loads(sent.stdout)["id"]
    done = cli.run("alert", "watch", alert_id, "--json")
    assert done.returncode == 0, _explain(done)
    state = json.loads(done.stdout)
    assert (state["id"], state["state"], state["coverage"]) == (alert_id, "completed", 1.0)


def test_watch_reattaches_to_an_alert_in_flight_showing_why_its_pending_wait(
    cli: Cli, district: District
) -> None:
    code, name, terminals = _hopeless(district, 1)
    sent = cli.send(f"village:{code}", text="重新跟踪的测试")
    assert sent.returncode == 0, _explain(sent)
    alert_id = sent.stdout.strip()
    done = piped(cli, "alert", "watch", alert_id)
    assert done.returncode == 3, _explain(done)  # nobody answers: partial
    lines = done.stderr.splitlines()
    first = next(line for line in lines if line.startswith(f"{alert_id} dispatching"))
    assert f"{len(terminals)} pending" in first, done.stderr
    assert "awaiting acknowledgement" in first, done.stderr
    assert any(line.strip().startswith(f"village {code} {name}:") for line in lines), done.stderr
    last = [line for line in lines if line.startswith(alert_id)][-1]
    assert last.startswith(f"{alert_id} partial: 0/{len(terminals)} acked"), done.stderr
    assert alert_id in done.stdout  # the coverage table at the end


def test_send_wait_says_a_pending_terminal_waits_for_the_alert_that_holds_it(
    cli: Cli, district: District
) -> None:
    code, _, terminals = _hopeless(district, 2)
    holder = cli.send(f"village:{code}", "--ttl", "120", text="先到的广播")
    assert holder.returncode == 0, _explain(holder)
    holder_id = holder.stdout.strip()
    # an equal broadcast waits while the first one holds the terminals (sent, then retried)
    done = piped(cli, "alert", "send", "--level", "4", "--event", TEST_EVENT, "--target",
                 f"village:{code}", "--text", "后到的广播", "--test", "--wait")  # fmt: skip
    assert done.returncode == 3, _explain(done)
    assert f"{len(terminals)} waiting for alert {holder_id}" in done.stderr, done.stderr
    assert f"village {code}" in done.stderr


def test_watch_of_an_unknown_alert_exits_2_naming_it(cli: Cli) -> None:
    done = cli.run("alert", "watch", "20991231-9997")
    assert done.returncode == 2, _explain(done)
    assert "20991231-9997" in done.stderr


# -- alert resend, and the attempt history in the report ---------------------------------------------
def _answering_village(district: District) -> tuple[str, set[str]]:
    village = next(iter(district.towns[TOWN_CODE].villages.values()))
    return village.code, {t.code for t in village.terminals}


@pytest.fixture(scope="module")
def mixed(cli: Cli, district: District) -> tuple[str, set[str], set[str]]:
    """A partial alert: one village of 桃溪镇 played it, one of 万佛湖镇 never answered."""
    played, answered = _answering_village(district)
    silent, _, nobody = _hopeless(district, 3)
    done = cli.send(f"village:{played}", "--target", f"village:{silent}", "--wait", "--json", text="补发测试")
    assert done.returncode == 3, _explain(done)
    state = json.loads(done.stdout)
    assert (state["state"], state["acked"]) == ("partial", len(answered)), state
    return state["id"], answered, nobody


def test_resend_goes_only_to_the_terminals_that_did_not_acknowledge(
    cli: Cli, mixed: tuple[str, set[str], set[str]]
) -> None:
    alert_id, answered, nobody = mixed
    done = cli.run("alert", "resend", alert_id, "--only", "uncertain", "--json")
    assert done.returncode == 0, _explain(done)
    answer = json.loads(done.stdout)
    assert set(answer["resent"]) == nobody  # never a terminal that played it
    assert not set(answer["resent"]) & answered
    assert answer["state"]["state"] == "dispatching"
    assert answer["state"]["acked"] == len(answered)
    settled = cli.run("alert", "watch", alert_id, "--json")  # nobody answers the new attempt either
    assert settled.returncode == 3, _explain(settled)
    assert json.loads(settled.stdout)["state"] == "partial"


def test_report_shows_each_resent_terminals_attempts_with_who_asked(
    cli: Cli, mixed: tuple[str, set[str], set[str]], district: District
) -> None:
    alert_id, _, nobody = mixed
    resent = cli.run("alert", "resend", alert_id)
    assert resent.returncode == 0, _explain(resent)
    assert f"{alert_id} resent to {len(nobody)} terminal(s)" in resent.stdout
    assert cli.run("alert", "watch", alert_id).returncode == 3
    report = cli.json("report", alert_id)
    history = report["history"]
    assert set(history) == nobody  # the terminals that played it have no history here
    for code in nobody:
        attempts = history[code]["attempts"]
        assert history[code]["resent"] is True
        assert len(attempts) >= 3  # 2 attempts, then at least one resend
        assert [a["n"] for a in attempts] == list(range(1, len(attempts) + 1))
        link = district.terminal(code).link  # 万佛湖镇's villages are behind vendor adapters
        assert all(a["link"].split()[0] == link for a in attempts), attempts
        assert all(a["outcome"] == "uncertain" for a in attempts), attempts
        assert all(a["at"] <= b["at"] for a, b in itertools.pairwise(attempts))
        asked = [a["asked_by"] for a in attempts if a["asked_by"]]
        assert asked, attempts  # this test's resend (and another test's, when it ran first)
        assert set(asked) == {ME}, attempts
    table = piped(cli, "report", alert_id)
    assert table.returncode == 0, _explain(table)
    assert max(cell_len(line) for line in table.stdout.splitlines()) > 80  # not cut for the pipe
    for code in nobody:
        rows = [line for line in table.stdout.splitlines() if code in line and "uncertain" in line]
        assert len(rows) >= 3, table.stdout  # the problem row and one per attempt, the code whole
        assert sum(row.rstrip(" │").endswith(ME) for row in rows) == len(asked), table.stdout


def test_resend_of_a_cancelled_alert_exits_2_saying_it_ended(cli: Cli, district: District) -> None:
    code, _, _ = _hopeless(district, 4)
    sent = cli.send(f"village:{code}")
    alert_id = sent.stdout.strip()
    assert cli.run("alert", "cancel", alert_id).returncode == 0
    done = cli.run("alert", "resend", alert_id)
    assert done.returncode == 2, _explain(done)
    assert "ended" in done.stderr
    assert "cancelled" in done.stderr


def test_resend_past_the_time_to_live_exits_2_saying_so(cli: Cli, district: District) -> None:
    code, _, _ = _hopeless(district, 5)
    sent = cli.send(f"village:{code}", "--ttl", "1")
    alert_id = sent.stdout.strip()
    settled = cli.run("alert", "watch", alert_id, "--json")
    assert json.loads(settled.stdout)["state"] == "expired"
    done = cli.run("alert", "resend", alert_id)
    assert done.returncode == 2, _explain(done)
    assert "time to live" in done.stderr


def test_resend_of_a_completed_alert_exits_2_with_nothing_to_resend(cli: Cli) -> None:
    sent = cli.send(f"town:{TOWN_AREA}", "--wait", "--json")
    alert_id = json.loads(sent.stdout)["id"]
    done = cli.run("alert", "resend", alert_id)
    assert done.returncode == 2, _explain(done)
    assert "nothing_to_resend" in done.stderr


def test_resend_with_an_unknown_kind_exits_2_listing_the_kinds(cli: Cli) -> None:
    done = cli.run("alert", "resend", "20261203-0001", "--only", "uncertain,lost")
    assert done.returncode == 2, _explain(done)
    assert "--only uncertain,lost" in done.stderr
    for kind in ("uncertain", "failed", "refused"):
        assert kind in done.stderr
