"""`ebcd top` in a real 80x24 terminal: tmux runs it, sends its keys and reads its screen.

A daemon of its own and the simulators of 桃溪镇 with a fault profile: a tenth never connect
(`offline`), a fifth acknowledge 3 s late (`slow`, longer than the daemon's 1 s timeout, so an
alert to them is seen dispatching, then completed by the late acknowledgements).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ebcd.model.events import TEST_EVENT
from ebcd.tiers.district import District
from tests.cli.test_commands import (
    ROOT,
    START_TIMEOUT_S,
    TOWN_AREA,
    TOWN_CODE,
    Cli,
    _explain,
    _poll,
    _read,
    _spawn,
    _stop,
    ask,
    fast_config_file,
)
from tests.conftest import Mosquitto

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="needs tmux (.ci/run installs it)")

SCREEN_TIMEOUT_S = 60.0
FAULTS = "offline=10%,slow=20%"


@dataclass
class Room:
    cli: Cli
    offline: list[str]
    slow: list[str]


@pytest.fixture(scope="module")
def room(
    mosquitto: Mosquitto, district: District, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Room]:
    work = tmp_path_factory.mktemp("top")
    config = fast_config_file(work)
    state_dir = work / "state"
    town = district.towns[TOWN_CODE]
    simulated = {t.code for t in town.terminals()}
    run = ["run", "-c", str(config), "--broker", mosquitto.url, "--state-dir", str(state_dir)]
    daemon = _spawn([*run, "--metrics-port", "-1"], work / "daemon.log")
    env = Cli(config, state_dir, daemon, work / "daemon.log", work / "simulate.log", simulated)
    report = work / "faults.json"
    try:
        _poll(env, "the daemon connected", lambda: '"mqtt.connected"' in _read(env.daemon_log), 30)
        env.sims = _spawn(
            ["simulate", "-c", str(config), "--broker", mosquitto.url, "--only", f"town:{TOWN_AREA}",
             "--faults", FAULTS, "--seed", "7", "--faults-report", str(report)],
            env.sim_log,
        )  # fmt: skip
        _poll(env, "the faults report", report.exists, START_TIMEOUT_S)
        chosen = json.loads(report.read_text(encoding="utf-8"))
        faults = chosen.get("faults", chosen)
        offline, slow = sorted(faults.get("offline", [])), sorted(faults.get("slow", []))
        assert offline, chosen
        assert slow, chosen
        expected = simulated - set(offline)

        def all_online() -> bool:
            rows = ask(env.socket, "terminals")["terminals"]
            return {r["code"] for r in rows if r["state"] == "online"} == expected

        _poll(env, f"the {len(expected)} terminals online", all_online, START_TIMEOUT_S)
        yield Room(env, offline, slow)
    finally:
        sims_rc = _stop(env.sims, stacks_on_usr1=True)
        daemon_rc = _stop(env.daemon)
    assert daemon_rc == 0, f"ebcd run exited {daemon_rc} on SIGTERM\n{env.logs()}"
    assert sims_rc == 0, f"ebcd simulate exited {sims_rc} on SIGTERM\n{env.logs()}"


@dataclass
class Tmux:
    """A private tmux server with one 80x24 window."""

    socket: Path
    name: str = "top"

    def __call__(self, *args: str) -> str:
        done = subprocess.run(
            [TMUX or "tmux", "-u", "-S", str(self.socket), *args],
            capture_output=True, text=True, timeout=30, check=False, env=_env(),
        )  # fmt: skip
        assert done.returncode == 0, f"tmux {args}: {done.stderr}"
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.name)

    def wait(self, what: str, predicate: Callable[[str], bool], timeout_s: float = SCREEN_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"{what}: not on the screen within {timeout_s} s; it shows:\n{text}")
            time.sleep(0.05)


def _keep(name: str, screen: str) -> None:
    """A screen as text in EBCD_ARTEFACTS (if set), for a person to look at."""
    where = os.environ.get("EBCD_ARTEFACTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / name).write_text(screen, encoding="utf-8")


def _env() -> dict[str, str]:
    return {**os.environ, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm-256color"}


@pytest.fixture
def top(room: Room, tmp_path: Path) -> Iterator[Tmux]:
    tmux = Tmux(tmp_path / "tmux.sock")
    c = room.cli
    top = f"{sys.executable} -m ebcd top --state-dir {c.state_dir} -c {c.config}"
    command = f"{top}; echo EBCD-TOP-EXITED $?; sleep 60"
    tmux("new-session", "-d", "-s", tmux.name, "-x", "80", "-y", "24", "-c", str(ROOT), command)
    try:
        tmux.wait("the header of ebcd top", lambda s: " online " in s and " unknown " in s)
        yield tmux
    finally:
        subprocess.run(
            [TMUX or "tmux", "-S", str(tmux.socket), "kill-server"], capture_output=True, check=False
        )


def test_top_fits_80x24_and_q_quits(top: Tmux) -> None:
    screen = top.screen()
    lines = screen.splitlines()
    assert len(lines) <= 24
    assert all(len(line) <= 80 for line in lines)
    top("send-keys", "-t", top.name, "q")
    top.wait("ebcd top exited 0", lambda s: "EBCD-TOP-EXITED 0" in s)


def test_top_lists_the_terminals_of_the_fault_profile_that_never_came_online(room: Room, top: Tmux) -> None:
    top("send-keys", "-t", top.name, "t")
    screen = top.wait("the offline terminals", lambda s: all(code in s for code in room.offline))
    for code in room.offline:
        [line] = [line for line in screen.splitlines() if code in line]
        assert "unknown" in line, line  # never connected: unknown, not online
        assert "never" in line, line
    healthy = sorted(room.cli.simulated - set(room.offline))
    assert not any(code in screen for code in healthy)
    _keep("top-terminals.txt", screen)


def test_top_shows_an_alert_go_from_dispatching_to_completed(room: Room, top: Tmux) -> None:
    targets = sorted(room.cli.simulated - set(room.offline))  # the terminals that can answer, slow ones too
    args = [a for code in targets for a in ("--target", f"terminal:{code}")]
    sent = room.cli.run(
        "alert", "send", "--level", "4", "--event", TEST_EVENT, "--text", "值班室测试", "--test", *args
    )
    assert sent.returncode == 0, _explain(sent)
    alert_id = sent.stdout.strip()

    def row(state: str) -> Callable[[str], bool]:
        return lambda s: any(alert_id in line and state in line for line in s.splitlines())

    dispatching = top.wait(f"{alert_id} dispatching", row("dispatching"))
    line = next(line for line in dispatching.splitlines() if alert_id in line)
    assert f"/{len(targets)}" in line, line
    done = top.wait(f"{alert_id} completed", row("completed"))
    line = next(line for line in done.splitlines() if alert_id in line)
    assert f"{len(targets)}/{len(targets)}" in line, line
    assert "100%" in line, line
    assert "桃溪镇" in done  # the coverage bar of its town
    _keep("top-dispatching.txt", dispatching)
    _keep("top-completed.txt", done)


def test_enter_on_a_partial_alert_lists_its_terminals_without_acknowledgement(room: Room, top: Tmux) -> None:
    sent = room.cli.send(f"town:{TOWN_AREA}", "--wait", "--json", text="含离线终端的测试")
    assert sent.returncode == 3, _explain(sent)  # the offline tenth never acknowledges
    alert_id = json.loads(sent.stdout)["id"]
    reached = len(room.cli.simulated) - len(room.offline)  # once the slow ones' late acks are in
    settled = f"{reached}/{len(room.cli.simulated)}"

    def partial(screen: str) -> bool:
        return any(alert_id in x and "partial" in x and settled in x for x in screen.splitlines())

    top.wait(f"{alert_id} partial at {settled}", partial)
    top("send-keys", "-t", top.name, "Enter")
    more_line = r"… and (\d+) more terminal\(s\): ebcd report " + re.escape(alert_id)

    def listed(screen: str) -> bool:  # tmux may be read while curses is still drawing the view
        drawn = all(code in screen for code in room.offline) or re.search(more_line, screen)
        return room.offline[0] in screen and bool(drawn)

    screen = top.wait("the terminals without acknowledgement, all or with a count", listed)
    shown = [code for code in room.offline if code in screen]
    more = re.search(more_line, screen)
    assert len(shown) + (int(more.group(1)) if more else 0) == len(room.offline), (
        screen
    )  # none hidden silently
    assert len(shown) >= 5, screen
    for code in shown:
        [line] = [x for x in screen.splitlines() if code in x]
        assert "uncertain" in line, line
    _keep("top-details.txt", screen)
    top("send-keys", "-t", top.name, "Escape")
    top.wait("back to the alerts", lambda s: room.offline[0] not in s and "桃溪镇" in s)


def test_send_wait_in_a_terminal_redraws_one_live_view_with_the_pending_reason(
    room: Room, tmp_path: Path
) -> None:
    tmux = Tmux(tmp_path / "tmux.sock", name="send")
    c = room.cli
    slow = room.slow[:5]
    targets = " ".join(f"--target terminal:{code}" for code in slow)
    send = (
        f"{sys.executable} -m ebcd alert send --level 4 --event {TEST_EVENT} {targets} --text 慢速终端测试"
        f" --test --wait --state-dir {c.state_dir} -c {c.config}"
    )
    tmux("new-session", "-d", "-s", tmux.name, "-x", "80", "-y", "24", "-c", str(ROOT),
         f"{send}; echo EBCD-SEND-EXITED $?; sleep 60")  # fmt: skip
    try:
        waiting = tmux.wait(
            "the pending reason", lambda s: f"pending: {len(slow)} awaiting acknowledgement" in s
        )
        assert f"0/{len(slow)} acked" in waiting, waiting
        done = tmux.wait("the end of --wait", lambda s: "EBCD-SEND-EXITED" in s)
        # they answer 3 s late, after the 1 s timeout and its retry: --wait ends at partial
        assert "EBCD-SEND-EXITED 3" in done, done
        assert done.count("awaiting acknowledgement") == 0, done  # redrawn in place, not appended
        assert done.count(" acked 0:") == 1, done
        assert f"{len(slow)} uncertain" in done, done
        _keep("send-wait.txt", done)
    finally:
        subprocess.run(
            [TMUX or "tmux", "-S", str(tmux.socket), "kill-server"], capture_output=True, check=False
        )
