"""Scenario 2: the supervisor itself is SIGKILLed mid-run, then a fresh `mailqd` starts.

a. Only the supervisor dies (the OOM killer, `kill -9 <main pid>`): its
   workers are orphans. They must notice and stop gracefully on their own
   (finishing and recording their sends, giving back what they had not
   started) rather than deliver on unsupervised forever.
b. The whole daemon dies at once (supervisor and workers, as a machine or
   container crash): the jobs it held stay `sending` under leases nobody
   renews, and the fresh daemon takes them back once the leases expire.

Either way every job the dead daemon held ends delivered.
"""

from __future__ import annotations

import signal

import sqlalchemy as sa
from harness import MakeScenario, Scenario, wait_until

from daemon_process import DaemonProcess, process_state


def held_jobs(scenario: Scenario) -> set[str]:
    with scenario.store.engine.connect() as conn:
        return set(
            conn.execute(sa.text("SELECT id FROM email_queue WHERE status = 'sending'")).scalars()
        )


def kill_mid_run(
    scenario: Scenario, daemon: DaemonProcess, messages: int
) -> tuple[set[int], set[str]]:
    """Wait until the daemon is busy (a quarter sent, jobs held); its workers and held jobs."""
    scenario.wait_sent(messages // 4, daemon)
    wait_until(lambda: scenario.holders(), "workers holding jobs", 60, daemon=daemon)
    return daemon.worker_pids(), held_jobs(scenario)


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


def test_supervisor_sigkilled_orphaned_workers_stop_and_a_fresh_daemon_finishes(
    make_scenario: MakeScenario,
) -> None:
    scenario = make_scenario("2a. supervisor SIGKILL, workers orphaned", "orphan")
    messages = scenario.scale(ci=1000, soak=10000)
    scenario.enqueue(messages)
    first = scenario.start_daemon()
    workers, held = kill_mid_run(scenario, first, messages)

    first.send(signal.SIGKILL)
    first.wait_exit(timeout=30)
    wait_until(
        lambda: not any(alive(pid) for pid in workers),
        "the orphaned workers to stop on their own",
        timeout=60,
    )
    assert len(first.events("supervisor gone; stopping gracefully")) == len(workers)
    assert held_jobs(scenario) == set(), "the orphans record or give back all they held"

    second = scenario.start_daemon()
    scenario.books.fault(
        f"supervisor SIGKILLed with {len(held)} jobs held; {len(workers)} orphaned workers; "
        "fresh start"
    )
    scenario.finish(second)
    assert held <= sent_ids(scenario), "every job held by the dead daemon is delivered"


def test_whole_daemon_sigkilled_and_a_fresh_daemon_recovers_its_jobs(
    make_scenario: MakeScenario,
) -> None:
    scenario = make_scenario("2b. whole daemon SIGKILL (supervisor + workers)", "crash")
    messages = scenario.scale(ci=1000, soak=10000)
    scenario.enqueue(messages)
    first = scenario.start_daemon()
    kill_mid_run(scenario, first, messages)

    first.signal_group(signal.SIGKILL)
    first.wait_exit(timeout=30)
    held = held_jobs(scenario)
    assert held, "the crash leaves jobs held under leases nobody renews"

    second = scenario.start_daemon()
    scenario.books.fault(f"daemon SIGKILLed with {len(held)} jobs held; fresh start")
    scenario.finish(second)
    assert held <= sent_ids(scenario), "every job held by the dead daemon is delivered"
    assert second.events("rescued jobs whose lease expired"), "recovered by lease expiry"


def sent_ids(scenario: Scenario) -> set[str]:
    with scenario.store.engine.connect() as conn:
        return set(
            conn.execute(sa.text("SELECT id FROM email_queue WHERE status = 'sent'")).scalars()
        )
