"""What claim-time screening works with: its rules, its verdicts, and the one admission rule.

The three screening policies (`mailqd.store.dedup`, `mailqd.store.recipient_cap`,
`mailqd.store.throttle`) each judge a claimed batch; the cap and the
throttle admit jobs by the same rule, `admit`. `mailqd.store.screening`
runs them in the claim's transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailqd.models import Job, Outcome
from mailqd.rules import envelope_addresses
from mailqd.store.rows import UnreadableRow

__all__ = ["ScreenRules", "Screened", "ScreenedClaim", "admit", "recipients_of"]


@dataclass(frozen=True, slots=True)
class ScreenRules:
    """What to screen claimed jobs for; a rule at 0 is off.

    `open_variables` turns a job's stored `variables` into what they say
    (encrypted variables differ at every enqueue), for the content hash.
    """

    dedup_window: float = 0.0
    """Seconds: a job with the same content as one claimed this recently is not sent."""
    recipient_hourly_cap: int = 0
    """Sends begun per recipient per clock hour; more wait for the next hour."""
    domain_rates: Mapping[str, float] = field(default_factory=dict)
    """Messages per second per recipient domain (`Settings.domain_rates`); `*.d`: d's subdomains."""
    open_variables: Callable[[Any], Any] | None = field(default=None, compare=False)

    @property
    def active(self) -> bool:
        return self.dedup_window > 0 or self.recipient_hourly_cap > 0 or bool(self.domain_rates)

    def limited_domain(self, domain: str) -> str | None:
        """The `domain_rates` key that limits a (lower-cased) recipient domain, if any.

        The exact domain first, then the closest `*.parent` above it.
        """
        if domain in self.domain_rates:
            return domain
        labels = domain.split(".")
        for i in range(1, len(labels)):
            wildcard = "*." + ".".join(labels[i:])
            if wildcard in self.domain_rates:
                return wildcard
        return None


@dataclass(frozen=True, slots=True)
class Screened:
    """A claimed job that was not sent, and why; already recorded in the store."""

    job: Job
    outcome: Outcome
    """`DUPLICATE` (now cancelled), `DEFERRED` or `THROTTLED` (both pending again)."""
    reason: str
    """The job's `last_error` and its attempt row's text (`THROTTLED`: for the log only)."""
    domain: str = ""
    """`THROTTLED`: the limited domain (a `domain_rates` key) that held the job back."""
    delay: float = 0.0
    """`DEFERRED`, `THROTTLED`: seconds from the claim until the job is due again."""


@dataclass(frozen=True, slots=True)
class ScreenedClaim:
    """What `Store.claim_screened` took: jobs to send, and jobs it set aside."""

    jobs: list[Job]
    screened: list[Screened] = field(default_factory=list)
    unreadable: list[UnreadableRow] = field(default_factory=list)
    """Rows that could not be read: already failed, each with its column in `last_error`."""

    @property
    def claimed(self) -> int:
        return len(self.jobs) + len(self.screened) + len(self.unreadable)

    def count(self, outcome: Outcome) -> int:
        return sum(1 for s in self.screened if s.outcome is outcome)


def admit(
    jobs: Sequence[Job], wanted: Mapping[str, Sequence[str]], room: dict[str, int]
) -> tuple[list[Job], list[tuple[Job, list[str]]]]:
    """Admit jobs in claim order while every key a job wants has room left; pure.

    `wanted` maps a job's id to the keys it needs one unit of (recipients
    for the cap, limited domains for the throttle); `room` is what each key
    has, and is decremented for every job admitted. Returns the admitted
    jobs, and the refused ones each with the keys that had no room, in
    the order of `wanted`.
    """
    admitted: list[Job] = []
    refused: list[tuple[Job, list[str]]] = []
    for job in jobs:
        empty = [key for key in wanted[job.id] if room[key] <= 0]
        if empty:
            refused.append((job, empty))
            continue
        for key in wanted[job.id]:
            room[key] -= 1
        admitted.append(job)
    return admitted, refused


def recipients_of(job: Job) -> list[str]:
    """The job's To, Cc and Bcc envelope addresses, lower-cased, each once, sorted.

    Parsed by the composer's own parser (`mailqd.rules`), so these are the
    addresses the message would go to, domains in A-labels as sent. A
    field that is no address list is refused later by the composer; here
    it counts as its text, so one odd row never stops a claim.
    """
    found: set[str] = set()
    for value in (job.recipient_to, job.cc, job.bcc):
        if not value:
            continue
        addresses = envelope_addresses(value)
        if addresses is None:
            found.add(str(value).strip().lower())
        else:
            found.update(addr.lower() for addr in addresses)
    return sorted(found)
