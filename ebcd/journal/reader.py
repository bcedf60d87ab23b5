"""Reading the journal read-only: alert history for the CLI while the daemon is down or has forgotten.

`ebcd alert list`, `alert status ID` and `report ID` answer from the running daemon; an alert it no
longer holds (or every alert, when it is not running) is read from its journal by this module. It
never writes: the database is opened with SQLite's `mode=ro` URI and `PRAGMA query_only`, so it is
safe beside a running daemon (the journal is in WAL mode: readers do not block the writer, nor it
them). A journal whose writer closed cleanly has no `-wal` file; opening it `mode=ro` would create
the `-wal` and `-shm` files (and fails in a directory the reader may not write), so such a journal
is opened `immutable=1` as well: it is then one consistent file, and a daemon that starts meanwhile
writes to its new WAL, not to that file (until its first checkpoint, long after a read).

What it builds is what the daemon's control handler answers (`ebcd.control.handler`): the alert
state of CONTRACT.md (the doc's last published `state_doc` when the daemon saved one, else an
equivalent built from the doc's counts and request, with the town tallies from the deliveries) and
the coverage report (towns with village rows, the terminals without acknowledgement, the refusals
heard, the missed terminals of a scheduled test). Liveness is not journalled: it is "unknown".
Every document it returns carries `"source": "journal"`.

The schema is the journal's (`ebcd.journal.journal`); this module reads it without depending on
its version: the columns schema 2 added to `deliveries` (revision, progress, acked, finished, resume,
retry, budget_base, left_area) are read when the table has them and are None otherwise.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import quote

from ebcd.admission.schedule import TestOutcome
from ebcd.journal.attempts import attempt_history, ledger_link
from ebcd.tiers.district import District
from ebcd.tiers.rollup import Tally

JOURNAL_FILE: Final = "journal.sqlite3"  # the daemon's journal in its state dir
SOURCE: Final = "journal"  # the value of "source" in every document read from the journal
BUSY_TIMEOUT_S: Final = 5.0
MAX_REFUSALS: Final = 200  # as many as the daemon's report lists

# Columns of `deliveries` read when present (schema version 2), None when the journal predates them.
OPTIONAL_DELIVERY_COLUMNS: Final = (
    "revision",
    "progress",
    "acked",
    "finished",
    "resume",
    "retry",
    "budget_base",
    "left_area",
)
_FLAGS: Final = frozenset({"acked", "finished", "resume", "retry", "left_area"})  # 0/1 columns

# EBMState (DOMAIN.md) of each alert state, for an alert doc saved without its state_doc.
EBM_STATE: Final[Mapping[str, int]] = {
    "pending_approval": 1,
    "dispatching": 2,
    "completed": 3,
    "partial": 4,
    "expired": 4,
    "cancelled": 5,
    "rejected": 0,
}
# How a journalled delivery state counts when the terminal has not acknowledged (the rest: pending).
_BUCKET: Final[Mapping[str, str]] = {
    "acknowledged": "acked",
    "refused": "failed",
    "expired": "failed",
    "cancelled": "cancelled",
    "uncertain": "uncertain",
}
_COUNT_KEYS: Final = ("acked", "failed", "uncertain", "pending", "cancelled")
_TALLY_BUCKETS: Final = frozenset(f.name for f in fields(Tally)) - {"targets"}
_LEFT_AREA: Final = "left the alert's area"  # schema 1's cause for a terminal an update took out
_UNSETTLED: Final = frozenset({"dispatching", "pending_approval"})


class JournalUnavailable(Exception):
    """The journal cannot be read: missing, unreadable, not an ebcd journal, or corrupt."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def journal_path(state_dir: Path) -> Path:
    """Where the daemon keeps its journal in `state_dir`."""
    return state_dir / JOURNAL_FILE


@dataclass(frozen=True, slots=True)
class JournalDelivery:
    """The latest journalled state of one delivery; the schema-2 fields are None in older journals."""

    terminal: str
    state: str
    detail: str | None  # the cause, or an acknowledgement's progress (schema 1)
    at: float  # wall clock of the last transition
    attempts: int
    revision: int | None = None
    progress: str | None = None
    acked: bool | None = None  # the terminal acknowledged the current revision
    finished: bool | None = None
    resume: bool | None = None
    retry: bool | None = None
    budget_base: int | None = None
    left_area: bool | None = None  # an update of the alert took the terminal out of its area

    @property
    def is_acked(self) -> bool:
        """Acknowledged (in the current revision: schema 2's flag, set by the delivery core's full rows)."""
        return bool(self.acked) or self.state == "acknowledged"

    @property
    def bucket(self) -> str:
        """acked, failed, uncertain, pending or cancelled: how it counts in the alert's figures."""
        return "acked" if self.is_acked else _BUCKET.get(self.state, "pending")


@dataclass(frozen=True, slots=True)
class JournalFileStats:
    """What `ebcd journal stats` shows: the files, the schema, the rows and the raw payloads."""

    path: Path
    db_bytes: int
    wal_bytes: int  # 0 without a -wal file (a journal closed cleanly)
    free_bytes: int  # pages SQLite keeps for new rows (what pruning freed, until reused)
    schema_version: int | None
    received: int
    received_unjudged: int  # journalled, no verdict yet: never pruned
    received_pruned: int  # judged, payload cleared by retention
    payload_bytes: int  # raw payloads of `received`, in total
    oldest_received_at: float | None  # wall clock
    newest_received_at: float | None
    alerts: int
    alerts_final: int
    alerts_active: int
    deliveries: int
    transitions: int
    dedupe: int
    audit: int

    def as_dict(self) -> dict[str, Any]:
        """The JSON of `ebcd journal stats --json` (without the retention settings)."""
        return {
            "path": str(self.path),
            "files": {"db_bytes": self.db_bytes, "wal_bytes": self.wal_bytes, "free_bytes": self.free_bytes},
            "schema_version": self.schema_version,
            "rows": {
                "received": self.received,
                "alerts": self.alerts,
                "alerts_final": self.alerts_final,
                "alerts_active": self.alerts_active,
                "deliveries": self.deliveries,
                "transitions": self.transitions,
                "dedupe": self.dedupe,
                "audit": self.audit,
            },
            "received": {
                "payload_bytes": self.payload_bytes,
                "unjudged": self.received_unjudged,
                "pruned": self.received_pruned,
                "oldest_at": self.oldest_received_at,
                "newest_at": self.newest_received_at,
            },
        }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _tally_bucket(bucket: str) -> str:
    """The bucket as `Tally` counts it (one without a `cancelled` field counts it as failed)."""
    if bucket in _TALLY_BUCKETS:
        return bucket
    return "failed" if bucket == "cancelled" else "pending"


def _uri(path: Path, *, immutable: bool) -> str:
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    return uri + "&immutable=1" if immutable else uri


class JournalReader:
    """The journal at `path`, opened read-only; use as a context manager or `close()` it.

    `district` is the topology the tallies are rolled up on (from the config, as the daemon's);
    `report` needs it, the state docs use it only for alerts saved without their state_doc.
    Raises JournalUnavailable (naming the path) if the journal cannot be read. A reader is meant
    for one command's reads: whether it reads through the WAL is decided when it opens.
    """

    def __init__(
        self, path: Path, district: District | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self.district = district
        self.clock = clock  # wall clock, for ttl_remaining_s
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise JournalUnavailable(path, f"no journal at {path} (it {what})")
        wal = path.with_name(path.name + "-wal")
        # A cleanly closed journal (no WAL) is one consistent file: read it without creating files.
        self.immutable = not wal.exists()
        try:
            self._conn = sqlite3.connect(
                _uri(path, immutable=self.immutable), uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None
            )
        except sqlite3.Error as e:
            raise JournalUnavailable(path, f"cannot open the journal {path} read-only: {e}") from None
        try:
            self._conn.execute("PRAGMA query_only = 1")
            tables = {name for (name,) in self._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"alerts", "deliveries", "transitions"} <= tables:
                raise JournalUnavailable(path, f"{path} is not an ebcd journal (no alerts/deliveries tables)")
            present = {row[1] for row in self._query("PRAGMA table_info(deliveries)")}
        except BaseException:
            self._conn.close()
            raise
        self.delivery_columns: tuple[str, ...] = tuple(c for c in OPTIONAL_DELIVERY_COLUMNS if c in present)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection; idempotent."""
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- low level -------------------------------------------------------------------------
    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise JournalUnavailable(self.path, f"cannot read the journal {self.path}: {e}") from None

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """One read transaction: the queries inside see the same state of the journal."""
        self._query("BEGIN")
        try:
            yield
        finally:
            self._query("ROLLBACK")

    def _decode(self, alert_id: str, text: str) -> dict[str, Any]:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise JournalUnavailable(
                self.path, f"{self.path}: alert {alert_id}: corrupt document: {e}"
            ) from None
        if not isinstance(doc, dict):
            raise JournalUnavailable(
                self.path, f"{self.path}: alert {alert_id}: corrupt document: not an object"
            )
        return doc

    # -- raw reads -------------------------------------------------------------------------
    def alert_doc(self, alert_id: str) -> dict[str, Any] | None:
        """The journal's document of an alert (as the daemon saved it), or None."""
        rows = self._query("SELECT doc FROM alerts WHERE alert_id = ?", (alert_id,))
        return self._decode(alert_id, rows[0][0]) if rows else None

    def alert_docs(self) -> list[dict[str, Any]]:
        """Every alert document of the journal, newest first."""
        rows = self._query("SELECT alert_id, doc FROM alerts ORDER BY created_at DESC, alert_id DESC")
        return [self._decode(alert_id, doc) for alert_id, doc in rows]

    def deliveries(self, alert_id: str) -> dict[str, JournalDelivery]:
        """The latest state of each delivery of an alert (every terminal it ever had), by terminal."""
        extra = "".join(f", {c}" for c in self.delivery_columns)  # names from OPTIONAL_DELIVERY_COLUMNS
        sql = f"SELECT terminal, state, detail, at, attempts{extra} FROM deliveries WHERE alert_id = ?"  # noqa: S608
        out = {}
        for terminal, state, detail, at, attempts, *rest in self._query(sql, (alert_id,)):
            optional = dict(zip(self.delivery_columns, rest, strict=True))
            for flag in _FLAGS.intersection(optional):
                if optional[flag] is not None:
                    optional[flag] = bool(optional[flag])
            out[terminal] = JournalDelivery(terminal, state, detail, at, attempts, **optional)
        return out

    def refusals(self, alert_id: str, limit: int = MAX_REFUSALS) -> list[tuple[str, str]]:
        """(terminal, cause) of the latest `limit` refusals journalled for an alert, oldest first."""
        rows = self._query(
            "SELECT terminal, detail FROM transitions WHERE alert_id = ? AND state = 'refused'"
            " ORDER BY id DESC LIMIT ?",
            (alert_id, limit),
        )
        return [(terminal, cause or "refused") for terminal, cause in reversed(rows)]

    def stats(self) -> JournalFileStats:
        """The journal's files, schema version, row counts and raw payloads, in one snapshot."""
        with self._snapshot():
            tables = {name for (name,) in self._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
            missing = {"received", "dedupe", "audit", "schema_version"} - tables
            if missing:  # every ebcd journal has them, from schema 1 on
                raise JournalUnavailable(
                    self.path, f"{self.path} is not an ebcd journal (no {min(missing)} table)"
                )
            ((version,),) = self._query("SELECT max(version) FROM schema_version")
            ((received, unjudged, pruned, payload_bytes, oldest, newest),) = self._query(
                "SELECT count(*), count(*) - count(outcome),"
                " coalesce(sum(outcome IS NOT NULL AND length(payload) = 0), 0),"
                " coalesce(sum(length(payload)), 0), min(received_at), max(received_at) FROM received"
            )
            ((alerts, final),) = self._query("SELECT count(*), coalesce(sum(final = 1), 0) FROM alerts")
            counts = {
                table: int(self._query(f"SELECT count(*) FROM {table}")[0][0])  # noqa: S608 -- our names
                for table in ("deliveries", "transitions", "dedupe", "audit")
            }
            ((free_pages,),) = self._query("PRAGMA freelist_count")
            ((page_size,),) = self._query("PRAGMA page_size")
        return JournalFileStats(
            path=self.path,
            db_bytes=_size(self.path),
            wal_bytes=_size(self.path.with_name(self.path.name + "-wal")),
            free_bytes=int(free_pages) * int(page_size),
            schema_version=None if version is None else int(version),
            received=int(received),
            received_unjudged=int(unjudged),
            received_pruned=int(pruned),
            payload_bytes=int(payload_bytes),
            oldest_received_at=oldest,
            newest_received_at=newest,
            alerts=int(alerts),
            alerts_final=int(final),
            alerts_active=int(alerts) - int(final),
            **counts,
        )

    # -- what the CLI shows ----------------------------------------------------------------
    def list_alerts(self) -> list[dict[str, Any]]:
        """The state of every alert the journal holds, in any state, newest first."""
        with self._snapshot():
            return [self._state_of(doc) for doc in self.alert_docs()]

    def alert_state(self, alert_id: str) -> dict[str, Any] | None:
        """The alert state of CONTRACT.md (as `ebcd alert status --json` shows it), or None."""
        with self._snapshot():
            doc = self.alert_doc(alert_id)
            return None if doc is None else self._state_of(doc)

    def report(self, alert_id: str) -> dict[str, Any] | None:
        """The coverage report of an alert, as the daemon's `report` answers it, or None.

        Needs the district (towns and villages); raises ValueError if the reader has none.
        """
        district = self.district
        if district is None:
            raise ValueError("a report needs the district: JournalReader(path, district)")
        with self._snapshot():
            doc = self.alert_doc(alert_id)
            if doc is None:
                return None
            state = self._state_of(doc)
            deliveries = self.current_deliveries(doc)
            refusals = self.refusals(alert_id)
            rows = self._query(
                "SELECT terminal, state, detail, at, attempt FROM transitions WHERE alert_id = ? ORDER BY id",
                (alert_id,),
            )
        order = {t.code: i for i, t in enumerate(district.terminals())}
        problems = []
        for code in sorted(deliveries, key=lambda c: (order.get(c, len(order)), c)):
            d = deliveries[code]
            if d.is_acked:
                continue
            term = district.terminal(code)
            problems.append(
                {
                    "terminal": code,
                    "name": term.name if term else "",
                    "state": d.state,
                    "cause": d.detail,
                    "attempts": d.attempts,
                    "liveness": "unknown",  # not journalled
                    "room": term.room if term else None,
                }
            )
        unacked = {p["terminal"] for p in problems}
        history = attempt_history(((t, s, d, at, bool(a)) for t, s, d, at, a in rows), ledger_link(district))
        report: dict[str, Any] = {
            "state": state,
            "towns": town_rows(district, {c: d.bucket for c, d in deliveries.items()}),
            "problems": problems,
            "history": {c: h for c, h in history.items() if c in unacked or h["resent"]},
            "buckets": {c: _tally_bucket(d.bucket) for c, d in deliveries.items()},
        }
        if refusals:
            report["refusals"] = [{"terminal": t, "cause": c} for t, c in refusals]
        if doc.get("source") == "schedule" and state["state"] not in _UNSETTLED:
            outcome = TestOutcome.of(alert_id, deliveries, (c for c, d in deliveries.items() if d.is_acked))
            report["test"] = {
                "missed": list(outcome.missed),
                "acked": outcome.acked,
                "targets": outcome.targets,
            }
        report["source"] = SOURCE
        return report

    def current_deliveries(self, doc: Mapping[str, Any]) -> dict[str, JournalDelivery]:
        """The alert's deliveries without the terminals an update took out of its area (as the daemon's)."""
        return {
            code: d
            for code, d in self.deliveries(str(doc.get("id"))).items()
            if not (d.left_area or (d.state == "cancelled" and (d.detail or "").startswith(_LEFT_AREA)))
        }

    def _state_of(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        saved = doc.get("state_doc")
        state = dict(saved) if isinstance(saved, dict) else self._rebuilt_state(doc)
        expires_at = doc.get("expires_at")
        if isinstance(expires_at, int | float):
            state["ttl_remaining_s"] = max(0.0, round(float(expires_at) - self.clock(), 1))
        state["source"] = SOURCE
        return state

    def _rebuilt_state(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The state doc of an alert saved without one: its counts and request, towns from deliveries."""
        alert_id = str(doc.get("id"))
        raw_request = doc.get("request")
        request: dict[str, Any] = raw_request if isinstance(raw_request, dict) else {}
        saved_counts = doc.get("counts")
        deliveries: dict[str, JournalDelivery] | None = None
        if isinstance(saved_counts, dict) and saved_counts:  # what the daemon counted when it saved
            counts = {k: v for k, v in saved_counts.items() if k in _COUNT_KEYS and isinstance(v, int)}
        else:
            deliveries = self.current_deliveries(doc)
            tally = Tally()
            for d in deliveries.values():
                tally.add(_tally_bucket(d.bucket))
            counts = {k: v for k, v in tally.as_dict().items() if k in _COUNT_KEYS and isinstance(v, int)}
        targets = sum(counts.values())
        towns: dict[str, Any] = {}
        if self.district is not None:
            if deliveries is None:
                deliveries = self.current_deliveries(doc)
            buckets = {c: _tally_bucket(d.bucket) for c, d in deliveries.items()}
            towns = {
                code: {"name": self.district.towns[code].name, **t.as_dict()}
                for code, t in sorted(self.district.town_tallies(buckets).items())
            }
        alert_state = str(doc.get("state", ""))
        acked = counts.get("acked", 0)
        state: dict[str, Any] = {
            "id": alert_id,
            "identifier": request.get("identifier"),
            "sender": request.get("sender"),
            "ebmid": doc.get("ebmid"),
            "revision": doc.get("revision", 1),
            "state": alert_state,
            "ebm_state": EBM_STATE.get(alert_state, 0),
            "level": request.get("level"),
            "event_type": request.get("event_type"),
            "test": request.get("test", False),
            "text": request.get("text", ""),
            "targets": targets,
            "acked": acked,
            "failed": counts.get("failed", 0),
            "uncertain": counts.get("uncertain", 0),
            "pending": counts.get("pending", 0),
            "coverage": round(acked / targets, 4) if targets else 0.0,
            "towns": towns,
            "accepted_at": doc.get("accepted_at"),
            "ttl_remaining_s": 0.0,
            "reason": doc.get("reason"),
        }
        if "cancelled" in counts:
            state["cancelled"] = counts["cancelled"]
        return state


def town_rows(district: District, buckets: Mapping[str, str]) -> list[dict[str, Any]]:
    """The report's towns (those the alert reaches), each with its village rows and, first, a row of
    the terminals the town room drives itself; `buckets`: terminal -> acked/failed/uncertain/pending."""
    counted = {code: _tally_bucket(b) for code, b in buckets.items()}
    towns = []
    for town in district.towns.values():
        tt = town.tally(counted)
        if not tt.targets:
            continue
        own = Tally()
        for term in town.own_terminals:
            if (bucket := counted.get(term.code)) is not None:
                own.add(bucket)
        rows = [{"code": town.code, "name": f"{town.name}（镇直属）", **own.as_dict()}] if own.targets else []
        rows += [
            {"code": code, "name": town.villages[code].name, **t.as_dict()}
            for code, t in town.village_tallies(counted).items()
        ]
        towns.append({"code": town.code, "name": town.name, **tt.as_dict(), "villages": rows})
    return towns
