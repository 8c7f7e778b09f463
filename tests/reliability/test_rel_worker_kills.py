"""Scenario 1: workers are SIGKILLed again and again while thousands of messages go out.

Each victim is a worker that holds jobs at that moment (mid-send), chosen at
random; kills are spread over the run by delivery progress, and more mail
keeps arriving in bursts meanwhile. The supervisor replaces every victim and
gives its jobs back; every job is delivered, and resends (duplicates) carry
the job's one Message-ID.
"""

from __future__ import annotations

import random
import signal

import pytest
from harness import MakeScenario, wait_until


@pytest.mark.runs_for(20)
def test_random_workers_sigkilled_repeatedly_while_delivering(make_scenario: MakeScenario) -> None:
    scenario = make_scenario("1. worker SIGKILL", "kill")
    messages = scenario.scale(ci=5000, soak=20000)
    kills_wanted = scenario.scale(ci=10, soak=30)
    burst = messages // 10
    rng = random.Random(1)

    scenario.enqueue(2 * burst)
    daemon = scenario.start_daemon()
    enqueued = 2 * burst
    for kill in range(kills_wanted):
        if enqueued < messages:
            scenario.enqueue(min(burst, messages - enqueued))
            enqueued = min(messages, enqueued + burst)
        scenario.wait_sent(messages * (kill + 1) // (kills_wanted + 2), daemon)
        holders = wait_until(
            lambda: [p for p in scenario.holders() if p in daemon.worker_pids()],
            "a live worker holding jobs",
            timeout=120,
            daemon=daemon,
        )
        victim = rng.choice(sorted(holders))
        daemon.signal_worker(victim, signal.SIGKILL)
        wait_until(lambda v=victim: v not in daemon.worker_pids(), "the victim reaped", 30)
    if enqueued < messages:
        scenario.enqueue(messages - enqueued)

    scenario.books.fault(f"{kills_wanted} workers SIGKILLed mid-send")
    tally = scenario.finish(daemon)
    assert tally.messages == messages
    # A victim that recorded its last outcomes just before the kill holds nothing to give back.
    given_back = sum(e["count"] for e in daemon.events("jobs given back"))
    assert given_back > 0, "the supervisor gives back the jobs its dead workers held"
