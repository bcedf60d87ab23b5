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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, NamedTuple, Self

import structlog

from ebcd.journal.worker import JournalStats as JournalStats  # re-exported: the types a caller meets
from ebcd.journal.worker import NullWorker, StoreWorker
from ebcd.journal.worker import OnCommit as OnCommit
from ebcd.journal.worker import Synchronous as Synchronous

log = structlog.get_logger(__name__)

SCHEMA_VERSION: Final = 1
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
)
_INSERT_TRANSITION: Final = (
    "INSERT INTO transitions (alert_id, terminal, state, detail, at, attempt) VALUES (?, ?, ?, ?, ?, ?)"
)
_UPSERT_DELIVERY: Final = """INSERT INTO deliveries (alert_id, terminal, state, detail, at, attempts)
    VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (alert_id, terminal) DO UPDATE SET state = excluded.state,
    detail = excluded.detail, at = excluded.at, attempts = deliveries.attempts + excluded.attempts"""


class JournalError(Exception):
    """The journal could not do what was asked; nothing awaited on it should be taken as durable."""


class Delivery(NamedTuple):
    """The latest state of one delivery (alert, terminal) and how many attempts were recorded."""

    state: str
    detail: str | None
    at: float
    attempts: int


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

    def __init__(self, path: Path, synchronous: Synchronous, max_queue_ops: int) -> None:
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
            append_statements=(_INSERT_TRANSITION, _UPSERT_DELIVERY),
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
    ) -> Self:
        """Open (creating or migrating) the journal at `path` and start its writer thread."""
        self = cls(path, synchronous, max_queue_ops)
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
        self._worker.append((alert_id, terminal, state, detail, at, int(attempt)))

    async def flush(self) -> None:
        """Return when everything queued before it is durable; JournalError if a transition was lost."""
        await self._worker.flush()

    # ---- reads: each sees every write queued before it -------------------------------------

    async def load_active(self) -> list[ActiveAlert]:
        """Every alert whose doc is not final, oldest first, with its latest delivery states."""
        alerts, rows = await self._worker.read(
            ("SELECT alert_id, doc FROM alerts WHERE final = 0 ORDER BY created_at", ()),
            (
                "SELECT d.alert_id, terminal, state, detail, at, attempts FROM deliveries d"
                " JOIN alerts a USING (alert_id) WHERE a.final = 0",
                (),
            ),
        )
        by_alert: dict[str, dict[str, Delivery]] = {alert_id: {} for alert_id, _ in alerts}
        for alert_id, terminal, *rest in rows:
            by_alert[alert_id][terminal] = Delivery(*rest)
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
        sql = "SELECT terminal, state, detail, at, attempts FROM deliveries WHERE alert_id = ?"
        (rows,) = await self._worker.read((sql, (alert_id,)))
        return {terminal: Delivery(*rest) for terminal, *rest in rows}

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
