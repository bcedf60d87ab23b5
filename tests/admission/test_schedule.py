"""Scheduled test broadcasts: the spec, when slots fire, catching up after downtime, outcomes."""

from __future__ import annotations

import asyncio
import itertools
import tomllib
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ebcd.admission import schedule
from ebcd.admission.schedule import Slot, TestBroadcastConfig, due, next_fire, parse_slot, previous_fire
from ebcd.config import Config as EbcdConfig
from ebcd.model.events import TEST_EVENT
from ebcd.tiers.district import District
from tests.conftest import Mosquitto, fast_config
from tests.helpers import running_daemon, running_fleet, wait_for

SHANGHAI = ZoneInfo("Asia/Shanghai")
Config = schedule.TestBroadcastConfig
Outcome = schedule.TestOutcome


def sh(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    """A wall-clock time in Asia/Shanghai."""
    return datetime(year, month, day, hour, minute, second, tzinfo=SHANGHAI)


def spec(*weekly: str, **kw: object) -> schedule.TestBroadcastConfig:
    return Config.model_validate({"weekly": list(weekly), **kw})


MONDAY_10 = spec("MON 10:00")


# -- the spec --------------------------------------------------------------------------------------
def test_one_slot_as_a_string_and_the_defaults() -> None:
    s = Config.model_validate({"weekly": "MON 10:00"})
    assert s.weekly == ("MON 10:00",)
    assert s.slots == (Slot(0, time(10, 0)),)
    assert s.timezone == "Asia/Shanghai"
    assert s.zone == SHANGHAI
    assert s.targets == ("all",)
    assert (s.enabled, s.silent, s.max_late_s) == (True, False, None)
    assert s.text.strip()


def test_slots_are_case_insensitive_normalised_and_sorted_monday_first() -> None:
    s = spec("sun 7:05", "Thu 16:30", "MON 10:00")
    assert s.weekly == ("MON 10:00", "THU 16:30", "SUN 07:05")
    assert [str(slot) for slot in s.slots] == list(s.weekly)


def test_the_documented_toml_example_is_a_valid_config() -> None:
    doc = schedule.__doc__ or ""
    example = doc[doc.index("[test_broadcast]") : doc.index("The daemon keeps")]
    raw = tomllib.loads("\n".join(line.strip() for line in example.splitlines()))
    s = Config.model_validate(raw["test_broadcast"])
    assert s.weekly == ("MON 10:00",)
    assert s.targets == ("all",)


@pytest.mark.parametrize(
    ("raw", "field", "says"),
    [
        ({}, "weekly", "Field required"),
        ({"weekly": []}, "weekly", "at least one 'DAY HH:MM' slot"),
        ({"weekly": "Monday 10:00"}, "weekly", "expected 'DAY HH:MM' with DAY one of MON, TUE"),
        ({"weekly": "MON 10"}, "weekly", "expected 'DAY HH:MM'"),
        ({"weekly": "MON 10:00:00"}, "weekly", "expected 'DAY HH:MM'"),
        ({"weekly": "XYZ 10:00"}, "weekly", "day 'XYZ' is not one of MON, TUE, WED, THU, FRI, SAT, SUN"),
        ({"weekly": "MON 24:00"}, "weekly", "24:00 is not a time of day"),
        ({"weekly": "MON 10:60"}, "weekly", "10:60 is not a time of day"),
        ({"weekly": ["MON 10:00", "mon 10:00"]}, "weekly", "'mon 10:00' is the same as 'MON 10:00'"),
        ({"weekly": "MON 10:00", "timezone": "Asia/Beijing"}, "timezone", "'Asia/Beijing' is not an IANA"),
        ({"weekly": "MON 10:00", "timezone": "../etc/passwd"}, "timezone", "is not an IANA time zone"),
        ({"weekly": "MON 10:00", "targets": ["county:1"]}, "targets", "expected all, town:CODE"),
        ({"weekly": "MON 10:00", "targets": ["town:abc"]}, "targets", "town needs a numeric code"),
        ({"weekly": "MON 10:00", "targets": []}, "targets", "at least one target"),
        ({"weekly": "MON 10:00", "text": "   "}, "text", "needs a text for the loudspeakers"),
        ({"weekly": "MON 10:00", "ttl_s": 0}, "ttl_s", "greater than 0"),
        ({"weekly": "MON 10:00", "max_late_s": -1}, "max_late_s", "greater than 0"),
        ({"weekly": "MON 10:00", "volume": 0}, "volume", "Extra inputs are not permitted"),
    ],
)
def test_invalid_specs_are_refused_naming_the_field_and_why(
    raw: dict[str, object], field: str, says: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Config.model_validate(raw)
    [error] = caught.value.errors()
    assert error["loc"] == (field,)
    assert says in error["msg"]


def test_parse_slot_refuses_with_what_a_slot_looks_like() -> None:
    assert parse_slot(" wed  08:30 ") == Slot(2, time(8, 30))
    with pytest.raises(ValueError, match=r"expected 'DAY HH:MM'.*e\.g\. 'MON 10:00'"):
        parse_slot("every monday")


def test_the_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        MONDAY_10.silent = True


def test_to_request_is_a_level_4_test_alert_and_silent_means_volume_0() -> None:
    loud = spec("MON 10:00", targets=["town:341523104000", "village:63415231000010314010101"]).to_request()
    assert (loud.level, loud.event_type, loud.test) == (4, TEST_EVENT, True)
    assert [str(t) for t in loud.targets] == ["town:341523104000", "village:63415231000010314010101"]
    assert loud.volume == 0xFF
    assert loud.ttl_s == 600.0
    assert loud.text == MONDAY_10.text

    quiet = spec("MON 10:00", silent=True, text="静音测试", ttl_s=120).to_request()
    assert quiet.volume == 0
    assert (quiet.text, quiet.ttl_s) == ("静音测试", 120)
    assert [str(t) for t in quiet.targets] == ["all"]


# -- next_fire / previous_fire -----------------------------------------------------------------------
def test_next_fire_on_a_wednesday_is_the_coming_monday_at_10_shanghai_time() -> None:
    nf = next_fire(MONDAY_10, sh(2026, 11, 25, 15, 0))  # a Wednesday
    assert nf == sh(2026, 11, 30, 10, 0)
    assert nf.utcoffset() == timedelta(hours=8)
    assert nf.astimezone(UTC) == datetime(2026, 11, 30, 2, 0, tzinfo=UTC)


def test_next_fire_is_strictly_after_so_a_slot_fired_now_is_next_week() -> None:
    assert next_fire(MONDAY_10, sh(2026, 11, 30, 9, 59, 59)) == sh(2026, 11, 30, 10, 0)
    assert next_fire(MONDAY_10, sh(2026, 11, 30, 10, 0)) == sh(2026, 12, 7, 10, 0)
    assert next_fire(MONDAY_10, sh(2026, 11, 30, 10, 0, 0) + timedelta(microseconds=1)) == sh(2026, 12, 7, 10)


def test_week_boundaries() -> None:
    # Sunday night -> Monday morning
    assert next_fire(MONDAY_10, sh(2026, 11, 29, 23, 59)) == sh(2026, 11, 30, 10, 0)
    # a Sunday slot just passed -> next Sunday, seven days on
    sunday = spec("SUN 23:30")
    assert next_fire(sunday, sh(2026, 11, 29, 23, 45)) == sh(2026, 12, 6, 23, 30)
    # the year ends on a Thursday: the first Monday of 2027
    assert next_fire(MONDAY_10, sh(2026, 12, 31, 12, 0)) == sh(2027, 1, 4, 10, 0)
    # several slots a week: the nearest one
    twice = spec("MON 10:00", "THU 16:30")
    assert next_fire(twice, sh(2026, 11, 30, 11, 0)) == sh(2026, 12, 3, 16, 30)
    assert next_fire(twice, sh(2026, 12, 3, 16, 30)) == sh(2026, 12, 7, 10, 0)


def test_the_weekday_is_shanghais_not_utcs() -> None:
    early = spec("MON 00:30")
    # Sunday 17:00 UTC is Monday 01:00 in Shanghai: Monday's 00:30 has passed already
    after = datetime(2026, 11, 29, 17, 0, tzinfo=UTC)
    assert next_fire(early, after) == sh(2026, 12, 7, 0, 30)
    assert previous_fire(early, after) == sh(2026, 11, 30, 0, 30)
    # Monday 01:59 UTC is 09:59 in Shanghai: today's 10:00 is still to come
    assert next_fire(MONDAY_10, datetime(2026, 11, 30, 1, 59, tzinfo=UTC)) == sh(2026, 11, 30, 10, 0)
    # the same instant, written in another zone, gives the same answer
    la = ZoneInfo("America/Los_Angeles")
    assert next_fire(MONDAY_10, after.astimezone(la)) == next_fire(MONDAY_10, after)


def test_shanghai_has_no_dst_every_weekly_slot_is_exactly_seven_days_apart() -> None:
    fired = [next_fire(MONDAY_10, sh(2026, 1, 1))]
    for _ in range(110):  # two years, across both years' ends and every month
        fired.append(next_fire(MONDAY_10, fired[-1]))
    assert all(f.utcoffset() == timedelta(hours=8) for f in fired)
    assert all((f.weekday(), f.time()) == (0, time(10, 0)) for f in fired)
    gaps = {(b.astimezone(UTC) - a.astimezone(UTC)) for a, b in itertools.pairwise(fired)}
    assert gaps == {timedelta(days=7)}


def test_a_zone_with_dst_keeps_the_wall_clock_time_and_fires_once_a_week() -> None:
    berlin = spec("SUN 02:30", timezone="Europe/Berlin")  # 02:30 does not exist on 2026-03-29
    fired = [next_fire(berlin, datetime(2026, 3, 20, tzinfo=UTC))]
    for _ in range(3):
        fired.append(next_fire(berlin, fired[-1]))
    utc = [f.astimezone(UTC) for f in fired]
    assert utc == sorted(set(utc))  # strictly increasing: nothing fires twice
    assert [u.date().isoformat() for u in utc] == ["2026-03-22", "2026-03-29", "2026-04-05", "2026-04-12"]
    assert fired[2].astimezone(ZoneInfo("Europe/Berlin")).time() == time(2, 30)


def test_previous_fire_includes_the_slot_itself() -> None:
    assert previous_fire(MONDAY_10, sh(2026, 11, 30, 10, 0)) == sh(2026, 11, 30, 10, 0)
    assert previous_fire(MONDAY_10, sh(2026, 11, 30, 9, 59)) == sh(2026, 11, 23, 10, 0)
    assert previous_fire(MONDAY_10, sh(2026, 12, 6, 23, 59)) == sh(2026, 11, 30, 10, 0)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="after must be timezone-aware"):
        next_fire(MONDAY_10, datetime(2026, 11, 30, 10, 0))
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        due(MONDAY_10, sh(2026, 11, 23, 10), datetime(2026, 11, 30, 10, 0))
    with pytest.raises(ValueError, match="last_fired must be timezone-aware"):
        due(MONDAY_10, datetime(2026, 11, 23, 10, 0), sh(2026, 11, 30, 10))


@given(
    after=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    slots=st.sets(
        st.tuples(st.integers(0, 6), st.integers(0, 23), st.integers(0, 59)), min_size=1, max_size=5
    ),
)
def test_next_fire_is_the_nearest_slot_after(after: datetime, slots: set[tuple[int, int, int]]) -> None:
    s = spec(*(f"{schedule.DAYS[d]} {h:02d}:{m:02d}" for d, h, m in slots))
    nf = next_fire(s, after)
    assert after < nf <= after + timedelta(days=7)
    local = nf.astimezone(SHANGHAI)
    assert (local.weekday(), local.hour, local.minute) in slots
    assert (local.second, local.microsecond) == (0, 0)
    # no slot in between: the last slot before the one found is not after `after`
    assert previous_fire(s, nf - timedelta(microseconds=1)) <= after
    assert previous_fire(s, nf) == nf


# -- due ---------------------------------------------------------------------------------------------
def test_due_at_the_slot_and_not_again_once_fired() -> None:
    last = sh(2026, 11, 23, 10, 0, 5)  # last week's test, fired 5 s after its slot
    assert not due(MONDAY_10, last, sh(2026, 11, 30, 9, 59, 59))
    assert due(MONDAY_10, last, sh(2026, 11, 30, 10, 0))
    fired = sh(2026, 11, 30, 10, 0, 1)
    assert not due(MONDAY_10, fired, fired)
    assert not due(MONDAY_10, fired, sh(2026, 12, 7, 9, 59))
    assert due(MONDAY_10, fired, sh(2026, 12, 7, 10, 0))


def test_recording_the_slot_itself_as_last_fired_works_too() -> None:
    slot = sh(2026, 11, 30, 10, 0)
    assert not due(MONDAY_10, slot, sh(2026, 11, 30, 10, 0, 30))


def test_no_record_means_nothing_is_due_so_enabling_a_schedule_never_fires_at_once() -> None:
    assert not due(MONDAY_10, None, sh(2026, 11, 30, 10, 0))
    assert not due(MONDAY_10, None, sh(2026, 11, 25, 15, 0))


def test_a_daemon_down_over_several_slots_fires_once_on_start() -> None:
    last = sh(2026, 11, 2, 10, 0)  # then down for three Mondays
    back = sh(2026, 11, 25, 3, 0)
    assert due(MONDAY_10, last, back)
    assert not due(MONDAY_10, back, back + timedelta(seconds=1))
    assert not due(MONDAY_10, back, sh(2026, 11, 30, 9, 59))
    assert due(MONDAY_10, back, sh(2026, 11, 30, 10, 0))


def test_a_daemon_loop_over_two_months_with_an_outage_fires_once_per_slot_plus_one_catch_up() -> None:
    last: datetime | None = None
    fired: list[datetime] = []
    now = sh(2026, 10, 31, 0, 0)  # a Saturday
    down = (sh(2026, 11, 3, 0, 0), sh(2026, 11, 24, 12, 7))  # misses 9, 16 and 23 November
    while now < sh(2026, 12, 31):
        if not down[0] <= now < down[1]:
            if last is None:
                last = now  # the first start: a baseline, no test
            elif due(MONDAY_10, last, now):
                fired.append(now)
                last = now
        now += timedelta(minutes=7)
    assert [f.date().isoformat() for f in fired] == [
        "2026-11-02",
        "2026-11-24",  # the catch-up, once, for three missed Mondays
        "2026-11-30",
        "2026-12-07",
        "2026-12-14",
        "2026-12-21",
        "2026-12-28",
    ]
    assert timedelta(0) <= fired[1] - down[1] < timedelta(minutes=7)  # the first tick once back
    on_time = [f for i, f in enumerate(fired) if i != 1]
    assert all(timedelta(0) <= f - f.replace(hour=10, minute=0) < timedelta(minutes=7) for f in on_time)


def test_max_late_s_skips_a_slot_missed_by_too_long() -> None:
    strict = spec("MON 10:00", max_late_s=3600)
    last = sh(2026, 11, 23, 10, 0)
    assert due(strict, last, sh(2026, 11, 30, 11, 0))
    assert not due(strict, last, sh(2026, 11, 30, 11, 0, 1))
    assert due(strict, last, sh(2026, 12, 7, 10, 30))  # the next slot fires as usual


def test_a_disabled_schedule_is_never_due() -> None:
    off = spec("MON 10:00", enabled=False)
    assert not due(off, sh(2026, 11, 23, 10), sh(2026, 11, 30, 10))


def test_a_clock_set_back_fires_nothing() -> None:
    assert not due(MONDAY_10, sh(2026, 12, 1, 10), sh(2026, 11, 30, 10, 0, 1))


# -- outcomes ----------------------------------------------------------------------------------------
def test_outcome_names_the_missed_terminals_sorted() -> None:
    expected = {"63415231000010314010403", "63415231000010314010401", "63415231000010314010402"}
    acked = {"63415231000010314010402", "99999999999999999999999"}  # a stray ack does not count
    out = Outcome.of("20261130-0001", expected, acked, slot=sh(2026, 11, 30, 10))
    assert (out.targets, out.acked) == (3, 1)
    assert out.missed == ("63415231000010314010401", "63415231000010314010403")
    assert out.coverage == pytest.approx(1 / 3)
    assert not out.complete
    assert out.to_log_fields() == {
        "alert_id": "20261130-0001",
        "targets": 3,
        "acked": 1,
        "missed": 2,
        "coverage": 0.3333,
        "missed_terminals": ["63415231000010314010401", "63415231000010314010403"],
        "slot": "2026-11-30T10:00:00+08:00",
    }


def test_a_complete_outcome() -> None:
    codes = [f"634152310000103140104{i:02d}" for i in range(1, 6)]
    out = Outcome.of("20261130-0002", codes, codes)
    assert out.complete
    assert (out.targets, out.acked, out.missed, out.coverage) == (5, 5, (), 1.0)
    assert "slot" not in out.to_log_fields()
    assert Outcome.of("x", [], []).coverage == 1.0


def test_the_log_line_names_at_most_100_terminals() -> None:
    codes = [f"63415231{i:015d}" for i in range(769)]
    out = Outcome.of("20261130-0003", codes, codes[:600])
    fields = out.to_log_fields()
    assert fields["missed"] == 169
    assert fields["missed_terminals"] == codes[600:700]
    assert fields["missed_terminals_truncated"] is True
    assert len(out.missed) == 169


def test_log_fields_go_into_structlog_as_they_are() -> None:
    out = Outcome.of("20261130-0004", ["a", "b"], ["b"])
    with structlog.testing.capture_logs() as logs:
        structlog.get_logger("ebcd.admission.schedule").info("test_broadcast.finished", **out.to_log_fields())
    assert logs == [
        {"event": "test_broadcast.finished", "log_level": "info", **out.to_log_fields()},
    ]


def test_an_inconsistent_outcome_is_refused() -> None:
    with pytest.raises(ValueError, match="sorted"):
        Outcome("a", 2, 0, ("b", "a"))
    with pytest.raises(ValueError, match="sorted"):
        Outcome("a", 2, 0, ("a", "a"))
    with pytest.raises(ValueError, match=r"1 acked \+ 2 missed != 2 targets"):
        Outcome("a", 2, 1, ("a", "b"))


def test_pytest_does_not_take_the_models_for_test_classes() -> None:
    assert schedule.TestBroadcastConfig.__test__ is False
    assert schedule.TestOutcome.__test__ is False


async def test_a_missed_weekly_test_is_reported_with_the_exact_terminals_that_missed_it(
    mosquitto: Mosquitto, shipped_config: EbcdConfig, district: District, tmp_path: Path
) -> None:
    village = next(v for v in district.villages() if v.link == "mqtt")
    silent = village.terminals[-2:]  # these two never answer
    spec = TestBroadcastConfig(
        weekly="MON 10:00", targets=(f"village:{village.code}",), silent=True, text="每周静默测试"
    )
    config = fast_config(shipped_config, ack_timeout_s=0.5, max_attempts=2, retry_initial_s=0.2)
    config = config.model_copy(update={"test_broadcast": [spec]})
    cst = ZoneInfo("Asia/Shanghai")
    clock = {"now": datetime(2026, 11, 30, 9, 59, 58, tzinfo=cst)}  # a Monday, just before the slot
    async with (
        running_daemon(config, district, mosquitto.url, tmp_path, wall_clock=lambda: clock["now"]) as daemon,
        running_fleet(config, district, village.terminals[:-2], mosquitto.host, mosquitto.port),
    ):
        await asyncio.sleep(1.5)
        assert not daemon.runner.alerts  # not due yet
        clock["now"] = datetime(2026, 11, 30, 10, 0, 1, tzinfo=cst)
        await wait_for(lambda: len(daemon.scheduler.outcomes) == 1, 20)
        outcome = next(iter(daemon.scheduler.outcomes.values()))
        assert outcome.missed == tuple(sorted(t.code for t in silent))
        assert outcome.acked == len(village.terminals) - 2
        run = daemon.runner.alerts[outcome.alert_id]
        assert run.request.test
        assert run.request.volume == 0
        assert run.source == "schedule"
        assert daemon.metrics.missed_tests._value.get() == 2
        report = daemon.control.report(run)
        assert report["test"]["missed"] == list(outcome.missed)
        clock["now"] = datetime(2026, 11, 30, 10, 30, tzinfo=cst)
        await asyncio.sleep(1.5)
        assert len(daemon.runner.alerts) == 1  # once per slot
