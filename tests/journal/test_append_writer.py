"""The journal's many-rows-to-a-statement writer leaves exactly what one statement per row leaves."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ebcd.journal import journal as j

KEYS = st.sampled_from([("a1", "t1"), ("a1", "t2"), ("a2", "t1")])


@st.composite
def rows(draw: st.DrawFn) -> dict[str, Any]:
    alert_id, terminal = draw(KEYS)
    full = draw(st.booleans())
    row: dict[str, Any] = {
        **(j._BARE if not full else {}),
        "full": int(full),
        "alert_id": alert_id,
        "terminal": terminal,
        "state": draw(st.sampled_from(["pending", "sent", "acknowledged", "uncertain"])),
        "detail": draw(st.none() | st.sampled_from(["done", "playing", "no answer", "终端离线"])),
        "at": draw(st.floats(0, 2e9, allow_nan=False)),
        "attempt": draw(st.integers(0, 1)),
    }
    if full:
        row.update(
            attempts=draw(st.integers(0, 9)),
            revision=draw(st.integers(1, 3)),
            progress=draw(st.none() | st.sampled_from(["received", "playing", "done"])),
            acked=draw(st.integers(0, 1)),
            finished=draw(st.integers(0, 1)),
            resume=draw(st.integers(0, 1)),
            retry=draw(st.integers(0, 1)),
            budget_base=draw(st.integers(0, 5)),
            left_area=draw(st.integers(0, 1)),
        )
    return row


def _fresh(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    j._migrate(conn, path)
    return conn


def _tables(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
    deliveries = conn.execute("SELECT * FROM deliveries ORDER BY alert_id, terminal").fetchall()
    transitions = conn.execute("SELECT * FROM transitions ORDER BY id").fetchall()
    return deliveries, transitions


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.lists(rows(), max_size=12), min_size=1, max_size=5))
def test_the_batch_writer_matches_a_statement_per_row(tmp_path_factory: Any, batches: list[Any]) -> None:
    folder = tmp_path_factory.mktemp("w")
    many, single = _fresh(folder / "many.sqlite3"), _fresh(folder / "single.sqlite3")
    for batch in batches:
        j._append_deliveries(many, batch)
        for row in batch:
            single.execute(j._INSERT_TRANSITION, row)
            single.execute(j._UPSERT_DELIVERY, row)
    assert _tables(many) == _tables(single)


def test_a_run_longer_than_one_statement_is_split_and_kept_in_order(tmp_path: Path) -> None:
    conn = _fresh(tmp_path / "j.sqlite3")
    n = j._ROWS_PER_STATEMENT * 2 + 7
    base = {"full": 1, "alert_id": "a", "detail": None, "attempt": 1, "attempts": 1, "revision": 1,
            "progress": None, "acked": 0, "finished": 0, "resume": 0, "retry": 0, "budget_base": 0,
            "left_area": 0}  # fmt: skip
    batch = [{**base, "terminal": f"t{k % 300}", "state": f"s{k}", "at": float(k)} for k in range(n)]
    j._append_deliveries(conn, batch)
    deliveries, transitions = _tables(conn)
    assert len(transitions) == n
    assert [t[3] for t in transitions] == [f"s{k}" for k in range(n)]
    assert len(deliveries) == 300  # the last row of each terminal won
    by_terminal = {d[1]: d[2] for d in deliveries}
    assert by_terminal["t0"] == f"s{max(k for k in range(n) if k % 300 == 0)}"
