"""An in-memory store implementing the job lease protocol (`mailqd.daemon.ports.JobLeases`).

For unit tests of the worker's parts that run in milliseconds: no database,
no threads contending for a lock. It keeps the rules the real store keeps,
and tests/test_store_contract.py holds it to them beside PostgreSQL and
SQLite: due jobs by priority (highest first), then due time, then id;
leases per owner; attempts counted when recorded, when a rescue takes
back a job lost before (each rescue is a `lost` row), and when a release
gives back one that had reached DATA (`ambiguous`; the others `released`,
not counted); every change but a rescue only for the lease's owner.
Claim-time screening (dedup, caps, domain limits) is not kept here:
`claim_screened` accepts only rules that screen nothing.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from mailqd.breaker import BreakerPolicy, RelayState, after_failure, after_success
from mailqd.models import Attempt, Job, NewJob, Outcome, RecipientStatus, Status
from mailqd.store import Completion
from mailqd.store.jobs import RELEASED_UNSENT
from mailqd.store.screening import ScreenedClaim, ScreenRules
from mailqd.store.store import LONGEST_LEASE

__all__ = ["FakeStore"]

_NEXT_STATUS = {
    Outcome.SENT: Status.SENT,
    Outcome.RETRY: Status.PENDING,
    Outcome.AMBIGUOUS: Status.PENDING,
    Outcome.DEFERRED: Status.PENDING,
    Outcome.FAILED: Status.FAILED,
    Outcome.EXPIRED: Status.FAILED,
}


class FakeStore:
    """The queue in a dict; safe to call from threads (one lock, like SQLite's)."""

    dialect = "fake"

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self.clock = clock or (lambda: datetime.now(UTC))
        """The store's own clock, used when a call passes no `now` (the database's clock)."""
        self.jobs: dict[str, Job] = {}
        self.attempt_rows: list[Attempt] = []
        self.calls: list[str] = []
        """The protocol methods called, in order, for tests of what a part asks."""
        self.nows: list[tuple[str, datetime | None]] = []
        """Each call's `now=` argument, to check that an injected clock reaches it."""
        self._lock = threading.Lock()
        self.relay_health = FakeRelayHealth(self.clock)
        self.recipient_ledger = self
        self.recipient_rows: dict[tuple[str, str], RecipientStatus] = {}

    def settled(self, job_id: str) -> frozenset[str]:
        """`Store.recipient_ledger.settled`: accepted or refused recipients of the job."""
        with self._lock:
            return frozenset(
                address
                for (job, address), status in self.recipient_rows.items()
                if job == job_id and status is not RecipientStatus.PENDING
            )

    # -- what tests set up and read -------------------------------------------------

    def enqueue_many(self, jobs: Sequence[NewJob]) -> list[str]:
        at = self.clock()
        with self._lock:
            for new in jobs:
                self.jobs[new.id] = _job(new, at)
        return [new.id for new in jobs]

    def enqueue(self, job: NewJob) -> str:
        return self.enqueue_many([job])[0]

    def get(self, job_id: str) -> Job:
        return self.jobs[job_id]

    def attempts(self, job_id: str) -> list[Attempt]:
        return [a for a in self.attempt_rows if a.job_id == job_id]

    def close(self) -> None:
        pass

    # -- the job lease protocol -----------------------------------------------------

    def claim_batch(
        self, owner: str, limit: int, lease_seconds: float, now: datetime | None = None
    ) -> ScreenedClaim:
        at = now or self.clock()
        with self._lock:
            self._called("claim", now)
            due = sorted(
                (
                    j
                    for j in self.jobs.values()
                    if j.status is Status.PENDING and j.next_attempt_at <= at
                ),
                key=lambda j: (-j.priority, j.next_attempt_at, j.id),
            )[: max(0, limit)]
            claimed = [
                self._change(
                    job.id,
                    status=Status.SENDING,
                    lease_owner=owner,
                    lease_expires_at=at + timedelta(seconds=lease_seconds),
                    updated_at=at,
                )
                for job in due
            ]
        return ScreenedClaim(claimed)

    def claim_screened(
        self,
        owner: str,
        limit: int,
        lease_seconds: float,
        rules: ScreenRules,
        now: datetime | None = None,
    ) -> ScreenedClaim:
        if rules.active:
            raise NotImplementedError("the fake store does not screen at claim")
        return self.claim_batch(owner, limit, lease_seconds, now)

    def complete(self, completions: Sequence[Completion], now: datetime | None = None) -> int:
        at = now or self.clock()
        changed = 0
        with self._lock:
            self._called("complete", now)
            for c in completions:
                for r in c.recipients:
                    self.recipient_rows[(c.job_id, r.address)] = r.status
                self.attempt_rows.append(
                    Attempt(
                        c.job_id,
                        c.attempt,
                        c.started_at,
                        c.duration_seconds,
                        c.outcome,
                        c.smtp_code,
                        c.smtp_text if c.smtp_text is not None else c.error,
                    )
                )
                if not self._held_by(c.job_id, c.owner):
                    continue
                status = _NEXT_STATUS[c.outcome]
                job = self.jobs[c.job_id]
                self._change(
                    c.job_id,
                    status=status,
                    attempts=job.attempts + (0 if c.outcome is Outcome.DEFERRED else 1),
                    last_error=None if c.outcome is Outcome.SENT else c.error,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=at + timedelta(seconds=c.retry_in_seconds),
                    sent_at=at if status is Status.SENT else job.sent_at,
                    message_id=c.message_id or job.message_id,
                    updated_at=at,
                )
                changed += 1
        return changed

    def release(
        self,
        job_ids: Sequence[str],
        owner: str,
        now: datetime | None = None,
        *,
        reasons: Mapping[str, str] | None = None,
        counted: Collection[str] = (),
    ) -> int:
        at = now or self.clock()
        with self._lock:
            self._called("release", now)
            mine = [job_id for job_id in job_ids if self._held_by(job_id, owner)]
            for job_id in mine:
                job = self.jobs[job_id]
                why = (reasons or {}).get(job_id, RELEASED_UNSENT)
                counts = job_id in counted
                self._change(
                    job_id,
                    status=Status.PENDING,
                    attempts=job.attempts + 1 if counts else job.attempts,
                    last_error=why if counts else job.last_error,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=at,
                    updated_at=at,
                )
                outcome = Outcome.AMBIGUOUS if counts else Outcome.RELEASED
                self.attempt_rows.append(
                    Attempt(job_id, job.attempts + 1, at, 0.0, outcome, smtp_text=why, worker=owner)
                )
        return len(mine)

    def extend_leases(
        self, job_ids: Sequence[str], owner: str, lease_seconds: float, now: datetime | None = None
    ) -> int:
        at = now or self.clock()
        with self._lock:
            self._called("extend_leases", now)
            mine = [job_id for job_id in job_ids if self._held_by(job_id, owner)]
            for job_id in mine:
                self._change(job_id, lease_expires_at=at + timedelta(seconds=lease_seconds))
        return len(mine)

    def rescue(
        self,
        *,
        owner: str | None = None,
        reason: str | None = None,
        now: datetime | None = None,
        limit: int = 1000,
        longest_lease: float = LONGEST_LEASE,
    ) -> list[str]:
        at = now or self.clock()
        too_long = at + timedelta(seconds=longest_lease)
        with self._lock:
            self._called("rescue", now)
            victims = []
            for job in self.jobs.values():
                if job.status is not Status.SENDING:
                    continue
                if owner is not None:
                    lost = job.lease_owner == owner and job.lease_expires_at is not None
                else:
                    lease = job.lease_expires_at
                    lost = job.lease_owner is None or lease is None or not at <= lease <= too_long
                if lost:
                    victims.append(job)
            for job in victims[:limit]:
                if owner is not None:
                    why = reason or f"worker died: the worker {owner} held it when it ended"
                else:
                    why = f"lease expired: the worker {job.lease_owner} stopped renewing it"
                again = any(
                    row.job_id == job.id and row.outcome is Outcome.LOST
                    for row in self.attempt_rows
                )
                number = job.attempts + 1
                self._change(
                    job.id,
                    status=Status.PENDING,
                    attempts=number if again else job.attempts,
                    last_error=why,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=at,
                    updated_at=at,
                )
                self.attempt_rows.append(
                    Attempt(job.id, number, at, 0.0, Outcome.LOST, smtp_text=why, worker=owner)
                )
        return [job.id for job in victims[:limit]]

    def purge_screening(self, dedup_window: float, now: datetime | None = None) -> int:
        self._called("purge_screening", now)
        return 0

    # -- inside ---------------------------------------------------------------------

    def _called(self, name: str, now: datetime | None) -> None:
        self.calls.append(name)
        self.nows.append((name, now))

    def _held_by(self, job_id: str, owner: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.status is Status.SENDING and job.lease_owner == owner

    def _change(self, job_id: str, **changes: object) -> Job:
        job = dataclasses.replace(self.jobs[job_id], **changes)  # type: ignore[arg-type]
        self.jobs[job_id] = job
        return job


def _job(new: NewJob, at: datetime) -> Job:
    return Job(
        id=new.id,
        recipient_to=new.recipient_to,
        subject=new.subject,
        body=new.body,
        html=new.html,
        template_id=new.template_id,
        variables=new.variables,
        cc=new.cc,
        bcc=new.bcc,
        reply_to=new.reply_to,
        from_address=new.from_address,
        headers=new.headers,
        status=Status.PENDING,
        priority=new.priority,
        attempts=0,
        max_attempts=new.max_attempts,
        last_error=None,
        next_attempt_at=new.send_after or at,
        expires_at=new.expires_at,
        idempotency_key=new.idempotency_key,
        lease_owner=None,
        lease_expires_at=None,
        message_id=None,
        created_at=at,
        updated_at=at,
        sent_at=None,
    )


class FakeRelayHealth:
    """`Store.relay_health` in memory: the same rules (`mailqd.breaker`), one lock."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self._clock = clock
        self._states: dict[str, RelayState] = {}
        self._lock = threading.Lock()

    def states(self) -> list[RelayState]:
        with self._lock:
            return sorted(self._states.values(), key=lambda s: s.relay)

    def failed(
        self,
        relay: str,
        *,
        reason: str,
        error: str,
        policy: BreakerPolicy,
        opens_now: bool,
        owner: str,
        now: datetime | None = None,
    ) -> RelayState:
        with self._lock:
            state = after_failure(
                self._states.get(relay, RelayState(relay)),
                reason=reason,
                error=error,
                at=now or self._clock(),
                policy=policy,
                opens_now=opens_now,
                owner=owner,
            )
            self._states[relay] = state
            return state

    def succeeded(self, relay: str, now: datetime | None = None) -> RelayState | None:
        with self._lock:
            state = self._states.get(relay)
            if state is None or state.clean:
                return None
            self._states[relay] = after_success(state, now or self._clock())
            return self._states[relay]

    def take_probe(self, relay: str, owner: str, now: datetime | None = None) -> RelayState | None:
        at = now or self._clock()
        with self._lock:
            state = self._states.get(relay)
            if state is None or not state.probe_due(at):
                return None
            taken = dataclasses.replace(
                state,
                probe_owner=owner,
                probe_at=at + timedelta(seconds=state.probe_interval),
                updated_at=at,
            )
            self._states[relay] = taken
            return taken
