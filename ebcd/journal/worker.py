"""The journal's engine: one SQLite connection on its own thread, fed from asyncio, with group commit.

It knows no table: its owner (`ebcd.journal.journal.Journal`) gives it the schema set-up and the statements,
and it runs them. It does speak the journal's words: its log events are `journal.*`, its errors are
the owner's exception class, and the rows it appends for the owner are called transitions in the
one error and the one counter about them. `NullWorker` (under `NullJournal`) is never started and
keeps nothing.

Theory of operation.

The thread. `start()` starts one daemon thread, named by the owner, which opens the only
connection to the database (busy timeout, WAL or refuse, the owner's `synchronous`, a WAL size
limit), runs the owner's `setup` on it (the journal's migrations) and then serves the queue until
a close marker, after which it checkpoints the WAL (TRUNCATE) and closes the connection. The event
loop never touches SQLite. If opening fails, the thread ends and `start()` raises "cannot open
the journal".

The queue and its bound. Every call becomes an `_Op` on one FIFO `queue.SimpleQueue`: WRITE and
READ carry statements and are awaited; APPEND carries rows for the owner's `append` writer
(one, or every row of one burst: one op, not one per row) and is not awaited; FLUSH and CLOSE
are markers. Nothing is ever dropped. Past `max_queue_ops` queued ops, an awaited call waits
for room before queueing (an event set after every batch; the time is counted in
`stats.backpressure_wait_s`). `append()` never blocks the loop, so its producer
should `await flush()` after each burst, which is where it meets the bound. Closing wakes the
waiters, which then fail with "closed".

A batch is one transaction. The thread waits for one op, then takes whatever else is queued
without waiting, up to `MAX_BATCH_OPS` and never past a close marker. A batch of markers only
needs no transaction. Otherwise it runs in one: BEGIN IMMEDIATE if anything in it writes, BEGIN if
it only reads; the ops in queue order; appended rows gathered and handed to the `append` writer
just before the next other op and at the end, so order holds; then COMMIT. While
a commit is syncing, new ops pile up and go into the next transaction together, so a 769-terminal
fan-out costs a handful of commits, not 769. Reads share the queue, so a read sees every write
queued before it. An awaited write has been committed when its await returns.

When one statement fails. The transaction is rolled back, counted in `stats.failed_transactions`
and logged (`journal.commit_failed`). If it is an error one op causes by itself (a constraint, a
value SQLite cannot bind: `_OP_ERRORS`), the batch is run again one op per transaction, so the
culprit alone fails and the others commit. If the database failed (locked, I/O, full, corrupt),
every op of the batch fails. A failed append has nobody waiting: it is counted in
`stats.lost_transitions`, and the next flush that would succeed fails once instead ("N transitions
could not be journalled"). A bug in this module fails the whole batch (`journal.writer_bug`)
rather than leave its waiters hanging.

Back to the event loop. The thread records one outcome (a result or an error) per op and hands
the whole batch over with one `loop.call_soon_threadsafe`; there `_on_batch` resolves every future
still pending, updates the stats, makes room for waiting producers and reports the commits. A
cancelled caller's future is skipped: cancelling does not withdraw the op. If the loop is gone,
the thread logs `journal.loop_closed`.

Commit latency. For each committed transaction that writes, the thread measures from BEGIN to the
return of COMMIT (lock wait, statements and sync) and counts the rows changed; over `SLOW_COMMIT_S`
it logs `journal.slow_commit`. On the loop each commit adds to `stats.transactions` and
`stats.rows_written`, sets `stats.last_commit_latency_s` and calls `on_commit(latency_s, rows)`.
Read-only and failed transactions report no latency.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import structlog

log = structlog.get_logger(__name__)

MAX_BATCH_OPS: Final = 5000
SLOW_COMMIT_S: Final = 1.0
JOURNAL_SIZE_LIMIT_BYTES: Final = 64 * 1024 * 1024

Synchronous = Literal["FULL", "NORMAL"]
OnCommit = Callable[[float, int], None]
Statement = tuple[str, tuple[Any, ...]]
Row = Mapping[str, Any]  # one row for the append statements (named parameters)
AppendWriter = Callable[[sqlite3.Connection, Sequence[Row]], None]
Setup = Callable[[sqlite3.Connection], None]

# Errors that one op causes (a constraint, a value SQLite cannot bind); others fail the whole batch.
_OP_ERRORS: Final = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
)


@dataclass(slots=True)
class JournalStats:
    """Counters for metrics; updated on the event loop thread."""

    transactions: int = 0
    failed_transactions: int = 0
    rows_written: int = 0
    ops: int = 0
    last_commit_latency_s: float = 0.0
    backpressure_wait_s: float = 0.0
    lost_transitions: int = 0  # appended rows that could not be written


class _Kind(enum.Enum):
    WRITE = enum.auto()
    READ = enum.auto()
    APPEND = enum.auto()
    FLUSH = enum.auto()
    CLOSE = enum.auto()


@dataclass(slots=True)
class _Op:
    kind: _Kind
    args: Any = ()  # statements for WRITE and READ, the list of rows for APPEND
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


class StoreWorker:
    """One SQLite connection on its own thread, serving ops queued from one event loop in batches."""

    def __init__(
        self,
        path: Path,
        *,
        synchronous: Synchronous,
        max_queue_ops: int,
        busy_timeout_ms: int,
        thread_name: str,
        error: type[Exception],
        setup: Setup,
        append: AppendWriter,
        group_commit_s: float = 0.0,
    ) -> None:
        self.path = path
        self.synchronous: Synchronous = synchronous
        self.stats = JournalStats()
        self.on_commit: OnCommit | None = None
        self._busy_timeout_ms = busy_timeout_ms
        self._thread_name = thread_name
        self._error = error
        self._setup = setup
        self._append = append  # writes appended rows, in order, inside the batch's transaction
        self._group_commit_s = group_commit_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._max_queue_ops = max_queue_ops
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._room = asyncio.Event()
        self._urgent = threading.Event()  # an op someone awaits is queued: end the group-commit wait
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lost_since_flush = 0  # writer thread only
        self._log = log.bind(journal=str(path))

    async def start(self) -> None:
        """Start the thread; return once it has connected and run `setup`, else close and raise."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self._run, args=(self._loop,), name=self._thread_name, daemon=True
        )
        self._thread.start()
        try:
            await self.read()  # returns once the thread has connected and run setup
        except BaseException:
            await self.close()
            raise

    @property
    def queue_depth(self) -> int:
        """Ops waiting for the writer thread (approximate)."""
        return self._queue.qsize()

    async def write(self, *statements: Statement) -> tuple[int, int]:
        """Run statements in one transaction; (lastrowid, rowcount) of the first."""
        result: tuple[int, int] = await self._submit(_Op(_Kind.WRITE, statements))
        return result

    async def read(self, *queries: Statement) -> list[list[Any]]:
        """Run queries in one transaction; all the rows of each."""
        result: list[list[Any]] = await self._submit(_Op(_Kind.READ, queries))
        return result

    def append(self, row: Row) -> None:
        """Queue a row for the append statements without blocking; `await flush()` to know it is durable."""
        self.append_many((row,))

    def append_many(self, rows: Sequence[Row]) -> None:
        """Queue rows for the append statements, in order, as one op; never blocks."""
        self._check_open()
        if rows:
            self._queue.put(_Op(_Kind.APPEND, list(rows)))

    async def flush(self) -> None:
        """Return when everything queued before it is durable; the error if an appended row was lost."""
        await self._submit(_Op(_Kind.FLUSH))

    async def close(self) -> None:
        """Make everything queued durable, checkpoint the WAL and close; idempotent."""
        if not self._closing:
            self._closing = True
            self._queue.put(_Op(_Kind.CLOSE))
            self._urgent.set()
            self._room.set()  # producers waiting for room now fail with "closed"
        if self._thread is not None:  # it ends after serving the close marker
            await asyncio.to_thread(self._thread.join)

    # ---- loop side -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise self._error("the journal is closed")

    async def _submit(self, op: _Op) -> Any:
        self._check_open()
        if asyncio.get_running_loop() is not self._loop:
            raise self._error("the journal is used outside the event loop that opened it")
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
        self._urgent.set()
        return await op.future

    def _on_batch(self, report: _BatchReport) -> None:
        for outcome in report.outcomes:
            future = outcome.op.future
            if future is None or future.done():
                continue  # a fire-and-forget append, or the caller was cancelled
            if outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.result)
        stats = self.stats
        stats.ops += len(report.outcomes)
        stats.failed_transactions += report.failures
        stats.lost_transitions += sum(
            len(o.op.args) for o in report.outcomes if o.op.kind is _Kind.APPEND and o.error is not None
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
            conn = self._connect()
        except (sqlite3.Error, OSError, self._error) as exc:
            self._log.error("journal.open_failed", error=str(exc))
            error = self._error(f"cannot open the journal: {exc}")
            self._deliver(loop, _BatchReport([_Outcome(self._queue.get(), error=error)]))  # start()'s read
            return
        try:
            while self._serve_batch(conn, loop):
                pass
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
        try:
            conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise self._error(f"{path}: cannot use WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT_BYTES}")
            self._setup(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _serve_batch(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> bool:
        batch = [self._queue.get()]
        if batch[0].kind is _Kind.APPEND and self._group_commit_s > 0:
            # group commit: rows nobody awaits wait up to `group_commit_s` for the rows behind
            # them, so that a burst of reports is one transaction, not one each. The thread sleeps
            # through the window: the appends behind do not wake it (one wake-up per batch, not
            # per report, each taking the interpreter lock from the loop); an awaited op does.
            self._urgent.wait(self._group_commit_s)
        self._urgent.clear()  # before taking the queue: a later set is for an op not yet taken
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
            error = self._error(f"journal writer failed: {exc!r}")
            report = _BatchReport([_Outcome(op, error=error) for op in batch], failures=1)
            _rollback(conn)
        for outcome in report.outcomes:  # a flush fails if an append queued before it was lost
            if outcome.op.kind is _Kind.APPEND and outcome.error is not None:
                self._lost_since_flush += len(outcome.op.args)
            elif outcome.op.kind is _Kind.FLUSH and self._lost_since_flush and outcome.error is None:
                lost, self._lost_since_flush = self._lost_since_flush, 0
                outcome.error = self._error(f"{lost} transitions could not be journalled")
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
            if isinstance(exc, _OP_ERRORS) and (len(batch) > 1 or len(_singles(batch[0])) > 1):
                for op in batch:  # one op (one appended row) per transaction: only the culprit fails
                    for single in _singles(op):
                        self._execute(conn, [single], report)
            else:  # busy, I/O, full, corrupt: the database failed, not one op
                error = self._error(f"journal: {exc}")
                report.outcomes.extend(_Outcome(op, error=error) for op in batch)

    def _transaction(self, conn: sqlite3.Connection, ops: list[_Op], report: _BatchReport) -> list[_Outcome]:
        kinds = {op.kind for op in ops}
        if not kinds & {_Kind.WRITE, _Kind.READ, _Kind.APPEND}:
            return [_Outcome(op) for op in ops]  # only flush or close markers
        writes = bool(kinds & {_Kind.WRITE, _Kind.APPEND})
        started, changes = time.perf_counter(), conn.total_changes
        conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        outcomes: list[_Outcome] = []
        rows: list[Row] = []
        for op in ops:
            if op.kind is _Kind.APPEND:
                rows.extend(op.args)  # written together with the next non-append op
                outcomes.append(_Outcome(op))
                continue
            self._write_appended(conn, rows)
            rows = []
            if op.kind is _Kind.WRITE:
                cursors = [conn.execute(sql, params) for sql, params in op.args]
                outcomes.append(_Outcome(op, (cursors[0].lastrowid or 0, cursors[0].rowcount)))
            elif op.kind is _Kind.READ:
                outcomes.append(_Outcome(op, [conn.execute(q, params).fetchall() for q, params in op.args]))
            else:
                outcomes.append(_Outcome(op))
        self._write_appended(conn, rows)
        conn.execute("COMMIT")
        if writes:
            latency_s = time.perf_counter() - started
            report.commits.append((latency_s, conn.total_changes - changes))
            if latency_s > SLOW_COMMIT_S:
                self._log.warning("journal.slow_commit", latency_s=latency_s, ops=len(ops))
        return outcomes

    def _write_appended(self, conn: sqlite3.Connection, rows: list[Row]) -> None:
        if rows:
            self._append(conn, rows)

    def _deliver(self, loop: asyncio.AbstractEventLoop, report: _BatchReport) -> None:
        try:
            loop.call_soon_threadsafe(self._on_batch, report)
        except RuntimeError:  # the loop is gone; nobody is left waiting
            self._log.warning("journal.loop_closed", ops=len(report.outcomes))


def _singles(op: _Op) -> list[_Op]:
    """An append of several rows as one op per row (the op itself otherwise)."""
    if op.kind is not _Kind.APPEND or len(op.args) == 1:
        return [op]
    return [_Op(_Kind.APPEND, [row]) for row in op.args]


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.error("journal.rollback_failed", error=str(exc))


class NullWorker(StoreWorker):
    """A worker that is never started and keeps nothing: writes succeed and vanish, reads find nothing."""

    def __init__(self, path: Path, **config: Any) -> None:
        super().__init__(path, **config)
        self._ids = itertools.count(1)

    def append_many(self, rows: Sequence[Row]) -> None:
        """Keep nothing."""
        self._check_open()

    async def _submit(self, op: _Op) -> Any:
        self._check_open()
        if op.kind is _Kind.WRITE:
            return next(self._ids), 1
        return [[] for _ in op.args] if op.kind is _Kind.READ else None
