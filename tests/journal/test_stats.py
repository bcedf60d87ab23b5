"""`ebcd journal stats`: the journal's files, rows, raw payloads and retention settings, read-only.

A real journal with known contents (written by `ebcd.journal.journal.Journal` as the daemon writes
it), read by `JournalReader.stats()` and by the real `ebcd` command as a subprocess, with the
journal closed (no daemon) and open for writing (a daemon running).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ebcd.journal import journal as store
from ebcd.journal.journal import SCHEMA_VERSION, Journal
from ebcd.journal.reader import JournalReader, journal_path
from tests.journal.test_reader import files_of

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "ebcd.toml"
COMMAND_TIMEOUT_S = 60.0
T0 = 1_764_160_000.0  # wall clock of the journal's writes
DAY_S = 86_400.0
PAYLOADS = (b"A" * 4000, b"<alert>" + b"B" * 2000, b'{"level": 2}', b"C" * 300)  # 4000, 2007, 12, 300

# What the journal built by `_fill` holds.
ROWS = {
    "received": 4,
    "alerts": 3,
    "alerts_final": 2,
    "alerts_active": 1,
    "deliveries": 6,
    "transitions": 11,
    "dedupe": 2,
    "audit": 3,
}
RECEIVED = {  # the first message's payload was pruned, the last one has no verdict
    "payload_bytes": 2007 + 12 + 300,
    "unjudged": 1,
    "pruned": 1,
    "oldest_at": T0,
    "newest_at": T0 + 3 * DAY_S,
}


async def _fill(journal: Journal) -> None:
    """Four messages, three alerts (two ended) with their deliveries, two claims, three audits."""
    for n, payload in enumerate(PAYLOADS):
        row_id = await journal.record_received("ebc/v1/x/alerts/in", payload, T0 + n * DAY_S, source="mqtt")
        if n < 3:
            await journal.mark_received(row_id, outcome="accepted", detail="", alert_id=f"A{n}")
    pruned = await journal.prune(T0 + DAY_S / 2, None)  # the first message's payload
    assert pruned.payloads == 1
    for n, (terminals, final) in enumerate(((3, True), (2, True), (1, False))):
        alert_id = f"20261126-{n + 1:04d}"
        key = ("city-ews", f"cap-{n}") if n < 2 else None
        await journal.save_alert(alert_id, {"id": alert_id, "final": final}, dedupe_key=key)
        for t in range(terminals):
            code = f"6341523{t:016d}"
            journal.record_transition(alert_id, code, "sent", None, T0, attempt=True)
            if final:
                journal.record_transition(alert_id, code, "acknowledged", "done", T0 + 1)
        await journal.flush()
    for actor in ("duty", "duty", "root"):
        await journal.record_audit(actor, "send", {})


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state dir with a journal of known contents, cleanly closed, and no daemon."""
    monkeypatch.setattr(store, "time", SimpleNamespace(time=lambda: T0))
    directory = tmp_path / "state"

    async def build() -> None:
        journal = await Journal.open(journal_path(directory))
        try:
            await _fill(journal)
        finally:
            await journal.close()

    asyncio.run(build())
    return directory


def _argv(state_dir: Path, config: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ebcd",
        "journal",
        "stats",
        "--state-dir",
        str(state_dir),
        "-c",
        str(config),
        *args,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NO_COLOR": "1", "TZ": "UTC"}


def stats_command(state_dir: Path, *args: str, config: Path = SHIPPED) -> subprocess.CompletedProcess[str]:
    """`ebcd journal stats --state-dir DIR -c FILE ARGS`, as the duty officer would type it."""
    return subprocess.run(
        _argv(state_dir, config, *args),
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        cwd=ROOT,
        env=_env(),
        check=False,
    )


def _explain(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-2000:]}"


def _json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, _explain(done)
    return json.loads(done.stdout)


def test_stats_count_every_table_exactly(state_dir: Path) -> None:
    with JournalReader(journal_path(state_dir)) as reader:
        stats = reader.stats()
    doc = stats.as_dict()
    assert doc["rows"] == ROWS
    assert doc["received"] == RECEIVED
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["path"] == str(journal_path(state_dir))
    assert doc["files"]["db_bytes"] == journal_path(state_dir).stat().st_size > 0
    assert doc["files"]["wal_bytes"] == 0  # closed cleanly: no -wal


def test_the_command_prints_the_counts_and_the_retention_settings_as_json(state_dir: Path) -> None:
    before = files_of(state_dir)
    doc = _json(stats_command(state_dir, "--json"))
    assert doc["rows"] == ROWS
    assert doc["received"] == RECEIVED
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["path"] == str(journal_path(state_dir))
    assert doc["files"] == {
        "db_bytes": journal_path(state_dir).stat().st_size,
        "wal_bytes": 0,
        "free_bytes": 0,
    }
    assert doc["retention"] == {
        "raw_retention_days": 30.0,
        "alert_retention_days": None,
        "retention_interval_s": 3600.0,
    }
    assert files_of(state_dir) == before  # read-only: not a byte nor a timestamp changed, no file added


def test_the_command_prints_the_same_for_people(state_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "ebcd.toml"
    config.write_text(
        SHIPPED.read_text(encoding="utf-8")
        + "\n[journal]\nraw_retention_days = 7\nalert_retention_days = 365\nretention_interval_s = 600\n",
        encoding="utf-8",
    )
    done = stats_command(state_dir, config=config)
    assert done.returncode == 0, _explain(done)
    lines = [line.rstrip() for line in done.stdout.splitlines()]
    size = journal_path(state_dir).stat().st_size
    assert lines == [
        f"journal         {journal_path(state_dir)}",
        f"  database      {size / 1024:.1f} KiB ({size} B), 0 B of it free for reuse",
        "  wal           0 B",
        f"schema version  {SCHEMA_VERSION}",
        "rows",
        "  received              4  (1 without a verdict, 1 with the payload pruned)",
        "  alerts                3  (2 final, 1 active)",
        "  deliveries            6",
        "  transitions          11",
        "  dedupe                2",
        "  audit                 3",
        "raw payloads    2.3 KiB (2319 B)",
        "received at     2025-11-26T12:26:40+00:00 … 2025-11-29T12:26:40+00:00",
        "retention       raw payloads kept 7 days, ended alerts kept 365 days, every 600 s",
    ]


async def test_the_command_reads_a_journal_the_daemon_is_writing(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    journal = await Journal.open(journal_path(state_dir))  # the daemon, running
    try:
        await journal.record_received("ebc/v1/x/alerts/in", b"x" * 100, T0, source="mqtt")
        await journal.save_alert("20261126-0001", {"final": False})
        proc = await asyncio.create_subprocess_exec(
            *_argv(state_dir, SHIPPED, "--json"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=_env(),
        )
        out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
        assert proc.returncode == 0, err.decode()
        doc = json.loads(out)
        assert doc["rows"]["received"] == 1
        assert doc["rows"]["alerts"] == doc["rows"]["alerts_active"] == 1
        assert doc["received"]["payload_bytes"] == 100
        assert doc["files"]["wal_bytes"] > 0  # the writes are in the WAL, not yet checkpointed
        await journal.record_audit("duty", "send", {})  # the daemon writes on after the read
    finally:
        await journal.close()


def test_without_a_journal_the_command_names_the_path_and_exits_2(tmp_path: Path) -> None:
    done = stats_command(tmp_path / "nowhere")
    assert done.returncode == 2, _explain(done)
    assert done.stdout == ""
    assert f"no journal at {journal_path(tmp_path / 'nowhere')}" in done.stderr
    assert not (tmp_path / "nowhere").exists()
