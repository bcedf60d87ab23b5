"""kill -9 of the daemon at seeded moments, each restart checked: a few fixed seeds of tests/crash_harness.py.

One `ebcd simulate` serves every run; each run is one scenario (send, fan-out, alerts waiting for
each other, a flood over MQTT) killed at the moment its seed draws, restarted, settled and checked
(every alert final with exact counts, no terminal played twice, nothing acknowledged upstream
lost, every terminal released, a clean SIGTERM, a journal that agrees). `python bench/crash.py
--runs N --seed S` runs many more seeds; a seed that fails here replays there with `--runs 1
--seed SEED`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ebcd.config import Config
from ebcd.tiers.district import District
from tests.conftest import Mosquitto
from tests.crash_harness import SCENARIOS, CrashHarness, plan_run, summary, table

pytestmark = pytest.mark.slow

# send (all, 85 ms), fanout (a town, at 59 %), waiting (daily first, 城关镇), flood (73 alerts,
# killed twice): every scenario once; `plan_run(seed, district).describe()` says what each does.
SEEDS = (2, 3, 7, 24)
SETTLE_TIMEOUT_S = 45.0  # a run that passes settles in under 10 s


@pytest.mark.timeout(480)
async def test_kill_9_at_seeded_moments_every_restart_settles_and_loses_nothing(
    own_mosquitto: Mosquitto,
    shipped_config: Config,
    district: District,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plans = [plan_run(seed, district) for seed in SEEDS]
    assert {p.scenario for p in plans} == set(SCENARIOS), [p.scenario for p in plans]
    config_file = shipped_config.base_dir / "ebcd.toml"  # serial buses in this session's folder
    async with CrashHarness(
        config_file,
        district,
        own_mosquitto.host,
        own_mosquitto.port,
        tmp_path,
        settle_timeout_s=SETTLE_TIMEOUT_S,
    ) as harness:
        results = [await harness.run(plan) for plan in plans]
    with capsys.disabled():
        print(f"\n{summary(results)}")  # noqa: T201 -- the one line CI shows
    failed = [r for r in results if not r.passed]
    report = [table(results), f"logs and journal: {tmp_path}"]
    report += [f"{r.reproduce()}\n  {r.why}\n  notes: {'; '.join(r.notes)}" for r in failed]
    assert not [r.plan.seed for r in failed], "\n".join(report)
