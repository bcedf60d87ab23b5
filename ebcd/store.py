"""The journal: what ebcd must not forget, in SQLite (WAL), written by one thread with group commit.

Theory of operation: the event loop never touches SQLite. Every call becomes an op on a FIFO
queue; one writer thread owns the only connection, takes everything queued (up to
`MAX_BATCH_OPS`) and runs it as one transaction, then resolves all the awaiting futures with one
wake-up of the loop. While a commit is syncing, new ops pile up and go into the next transaction
together, so a 769-terminal fan-out costs a handful of commits, not 769. Reads use the same queue,
so a read sees every write queued before it. An awaited write has been committed; with the default
`synchronous=FULL` the WAL is fsynced on every commit, so it survives kill -9 and power loss (with
NORMAL only kill -9). If one op breaks a transaction (a constraint, an unbindable value), the
batch is retried one op per transaction so the culprit alone gets `JournalError`; if the database
fails (locked, I/O, full, corrupt), the whole batch does. Cancelling an awaiting caller does not
withdraw its write. Nothing is ever dropped: past `max_queue_ops` queued ops, awaited calls wait
for room (counted in `stats.backpressure_wait_s`); `record_transition` never blocks the loop, so
its producer should `await flush()` after each burst, which is where it meets the backpressure.

Contract with the daemon: alert documents are opaque JSON objects, except the key `"final"`
(bool, missing means False): an alert whose doc is not final is returned by `load_active()` at
start-up with the latest state of each of its deliveries.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, NamedTuple, Self

import structlog

log = structlog.get_logger(__name__)

SCHEMA_VERSION: Final = 1
MAX_BATCH_OPS: Final = 5000
DEFAULT_MAX_QUEUE_OPS: Final = 50_000
SLOW_COMMIT_S: Final = 1.0
BUSY_TIMEOUT_MS: Final = 5000
JOURNAL_SIZE_LIMIT_BYTES: Final = 64 * 1024 * 1024
THREAD_NAME: Final = "ebcd-journal"

Synchronous = Literal["FULL", "NORMAL"]
OnCommit = Callable[[float, int], None]
Statement = tuple[str, tuple[Any, ...]]

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


# Errors that one op causes (a constraint, a value SQLite cannot bind); others fail the whole batch.
_OP_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
)


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


@dataclass(slots=True)
class JournalStats:
    """Counters for metrics; updated on the event loop thread."""

    transactions: int = 0
    failed_transactions: int = 0
    rows_written: int = 0
    ops: int = 0
    last_commit_latency_s: float = 0.0
    backpressure_wait_s: float = 0.0
    lost_transitions: int = 0


class _Kind(enum.Enum):
    WRITE = enum.auto()
    READ = enum.auto()
    TRANSITION = enum.auto()
    FLUSH = enum.auto()
    CLOSE = enum.auto()


@dataclass(slots=True)
class _Op:
    kind: _Kind
    args: tuple[Any, ...] = ()  # statements for WRITE and READ, the row for TRANSITION
    future: asyncio.Future[Any] | None = None


@dataclass(slots=True)
class _Outcome:
    op: _Op
    result: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class _BatchReport:
    outcomes: list[_Outcome] = field(default_factory=list)
    commits: list[tuple[float, int]] = field(default_factory=list)
    failures: int = 0


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


def _connect(path: Path, synchronous: Synchronous) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise JournalError(f"{path}: cannot use WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
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
    except BaseException:
        conn.close()
        raise
    return conn


class Journal:
    """The durable journal; open with `await Journal.open(path)`, end with `await close()`."""

    enabled: ClassVar[bool] = True

    def __init__(self, path: Path, synchronous: Synchronous, max_queue_ops: int) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise JournalError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = path
        self.synchronous: Synchronous = synchronous
        self.stats = JournalStats()
        self.on_commit: OnCommit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_queue_ops = max_queue_ops
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._room = asyncio.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lost_since_flush = 0  # writer thread only
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
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(self._loop,), name=THREAD_NAME, daemon=True)
        self._thread.start()
        try:
            await self._read()  # returns once the thread has connected and migrated
        except BaseException:
            await self.close()
            raise
        self._log.info("journal.opened", synchronous=synchronous, schema_version=SCHEMA_VERSION)
        return self

    @property
    def queue_depth(self) -> int:
        """Ops waiting for the writer thread (approximate)."""
        return self._queue.qsize()

    # ---- writes: durable when the await returns --------------------------------------------

    async def record_received(self, topic: str, payload: bytes, received_at: float, *, source: str) -> int:
        """Journal a raw inbound message before anything judges it; returns its row id."""
        sql = "INSERT INTO received (topic, payload, source, received_at) VALUES (?, ?, ?, ?)"
        row_id, _ = await self._write((sql, (topic, bytes(payload), source, received_at)))
        return row_id

    async def mark_received(self, row_id: int, *, outcome: str, detail: str, alert_id: str | None) -> None:
        """Record the verdict (accepted, or the rejection reason) on a received message."""
        sql = "UPDATE received SET outcome = ?, detail = ?, alert_id = ? WHERE id = ?"
        _, changed = await self._write((sql, (outcome, detail, alert_id, row_id)))
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
            await self._write(upsert)
            return
        claim = (  # the first alert to claim a key keeps it
            "INSERT INTO dedupe (sender, identifier, alert_id, at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT DO NOTHING",
            (*dedupe_key, alert_id, now),
        )
        await self._write(upsert, claim)

    async def mark_final(self, alert_id: str) -> bool:
        """Set the alert's doc["final"] to true; False if there is no such alert."""
        sql = (
            "UPDATE alerts SET doc = json_set(doc, '$.final', json('true')), final = 1, updated_at = ?"
            " WHERE alert_id = ?"
        )
        _, changed = await self._write((sql, (time.time(), alert_id)))
        return changed == 1

    async def record_audit(self, actor: str, action: str, detail: dict[str, Any]) -> None:
        """Record who did what."""
        sql = "INSERT INTO audit (at, actor, action, detail) VALUES (?, ?, ?, ?)"
        await self._write((sql, (time.time(), actor, action, _encode(detail))))

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
        self._check_open()
        self._queue.put(_Op(_Kind.TRANSITION, (alert_id, terminal, state, detail, at, int(attempt))))

    async def flush(self) -> None:
        """Return when everything queued before it is durable; JournalError if a transition was lost."""
        await self._submit(_Op(_Kind.FLUSH))

    # ---- reads: each sees every write queued before it -------------------------------------

    async def load_active(self) -> list[ActiveAlert]:
        """Every alert whose doc is not final, oldest first, with its latest delivery states."""
        alerts, rows = await self._read(
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
        (rows,) = await self._read(("SELECT doc FROM alerts WHERE alert_id = ?", (alert_id,)))
        return _decode(rows[0][0]) if rows else None

    async def list_alerts(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently saved alert documents, newest first."""
        (rows,) = await self._read(("SELECT doc FROM alerts ORDER BY updated_at DESC LIMIT ?", (limit,)))
        return [_decode(doc) for (doc,) in rows]

    async def deliveries(self, alert_id: str) -> dict[str, Delivery]:
        """The latest state of each delivery of an alert, by terminal."""
        sql = "SELECT terminal, state, detail, at, attempts FROM deliveries WHERE alert_id = ?"
        (rows,) = await self._read((sql, (alert_id,)))
        return {terminal: Delivery(*rest) for terminal, *rest in rows}

    async def history(self, alert_id: str) -> list[Transition]:
        """The transition log of an alert, in the order it was recorded."""
        sql = "SELECT terminal, state, detail, at, attempt FROM transitions WHERE alert_id = ? ORDER BY id"
        (rows,) = await self._read((sql, (alert_id,)))
        return [Transition(t, s, d, at, bool(a)) for t, s, d, at, a in rows]

    async def dedupe_key_seen(self, sender: str, identifier: str) -> str | None:
        """The alert id saved under (sender, identifier), or None."""
        sql = "SELECT alert_id FROM dedupe WHERE sender = ? AND identifier = ?"
        (rows,) = await self._read((sql, (sender, identifier)))
        return str(rows[0][0]) if rows else None

    async def list_received(self, limit: int = 100) -> list[Received]:
        """The most recent raw inbound messages, newest first."""
        sql = (
            "SELECT id, topic, payload, source, received_at, outcome, detail, alert_id FROM received"
            " ORDER BY id DESC LIMIT ?"
        )
        (rows,) = await self._read((sql, (limit,)))
        return [Received(*row) for row in rows]

    async def list_audit(self, limit: int = 100) -> list[AuditEntry]:
        """The most recent audit entries, newest first."""
        (rows,) = await self._read(
            ("SELECT at, actor, action, detail FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        )
        return [AuditEntry(at, actor, action, _decode(d)) for at, actor, action, d in rows]

    async def integrity_check(self) -> list[str]:
        """SQLite's integrity check: ["ok"] when the database is sound."""
        (rows,) = await self._read(("PRAGMA integrity_check", ()))
        return [str(msg) for (msg,) in rows]

    async def close(self) -> None:
        """Make everything queued durable, checkpoint the WAL and close; idempotent."""
        if not self._closing:
            self._closing = True
            self._queue.put(_Op(_Kind.CLOSE))
            self._room.set()  # producers waiting for room now fail with "closed"
        if self._thread is not None:  # it ends after serving the close marker
            await asyncio.to_thread(self._thread.join)

    # ---- loop side -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise JournalError("the journal is closed")

    async def _write(self, *statements: Statement) -> tuple[int, int]:
        """Run statements in one transaction; (lastrowid, rowcount) of the first."""
        result: tuple[int, int] = await self._submit(_Op(_Kind.WRITE, statements))
        return result

    async def _read(self, *queries: Statement) -> list[list[Any]]:
        """Run queries in one transaction; all the rows of each."""
        result: list[list[Any]] = await self._submit(_Op(_Kind.READ, queries))
        return result

    async def _submit(self, op: _Op) -> Any:
        self._check_open()
        if asyncio.get_running_loop() is not self._loop:
            raise JournalError("the journal is used outside the event loop that opened it")
        if self._queue.qsize() >= self._max_queue_ops:
            started = time.perf_counter()
            try:
                while self._queue.qsize() >= self._max_queue_ops and not self._closing:
                    self._room.clear()
                    await self._room.wait()
            finally:
                self.stats.backpressure_wait_s += time.perf_counter() - started
            self._check_open()
        op.future = self._loop.create_future()
        self._queue.put(op)
        return await op.future

    def _on_batch(self, report: _BatchReport) -> None:
        for outcome in report.outcomes:
            future = outcome.op.future
            if future is None or future.done():
                continue  # a fire-and-forget transition, or the caller was cancelled
            if outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.result)
        stats = self.stats
        stats.ops += len(report.outcomes)
        stats.failed_transactions += report.failures
        stats.lost_transitions += sum(
            1 for o in report.outcomes if o.op.kind is _Kind.TRANSITION and o.error is not None
        )
        self._room.set()
        for latency_s, rows in report.commits:
            stats.transactions += 1
            stats.rows_written += rows
            stats.last_commit_latency_s = latency_s
            if self.on_commit is not None:
                self.on_commit(latency_s, rows)

    # ---- writer thread ---------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            conn = _connect(self.path, self.synchronous)
        except (sqlite3.Error, OSError, JournalError) as exc:
            self._log.error("journal.open_failed", error=str(exc))
            error = JournalError(f"cannot open the journal: {exc}")
            self._deliver(loop, _BatchReport([_Outcome(self._queue.get(), error=error)]))  # open()'s read
            return
        try:
            while self._serve_batch(conn, loop):
                pass
        finally:
            conn.close()

    def _serve_batch(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> bool:
        batch = [self._queue.get()]
        while len(batch) < MAX_BATCH_OPS and batch[-1].kind is not _Kind.CLOSE:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        report = _BatchReport()
        try:
            self._execute(conn, batch, report)
        except Exception as exc:  # noqa: BLE001 - a bug here must fail the waiters, never hang them
            self._log.exception("journal.writer_bug")
            error = JournalError(f"journal writer failed: {exc!r}")
            report = _BatchReport([_Outcome(op, error=error) for op in batch], failures=1)
            _rollback(conn)
        for outcome in report.outcomes:  # a flush fails if a transition queued before it was lost
            if outcome.op.kind is _Kind.TRANSITION and outcome.error is not None:
                self._lost_since_flush += 1
            elif outcome.op.kind is _Kind.FLUSH and self._lost_since_flush and outcome.error is None:
                lost, self._lost_since_flush = self._lost_since_flush, 0
                outcome.error = JournalError(f"{lost} transitions could not be journalled")
        closing = batch[-1].kind is _Kind.CLOSE
        if closing:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                self._log.warning("journal.checkpoint_failed", error=str(exc))
        self._deliver(loop, report)
        return not closing

    def _execute(self, conn: sqlite3.Connection, batch: list[_Op], report: _BatchReport) -> None:
        try:
            report.outcomes.extend(self._transaction(conn, batch, report))
        except sqlite3.Error as exc:
            _rollback(conn)
            report.failures += 1
            self._log.error("journal.commit_failed", error=str(exc), ops=len(batch))
            if len(batch) > 1 and isinstance(exc, _OP_ERRORS):
                for op in batch:  # one op per transaction, so only the culprit fails
                    self._execute(conn, [op], report)
            else:  # busy, I/O, full, corrupt: the database failed, not one op
                error = JournalError(f"journal: {exc}")
                report.outcomes.extend(_Outcome(op, error=error) for op in batch)

    def _transaction(self, conn: sqlite3.Connection, ops: list[_Op], report: _BatchReport) -> list[_Outcome]:
        kinds = {op.kind for op in ops}
        if not kinds & {_Kind.WRITE, _Kind.READ, _Kind.TRANSITION}:
            return [_Outcome(op) for op in ops]  # only flush or close markers
        writes = bool(kinds & {_Kind.WRITE, _Kind.TRANSITION})
        started, changes = time.perf_counter(), conn.total_changes
        conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        outcomes: list[_Outcome] = []
        rows: list[tuple[Any, ...]] = []
        for op in ops:
            if op.kind is _Kind.TRANSITION:
                rows.append(op.args)  # written together with the next non-transition op
                outcomes.append(_Outcome(op))
                continue
            _write_transitions(conn, rows)
            rows = []
            if op.kind is _Kind.WRITE:
                cursors = [conn.execute(sql, params) for sql, params in op.args]
                outcomes.append(_Outcome(op, (cursors[0].lastrowid or 0, cursors[0].rowcount)))
            elif op.kind is _Kind.READ:
                outcomes.append(_Outcome(op, [conn.execute(q, params).fetchall() for q, params in op.args]))
            else:
                outcomes.append(_Outcome(op))
        _write_transitions(conn, rows)
        conn.execute("COMMIT")
        if writes:
            latency_s = time.perf_counter() - started
            report.commits.append((latency_s, conn.total_changes - changes))
            if latency_s > SLOW_COMMIT_S:
                self._log.warning("journal.slow_commit", latency_s=latency_s, ops=len(ops))
        return outcomes

    def _deliver(self, loop: asyncio.AbstractEventLoop, report: _BatchReport) -> None:
        try:
            loop.call_soon_threadsafe(self._on_batch, report)
        except RuntimeError:  # the loop is gone; nobody is left waiting
            self._log.warning("journal.loop_closed", ops=len(report.outcomes))


def _write_transitions(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    if rows:
        conn.executemany(_INSERT_TRANSITION, rows)
        conn.executemany(_UPSERT_DELIVERY, rows)


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("journal.rollback_failed", error=str(exc))


class NullJournal(Journal):
    """A journal that keeps nothing: writes succeed and vanish, reads find nothing (for benchmarks)."""

    enabled: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__(Path(os.devnull), "NORMAL", DEFAULT_MAX_QUEUE_OPS)
        self._ids = itertools.count(1)

    @classmethod
    async def open(cls, path: Path | None = None, **_: Any) -> Self:
        """A NullJournal; the arguments are ignored."""
        return cls()

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
        """Keep nothing."""
        self._check_open()

    async def _submit(self, op: _Op) -> Any:
        self._check_open()
        if op.kind is _Kind.WRITE:
            return next(self._ids), 1
        return [[] for _ in op.args] if op.kind is _Kind.READ else None
