"""Scenario 4: the mail server misbehaves in every way operators meet.

a. It drops the connection after the message content on 10 % of messages
   (the reply is lost: ambiguous), answers 421/451 at random, and refuses
   some recipients for good (550).
b. It is down for 30 s.
c. It answers the end of DATA slower than the daemon's timeout.
d. It takes the message and then never answers (on 5 % of messages), and
   for a while a tarpit accepts connections and never even greets.

Transient faults end in delivery (resends carry the same Message-ID); a 5xx
fails the job at once, with the reply as its reason, after exactly one
attempt that reached the server's verdict.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from harness import MakeScenario, Scenario, hold, wait_until

from mailqd.models import Outcome

SLOW_TIMEOUT = "2"
"""`smtp_timeout` (seconds) for the slow and hanging server: faults show in seconds."""


def attempts_by_outcome(scenario: Scenario) -> dict[str, int]:
    with scenario.store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT outcome, count(*) FROM email_attempts GROUP BY 1"))
        return {outcome: n for outcome, n in rows}


def describe(scenario: Scenario) -> str:
    injected = scenario.smtp.plan.injected
    return ", ".join(f"{kind} x{n:,}" for kind, n in sorted(injected.items()))


@pytest.mark.runs_for(10)
def test_drops_during_data_random_4xx_and_permanent_5xx(make_scenario: MakeScenario) -> None:
    scenario = make_scenario("4a. SMTP drops in DATA 10 %, random 421/451, 550s", "smtpa")
    plan = scenario.smtp.plan
    plan.drop_data, plan.temp_data, plan.temp_mail = 0.10, 0.05, 0.05
    messages = scenario.scale(ci=1500, soak=10000)
    bounced = scenario.enqueue(messages // 20, to="bounce{n}@example.com", fail_reason=r"\b550\b")
    scenario.enqueue(messages - len(bounced))
    daemon = scenario.start_daemon()

    scenario.wait_drained(daemon, 180)
    scenario.books.fault(describe(scenario))
    scenario.finish(daemon)
    assert plan.injected["DATA drop"] >= messages // 20, "the drops really happened"
    for job_id in bounced:
        attempts = scenario.store.attempts(job_id)
        verdicts = [a for a in attempts if a.outcome is Outcome.FAILED]
        assert len(verdicts) == 1 and verdicts[0] is attempts[-1], attempts
        assert verdicts[0].smtp_code == 550, attempts
        transient = attempts[:-1]
        assert all(a.outcome in (Outcome.RETRY, Outcome.AMBIGUOUS) for a in transient), attempts
        assert all(a.smtp_code != 550 for a in transient), "a 5xx is never retried"


@pytest.mark.runs_for(35)
def test_smtp_server_down_for_30_seconds(make_scenario: MakeScenario) -> None:
    scenario = make_scenario("4b. SMTP server down 30 s", "smtpdown")
    messages = scenario.scale(ci=600, soak=5000)
    scenario.enqueue(messages)
    daemon = scenario.start_daemon()
    scenario.wait_sent(messages // 4, daemon)

    scenario.smtp.stop()
    before = attempts_by_outcome(scenario)
    hold(30.0, daemon)
    after = attempts_by_outcome(scenario)
    deferred = after.get("deferred", 0) - before.get("deferred", 0)
    scenario.smtp.start()
    # A relay outage is not the messages' fault (#16): sends are deferred, no attempt
    # used, and once the breaker is open only its probes reach for the relay.
    assert deferred > 0, "the daemon defers its sends while the server is down"
    assert after.get("retry", 0) == before.get("retry", 0), "no attempt used by the outage"
    scenario.books.fault(f"server stopped 30 s; {deferred:,} sends deferred meanwhile")
    scenario.finish(daemon)


@pytest.mark.runs_for(14)
def test_server_slower_than_the_timeout(make_scenario: MakeScenario) -> None:
    scenario = make_scenario("4c. SMTP replies slower than the timeout", "smtpslow")
    messages = scenario.scale(ci=600, soak=5000)
    scenario.enqueue(messages)
    daemon = scenario.start_daemon(MAILQD_SMTP_TIMEOUT=SLOW_TIMEOUT)
    scenario.wait_sent(messages // 4, daemon)

    scenario.smtp.plan.data_delay = 3.0
    ambiguous_before = attempts_by_outcome(scenario).get("ambiguous", 0)
    wait_until(
        lambda: attempts_by_outcome(scenario).get("ambiguous", 0) > ambiguous_before + 30,
        "sends timing out on the slow server",
        timeout=60,
        daemon=daemon,
    )
    slow_for = scenario.scale(ci=6, soak=30)
    hold(slow_for, daemon)
    scenario.smtp.plan.data_delay = 0.0
    scenario.books.fault(
        f"end of DATA answered after 3 s (timeout {SLOW_TIMEOUT} s) for {slow_for}+ s: "
        f"{describe(scenario)}"
    )
    scenario.finish(daemon)


@pytest.mark.runs_for(15)
def test_server_accepts_then_hangs(make_scenario: MakeScenario) -> None:
    scenario = make_scenario("4d. SMTP accepts, then hangs; tarpit", "smtphang")
    scenario.smtp.plan.hang_data = 0.05
    messages = scenario.scale(ci=600, soak=5000)
    scenario.enqueue(messages)
    daemon = scenario.start_daemon(MAILQD_SMTP_TIMEOUT=SLOW_TIMEOUT)
    scenario.wait_sent(messages // 4, daemon)

    tarpit_for = scenario.scale(ci=6, soak=30)
    with scenario.smtp.tarpit():
        hold(tarpit_for, daemon)
    scenario.books.fault(
        f"no reply after DATA on 5 %; {tarpit_for} s of a tarpit that never greets: "
        f"{describe(scenario)}"
    )
    scenario.finish(daemon)
