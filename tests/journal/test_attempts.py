"""Attempt histories from the journal's transition log (`ebcd.journal.attempts`)."""

from __future__ import annotations

from ebcd.journal.attempts import IN_FLIGHT, attempt_history


def link(code: str) -> str:
    return "serial /dev/ttyS1" if code == "S" else "mqtt"


def test_each_send_is_an_attempt_whose_outcome_is_the_next_change() -> None:
    rows = [
        ("T", "pending", None, 1.0, False),
        ("T", "sent", None, 1.0, True),
        ("T", "uncertain", "no acknowledgement after attempt 1", 3.0, False),
        ("T", "sent", None, 4.0, True),
        ("T", "refused", "busy", 4.5, False),
    ]
    h = attempt_history(rows, link)["T"]
    assert h["resent"] is False
    assert [(a["n"], a["at"], a["outcome"], a["cause"]) for a in h["attempts"]] == [
        (1, 1.0, "uncertain", "no acknowledgement after attempt 1"),
        (2, 4.0, "refused", "busy"),
    ]


def test_a_late_acknowledgement_upgrades_its_attempt_and_a_resend_names_who_asked() -> None:
    rows = [
        ("S", "sent", None, 1.0, True),
        ("S", "uncertain", "no acknowledgement after attempt 1", 3.0, False),
        ("S", "pending", "resent by duty (uid 1000)", 10.0, False),  # the write-ahead intent
        ("S", "pending", "resent by duty (uid 1000)", 10.0, False),  # the core's own move
        ("S", "sent", None, 10.0, True),
        ("S", "uncertain", "no acknowledgement after attempt 2", 12.0, False),
        ("S", "acknowledged", "received", 13.0, False),
        ("S", "acknowledged", "done", 40.0, False),
        ("T", "sent", None, 1.0, True),
    ]
    history = attempt_history(rows, link)
    s = history["S"]
    assert s["resent"] is True
    first, second = s["attempts"]
    assert (first["outcome"], first["asked_by"]) == ("uncertain", None)
    assert (second["outcome"], second["cause"], second["outcome_at"]) == ("acknowledged", "done", 13.0)
    assert second["asked_by"] == "duty (uid 1000)"
    assert second["link"] == "serial /dev/ttyS1"
    assert history["T"]["attempts"][0]["outcome"] == IN_FLIGHT


def test_a_terminal_never_sent_to_has_no_history() -> None:
    assert attempt_history([("W", "waiting", "waiting: the terminal plays alert B", 1.0, False)], link) == {}
