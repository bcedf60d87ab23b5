"""The journal's EBD tables: EBDID claims, the outbox in order across a reopen, broadcasts to report."""

from __future__ import annotations

import time
from pathlib import Path

from ebcd.journal.journal import Journal


async def test_ebdid_claims_outbox_and_broadcasts_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    j = await Journal.open(path)
    try:
        row = await j.record_received("ebd multipart/form-data", b"raw", 1.0, source="ebd")
        mqtt = await j.record_received("ebc/v1/x/alerts/in", b"{}", 1.0, source="mqtt")
        assert await j.ebd_claim("1" * 41, row) is None
        assert await j.ebd_claim("1" * 41, row) is None  # the same row judged again after a crash
        first = await j.ebd_claim("1" * 41, row + 100)
        assert first is not None
        assert first[0] == row
        for n in (1, 2, 3):
            await j.ebd_enqueue(n, f"e{n}", "EBMStateResponse", bytes([n]))
        await j.ebd_broadcast("a-1", "ebm-1")
        await j.ebd_broadcast("a-2", "ebm-2")
        await j.ebd_enqueue(4, "e4", "EBMBrdLog", b"log", ended="a-1")
        await j.ebd_sent(1, "1: ok")
        assert [r.row_id for r in await j.unjudged(source="ebd")] == [row]
        assert [r.row_id for r in await j.unjudged(source="mqtt")] == [mqtt]
    finally:
        await j.close()
    j = await Journal.open(path)
    try:
        assert [(i, e, t) for i, e, t, _p in await j.ebd_unsent()] == [
            (2, "e2", "EBMStateResponse"),
            (3, "e3", "EBMStateResponse"),
            (4, "e4", "EBMBrdLog"),
        ]
        assert await j.ebd_last_outbox_id() == 4
        assert await j.ebd_open_broadcasts() == [("a-2", "ebm-2")]
    finally:
        await j.close()


async def test_retention_deletes_answered_packages_but_keeps_the_unsent_and_the_newest(
    tmp_path: Path,
) -> None:
    j = await Journal.open(tmp_path / "journal.sqlite3")
    try:
        for n in (1, 2, 3, 4):
            await j.ebd_enqueue(n, f"e{n}", "EBRDTState", b"x" * 10)
        for n in (1, 2, 4):
            await j.ebd_sent(n, "1: ok")
        row = await j.record_received("ebd x", b"", 1.0, source="ebd")
        assert await j.ebd_claim("1" * 41, row) is None
        result = await j.prune(time.time() + 1, None)
        assert (result.ebd_sent, result.bytes_freed) == (2, 20)  # 1 and 2; 3 unsent, 4 the newest
        assert result.ebd_seen == 1
        assert [i for i, *_ in await j.ebd_unsent()] == [3]
        assert await j.ebd_last_outbox_id() == 4
    finally:
        await j.close()
