"""Scenario 3: the database goes away under a busy daemon.

PostgreSQL is restarted mid-run with a fast shutdown (clients disconnected,
clean checkpoint) and with an immediate one (a crash: recovery at the next
start), and in the third run it is stopped and unreachable for 30 s. The
daemon must live through each without a restart of its own: workers back
off, keep the outcomes of sends they finished, and carry on when the
database is back; jobs whose leases expired meanwhile are rescued and sent
again (same Message-ID).
"""

from __future__ import annotations

import pytest
from harness import MakeScenario, Scenario, hold

from daemon_process import DaemonProcess
from pg import PostgresServer

OUTAGE_SECONDS = 30.0


def busy_daemon(scenario: Scenario, messages: int) -> tuple[DaemonProcess, set[int]]:
    scenario.enqueue(messages)
    daemon = scenario.start_daemon()
    scenario.wait_sent(messages // 4, daemon)
    return daemon, daemon.worker_pids()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restarted_mid_run(
    make_scenario: MakeScenario, owned_pg: PostgresServer, mode: str
) -> None:
    scenario = make_scenario(
        f"3{'a' if mode == 'fast' else 'b'}. PostgreSQL restart ({mode})", f"pg{mode}"
    )
    messages = scenario.scale(ci=1000, soak=10000)
    daemon, workers = busy_daemon(scenario, messages)

    sent_before = scenario.sent()
    owned_pg.restart(mode)
    scenario.books.fault(f"PostgreSQL restarted ({mode} shutdown) after {sent_before:,} sent")
    more = messages // 4
    scenario.enqueue(more)  # the application enqueues again as soon as the database is back

    scenario.finish(daemon)
    assert_no_worker_restarts(daemon, workers)


@pytest.mark.runs_for(35)
def test_postgres_unreachable_for_30_seconds(
    make_scenario: MakeScenario, owned_pg: PostgresServer
) -> None:
    scenario = make_scenario("3c. PostgreSQL unreachable 30 s", "pgdown")
    messages = scenario.scale(ci=1000, soak=10000)
    daemon, workers = busy_daemon(scenario, messages)

    sent_before = scenario.sent()
    owned_pg.stop("fast")
    try:
        hold(OUTAGE_SECONDS, daemon)
    finally:
        owned_pg.start()
    scenario.books.fault(
        f"PostgreSQL stopped for {OUTAGE_SECONDS:.0f} s after {sent_before:,} sent "
        "(leases expire meanwhile)"
    )
    scenario.enqueue(messages // 4)

    scenario.finish(daemon)
    assert_no_worker_restarts(daemon, workers)


def assert_no_worker_restarts(daemon: DaemonProcess, workers: set[int]) -> None:
    """A database outage is waited out by the workers; none should have died of it."""
    deaths = [e for e in daemon.events("worker exited") if e.get("pid") in workers]
    unexpected = [e for e in deaths if e.get("exit_code") != 0]
    assert not unexpected, f"workers died during the database outage: {unexpected}"
