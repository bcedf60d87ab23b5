"""`ebcd demo` as a new user runs it: its own broker, the daemon, 769 simulated terminals, one alert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ebcd.cli.broker import find_mosquitto
from tests.cli.test_commands import ROOT

DEMO_TIMEOUT_S = 600.0  # a bound on a hung demo, not a measure of its speed


def _demo(state_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run(
        [sys.executable, "-m", "ebcd", "demo", "--state-dir", str(state_dir), *extra],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        cwd=ROOT,
        env=env,
        check=False,
    )


def _events(log: Path) -> list[str]:
    """The daemon's log events; every line is one JSON record (no traceback on stderr, at any point)."""
    lines = log.read_text(encoding="utf-8").splitlines()
    stray = [line for line in lines if not line.startswith("{")]
    assert stray == [], "\n".join(stray[:20])
    return [json.loads(line)["event"] for line in lines]


def _check_run(run: subprocess.CompletedProcess[str], state_dir: Path) -> None:
    out = run.stderr + run.stdout
    assert run.returncode == 0, out
    assert "completed: 769/769 acked" in out, out
    total = next(line for line in out.splitlines() if "│ total" in line)
    cells = [cell.strip() for cell in total.split("│")]
    assert cells[3:8] == ["769", "769", "0", "0", "100.0%"], total  # targets, acked, uncertain, failed
    events = _events(state_dir / "daemon.log")
    assert events[-1] == "daemon.stopped", events[-5:]
    # the daemon said its last word (retained `offline`) within its grace, not cut off by the demo
    assert "daemon.shutdown_grace_exceeded" not in events
    assert "killed" not in out, out


@pytest.mark.skipif(find_mosquitto() is None, reason="needs mosquitto (.ci/run installs it)")
def test_the_demo_runs_on_the_installed_mosquitto_and_stops_it(tmp_path: Path) -> None:
    run = _demo(tmp_path)
    assert "MQTT broker: Mosquitto (" in run.stderr, run.stderr
    _check_run(run, tmp_path)
    conf = str(tmp_path / "mosquitto.conf")
    left = [p.parent.name for p in Path("/proc").glob("[0-9]*/cmdline") if conf in _cmdline(p)]
    assert left == [], f"the demo's mosquitto still runs: pid {left}"


def _cmdline(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # the process ended while we looked
        return ""


def test_the_demo_falls_back_to_the_embedded_broker(tmp_path: Path) -> None:
    run = _demo(tmp_path, "--embedded-broker")
    assert "MQTT broker: embedded MQTT broker (amqtt, MQTT 3.1.1)" in run.stderr, run.stderr
    _check_run(run, tmp_path)
