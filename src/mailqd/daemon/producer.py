"""The producer: claims jobs for free delivery slots, never more than there are.

It takes rate-limit tokens for the free slots, claims at most that many
jobs (screened at claim when the settings ask), holds the jobs to send and
hands them to the worker to start. While a backlog lasts (the last claim
was full), the next claim waits for half the slots to free up, or `linger`
after the first one did: one claim per freed slot would make the database
round trip, not SMTP, the limit (claims of ~5 jobs cost ~1 ms of worker
CPU per message more than claims of ~25). An idle worker claims at once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from mailqd.daemon.events import Events
from mailqd.daemon.outage import DatabaseOutage
from mailqd.daemon.ports import Clock, DatabaseClock, JobLeases
from mailqd.daemon.ratelimit import RateLimiter
from mailqd.daemon.slots import Slots
from mailqd.daemon.totals import BatchResult
from mailqd.daemon.waiting import wait_any
from mailqd.errors import StoreError
from mailqd.logging import mask_addresses_in
from mailqd.metrics import WorkerMetrics
from mailqd.models import Job, Outcome
from mailqd.store.rows import UnreadableRow
from mailqd.store.screening import Screened, ScreenedClaim, ScreenRules

__all__ = ["CLAIM_LINGER", "Producer", "ProducerConfig"]

CLAIM_LINGER = 0.01
"""While busy, how long a freed slot may wait for others before the next claim is made."""

_SET_ASIDE_EVENT = {  # logged per job; throttled jobs are logged once per claim
    Outcome.DUPLICATE: "duplicate not sent",
    Outcome.DEFERRED: "deferred by recipient cap",
}


@dataclass(frozen=True, slots=True)
class ProducerConfig:
    """Whose leases, how long, how often to poll, and the batching rule's two numbers."""

    owner: str
    lease_seconds: float
    poll_interval: float
    claim_batch: int
    """While busy, claim once this many slots are free (half of them) ..."""
    linger: float = CLAIM_LINGER
    """... or this long after the first one is."""
    screen_rules: ScreenRules | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.owner:
            raise ValueError("a producer needs its worker's owner name")
        if not (self.lease_seconds > 0 and self.poll_interval > 0 and self.claim_batch >= 1):
            raise ValueError(f"lease, poll interval and claim batch must be positive: {self}")
        if self.linger < 0:
            raise ValueError(f"linger must be >= 0, not {self.linger}")

    @classmethod
    def for_slots(
        cls,
        owner: str,
        concurrency: int,
        lease_seconds: float,
        poll_interval: float,
        screen_rules: ScreenRules | None,
    ) -> ProducerConfig:
        batch = max(1, concurrency // 2)
        return cls(owner, lease_seconds, poll_interval, batch, CLAIM_LINGER, screen_rules)


class Producer:
    """Claims into `slots`; `start(jobs)` is handed the jobs to send, already held in `held`.

    `claim_limit(free)`, when given, may lower how many to claim (the relay
    board: none while every relay of the default route is down, one when
    a probe is due) and says how long to wait when it allows none.
    """

    def __init__(
        self,
        leases: JobLeases,
        config: ProducerConfig,
        slots: Slots,
        start: Callable[[Sequence[Job]], object],
        *,
        limiter: RateLimiter | None = None,
        outage: DatabaseOutage | None = None,
        clock: Clock | None = None,
        events: Events | None = None,
        totals: BatchResult | None = None,
        metrics: WorkerMetrics | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
        on_progress: Callable[[], None] | None = None,
        claim_limit: Callable[[int], Awaitable[tuple[int, float]]] | None = None,
    ) -> None:
        self._leases = leases
        self._claim_limit = claim_limit
        self.config = config
        self._slots = slots
        self._start = start
        self._limiter = limiter
        self._outage = outage or DatabaseOutage()
        self._clock = clock or DatabaseClock()
        self._events = events
        self.totals = totals if totals is not None else BatchResult()
        self._metrics = metrics
        self._log = log or structlog.get_logger()
        self._on_progress = on_progress
        self.held: dict[str, Job] = {}
        """Jobs claimed to send and not yet recorded or released."""
        self.wake = asyncio.Event()
        """Set when there may be work before the next poll (NOTIFY, a rescue, a retry due)."""

    async def run(self, stop: asyncio.Event) -> None:
        """Claim whenever there are free slots and maybe work; poll, or wake on `wake`."""
        backlog = False
        while not stop.is_set():
            if backlog:
                await self._slots.wait_free(self.config.claim_batch, self.config.linger, stop)
            free = self._slots.free
            if free == 0:
                self._slots.freed.clear()
                await wait_any(stop, self._slots.freed)
                continue
            if self._claim_limit is not None:
                free, wait = await self._claim_limit(free)
                if free == 0:  # every relay of the default route is down: leave jobs be
                    backlog = False
                    self.wake.clear()
                    if self._events is not None:
                        self._events.emit("claims_held", wait=wait)
                    await wait_any(stop, self.wake, timeout=wait)
                    continue
            self.wake.clear()  # a wake-up during the claim below wakes the next wait
            try:
                claim, asked = await self.claim(free, stop)
            except StoreError as exc:
                backlog = False
                await wait_any(stop, timeout=self._outage.failed(exc, "claiming jobs"))
                continue
            self._start(claim.jobs)
            backlog = claim.claimed > 0 and claim.claimed == asked
            if backlog:
                continue  # a full batch: there is probably more waiting
            await wait_any(stop, self.wake, timeout=self.config.poll_interval)

    async def run_once(self, limit: int | None = None) -> ScreenedClaim:
        """One claim for the free slots (at most `limit`), started; raises `StoreError`."""
        want = self._slots.free if limit is None else min(limit, self._slots.free)
        claim, _ = await self.claim(want, asyncio.Event())
        self._start(claim.jobs)
        return claim

    async def claim(self, want: int, stop: asyncio.Event) -> tuple[ScreenedClaim, int]:
        """Take rate-limit tokens, claim up to that many jobs and hold those to send.

        Returns the claim and how many were asked for (the tokens granted).
        With screening rules, the store sets aside duplicates, capped and
        throttled jobs in the claim's transaction; their tokens are given
        back, as nothing is sent for them. Never asks for more than `want`.
        """
        want = min(want, self._slots.free)
        granted = want if self._limiter is None else await self._limiter.acquire(want, stop)
        if granted <= 0:
            return ScreenedClaim([]), 0
        claim = await self._claim(granted)
        self._outage.succeeded()
        for job in claim.jobs:
            self.held[job.id] = job
        self.totals.claimed += claim.claimed
        if self._metrics is not None:
            self._metrics.claimed(claim.claimed)
        if self._events is not None:
            self._events.emit("claimed", count=claim.claimed, job_ids=[j.id for j in claim.jobs])
        if claim.screened:
            self._set_aside(claim.screened)
        if claim.unreadable:
            self._failed_unreadable(claim.unreadable)
        if len(claim.jobs) < granted and self._limiter is not None:
            try:
                await self._limiter.give_back(granted - len(claim.jobs))
            except StoreError as exc:  # the tokens are lost; the limit still holds
                self._log.debug("could not give back rate-limit tokens", error=str(exc))
        return claim, granted

    async def _claim(self, limit: int) -> ScreenedClaim:
        config, now = self.config, self._clock.now()
        if config.screen_rules is None:
            return await asyncio.to_thread(
                self._leases.claim_batch, config.owner, limit, config.lease_seconds, now
            )
        return await asyncio.to_thread(
            self._leases.claim_screened,
            config.owner,
            limit,
            config.lease_seconds,
            config.screen_rules,
            now,
        )

    def _set_aside(self, screened: Sequence[Screened]) -> None:
        """Count and log the jobs the claim did not hand over (already recorded)."""
        self.totals.count(screened)
        if self._metrics is not None:
            self._metrics.screened(screened)
        throttled = [item for item in screened if item.outcome is Outcome.THROTTLED]
        for item in screened:
            if item.outcome is not Outcome.THROTTLED:
                event = _SET_ASIDE_EVENT[item.outcome]
                self._log.info(event, job_id=item.job.id, reason=mask_addresses_in(item.reason))
        if throttled:
            self._log.info(
                "throttled by domain rate limits",
                count=len(throttled),
                domains=dict(Counter(item.domain for item in throttled)),
                due_within_seconds=round(max(item.delay for item in throttled), 2),
            )
        if self._events is not None:
            self._events.emit("set_aside", outcomes={s.job.id: s.outcome for s in screened})
        if self._on_progress is not None:
            self._on_progress()

    def _failed_unreadable(self, rows: Sequence[UnreadableRow]) -> None:
        """Count and log the rows the claim failed because they could not be read."""
        self.totals.failed += len(rows)
        if self._metrics is not None:
            self._metrics.failed.inc(len(rows))
        for row in rows:
            self._log.warning("unreadable row failed", job_id=row.job_id, error=row.error)
        if self._events is not None:
            self._events.emit("failed_unreadable", job_ids=[row.job_id for row in rows])
        if self._on_progress is not None:
            self._on_progress()
