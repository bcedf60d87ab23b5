"""The delivery core under deterministic simulation (`tests.delivery.sim`).

Thousands of seeded workloads, each a random fleet, network and policy with 30 to 120 random
steps, checked after every step (`tests.delivery.invariants`); a failing seed is shrunk to the
shortest workload that still fails, printed ready to paste into `run(...)`. Hypothesis explores
further with its own generator and shrinker. Environment knobs, for a longer hunt or to replay
one seed: EBCD_SIM_SEEDS (default 2000), EBCD_SIM_FIRST_SEED (0), EBCD_SIM_JOBS (processes, up to
2), EBCD_SIM_EXAMPLES (hypothesis, 200).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebcd.delivery.state import AState
from tests.delivery.shrink import explain, run_seeds, steps_of
from tests.delivery.sim import KINDS, N_ARGS, ORDERS, WEIGHTS, Scenario, Sim, Step, generate

SEEDS = int(os.environ.get("EBCD_SIM_SEEDS", "2000"))
FIRST_SEED = int(os.environ.get("EBCD_SIM_FIRST_SEED", "0"))
EXAMPLES = int(os.environ.get("EBCD_SIM_EXAMPLES", "200"))
JOBS = int(os.environ.get("EBCD_SIM_JOBS", str(min(2, os.cpu_count() or 1))))

# What the workloads must have made happen, over all seeds: a simulation that never pre-empts,
# resumes, retries or restarts proves nothing about them.
EXERCISED = (
    "send", "block", "ack", "refuse", "timeout", "preempt", "cancel", "expire", "reopen", "renew", "resend",
    "resumed", "step_restart", "step_jump", "step_room_down", "note_play_hold_timeout",
)  # fmt: skip


@pytest.mark.timeout(600)
def test_seeded_workloads_keep_every_invariant(sim_summary: list[str]) -> None:
    started = time.perf_counter()
    seeds = range(FIRST_SEED, FIRST_SEED + SEEDS)
    jobs = min(JOBS, SEEDS)
    if jobs > 1:  # the seeds dealt out round-robin to a process per core
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(run_seeds, [seeds[i::jobs] for i in range(jobs)]))
    else:
        results = [run_seeds(seeds)]
    elapsed = time.perf_counter() - started
    failed = [seed for _, _, seed in results if seed is not None]
    if failed:
        seed = min(failed)
        sc, workload = generate(seed, steps_of(seed))
        pytest.fail(explain(sc, workload, seed), pytrace=False)
    seen: Counter[str] = sum((r[0] for r in results), Counter())
    steps = sum(r[1] for r in results)
    sim_summary.append(
        f"{SEEDS} seeds ({FIRST_SEED}..{FIRST_SEED + SEEDS - 1}) in {jobs} processes, {steps} steps, "
        f"{seen['transitions']} delivery transitions in {elapsed:.1f} s: "
        f"{SEEDS / elapsed:.1f} seeds/s, {steps / elapsed:.0f} steps/s"
    )
    if SEEDS >= 200:
        assert [k for k in EXERCISED if not seen[k]] == []


STEP = st.builds(
    Step,
    st.sampled_from([k for k in KINDS for _ in range(WEIGHTS[k])]),
    st.tuples(*[st.integers(0, (1 << 16) - 1)] * N_ARGS),
)
SCENARIO = st.builds(
    Scenario,
    terminals=st.integers(6, 12),
    loss_pct=st.sampled_from((0, 5, 15, 30)),
    dup_pct=st.sampled_from((0, 5, 20)),
    delay_pct=st.sampled_from((0, 5, 20)),
    refuse_pct=st.sampled_from((0, 5)),
    fail_pct=st.sampled_from((0, 10)),
    play_ms=st.sampled_from((200, 500, 1000, 3000)),
    ack_timeout_ms=st.sampled_from((500, 1500, 5000)),
    max_attempts=st.integers(1, 4),
    max_play_s=st.sampled_from((5, 30, 60)),
    end=st.integers(0, 1),
    order=st.integers(0, len(ORDERS) - 1),
)


@pytest.mark.timeout(300)
@settings(
    max_examples=EXAMPLES,
    deadline=None,  # a loaded 2-core CI machine makes per-example deadlines flaky
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(sc=SCENARIO, workload=st.lists(STEP, min_size=10, max_size=80))
def test_hypothesis_workloads_keep_every_invariant(sc: Scenario, workload: list[Step]) -> None:
    sim = Sim(sc)
    for step in workload:
        sim.do(step)
    sim.heal()


class CancelsAreBugs(Sim):
    """A simulation in which any cancel counts as a bug: a failure planted for the shrinker."""

    def check(self) -> None:
        super().check()
        if any(a.state is AState.CANCELLED for a in self.core.alerts.values()):
            raise self.fail("an alert was cancelled (the planted failure)")


def test_a_failing_workload_is_shrunk_to_the_steps_that_matter() -> None:
    noise = [s for s in generate(11, 80)[1] if s.kind in ("advance", "heartbeat", "lose", "dup", "born")]
    alert, cancel = Step("alert", (1, 2, 17, 4)), Step("cancel", (0, 0, 0, 0))  # (17: an hour to live)
    workload = [*noise[:30], alert, *noise[30:50], cancel, *noise[50:]]
    sc = Scenario()
    text = explain(sc, workload, seed=11, make=CancelsAreBugs)
    assert "the planted failure" in text
    replay = [line.strip() for line in text.splitlines() if line.strip().startswith("Step(")]
    assert replay == ["Step('alert', (1, 2, 17, 4)),", "Step('cancel', (0, 0, 0, 0)),"]
