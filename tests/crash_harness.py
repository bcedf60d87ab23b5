"""Crash harness: `kill -9` of `ebcd run` at seeded random moments, every restart checked.

One `ebcd simulate` (the whole district, a short play time, a fixed seed) serves every run of a
harness. A run starts `ebcd run`, drives the scenario its seed picks, SIGKILLs the daemon at the
moment its seed picks (sometimes a second time, early in the recovery), starts it again on the
same state dir, waits until it settles, checks, and stops it with SIGTERM.

Scenarios (`plan_run` draws one, and its timing, from the seed):
- ``send``: one district-wide or town alert over the control socket, killed 0–500 ms after the
  `send` answered;
- ``fanout``: a district-wide or town alert, killed once `acked / targets` first exceeds a drawn
  fraction;
- ``waiting``: a level-3 daily (event 20000) or test broadcast to a town, then a level-1
  emergency (11B03) to the same town, or the reverse order, killed at a drawn moment while both
  are live (so one pre-empts or waits for the other);
- ``flood``: 50–200 village alerts (unique identifiers, one `sender`) published over MQTT QoS 1
  within about a second, killed during or just after the flood.

Checks after the restart, on the alerts the run added to the journal (`RunResult.checks`):
1. ``final``: every one ends, within the settle timeout, in completed, partial, cancelled or
   expired (never dispatching, nor pending_approval: review is not configured);
2. ``targets``: `targets` is the number of terminals its request names (counted on the
   district), and none reads completed with acked < targets;
3. ``counts``: acked + failed + uncertain + pending + cancelled == targets, and the towns' tallies
   add up to the alert's;
4. ``plays``: no terminal played an (alert, revision) twice, but for resumes (`sim.play` with
   `resume: true`, serial buses) after a journalled pre-emption of that delivery. The MQTT
   simulator logs `terminal.played` for a first play only, so on MQTT terminals this check sees a
   second first play, never a resume;
5. ``ingest`` (flood): every message whose QoS 1 publish completed (PUBACK from the broker) is in
   the journal's `received` table with a verdict (outcome not NULL), and no identifier became two
   alerts; the kill splits them into acknowledged before / after it (the daemon's session is
   persistent, so the broker keeps the latter for it);
6. ``released``: no terminal stays held by an alert of the run that is not final (an alert that
   ended released its terminals), acknowledged but never `done`, for longer than a play after the
   run settled (a terminal is held while a broadcast plays on it, README "One delivery per (alert,
   terminal)", so such a terminal makes every equal or lower alert wait, up to
   `[delivery] max_play_s`); for each such terminal it says where its `done` went (a
   `ReportWatch` subscribes to every MQTT report): serial, published before the kill, after it;
7. ``stop``: SIGTERM ends the daemon with 0;
8. ``journal``: after that stop, the journal's documents of the run's alerts pass 1–3 again, agree
   with what the daemon answered, and their delivery rows tally to the same counts.

Before a run, whatever earlier runs left unsettled or holding terminals is cancelled (and noted),
so one failure does not make every later run fail.

The runs of one harness share one state dir, hence one journal: the simulated terminals remember
every (alert, revision) they played and the command sequence numbers they obeyed, and a fresh
journal numbers alerts from YYYYMMDD-0001 again and commands from the clock, so its alerts would
meet terminals that take them for ones already played and its commands for replays.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiomqtt

from ebcd.config import shipped_config_path
from ebcd.control.socket import SOCKET_NAME, ControlClient, NoDaemon
from ebcd.journal.reader import JournalReader, JournalUnavailable, journal_path
from ebcd.model.alert import AlertRequest
from ebcd.model.events import TEST_EVENT
from ebcd.protocols.mqtt.codec import Topics
from ebcd.tiers.district import District

SCENARIOS: Final = ("send", "fanout", "waiting", "flood")
FINAL_STATES: Final = frozenset({"completed", "partial", "cancelled", "expired"})
COUNT_KEYS: Final = ("acked", "failed", "uncertain", "pending", "cancelled")
SENDER: Final = "crash-harness"
DAILY_EVENT: Final = "20000"
EMERGENCY_EVENT: Final = "11B03"
CHECKS: Final = ("final", "targets", "counts", "plays", "ingest", "released", "stop", "journal")
POLL_S: Final = 0.03  # between status requests while driving (each costs the daemon a state document)
RELEASE_GRACE_S: Final = 15.0  # after the alerts settle, for the last `done` (a slow terminal: 3 s late)
# How a journalled delivery counts when the terminal did not acknowledge it (the daemon's buckets).
_ROW_BUCKET: Final = {
    "refused": "failed",
    "expired": "failed",
    "cancelled": "cancelled",
    "uncertain": "uncertain",
}

Say = Callable[[str], None]


# -- what a seed asks for ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RunPlan:
    """One seeded run: the scenario and its timing, all drawn from `seed` (see `plan_run`)."""

    seed: int
    scenario: str
    target: str = "all"  # send, fanout: "all" or "town:CODE"; waiting: "town:CODE"
    kill_after_s: float = 0.0  # send, waiting, flood: seconds after the scenario's reference moment
    fraction: float = 0.0  # fanout: kill once acked / targets exceeds this
    first: str = ""  # waiting: "daily", "test" or "emergency", sent first
    gap_s: float = 0.0  # waiting: between the two sends
    flood: int = 0  # flood: how many village alerts
    spread_s: float = 0.0  # flood: over how long they are published
    second_kill_s: float | None = None  # kill again this long after the first restart answers

    def describe(self) -> str:
        """The plan in a few words, for the run table."""
        if self.scenario == "fanout":
            what = f"{self.target} at acked>{self.fraction:.0%}"
        elif self.scenario == "waiting":
            what = (
                f"{self.first} first +{self.gap_s * 1000:.0f}ms, {self.target}, kill {self.kill_after_s:.2f}s"
            )
        elif self.scenario == "flood":
            what = f"{self.flood} in {self.spread_s:.2f}s, kill {self.kill_after_s:.2f}s"
        else:
            what = f"{self.target}, kill {self.kill_after_s * 1000:.0f}ms after send"
        if self.second_kill_s is not None:
            what += f", again {self.second_kill_s:.2f}s into recovery"
        return what


def plan_run(seed: int, district: District, scenario: str | None = None) -> RunPlan:
    """The run a seed asks for; `scenario` overrides only the seed's choice of scenario."""
    rng = random.Random(seed)
    drawn = rng.choice(SCENARIOS)
    scenario = scenario or drawn
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}: one of {', '.join(SCENARIOS)}")
    towns = sorted(district.towns)
    anywhere = "all" if rng.random() < 0.5 else f"town:{rng.choice(towns)}"
    second = rng.uniform(0.0, 1.5) if rng.random() < 0.25 else None
    if scenario == "send":
        return RunPlan(seed, scenario, anywhere, kill_after_s=rng.uniform(0.0, 0.5), second_kill_s=second)
    if scenario == "fanout":
        return RunPlan(seed, scenario, anywhere, fraction=rng.uniform(0.05, 0.95), second_kill_s=second)
    if scenario == "waiting":
        return RunPlan(
            seed,
            scenario,
            f"town:{rng.choice(towns)}",
            kill_after_s=rng.uniform(0.0, 1.5),
            first=rng.choice(("daily", "test", "emergency")),
            gap_s=rng.uniform(0.0, 0.4),
            second_kill_s=second,
        )
    spread = rng.uniform(0.6, 1.2)
    return RunPlan(
        seed,
        scenario,
        flood=rng.randint(50, 200),
        spread_s=spread,
        kill_after_s=rng.uniform(0.0, spread + 0.5),
        second_kill_s=second,
    )


# -- what a run found -------------------------------------------------------------------------
@dataclass(slots=True)
class Check:
    """One check of a run: its name (CHECKS), whether it held, and what it saw."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(slots=True)
class RunResult:
    """What one run did and found."""

    plan: RunPlan
    kill: str = ""  # what the (first) kill hit
    kills: int = 0
    alerts: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the harness could not drive or check the run
    duration_s: float = 0.0
    logs: list[Path] = field(default_factory=list)  # the daemon's logs of this run
    kill_times: list[float] = field(default_factory=list)  # loop time of each SIGKILL

    @property
    def passed(self) -> bool:
        """Every check held and nothing went wrong driving the run."""
        return self.error is None and all(c.ok for c in self.checks)

    @property
    def why(self) -> str:
        """The failed checks with what they saw (empty when the run passed)."""
        out = [f"harness: {self.error}"] if self.error else []
        out += [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]
        return "; ".join(out)

    def brief(self, width: int = 160) -> str:
        """The names of the failed checks and the start of what the first one saw."""
        failed = [c for c in self.checks if not c.ok]
        if self.error:
            text = f"harness: {self.error}"
        elif failed:
            text = f"{' '.join(c.name for c in failed)} -- {failed[0].detail}"
        else:
            return ""
        return text if len(text) <= width else text[: width - 1] + "…"

    def checked(self) -> str:
        """The checks made, e.g. 'final targets counts plays stop journal'."""
        return " ".join(c.name for c in self.checks)

    def reproduce(self) -> str:
        """How to run this run again."""
        return (
            f"seed {self.plan.seed} ({self.plan.scenario}: {self.plan.describe()}); "
            f"python bench/crash.py --runs 1 --seed {self.plan.seed}"
        )


def table(results: Iterable[RunResult]) -> str:
    """The runs as a plain-text table, one line each, with the totals under it."""
    rows = [("seed", "scenario", "plan", "kill", "kills", "alerts", "time", "result", "checked / why")]
    results = list(results)
    for r in results:
        rows.append(
            (
                str(r.plan.seed),
                r.plan.scenario,
                r.plan.describe(),
                r.kill,
                str(r.kills),
                str(len(r.alerts)),
                f"{r.duration_s:.1f}s",
                "pass" if r.passed else "FAIL",
                r.checked() if r.passed else r.brief(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join([*lines, summary(results)])


def summary(results: Iterable[RunResult]) -> str:
    """One line: runs, failures (with their seeds), per scenario, and the time taken."""
    results = list(results)
    failed = [r for r in results if not r.passed]
    per = collections.Counter(r.plan.scenario for r in results)
    scenarios = ", ".join(f"{s} {per[s]}" for s in SCENARIOS if per[s])
    line = (
        f"crash runs: {len(results)}, failures: {len(failed)} ({scenarios}; "
        f"{sum(r.kills for r in results)} kills, {sum(len(r.alerts) for r in results)} alerts, "
        f"{sum(r.duration_s for r in results):.0f} s)"
    )
    if failed:
        by_check = collections.Counter(c.name for r in failed for c in r.checks if not c.ok)
        by_check.update("harness" for r in failed if r.error)
        line += "; failed checks: " + ", ".join(f"{name} {n}" for name, n in by_check.most_common())
        line += "; failed seeds: " + ", ".join(str(r.plan.seed) for r in failed)
    return line


# -- the district, as the checks count it -----------------------------------------------------
def expected_targets(district: District, targets: Iterable[Mapping[str, Any]]) -> int | None:
    """How many terminals a request's targets name, counted on the district; None if it cannot tell."""
    chosen: set[str] = set()
    for t in targets:
        kind, code = t.get("kind"), str(t.get("code") or "")
        if kind == "all":
            chosen.update(term.code for term in district.terminals())
        elif kind == "town" and (town := district.town(code)) is not None:
            chosen.update(term.code for term in town.terminals())
        elif kind == "village" and (village := district.village(code)) is not None:
            chosen.update(term.code for term in village.terminals)
        elif kind == "terminal" and district.terminal(code) is not None:
            chosen.add(code)
        else:
            return None
    return len(chosen)


def prepare_config(directory: Path, source: Path | None = None, **delivery: float) -> Path:
    """A copy of the shipped config (or `source`) in `directory`, its serial buses at 115200 baud
    and `delivery` set in its `[delivery]` section (e.g. max_play_s=5); the rooms' ports keep
    `{run_dir}`, so pass `--run-dir` to `ebcd run` and `ebcd simulate`."""
    source = source or shipped_config_path()
    directory.mkdir(parents=True, exist_ok=True)
    for ledger in ("rooms.csv", "terminals.csv"):
        shutil.copy(source.parent / ledger, directory / ledger)
    toml = source.read_text(encoding="utf-8")
    if "[serial]" not in toml:
        toml += "\n[serial]\nbaudrate = 115200\n"
    if delivery:
        if "\n[delivery]\n" not in toml:
            toml += "\n[delivery]\n"
        keys = "".join(f"{key} = {value}\n" for key, value in delivery.items())
        toml = toml.replace("\n[delivery]\n", f"\n[delivery]\n{keys}", 1)
    (directory / source.name).write_text(toml, encoding="utf-8")
    return directory / source.name


# -- the journal, read-only -------------------------------------------------------------------
def _read_only(path: Path) -> sqlite3.Connection:
    """The journal opened read-only, as `JournalReader` opens it (immutable when there is no WAL)."""
    immutable = "" if path.with_name(path.name + "-wal").exists() else "&immutable=1"
    uri = f"file:{quote(str(path.resolve()))}?mode=ro{immutable}"
    conn = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None)
    conn.execute("PRAGMA query_only = 1")
    return conn


def journal_alert_ids(state_dir: Path) -> set[str]:
    """Every alert id of the journal (none if there is no journal yet)."""
    path = journal_path(state_dir)
    if not path.exists():
        return set()
    conn = _read_only(path)
    try:
        return {alert_id for (alert_id,) in conn.execute("SELECT alert_id FROM alerts")}
    finally:
        conn.close()


@dataclass(slots=True)
class Verdicts:
    """The journal's `received` rows of the harness's identifiers, and the alerts they became."""

    received: dict[str, list[tuple[int, str | None, str | None]]]  # identifier -> (row, outcome, detail)
    alerts: dict[str, list[str]]  # identifier -> alert ids with that (sender, identifier)


def journal_verdicts(state_dir: Path, identifiers: set[str]) -> Verdicts:
    """What the journal says of the upstream messages with these identifiers."""
    received: dict[str, list[tuple[int, str | None, str | None]]] = collections.defaultdict(list)
    alerts: dict[str, list[str]] = collections.defaultdict(list)
    conn = _read_only(journal_path(state_dir))
    try:
        for row, payload, outcome, detail in conn.execute(
            "SELECT id, payload, outcome, detail FROM received ORDER BY id"
        ):
            try:
                identifier = json.loads(payload).get("identifier")
            except (ValueError, AttributeError):
                continue
            if identifier in identifiers:
                received[identifier].append((row, outcome, detail))
        for alert_id, doc in conn.execute("SELECT alert_id, doc FROM alerts"):
            request = json.loads(doc).get("request") or {}
            if request.get("sender") == SENDER and request.get("identifier") in identifiers:
                alerts[request["identifier"]].append(alert_id)
    finally:
        conn.close()
    return Verdicts(dict(received), dict(alerts))


def journal_held(state_dir: Path) -> dict[str, list[str]]:
    """alert id -> terminals the journal shows acknowledged, not finished and holding (its `retry`
    flag: the hold timer of `[delivery] max_play_s` is armed), i.e. until their `done` is heard.

    Only alerts not yet final hold anything: an alert that ended released its terminals at once
    (README, the alert life cycle), whether or not each broadcast's `done` was heard."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    conn = _read_only(journal_path(state_dir))
    try:
        for alert_id, terminal in conn.execute(
            "SELECT d.alert_id, d.terminal FROM deliveries d JOIN alerts a ON a.alert_id = d.alert_id"
            " WHERE a.final = 0 AND d.state = 'acknowledged' AND d.finished = 0"
            " AND d.retry = 1 AND coalesce(d.progress, '') != 'stopped'"
        ):
            out[alert_id].append(terminal)
    finally:
        conn.close()
    return dict(out)


def journal_unsettled(state_dir: Path) -> set[str]:
    """Alerts whose journalled document is neither final nor in a final state."""
    conn = _read_only(journal_path(state_dir))
    try:
        return {
            alert_id
            for alert_id, state in conn.execute(
                "SELECT alert_id, json_extract(doc, '$.state') FROM alerts WHERE final = 0"
            )
            if state not in FINAL_STATES
        }
    finally:
        conn.close()


def journal_open_work(state_dir: Path, alert_ids: set[str]) -> dict[str, str]:
    """alert id -> what its deliveries that did not acknowledge are doing, most common first
    (e.g. "95 waiting: the terminal plays alert 20261203-0001")."""
    tally: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    conn = _read_only(journal_path(state_dir))
    try:
        for alert_id, state, detail in conn.execute(
            "SELECT alert_id, state, detail FROM deliveries WHERE acked = 0 AND state != 'acknowledged'"
        ):
            if alert_id in alert_ids:
                tally[alert_id][f"{state}: {detail}" if detail else state] += 1
    finally:
        conn.close()
    return {a: ", ".join(f"{n} {what}" for what, n in c.most_common(2)) for a, c in tally.items()}


def journal_preemptions(state_dir: Path, alert_ids: set[str]) -> collections.Counter[tuple[str, str]]:
    """(terminal, alert) -> how many times the journal logged the delivery as pre-empted."""
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    conn = _read_only(journal_path(state_dir))
    try:
        for alert_id, terminal in conn.execute(
            "SELECT alert_id, terminal FROM transitions WHERE state = 'preempted'"
        ):
            if alert_id in alert_ids:
                out[(terminal, alert_id)] += 1
    finally:
        conn.close()
    return out


# -- the simulator's log ----------------------------------------------------------------------
@dataclass(slots=True)
class Plays:
    """What the simulator logged playing: first plays and resumes per (terminal, alert, revision)."""

    first: collections.Counter[tuple[str, str, int]] = field(default_factory=collections.Counter)
    resumes: collections.Counter[tuple[str, str, int]] = field(default_factory=collections.Counter)


def read_plays(log: Path, alert_ids: set[str]) -> Plays:
    """`terminal.played` (MQTT terminals) and `sim.play` (serial buses) lines of these alerts."""
    plays = Plays()
    with log.open("rb") as f:
        for raw in f:
            if b'"terminal.played"' not in raw and b'"sim.play"' not in raw:
                continue
            try:
                event = json.loads(raw)
            except ValueError:  # a line being written
                continue
            if event.get("alert_id") not in alert_ids:
                continue
            key = (str(event["terminal"]), str(event["alert_id"]), int(event.get("revision", 1)))
            (plays.resumes if event.get("resume") else plays.first)[key] += 1
    return plays


# -- the checks -------------------------------------------------------------------------------
def check_states(
    district: District,
    states: Mapping[str, dict[str, Any] | None],
    requests: Mapping[str, Any],
    work: Mapping[str, str] | None = None,
) -> list[Check]:
    """Checks 1-3 on the alerts' state documents (`states`: alert id -> doc, None if none was read);
    `work` says, of an alert, what its open deliveries are doing."""
    bad_final, bad_targets, bad_counts = [], [], []
    for alert_id, doc in sorted(states.items()):
        if doc is None:
            bad_final.append(f"{alert_id} has no state")
            continue
        state = doc.get("state")
        if state not in FINAL_STATES:
            doing = (work or {}).get(alert_id)
            bad_final.append(f"{alert_id} {state} ({_counts(doc)}" + (f"; {doing})" if doing else ")"))
        targets = doc.get("targets")
        request = requests.get(alert_id) or {}
        expected = expected_targets(district, request.get("targets") or [])
        if expected is None:
            bad_targets.append(f"{alert_id}: cannot count the targets of {request.get('targets')}")
        elif targets != expected:
            bad_targets.append(f"{alert_id}: targets {targets}, its request names {expected} terminals")
        if state == "completed" and doc.get("acked", 0) < (targets or 0):
            bad_targets.append(f"{alert_id}: completed with acked {doc.get('acked')} < targets {targets}")
        total = sum(int(doc.get(k) or 0) for k in COUNT_KEYS)
        if total != targets:
            bad_counts.append(f"{alert_id}: {_counts(doc)} sum to {total}, targets {targets}")
        towns = doc.get("towns") or {}
        if towns and sum(int(t.get("targets", 0)) for t in towns.values()) != targets:
            bad_counts.append(f"{alert_id}: the towns' targets do not add up to {targets}")
    n = len(states)
    return [
        Check("final", not bad_final, listing(bad_final) or f"{n} alerts final"),
        Check("targets", not bad_targets, listing(bad_targets) or f"{n} alerts"),
        Check("counts", not bad_counts, listing(bad_counts) or f"{n} alerts"),
    ]


def check_plays(plays: Plays, preempted: Mapping[tuple[str, str], int]) -> Check:
    """Check 4: one first play per (terminal, alert, revision); resumes only after a pre-emption."""
    twice = [f"{t} {a} rev {r} played {n}x" for (t, a, r), n in sorted(plays.first.items()) if n > 1]
    for (t, a, r), n in sorted(plays.resumes.items()):
        if n > preempted.get((t, a), 0):
            twice.append(f"{t} {a} rev {r} resumed {n}x after {preempted.get((t, a), 0)} pre-emptions")
    detail = f"{sum(plays.first.values())} plays, {sum(plays.resumes.values())} resumes"
    if not twice:
        return Check("plays", True, detail)
    return Check("plays", False, listing(twice))


def _failing(
    district: District, alert_id: str, doc: dict[str, Any] | None, requests: Mapping[str, Any]
) -> list[str]:
    """What checks 1-3 find wrong with one alert's state document."""
    return [f"{c.name}: {c.detail}" for c in check_states(district, {alert_id: doc}, requests) if not c.ok]


def listing(items: list[str], most: int = 3) -> str:
    """The first `most` items, and how many more there are."""
    more = f"; and {len(items) - most} more" if len(items) > most else ""
    return "; ".join(items[:most]) + more


def _counts(doc: Mapping[str, Any]) -> str:
    return " ".join(f"{k} {doc.get(k)}" for k in ("targets", *COUNT_KEYS))


# -- processes --------------------------------------------------------------------------------
def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m ebcd ARGS`, its output appended to `log`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ebcd", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )


async def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int | None:
    """SIGTERM, then wait; its exit code, or None if it had to be killed (after a dump of its tasks)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(proc.wait, timeout_s)
    except subprocess.TimeoutExpired:
        pass
    proc.send_signal(signal.SIGUSR2)  # its tasks, then its threads' stacks, go to its log
    await asyncio.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    await asyncio.sleep(0.5)
    proc.kill()
    await asyncio.to_thread(proc.wait)
    return None


async def kill_9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL and reap."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(proc.wait)


def _log_has(log: Path, marker: bytes) -> bool:
    return log.exists() and marker in log.read_bytes()


class HarnessError(Exception):
    """The harness could not drive a run (a daemon that never answers, a send refused, ...)."""


# -- what the terminals said on MQTT ----------------------------------------------------------
class ReportWatch:
    """Every MQTT terminal's reports as the broker passes them on: when each `done` was published.

    It tells, of a terminal still held after a restart, whether its `done` went out before the kill
    (the daemon had it, or was about to, and lost it), after it, or never."""

    def __init__(self, host: str, port: int, topics: Topics) -> None:
        self.host, self.port, self.topics = host, port, topics
        self.done_at: dict[tuple[str, str], float] = {}  # (terminal, alert) -> loop time of its last `done`
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe; returns once the subscription is in place."""
        self._task = asyncio.create_task(self._run(), name="crash-report-watch")
        ready = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait({self._task, ready}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._task in done:
            self._task.result()  # raises what went wrong
        if not self.ready.is_set():
            raise HarnessError("the report watch did not subscribe within 20 s")

    async def stop(self) -> None:
        """Unsubscribe and end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        async with aiomqtt.Client(
            self.host, self.port, identifier=f"crash-watch-{uuid.uuid4().hex[:8]}"
        ) as c:
            await c.subscribe(self.topics.all_reports, qos=0)
            self.ready.set()
            async for m in c.messages:
                try:
                    report = json.loads(m.payload if isinstance(m.payload, bytes | str) else b"")
                except ValueError:
                    continue
                if isinstance(report, dict) and report.get("status") == "done":
                    self.done_at[(m.topic.value.split("/")[-2], str(report.get("alert")))] = loop.time()

    def explain(self, district: District, held: Mapping[str, list[str]], killed_at: float | None) -> str:
        """Where the `done` of each held terminal went: serial (no MQTT report), published before
        the (last) kill, after it, or not at all."""
        parts = []
        for alert_id, terminals in sorted(held.items()):
            kinds: collections.Counter[str] = collections.Counter()
            earliest = 0.0  # how long before the kill the oldest lost `done` went out
            for code in terminals:
                term = district.terminal(code)
                at = self.done_at.get((code, alert_id))
                if term is not None and term.link == "serial":
                    kinds["serial, no follow-up query"] += 1
                elif at is None:
                    kinds["mqtt, no done published"] += 1
                elif killed_at is not None and at <= killed_at:
                    kinds["mqtt, done published before the kill"] += 1
                    earliest = max(earliest, killed_at - at)
                else:
                    kinds["mqtt, done published after the kill"] += 1
            what = ", ".join(f"{n} {k}" for k, n in kinds.items())
            if earliest:
                what += f" (up to {earliest:.2f} s before it)"
            parts.append(f"{alert_id} holds {len(terminals)} (e.g. {terminals[0]}): {what}")
        return listing(parts)


# -- the harness ------------------------------------------------------------------------------
class CrashHarness:
    """One simulator for every run; `await harness.run(plan)` for each seeded run.

    Use as an async context manager: entering starts `ebcd simulate` and waits until its
    terminals are connected, leaving stops whatever still runs.
    """

    def __init__(
        self,
        config_file: Path,
        district: District,
        host: str,
        port: int,
        work: Path,
        *,
        sim_seed: int = 7,
        play_time_s: float = 1.0,
        faults: str = "slow=10%",
        settle_timeout_s: float = 120.0,
        say: Say | None = None,
    ) -> None:
        self.config_file = config_file
        self.district = district
        self.host, self.port = host, port
        self.broker = f"mqtt://{host}:{port}"
        self.work = work
        self.sim_seed = sim_seed
        self.play_time_s = play_time_s
        self.faults = faults
        self.settle_timeout_s = settle_timeout_s
        self.say: Say = say or (lambda _line: None)
        self.state = work / "state"
        self.run_dir = work / "serial"
        self.logs = work / "logs"
        self.sim_log = self.logs / "simulate.log"
        self.client = ControlClient(self.state / SOCKET_NAME)
        self.topics = Topics(district.code)
        self.sims: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.reports = ReportWatch(host, port, self.topics)
        self.results: list[RunResult] = []
        self.requests: dict[str, Any] = {}  # this run's alerts: id -> journalled request
        self.final_states: dict[str, dict[str, Any] | None] = {}  # this run's alerts as they settled

    # -- lifetime -------------------------------------------------------------------------
    async def __aenter__(self) -> CrashHarness:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        await self.reports.start()
        self.sims = spawn(
            [
                "simulate",
                "-c",
                str(self.config_file),
                "--broker",
                self.broker,
                "--run-dir",
                str(self.run_dir),
                "--seed",
                str(self.sim_seed),
                "--play-time",
                str(self.play_time_s),
                "--faults",
                self.faults,
            ],
            self.sim_log,
        )
        try:
            await self._wait_log(self.sim_log, b'"simulator.connected"', 180, self.sims)
        except BaseException:
            await stop_process(self.sims)
            await self.reports.stop()
            raise
        self.say(f"simulator up in {time.monotonic() - t0:.1f} s ({len(self.district)} terminals)")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.daemon is not None:
            await stop_process(self.daemon)
        if self.sims is not None:
            await stop_process(self.sims)
        await self.reports.stop()

    async def _wait_log(
        self, log: Path, marker: bytes, timeout_s: float, proc: subprocess.Popen[bytes]
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise HarnessError(f"{log.name}: the process exited with {proc.returncode}: {_tail(log)}")
            if _log_has(log, marker):
                return
            await asyncio.sleep(0.2)
        raise HarnessError(f"{log.name}: no {marker.decode()} within {timeout_s:.0f} s: {_tail(log)}")

    # -- the daemon -----------------------------------------------------------------------
    def _start_daemon(self, result: RunResult) -> subprocess.Popen[bytes]:
        log = self.logs / f"daemon-{result.plan.seed}-{len(result.logs) + 1}.log"
        result.logs.append(log)
        self.daemon = spawn(
            [
                "run",
                "-c",
                str(self.config_file),
                "--broker",
                self.broker,
                "--state-dir",
                str(self.state),
                "--run-dir",
                str(self.run_dir),
                "--metrics-port",
                "-1",
            ],
            log,
        )
        return self.daemon

    async def _answering(self, timeout_s: float = 60.0) -> float:
        """Wait until the daemon answers on its control socket; seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.daemon is not None and self.daemon.poll() is not None:
                raise HarnessError(f"the daemon exited with {self.daemon.returncode} before answering")
            with contextlib.suppress(NoDaemon, OSError, ValueError):
                await self.client.request("status", id="-")  # any answer will do: unknown_alert
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
        raise HarnessError(f"the daemon did not answer on its control socket within {timeout_s:.0f} s")

    async def _ask(self, op: str, **args: Any) -> dict[str, Any] | None:
        with contextlib.suppress(NoDaemon, OSError, ValueError):
            answer = await self.client.request(op, **args)
            return answer if answer.get("ok") else None
        return None

    async def _send(self, request: AlertRequest) -> str:
        answer = await self.client.request("send", alert=request.model_dump(mode="json"))
        if not answer.get("ok"):
            raise HarnessError(f"send refused: {answer.get('error')}: {answer.get('message')}")
        return str(answer["id"])

    async def _kill(self, result: RunResult) -> None:
        assert self.daemon is not None
        await kill_9(self.daemon)
        result.kills += 1
        result.kill_times.append(asyncio.get_running_loop().time())

    # -- one run --------------------------------------------------------------------------
    async def run(self, plan: RunPlan) -> RunResult:
        """Drive, kill, restart, settle, check and stop one seeded run; never raises for its failures."""
        result = RunResult(plan)
        self.requests, self.final_states = {}, {}
        t0 = time.monotonic()
        identifiers: dict[str, float | None] = {}  # flood: identifier -> when its PUBACK came (None: never)
        try:
            before = journal_alert_ids(self.state)
            self._start_daemon(result)
            await self._answering()
            await self._clean_slate(result)
            await self._drive(plan, result, identifiers)
            self._start_daemon(result)
            took = await self._answering()
            if plan.second_kill_s is not None:
                await asyncio.sleep(plan.second_kill_s)
                await self._kill(result)
                result.notes.append(f"second kill {took + plan.second_kill_s:.2f} s after the restart")
                self._start_daemon(result)
                await self._answering()
            await self._settle_and_check(result, before, identifiers)
        except (HarnessError, TimeoutError, aiomqtt.MqttError) as e:
            result.error = str(e) or type(e).__name__
        finally:
            if self.daemon is not None and self.daemon.poll() is None:
                code = await stop_process(self.daemon)
                result.checks.append(Check("stop", code == 0, f"SIGTERM: exit code {code}"))
            self.daemon = None
        if result.error is None:
            self._check_journal(result)
            self._check_plays(result)
        result.duration_s = time.monotonic() - t0
        self.results.append(result)
        self.say(
            f"seed {plan.seed} {plan.scenario}: {'pass' if result.passed else 'FAIL ' + result.why} "
            f"({result.kill}; {result.duration_s:.1f} s)"
        )
        return result

    async def _drive(self, plan: RunPlan, result: RunResult, identifiers: dict[str, float | None]) -> None:
        """Drive the scenario and kill the daemon (`result.kill_times` says when)."""
        loop = asyncio.get_running_loop()
        if plan.scenario == "send":
            await self._send(_alert(plan.target, level=1 + plan.seed % 4))
            sent = loop.time()
            await asyncio.sleep(plan.kill_after_s)
            await self._kill(result)
            result.kill = f"{(loop.time() - sent) * 1000:.0f} ms after send"
        elif plan.scenario == "fanout":
            alert_id = await self._send(_alert(plan.target, level=1))
            sent = loop.time()
            seen: dict[str, Any] = {}
            while loop.time() - sent < 60:
                answer = await self._ask("status", id=alert_id)
                if answer is not None:
                    seen = answer["state"]
                    if seen["state"] != "dispatching" or seen["acked"] > plan.fraction * seen["targets"]:
                        break
                await asyncio.sleep(POLL_S)
            await self._kill(result)
            result.kill = (
                f"acked {seen.get('acked')}/{seen.get('targets')} {loop.time() - sent:.2f}s after send"
            )
            if seen.get("state") != "dispatching":
                result.notes.append(f"the alert was {seen.get('state')} before the kill")
        elif plan.scenario == "waiting":
            await self._drive_waiting(plan, result)
        else:
            await self._drive_flood(plan, result, identifiers)

    async def _drive_waiting(self, plan: RunPlan, result: RunResult) -> None:
        loop = asyncio.get_running_loop()
        daily = _alert(plan.target, level=3, event=DAILY_EVENT, text="日常广播：防汛知识")
        if plan.first == "test":
            daily = _alert(plan.target, level=3, event=TEST_EVENT, text="应急广播测试", test=True)
        emergency = _alert(plan.target, level=1, event=EMERGENCY_EVENT, text="山洪红色预警")
        first, second = (emergency, daily) if plan.first == "emergency" else (daily, emergency)
        ids = [await self._send(first)]
        await asyncio.sleep(plan.gap_s)
        ids.append(await self._send(second))
        sent = loop.time()
        ended = ""
        while loop.time() - sent < plan.kill_after_s:  # kill at the drawn moment, or as one of them ends
            states = [await self._ask("status", id=i) for i in ids]
            ended = ", ".join(
                f"{i} {s['state']['state']}"
                for i, s in zip(ids, states, strict=True)
                if s is not None and s["state"]["state"] != "dispatching"
            )
            if ended:
                break
            await asyncio.sleep(POLL_S)
        await self._kill(result)
        result.kill = f"{loop.time() - sent:.2f}s after the 2nd send"
        if ended:
            result.notes.append(f"killed as soon as {ended}")

    async def _drive_flood(
        self, plan: RunPlan, result: RunResult, identifiers: dict[str, float | None]
    ) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(plan.seed * 7919 + 1)
        villages = sorted(v.code for v in self.district.villages())
        nonce = uuid.uuid4().hex[:8]  # identifiers unique across harness runs sharing a journal
        payloads = []
        for i in range(plan.flood):
            identifier = f"crash-{plan.seed}-{nonce}-{i:03d}"
            identifiers[identifier] = None
            payloads.append(
                (
                    identifier,
                    json.dumps(
                        {
                            "identifier": identifier,
                            "sender": SENDER,
                            "msgType": "alert",
                            "level": rng.randint(1, 4),
                            "event_type": EMERGENCY_EVENT,
                            "text": f"村级预警 {i}",
                            "ttl_s": 600,
                            "targets": [f"village:{rng.choice(villages)}"],
                        },
                        ensure_ascii=False,
                    ).encode(),
                )
            )
        failures: list[str] = []
        async with aiomqtt.Client(self.host, self.port, identifier=f"crash-flood-{nonce}") as mqtt:
            mqtt.pending_calls_threshold = 10 * plan.flood  # all of them wait for their PUBACK at once
            start = loop.time()

            async def publish(i: int, identifier: str, payload: bytes) -> None:
                await asyncio.sleep(max(0.0, start + i * plan.spread_s / plan.flood - loop.time()))
                try:
                    await mqtt.publish(self.topics.alerts_in, payload, qos=1, timeout=30)
                except aiomqtt.MqttError as e:
                    failures.append(f"{identifier}: {e}")
                    return
                identifiers[identifier] = loop.time()

            async with asyncio.TaskGroup() as tg:
                for i, (identifier, payload) in enumerate(payloads):
                    tg.create_task(publish(i, identifier, payload))
                await asyncio.sleep(max(0.0, start + plan.kill_after_s - loop.time()))
                await self._kill(result)
                killed = loop.time()
        acked_before = sum(1 for t in identifiers.values() if t is not None and t <= killed)
        acked = sum(1 for t in identifiers.values() if t is not None)
        result.kill = f"{killed - start:.2f}s into the flood, {acked_before}/{plan.flood} PUBACKed"
        result.notes.append(
            f"{acked - acked_before} PUBACKed after the kill, {len(failures)} publishes failed"
        )
        if failures:
            result.notes.append("failed publishes: " + "; ".join(failures[:3]))

    # -- after the restart ----------------------------------------------------------------
    async def _settle_and_check(
        self, result: RunResult, before: set[str], identifiers: dict[str, float | None]
    ) -> None:
        loop = asyncio.get_running_loop()
        kill_at = result.kill_times[0]
        deadline = loop.time() + self.settle_timeout_s
        published = {i for i, t in identifiers.items() if t is not None}
        states: dict[str, dict[str, Any] | None] = {}
        unjudged: set[str] = set(published)
        held: dict[str, list[str]] = {}
        settled_at: float | None = None
        while True:
            run_ids = journal_alert_ids(self.state) - before
            for alert_id in sorted(run_ids):  # ask again only about those not final yet
                if (known := states.get(alert_id)) is None or known.get("state") not in FINAL_STATES:
                    states[alert_id] = await self._state(alert_id)
            if published:
                verdicts = journal_verdicts(self.state, published)
                unjudged = {
                    i
                    for i in published
                    if not any(o is not None for _r, o, _d in verdicts.received.get(i, []))
                }
            settled = not unjudged and all(
                s is not None and s.get("state") in FINAL_STATES for s in states.values()
            )
            if settled and settled_at is None:
                settled_at = loop.time()
            # a broadcast plays for play_time_s (3 s later on a slow terminal), then its `done` frees it
            held = {a: t for a, t in journal_held(self.state).items() if a in run_ids}
            release_by = (settled_at or 0.0) + self.play_time_s + RELEASE_GRACE_S
            if (settled and (not held or loop.time() > release_by)) or loop.time() > deadline:
                break
            await asyncio.sleep(0.5)
        states = {alert_id: await self._state(alert_id) for alert_id in sorted(states)}  # as they end
        result.alerts = sorted(states)
        if settled_at is not None:
            result.notes.append(f"settled {settled_at - kill_at:.1f} s after the kill")
        self.requests = self._requests(set(states))
        result.checks += check_states(
            self.district, states, self.requests, journal_open_work(self.state, set(states))
        )
        self.final_states = states
        killed_at = result.kill_times[-1] if result.kill_times else None
        result.checks.append(
            Check(
                "released",
                not held,
                ("acknowledged, never done: " + self.reports.explain(self.district, held, killed_at))
                if held
                else "every acknowledged terminal reported done",
            )
        )
        if identifiers:
            result.checks.append(self._check_ingest(identifiers, kill_at))

    async def _clean_slate(self, result: RunResult) -> None:
        """Cancel what earlier runs left unsettled or holding terminals, so it does not stand in this
        run's way (a failure of theirs, already reported); noted in this run."""
        leftovers = sorted(journal_unsettled(self.state) | set(journal_held(self.state)))
        cancelled = []
        for alert_id in leftovers:
            answer = await self._ask("cancel", id=alert_id)
            if answer is not None:
                cancelled.append(alert_id)
        if cancelled:
            result.notes.append(
                f"cancelled {len(cancelled)} alerts earlier runs left: {', '.join(cancelled[:5])}"
            )

    async def _state(self, alert_id: str) -> dict[str, Any] | None:
        """The alert's state from the daemon, else (an alert it no longer holds) from the journal."""
        answer = await self._ask("status", id=alert_id)
        if answer is not None:
            return dict(answer["state"])
        try:
            with JournalReader(journal_path(self.state), self.district) as reader:
                return reader.alert_state(alert_id)
        except JournalUnavailable:
            return None

    def _requests(self, alert_ids: set[str]) -> dict[str, Any]:
        """The journalled requests of these alerts (alert id -> request dict)."""
        try:
            with JournalReader(journal_path(self.state), self.district) as reader:
                return {a: (reader.alert_doc(a) or {}).get("request") or {} for a in alert_ids}
        except JournalUnavailable:
            return {}

    def _check_ingest(self, identifiers: dict[str, float | None], kill_at: float) -> Check:
        """Check 5: every PUBACKed message journalled with a verdict; no identifier alerted twice."""
        published = {i for i, t in identifiers.items() if t is not None}
        verdicts = journal_verdicts(self.state, set(identifiers))
        lost, unjudged, twice = [], [], []
        outcomes: collections.Counter[str] = collections.Counter()
        for identifier in sorted(published):
            rows = verdicts.received.get(identifier, [])
            when = "before" if (identifiers[identifier] or 0) <= kill_at else "after"
            if not rows:
                lost.append(f"{identifier} (PUBACKed {when} the kill)")
            elif all(o is None for _r, o, _d in rows):
                unjudged.append(f"{identifier} (row {rows[0][0]})")
            for _r, o, d in rows:
                outcomes[o if o != "rejected" else f"rejected {str(d).split(':')[0]}"] += 1
        for identifier, alert_ids in verdicts.alerts.items():
            if len(alert_ids) > 1:
                twice.append(f"{identifier} became {', '.join(alert_ids)}")
        accepted = sum(1 for i in published if verdicts.alerts.get(i))
        problems = [
            f"not in received: {', '.join(lost[:5])}" if lost else "",
            f"no verdict: {', '.join(unjudged[:5])}" if unjudged else "",
            f"duplicates: {', '.join(twice[:5])}" if twice else "",
        ]
        seen = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        detail = "; ".join(p for p in problems if p) or (
            f"{len(published)} PUBACKed, {accepted} alerts; rows: {seen}"
        )
        return Check("ingest", not (lost or unjudged or twice), detail)

    def _check_journal(self, result: RunResult) -> None:
        """After the SIGTERM: the journal's documents and delivery rows of the run's alerts."""
        if not result.alerts:
            return
        try:
            with JournalReader(journal_path(self.state), self.district) as reader:
                states = {a: reader.alert_state(a) for a in result.alerts}
                rows = {a: reader.current_deliveries(reader.alert_doc(a) or {}) for a in result.alerts}
        except JournalUnavailable as e:
            result.checks.append(Check("journal", False, e.message))
            return
        problems = []
        for alert_id, doc in states.items():
            live = self.final_states.get(alert_id)
            if not _failing(self.district, alert_id, live, self.requests):  # else reported already
                problems += _failing(self.district, alert_id, doc, self.requests)
            if doc is None:
                continue
            tally = collections.Counter(
                "acked" if d.is_acked else _ROW_BUCKET.get(d.state, "pending")
                for d in rows[alert_id].values()
            )
            journalled = {k: int(doc.get(k) or 0) for k in COUNT_KEYS}
            if {k: tally.get(k, 0) for k in COUNT_KEYS} != journalled:
                problems.append(f"{alert_id}: the doc says {journalled}, its delivery rows {dict(tally)}")
            if live is None:
                continue
            said, kept = (live.get("state"), live.get("acked")), (doc.get("state"), doc.get("acked"))
            late_ack = said[0] == "partial" and (kept[1] or 0) >= (said[1] or 0)  # partial may complete
            if said != kept and not late_ack:
                problems.append(
                    f"{alert_id}: the daemon said {said[0]} acked {said[1]}, "
                    f"the journal after the stop {kept[0]} acked {kept[1]}"
                )
        result.checks.append(
            Check("journal", not problems, listing(problems) or f"{len(states)} alerts agree")
        )

    def _check_plays(self, result: RunResult) -> None:
        ids = set(result.alerts)
        if not ids:
            return
        result.checks.append(check_plays(read_plays(self.sim_log, ids), journal_preemptions(self.state, ids)))


def _alert(
    target: str, *, level: int, event: str = EMERGENCY_EVENT, text: str = "山洪红色预警", test: bool = False
) -> AlertRequest:
    kind, _, code = target.partition(":")
    targets = [{"kind": kind} if not code else {"kind": kind, "code": code}]
    return AlertRequest.model_validate(
        {"level": level, "event_type": event, "targets": targets, "text": text, "test": test, "ttl_s": 600}
    )


def _tail(log: Path, n: int = 600) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"
