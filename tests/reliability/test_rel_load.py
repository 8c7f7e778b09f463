"""Scenario 6: load. Tens of thousands of messages queued in bursts while the daemon delivers.

The queue must drain, and the memory of each process must stay flat: the
resident set of the supervisor and of every worker is sampled four times a
second, and its growth from the end of the warm-up (10 % delivered) to the
end of the run is reported and bounded.
"""

from __future__ import annotations

import pytest
from harness import MakeScenario, RssSampler, wait_until

BURST = 1000
WARM_UP_SHARE = 0.10
MAX_GROWTH_KIB = 32 * 1024
"""How much a process may grow after the warm-up: allocator and pool noise, not a leak."""


@pytest.mark.runs_for(12)
def test_bursts_of_mail_while_delivering_drain_with_flat_memory(
    make_scenario: MakeScenario,
) -> None:
    scenario = make_scenario("6. load", "load")
    messages = scenario.scale(ci=10_000, soak=50_000)
    daemon = scenario.start_daemon()

    with RssSampler(daemon.pid) as memory:
        enqueued = 0
        while enqueued < messages:
            wait_until(
                lambda: scenario.unfinished() < 2 * BURST,
                "the backlog to go below two bursts",
                timeout=300,
                daemon=daemon,
            )
            scenario.enqueue(min(BURST, messages - enqueued), body_bytes=1000)
            enqueued = min(messages, enqueued + BURST)
            if "warm" not in memory.marks and scenario.sent() >= messages * WARM_UP_SHARE:
                memory.mark("warm")
        if "warm" not in memory.marks:
            scenario.wait_sent(int(messages * WARM_UP_SHARE), daemon)
            memory.mark("warm")
        scenario.wait_drained(daemon, timeout=600)
        memory.mark("end")

    growth = report_memory(memory, daemon.pid)
    scenario.books.fault(
        f"none; {messages // BURST} bursts of {BURST:,} while delivering; {growth.summary}"
    )
    scenario.finish(daemon)
    assert growth.worst_kib <= MAX_GROWTH_KIB, growth.summary


class Growth:
    def __init__(self, summary: str, worst_kib: int) -> None:
        self.summary = summary
        self.worst_kib = worst_kib


def report_memory(memory: RssSampler, supervisor: int) -> Growth:
    """RSS of each process when warm, and its peak to the end; the worst growth."""
    warm, end = memory.marks["warm"], memory.marks["end"]
    after = memory.per_process(warm, end)
    parts, worst = [], 0
    workers = sorted(pid for pid in after if pid != supervisor)
    for pid in [supervisor, *workers]:
        samples = after.get(pid)
        if not samples:
            continue
        grown = max(samples) - samples[0]
        worst = max(worst, grown)
        role = "supervisor" if pid == supervisor else "worker"
        parts.append(f"{role} {samples[0] / 1024:.0f}→{max(samples) / 1024:.0f} MB")
    summary = "RSS after warm-up → peak: " + ", ".join(parts)
    print(f"\n{summary}")
    return Growth(summary, worst)
