"""Per-domain rate limits at claim time: a token bucket per limited recipient domain.

Each limited domain has a token bucket (`mailqd.store.buckets`, named
`domain:<domain>`) taken from in the claim's transaction, once per job
however many of its recipients are in that domain. Jobs are admitted in
claim order while every limited domain of the job has a token; tokens
taken for jobs that were not admitted are given back. A job turned away
goes back to pending, its attempt not counted and no attempt row written
(nothing was tried, and `last_error` is kept), due in the slot its
domain's bucket hands it: the k-th waiting job of a domain comes back
about `wait for the next token + k / rate` seconds later, after the jobs
already waiting. So a backlog is spread over the time the limit needs to
send it, deferred about once per job, and no worker re-claims it in a loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa

from mailqd.models import Job, Outcome
from mailqd.store import buckets
from mailqd.store.dialects import Dialect
from mailqd.store.screened import Screened, ScreenRules, admit, recipients_of

__all__ = ["DOMAIN_BUCKET_PREFIX", "throttle"]

DOMAIN_BUCKET_PREFIX = "domain:"
"""`mailqd_rate_limit` rows of the per-domain limits are named `domain:<domain>`."""


def throttle(
    conn: sa.Connection, dialect: Dialect, jobs: Sequence[Job], rules: ScreenRules, at: datetime
) -> dict[str, Screened]:
    """Take a token per job from each limited domain it sends to; put off the jobs that get none.

    One take per limited domain in the batch, in domain order (no deadlock
    between workers: the rows stay locked until the claim commits). The
    jobs are then admitted in claim order while each of their domains has
    a token left (`admit`); what is left over is given back. The jobs turned away
    are handed slots by their domains' buckets (`buckets.reserve`) and are
    due at the latest of their slots.
    """
    limited = {job.id: _limited_domains(job, rules) for job in jobs}
    demand = Counter(domain for domains in limited.values() for domain in domains)
    if not demand:
        return {}
    now = at.timestamp()  # the claim's database time: all buckets of this claim agree
    left: dict[str, int] = {}
    for domain, n in sorted(demand.items()):
        rate = rules.domain_rates[domain]
        grant = buckets.take(conn, dialect, _bucket(domain), n, rate, _burst(rate), now)
        left[domain] = grant.granted
    _, refused = admit(jobs, limited, left)
    for domain, unused in sorted(left.items()):
        rate = rules.domain_rates[domain]
        buckets.give_back(conn, dialect, _bucket(domain), unused, _burst(rate))
    waiting = Counter(domain for _, empty in refused for domain in empty)
    first_slot = {
        domain: buckets.reserve(conn, dialect, _bucket(domain), n, rules.domain_rates[domain], now)
        for domain, n in sorted(waiting.items())
    }
    places: Counter[str] = Counter()
    throttled: dict[str, Screened] = {}
    for job, empty in refused:
        slots: dict[str, float] = {}
        for domain in empty:
            slots[domain] = first_slot[domain] + places[domain] / rules.domain_rates[domain]
            places[domain] += 1
        domain = max(slots, key=lambda d: slots[d])
        delay = max(0.0, slots[domain] - now)
        reason = (
            f"recipient domain {domain} is at its domain_rate_limits "
            f"({rules.domain_rates[domain]:g}/s); due again in {delay:.2f} s, attempt not counted"
        )
        throttled[job.id] = Screened(job, Outcome.THROTTLED, reason, domain=domain, delay=delay)
    return throttled


def _limited_domains(job: Job, rules: ScreenRules) -> list[str]:
    """The `domain_rates` keys the job's recipients fall under, each once, sorted."""
    found = {rules.limited_domain(address.rpartition("@")[2]) for address in recipients_of(job)}
    return sorted(domain for domain in found if domain is not None)


def _bucket(domain: str) -> str:
    return DOMAIN_BUCKET_PREFIX + domain


def _burst(rate: float) -> float:
    """One second's worth, and at least one message, as for `rate_limit`."""
    return max(1.0, rate)
