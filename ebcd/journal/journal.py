"""The journal: what ebcd must not forget, in SQLite (WAL), written by one thread with group commit.

What it keeps: every received upstream message (before any judgement) and the verdict on it, every
alert document, every delivery transition (an append-only log plus the latest state of each
delivery), (sender, identifier) claims for de-duplication and the audit of who did what. This
module owns the schema, its migrations and every statement; `ebcd.journal.worker` runs them on the
writer thread (its docstring tells how: queue, bound, batches, failures, commit latency).

Contract with callers: an awaited write has been committed; with the default `synchronous=FULL`
the WAL is fsynced on every commit, so it survives kill -9 and power loss (with NORMAL only kill
-9). A failed write raises `JournalError` in its caller alone when it alone is at fault (a
constraint, an unbindable value), in every caller of its batch when the database fails (locked,
I/O, full, corrupt). Cancelling an awaiting caller does not withdraw its write. Reads see every
write queued before them. Nothing is ever dropped: past `max_queue_ops` queued ops, awaited calls
wait for room (counted in `stats.backpressure_wait_s`); `record_transition` never blocks the loop,
so its producer should `await flush()` after each burst, which is where it meets the backpressure
and learns of a transition that could not be journalled.

Contract with the daemon: alert documents are opaque JSON objects, except the key `"final"`
(bool, missing means False): an alert whose doc is not final is returned by `load_active()` at
start-up with the latest state of each of its deliveries.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, NamedTuple, Self

import structlog

from ebcd.journal.worker import JournalStats as JournalStats  # re-exported: the types a caller meets
from ebcd.journal.worker import NullWorker, StoreWorker
from ebcd.journal.worker import OnCommit as OnCommit
from ebcd.journal.worker import Synchronous as Synchronous

log = structlog.get_logger(__name__)

SCHEMA_VERSION: Final = 3
DEFAULT_MAX_QUEUE_OPS: Final = 50_000
BUSY_TIMEOUT_MS: Final = 5000
THREAD_NAME: Final = "ebcd-journal"

# One tuple of statements per schema version; never edit a shipped one, append a new one.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE received (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL,
        source TEXT NOT NULL, received_at REAL NOT NULL, outcome TEXT, detail TEXT, alert_id TEXT)""",
        """CREATE TABLE alerts (alert_id TEXT PRIMARY KEY, doc TEXT NOT NULL, final INTEGER NOT NULL,
        created_at REAL NOT NULL, updated_at REAL NOT NULL)""",
        "CREATE INDEX alerts_active ON alerts (alert_id) WHERE final = 0",
        "CREATE INDEX alerts_updated ON alerts (updated_at)",
        """CREATE TABLE transitions (id INTEGER PRIMARY KEY, alert_id TEXT NOT NULL,
        terminal TEXT NOT NULL, state TEXT NOT NULL, detail TEXT, at REAL NOT NULL,
        attempt INTEGER NOT NULL)""",
        "CREATE INDEX transitions_alert ON transitions (alert_id, id)",
        """CREATE TABLE deliveries (alert_id TEXT NOT NULL, terminal TEXT NOT NULL,
        state TEXT NOT NULL, detail TEXT, at REAL NOT NULL, attempts INTEGER NOT NULL,
        PRIMARY KEY (alert_id, terminal)) WITHOUT ROWID""",
        """CREATE TABLE dedupe (sender TEXT NOT NULL, identifier TEXT NOT NULL,
        alert_id TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (sender, identifier)) WITHOUT ROWID""",
        """CREATE TABLE audit (id INTEGER PRIMARY KEY, at REAL NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, detail TEXT NOT NULL)""",
    ),
    (  # 2: the whole state of a delivery, so that a rebuild gives back the same core
        "ALTER TABLE deliveries ADD COLUMN revision INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE deliveries ADD COLUMN progress TEXT",
        "ALTER TABLE deliveries ADD COLUMN acked INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE deliveries ADD COLUMN finished INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE deliveries ADD COLUMN resume INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE deliveries ADD COLUMN retry INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE deliveries ADD COLUMN budget_base INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE deliveries ADD COLUMN left_area INTEGER NOT NULL DEFAULT 0",
    ),
    (  # 3: EBD packages with the platform above (ebcd.platform): EBDIDs seen, the outbox, broadcasts
        """CREATE TABLE ebd_seen (ebdid TEXT PRIMARY KEY, received_row INTEGER NOT NULL,
        at REAL NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE ebd_outbox (id INTEGER PRIMARY KEY, ebdid TEXT NOT NULL, ebd_type TEXT NOT NULL,
        package BLOB NOT NULL, created_at REAL NOT NULL, sent_at REAL, result TEXT)""",
        "CREATE INDEX ebd_outbox_unsent ON ebd_outbox (id) WHERE sent_at IS NULL",
        """CREATE TABLE ebd_broadcasts (alert_id TEXT PRIMARY KEY, ebmid TEXT NOT NULL,
        ended INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID""",
    ),
)
_INSERT_TRANSITION: Final = (
    "INSERT INTO transitions (alert_id, terminal, state, detail, at, attempt)"
    " VALUES (:alert_id, :terminal, :state, :detail, :at, :attempt)"
)
# A full row (`full` = 1, from the delivery core) replaces the delivery's state; a bare transition
# (`full` = 0) sets state and detail and adds its attempt.
_UPSERT_DELIVERY: Final = """INSERT INTO deliveries (alert_id, terminal, state, detail, at, attempts,
    revision, progress, acked, finished, resume, retry, budget_base, left_area)
    VALUES (:alert_id, :terminal, :state, :detail, :at, CASE WHEN :full THEN :attempts ELSE :attempt END,
    :revision, :progress, :acked, :finished,
    :resume, :retry, :budget_base, :left_area)
    ON CONFLICT (alert_id, terminal) DO UPDATE SET state = excluded.state, detail = excluded.detail,
    at = excluded.at,
    attempts = CASE WHEN :full THEN :attempts ELSE deliveries.attempts + excluded.attempts END,
    revision = CASE WHEN :full THEN excluded.revision ELSE deliveries.revision END,
    progress = CASE WHEN :full THEN excluded.progress ELSE deliveries.progress END,
    acked = CASE WHEN :full THEN excluded.acked ELSE deliveries.acked END,
    finished = CASE WHEN :full THEN excluded.finished ELSE deliveries.finished END,
    resume = CASE WHEN :full THEN excluded.resume ELSE deliveries.resume END,
    retry = CASE WHEN :full THEN excluded.retry ELSE deliveries.retry END,
    budget_base = CASE WHEN :full THEN excluded.budget_base ELSE deliveries.budget_base END,
    left_area = CASE WHEN :full THEN excluded.left_area ELSE deliveries.left_area END"""
# The same two writes for a run of full rows as one statement each, many rows to a statement:
# SQLite then inserts the whole run in one step, without taking the interpreter lock once per row
# (executemany takes it back for every row, stalling the event loop's thread each time).
_FULL_ROW_KEYS: Final = (
    "alert_id", "terminal", "state", "detail", "at", "attempt", "attempts", "revision", "progress", "acked",
    "finished", "resume", "retry", "budget_base", "left_area",
)  # fmt: skip
_TRANSITION_KEYS: Final = _FULL_ROW_KEYS[:6]
_DELIVERY_KEYS: Final = tuple(k for k in _FULL_ROW_KEYS if k != "attempt")
_ROWS_PER_STATEMENT: Final = 500  # 14 parameters a row at most: far below SQLite's 32,766
_MULTI_TRANSITIONS: Final = "INSERT INTO transitions (alert_id, terminal, state, detail, at, attempt) VALUES "
_MULTI_DELIVERIES: Final = (
    "INSERT INTO deliveries (alert_id, terminal, state, detail, at, attempts, revision, progress, acked,"
    " finished, resume, retry, budget_base, left_area) VALUES {values}"
    " ON CONFLICT (alert_id, terminal) DO UPDATE SET state = excluded.state, detail = excluded.detail,"
    " at = excluded.at, attempts = excluded.attempts, revision = excluded.revision,"
    " progress = excluded.progress, acked = excluded.acked, finished = excluded.finished,"
    " resume = excluded.resume, retry = excluded.retry, budget_base = excluded.budget_base,"
    " left_area = excluded.left_area"
)


def _append_deliveries(conn: sqlite3.Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write queued delivery rows in order: runs of full rows many to a statement, bare ones singly."""
    start = 0
    while start < len(rows):
        end = start
        full = bool(rows[start]["full"])
        while end < len(rows) and bool(rows[end]["full"]) == full and end - start < _ROWS_PER_STATEMENT:
            end += 1
        run = rows[start:end]
        if full:
            transitions = ",".join(["(?,?,?,?,?,?)"] * len(run))
            conn.execute(_MULTI_TRANSITIONS + transitions, [r[k] for r in run for k in _TRANSITION_KEYS])
            values = ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?,?)"] * len(run))
            conn.execute(
                _MULTI_DELIVERIES.format(values=values),
                [r[k] for r in run for k in _DELIVERY_KEYS],
            )
        else:
            conn.executemany(_INSERT_TRANSITION, run)
            conn.executemany(_UPSERT_DELIVERY, run)
        start = end


_DELIVERY_COLUMNS: Final = (
    "terminal, state, detail, at, attempts, revision, progress, acked, finished, resume, retry, budget_base,"
    " left_area"
)


class JournalError(Exception):
    """The journal could not do what was asked; nothing awaited on it should be taken as durable."""


class Delivery(NamedTuple):
    """The latest state of one delivery (alert, terminal) and how many attempts were recorded."""

    state: str
    detail: str | None
    at: float
    attempts: int
    revision: int = 1
    progress: str | None = None
    acked: bool = False
    finished: bool = False
    resume: bool = False
    retry: bool = False
    budget_base: int = 0
    left: bool = False


class Transition(NamedTuple):
    """One entry of the append-only transition log."""

    terminal: str
    state: str
    detail: str | None
    at: float
    attempt: bool


class Received(NamedTuple):
    """One raw inbound message and the verdict on it (None until `mark_received`)."""

    row_id: int
    topic: str
    payload: bytes
    source: str
    received_at: float
    outcome: str | None
    detail: str | None
    alert_id: str | None


class AuditEntry(NamedTuple):
    """Who did what, when."""

    at: float
    actor: str
    action: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ActiveAlert:
    """A non-final alert as recovered at start-up, with its deliveries by terminal."""

    alert_id: str
    doc: dict[str, Any]
    deliveries: dict[str, Delivery]


@dataclass(frozen=True, slots=True)
class PruneResult:
    """What one `Journal.prune` removed: rows by kind, and an estimate of the bytes it freed."""

    payloads: int = 0  # received messages whose raw payload was cleared (their rows stay)
    alerts: int = 0
    deliveries: int = 0
    transitions: int = 0
    dedupe: int = 0
    # the payload bytes cleared, the deleted alerts' documents and the text of their deliveries and
    # transitions; SQLite keeps the pages for new rows (the file stops growing, it shrinks only by VACUUM)
    bytes_freed: int = 0
    ebd_sent: int = 0  # packages the platform above answered, deleted from the EBD outbox
    ebd_seen: int = 0  # EBDIDs received, forgotten (an EBM's EBMID claim and its EndTime still hold)

    @property
    def rows(self) -> int:
        """Rows pruned, of every kind (a cleared payload counts as one)."""
        return (
            self.payloads
            + self.alerts
            + self.deliveries
            + self.transitions
            + self.dedupe
            + self.ebd_sent
            + self.ebd_seen
        )


PRUNE_BATCH_ROWS: Final = 1000  # received messages cleared per transaction
PRUNE_BATCH_ALERTS: Final = 20  # alerts deleted per transaction, each with up to a district of deliveries
# The alerts retention deletes next: final and unchanged since ?1 (oldest first, ?2 at a time).
_DOOMED: Final = (
    "SELECT alert_id FROM alerts WHERE final = 1 AND updated_at < ?1 ORDER BY updated_at, alert_id LIMIT ?2"
)
_ROW_BYTES: Final = "length(terminal) + length(state) + coalesce(length(detail), 0) + 8"  # about
_DOOMED_DOCS: Final = f"SELECT alert_id, length(doc) FROM alerts WHERE alert_id IN ({_DOOMED})"  # noqa: S608
_DOOMED_ROWS: Final = (  # (table, alert id, rows, bytes about) of the doomed alerts
    f"SELECT 'deliveries', alert_id, count(*), sum({_ROW_BYTES}) FROM deliveries"  # noqa: S608 -- constants
    f" WHERE alert_id IN ({_DOOMED}) GROUP BY alert_id UNION ALL"
    f" SELECT 'transitions', alert_id, count(*), sum({_ROW_BYTES}) FROM transitions"
    f" WHERE alert_id IN ({_DOOMED}) GROUP BY alert_id"
)
_IN_IDS: Final = "alert_id IN (SELECT value FROM json_each(?))"  # ? = a JSON array of alert ids
_DELETE_ALERTS: Final = f"DELETE FROM alerts WHERE {_IN_IDS} AND final = 1 AND updated_at < ?"  # noqa: S608
_DELETE_ORPHANS: Final = tuple(  # the rows of those alerts of the list that are gone
    f"DELETE FROM {table} WHERE {_IN_IDS}"  # noqa: S608 -- constants
    f" AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.alert_id = {table}.alert_id)"
    for table in ("deliveries", "transitions")
)


_BARE: Final[dict[str, Any]] = {
    "full": 0, "attempts": 0, "revision": 1, "progress": None, "acked": 0, "finished": 0, "resume": 0,
    "retry": 0, "budget_base": 0, "left_area": 0,
}  # fmt: skip


def _delivery(row: list[Any]) -> Delivery:
    state, detail, at, attempts, revision, progress, acked, finished, resume, retry, budget_base, left = row
    return Delivery(
        state, detail, at, attempts, revision, progress, bool(acked), bool(finished), bool(resume),
        bool(retry), budget_base, bool(left),
    )  # fmt: skip


def _encode(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise JournalError(f"not a JSON document: {exc}") from exc


def _decode(text: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise JournalError(f"corrupt document in the journal: {exc}") from exc
    if not isinstance(doc, dict):
        raise JournalError("corrupt document in the journal: not an object")
    return doc


class Journal:
    """The durable journal; open with `await Journal.open(path)`, end with `await close()`."""

    enabled: ClassVar[bool] = True
    _worker_class: ClassVar[type[StoreWorker]] = StoreWorker

    def __init__(
        self, path: Path, synchronous: Synchronous, max_queue_ops: int, group_commit_s: float = 0.0
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise JournalError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = path
        self.synchronous: Synchronous = synchronous
        self._worker = self._worker_class(
            path,
            synchronous=synchronous,
            max_queue_ops=max_queue_ops,
            busy_timeout_ms=BUSY_TIMEOUT_MS,
            thread_name=THREAD_NAME,
            error=JournalError,
            setup=functools.partial(_migrate, path=path),
            append=_append_deliveries,
            group_commit_s=group_commit_s,
        )
        self.stats: JournalStats = self._worker.stats
        self._log = log.bind(journal=str(path))

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: Synchronous = "FULL",
        max_queue_ops: int = DEFAULT_MAX_QUEUE_OPS,
        on_commit: OnCommit | None = None,
        group_commit_s: float = 0.0,
    ) -> Self:
        """Open (creating or migrating) the journal at `path` and start its writer thread;
        `group_commit_s`: how long queued transitions may wait to be committed with the next."""
        self = cls(path, synchronous, max_queue_ops, group_commit_s)
        self.on_commit = on_commit
        await self._worker.start()  # returns once the thread has connected and migrated
        self._log.info("journal.opened", synchronous=synchronous, schema_version=SCHEMA_VERSION)
        return self

    @property
    def on_commit(self) -> OnCommit | None:
        """Called on the loop with (latency_s, rows) after each committed write transaction."""
        return self._worker.on_commit

    @on_commit.setter
    def on_commit(self, callback: OnCommit | None) -> None:
        self._worker.on_commit = callback

    @property
    def queue_depth(self) -> int:
        """Ops waiting for the writer thread (approximate)."""
        return self._worker.queue_depth

    # ---- writes: durable when the await returns --------------------------------------------

    async def record_received(self, topic: str, payload: bytes, received_at: float, *, source: str) -> int:
        """Journal a raw inbound message before anything judges it; returns its row id."""
        sql = "INSERT INTO received (topic, payload, source, received_at) VALUES (?, ?, ?, ?)"
        row_id, _ = await self._worker.write((sql, (topic, bytes(payload), source, received_at)))
        return row_id

    async def mark_received(self, row_id: int, *, outcome: str, detail: str, alert_id: str | None) -> None:
        """Record the verdict (accepted, or the rejection reason) on a received message."""
        sql = "UPDATE received SET outcome = ?, detail = ?, alert_id = ? WHERE id = ?"
        _, changed = await self._worker.write((sql, (outcome, detail, alert_id, row_id)))
        if changed != 1:
            raise JournalError(f"no received message with row id {row_id}")

    async def save_alert(
        self, alert_id: str, doc: dict[str, Any], *, dedupe_key: tuple[str, str] | None = None
    ) -> None:
        """Upsert an alert document and, if given, claim its (sender, identifier) for it."""
        final = doc.get("final", False)
        if not isinstance(final, bool):
            raise JournalError(f"alert {alert_id}: doc['final'] must be a bool, got {final!r}")
        now = time.time()
        upsert = (
            "INSERT INTO alerts (alert_id, doc, final, created_at, updated_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (alert_id) DO UPDATE SET doc = excluded.doc, final = excluded.final,"
            " updated_at = excluded.updated_at",
            (alert_id, _encode(doc), int(final), now, now),
        )
        if dedupe_key is None:
            await self._worker.write(upsert)
            return
        claim = (  # the first alert to claim a key keeps it
            "INSERT INTO dedupe (sender, identifier, alert_id, at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (*dedupe_key, alert_id, now),
        )
        await self._worker.write(upsert, claim)

    async def mark_final(self, alert_id: str) -> bool:
        """Set the alert's doc["final"] to true; False if there is no such alert."""
        sql = (
            "UPDATE alerts SET doc = json_set(doc, '$.final', json('true')), final = 1, updated_at = ?"
            " WHERE alert_id = ?"
        )
        _, changed = await self._worker.write((sql, (time.time(), alert_id)))
        return changed == 1

    async def record_audit(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        """Record who did what."""
        sql = "INSERT INTO audit (at, actor, action, detail) VALUES (?, ?, ?, ?)"
        await self._worker.write((sql, (time.time(), actor, action, _encode(detail))))

    def record_transition(
        self,
        alert_id: str,
        terminal: str,
        state: str,
        detail: str | None,
        at: float,
        *,
        attempt: bool = False,
    ) -> None:
        """Queue a delivery transition without blocking; `await flush()` to know it is durable."""
        self._worker.append(
            {**_BARE, "alert_id": alert_id, "terminal": terminal, "state": state, "detail": detail, "at": at,
             "attempt": int(attempt)}
        )  # fmt: skip

    def record_delivery(self, row: dict[str, Any]) -> None:
        """Queue the whole state of a delivery (the keys of `delivery_row`) without blocking."""
        self._worker.append(row)

    def record_deliveries(self, rows: Sequence[dict[str, Any]]) -> None:
        """Queue the states of several deliveries, in order, without blocking (one queue op)."""
        self._worker.append_many(rows)

    async def flush(self) -> None:
        """Return when everything queued before it is durable; JournalError if a transition was lost."""
        await self._worker.flush()

    # ---- reads: each sees every write queued before it -------------------------------------

    async def load_active(self) -> list[ActiveAlert]:
        """Every alert whose doc is not final, oldest first, with its latest delivery states."""
        alerts, rows = await self._worker.read(
            ("SELECT alert_id, doc FROM alerts WHERE final = 0 ORDER BY created_at", ()),
            (
                f"SELECT d.alert_id, {_DELIVERY_COLUMNS} FROM deliveries d"  # noqa: S608 -- constant columns
                " JOIN alerts a USING (alert_id) WHERE a.final = 0",
                (),
            ),
        )
        by_alert: dict[str, dict[str, Delivery]] = {alert_id: {} for alert_id, _ in alerts}
        for alert_id, terminal, *rest in rows:
            by_alert[alert_id][terminal] = _delivery(rest)
        return [ActiveAlert(a, _decode(doc), by_alert[a]) for a, doc in alerts]

    async def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        """The alert's document, or None."""
        (rows,) = await self._worker.read(("SELECT doc FROM alerts WHERE alert_id = ?", (alert_id,)))
        return _decode(rows[0][0]) if rows else None

    async def list_alerts(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently saved alert documents, newest first."""
        (rows,) = await self._worker.read(
            ("SELECT doc FROM alerts ORDER BY updated_at DESC LIMIT ?", (limit,))
        )
        return [_decode(doc) for (doc,) in rows]

    async def deliveries(self, alert_id: str) -> dict[str, Delivery]:
        """The latest state of each delivery of an alert, by terminal."""
        sql = f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE alert_id = ?"  # noqa: S608 -- constant columns
        (rows,) = await self._worker.read((sql, (alert_id,)))
        return {terminal: _delivery(rest) for terminal, *rest in rows}

    async def history(self, alert_id: str) -> list[Transition]:
        """The transition log of an alert, in the order it was recorded."""
        sql = "SELECT terminal, state, detail, at, attempt FROM transitions WHERE alert_id = ? ORDER BY id"
        (rows,) = await self._worker.read((sql, (alert_id,)))
        return [Transition(t, s, d, at, bool(a)) for t, s, d, at, a in rows]

    async def dedupe_key_seen(self, sender: str, identifier: str) -> str | None:
        """The alert id saved under (sender, identifier), or None."""
        sql = "SELECT alert_id FROM dedupe WHERE sender = ? AND identifier = ?"
        (rows,) = await self._worker.read((sql, (sender, identifier)))
        return str(rows[0][0]) if rows else None

    async def list_received(self, limit: int = 100) -> list[Received]:
        """The most recent raw inbound messages, newest first."""
        sql = (
            "SELECT id, topic, payload, source, received_at, outcome, detail, alert_id FROM received"
            " ORDER BY id DESC LIMIT ?"
        )
        (rows,) = await self._worker.read((sql, (limit,)))
        return [Received(*row) for row in rows]

    async def dedupe_claims(self) -> list[tuple[str, str, str, float]]:
        """Every (sender, identifier) claim: (sender, identifier, alert id, when claimed)."""
        (rows,) = await self._worker.read(("SELECT sender, identifier, alert_id, at FROM dedupe", ()))
        return [(str(s), str(i), str(a), float(at)) for s, i, a, at in rows]

    async def unjudged(self, limit: int = 100_000, *, source: str | None = None) -> list[Received]:
        """Raw inbound messages journalled but never judged (a crash came first), oldest first;
        only those of `source` (mqtt, ebd) when given."""
        sql = (
            "SELECT id, topic, payload, source, received_at, outcome, detail, alert_id FROM received"
            " WHERE outcome IS NULL AND (?1 IS NULL OR source = ?1) ORDER BY id LIMIT ?2"
        )
        (rows,) = await self._worker.read((sql, (source, limit)))
        return [Received(*row) for row in rows]

    # ---- EBD packages with the platform above (ebcd.platform) ------------------------------

    async def ebd_claim(self, ebdid: str, row: int) -> tuple[int, float] | None:
        """Claim an EBDID for a received row: None if claimed now (or before by the same row), else
        the (row, time) that claimed it first."""
        claim = ("INSERT INTO ebd_seen (ebdid, received_row, at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                 (ebdid, row, time.time()))  # fmt: skip
        await self._worker.write(claim)
        (rows,) = await self._worker.read(("SELECT received_row, at FROM ebd_seen WHERE ebdid = ?", (ebdid,)))
        first, at = rows[0]
        return None if first == row else (int(first), float(at))

    async def ebd_enqueue(
        self, outbox_id: int, ebdid: str, ebd_type: str, package: bytes, *, ended: str | None = None
    ) -> None:
        """Keep a package to send up; with `ended`, mark that alert's broadcast reported as ended too."""
        put = ("INSERT INTO ebd_outbox (id, ebdid, ebd_type, package, created_at) VALUES (?, ?, ?, ?, ?)",
               (outbox_id, ebdid, ebd_type, package, time.time()))  # fmt: skip
        if ended is None:
            await self._worker.write(put)
        else:
            mark = ("UPDATE ebd_broadcasts SET ended = 1 WHERE alert_id = ?", (ended,))
            await self._worker.write(put, mark)

    async def ebd_unsent(self, limit: int = 100) -> list[tuple[int, str, str, bytes]]:
        """The oldest packages not sent up yet: (id, EBDID, EBDType, package)."""
        sql = "SELECT id, ebdid, ebd_type, package FROM ebd_outbox WHERE sent_at IS NULL ORDER BY id LIMIT ?"
        (rows,) = await self._worker.read((sql, (limit,)))
        return [(int(i), str(e), str(t), bytes(p)) for i, e, t, p in rows]

    async def ebd_sent(self, outbox_id: int, result: str) -> None:
        """Record that the platform above answered a package."""
        sql = "UPDATE ebd_outbox SET sent_at = ?, result = ? WHERE id = ?"
        await self._worker.write((sql, (time.time(), result, outbox_id)))

    async def ebd_last_outbox_id(self) -> int:
        """The highest outbox id given out (0 for none)."""
        (rows,) = await self._worker.read(("SELECT coalesce(max(id), 0) FROM ebd_outbox", ()))
        return int(rows[0][0])

    async def ebd_broadcast(self, alert_id: str, ebmid: str) -> None:
        """Remember that an alert is a broadcast from above, to be reported up until it ends."""
        sql = "INSERT INTO ebd_broadcasts (alert_id, ebmid) VALUES (?, ?) ON CONFLICT DO NOTHING"
        await self._worker.write((sql, (alert_id, ebmid)))

    async def ebd_open_broadcasts(self) -> list[tuple[str, str]]:
        """(alert id, EBMID) of the broadcasts from above whose end was not reported up yet."""
        (rows,) = await self._worker.read(("SELECT alert_id, ebmid FROM ebd_broadcasts WHERE ended = 0", ()))
        return [(str(a), str(e)) for a, e in rows]

    async def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        """The most recent audit entries, newest first."""
        (rows,) = await self._worker.read(
            ("SELECT at, actor, action, detail FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        )
        return [AuditEntry(at, actor, action, _decode(d)) for at, actor, action, d in rows]

    async def integrity_check(self) -> list[str]:
        """SQLite's integrity check: ["ok"] when the database is sound."""
        (rows,) = await self._worker.read(("PRAGMA integrity_check", ()))
        return [str(msg) for (msg,) in rows]

    # ---- retention (ebcd.journal.retention) ----------------------------------------------

    async def prune(self, raw_before: float, alerts_before: float | None) -> PruneResult:
        """Clear the raw payloads of messages judged and received before `raw_before`; with
        `alerts_before`, delete the final alerts unchanged since before it, with their deliveries,
        transitions and the dedupe claims on them. Never touches an unjudged message or an alert
        that is not final. In short transactions, so the daemon's writes go on in between.

        A received message keeps its row, with the payload cleared (a zero-length blob; the column
        is NOT NULL): topic, source, time, verdict, detail and alert id are the history of what came
        in and what was decided about it, a few dozen bytes each, while the payloads (a CAP
        document is kilobytes: 13 MB of them were seen) are what grows. The bytes are gone, so
        nothing can be judged again from them; only an unjudged message is re-judged after a
        crash, and those are never cleared. A dedupe claim goes once its alert is gone and it is
        older than `alerts_before`: a message repeated after that long is accepted again.
        """
        if not self.enabled:
            return PruneResult()
        payloads, payload_bytes = await self._prune_payloads(raw_before)
        ebd_sent, ebd_bytes = await self._prune_ebd_outbox(raw_before)
        ebd_seen = 0
        (old,) = await self._worker.read(("SELECT 1 FROM ebd_seen WHERE at < ? LIMIT 1", (raw_before,)))
        if old:  # no write transaction when there is nothing to forget
            _, ebd_seen = await self._worker.write(("DELETE FROM ebd_seen WHERE at < ?", (raw_before,)))
        payload_bytes += ebd_bytes
        if alerts_before is None:
            return PruneResult(
                payloads=payloads, bytes_freed=payload_bytes, ebd_sent=ebd_sent, ebd_seen=ebd_seen
            )
        alerts, deliveries, transitions, alert_bytes = await self._prune_alerts(alerts_before)
        # claims whose alert is gone: those of the alerts deleted now, or by a pass that ended early
        _, dedupe = await self._worker.write(
            (
                "DELETE FROM dedupe WHERE at < ?"
                " AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.alert_id = dedupe.alert_id)",
                (alerts_before,),
            )
        )
        return PruneResult(
            payloads,
            alerts,
            deliveries,
            transitions,
            dedupe,
            bytes_freed=payload_bytes + alert_bytes,
            ebd_sent=ebd_sent,
            ebd_seen=ebd_seen,
        )

    async def _prune_ebd_outbox(self, before: float) -> tuple[int, int]:
        """Delete packages sent up (and answered) before `before`: (packages, bytes). The newest row
        always stays: the next outbox id, and so the next EBDID, is numbered from it."""
        keep = "sent_at < ? AND id < (SELECT max(id) FROM ebd_outbox)"
        (rows,) = await self._worker.read(
            (f"SELECT count(*), coalesce(sum(length(package)), 0) FROM ebd_outbox WHERE {keep}", (before,))  # noqa: S608
        )
        if not rows[0][0]:
            return 0, 0
        await self._worker.write((f"DELETE FROM ebd_outbox WHERE {keep}", (before,)))  # noqa: S608
        return int(rows[0][0]), int(rows[0][1])

    async def _prune_payloads(self, before: float) -> tuple[int, int]:
        """Clear judged payloads received before `before`: (messages, bytes)."""
        cleared = freed = last_id = 0
        while True:
            (rows,) = await self._worker.read(
                (
                    "SELECT id, length(payload) FROM received WHERE id > ? AND received_at < ?"
                    " AND outcome IS NOT NULL AND length(payload) > 0 ORDER BY id LIMIT ?",
                    (last_id, before, PRUNE_BATCH_ROWS),
                )
            )
            if not rows:
                return cleared, freed
            ids = [row_id for row_id, _ in rows]
            _, changed = await self._worker.write(
                (  # the verdict checked again in the write: only what is judged loses its bytes
                    "UPDATE received SET payload = x'' WHERE id IN (SELECT value FROM json_each(?))"
                    " AND received_at < ? AND outcome IS NOT NULL",
                    (json.dumps(ids), before),
                )
            )
            cleared += changed
            freed += sum(size for _, size in rows)  # a verdict, once given, is never taken back
            last_id = ids[-1]
            if len(rows) < PRUNE_BATCH_ROWS:
                return cleared, freed

    async def _prune_alerts(self, before: float) -> tuple[int, int, int, int]:
        """Delete final alerts unchanged since `before`: (alerts, deliveries, transitions, bytes)."""
        alerts = deliveries = transitions = freed = 0
        while True:
            docs, rows = await self._worker.read(  # one snapshot
                (_DOOMED_DOCS, (before, PRUNE_BATCH_ALERTS)), (_DOOMED_ROWS, (before, PRUNE_BATCH_ALERTS))
            )
            if not docs:
                return alerts, deliveries, transitions, freed
            ids = json.dumps([alert_id for alert_id, _ in docs])
            _, deleted = await self._worker.write(  # one transaction: an alert goes with all its rows
                (_DELETE_ALERTS, (ids, before)), *((sql, (ids,)) for sql in _DELETE_ORPHANS)
            )
            if not deleted:
                return alerts, deliveries, transitions, freed  # they all changed meanwhile
            gone: dict[str, int] = dict(docs)
            if deleted < len(docs):  # some changed between the count and the delete: they stay
                (kept,) = await self._worker.read((f"SELECT alert_id FROM alerts WHERE {_IN_IDS}", (ids,)))  # noqa: S608
                for (alert_id,) in kept:
                    del gone[alert_id]
            alerts += deleted
            freed += sum(gone.values())
            for table, alert_id, count, size in rows:
                if alert_id in gone:
                    freed += size or 0
                    if table == "deliveries":
                        deliveries += count
                    else:
                        transitions += count

    async def close(self) -> None:
        """Make everything queued durable, checkpoint the WAL and close; idempotent."""
        await self._worker.close()


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to SCHEMA_VERSION in one transaction; refuse a newer one (on the writer thread)."""
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, at REAL NOT NULL)")
    version = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise JournalError(f"{path}: schema version {version} is newer than this ebcd ({SCHEMA_VERSION})")
    for number, statements in enumerate(_MIGRATIONS[version:], start=version + 1):
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version, at) VALUES (?, ?)", (number, time.time()))
        log.info("journal.migrated", path=str(path), version=number)
    conn.execute("COMMIT")


class NullJournal(Journal):
    """A journal that keeps nothing: writes succeed and vanish, reads find nothing (for benchmarks)."""

    enabled: ClassVar[bool] = False
    _worker_class: ClassVar[type[StoreWorker]] = NullWorker

    def __init__(self) -> None:
        super().__init__(Path(os.devnull), "NORMAL", DEFAULT_MAX_QUEUE_OPS)

    @classmethod
    async def open(cls, path: Path | None = None, **_: Any) -> Self:
        """A NullJournal; the arguments are ignored."""
        return cls()
