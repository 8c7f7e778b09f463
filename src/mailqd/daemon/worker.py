"""The delivery worker: claims jobs, sends them over its own SMTP connections, records outcomes.

One worker is one OS process forked by the supervisor (`run_worker`), or an
object in a test or in `mailqctl drain` (`Worker`). Its parts each have one
role, after River's: the producer claims no more jobs than there are free
delivery slots; each slot owns one transport, so SMTP connections are
reused; the completer records outcomes in batches; the lease keeper extends
the leases of jobs in flight; the rescuer returns jobs whose worker
vanished. The store does the SQL, the transport the SMTP, `Deliverer` the
outcome rules; this module only schedules them.

The event loop must never block: store calls (sync SQLAlchemy) run in
threads, and a heartbeat task proves to the supervisor that the loop turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import structlog

from mailqd.config import Settings
from mailqd.daemon.completer import Completer
from mailqd.daemon.delivery import Deliverer
from mailqd.daemon.heartbeat import Heartbeat, WorkerIdentity
from mailqd.daemon.outage import DatabaseOutage
from mailqd.daemon.ratelimit import RateLimiter
from mailqd.daemon.templates import TemplateCache
from mailqd.daemon.waiting import wait_any, with_timeout
from mailqd.errors import DatabaseUnavailableError, StoreError
from mailqd.logging import mask_addresses_in
from mailqd.metrics import WorkerMetrics
from mailqd.models import Job, Outcome
from mailqd.secrets import SecretBox, load_secret_box, unseal_variables
from mailqd.store import Completion, Store, check_schema
from mailqd.store.notify import JobListener, supports_listen
from mailqd.store.rows import UnreadableRow
from mailqd.store.screening import Screened, ScreenedClaim, ScreenRules
from mailqd.store.store import LONGEST_LEASE
from mailqd.transport import Transport

__all__ = ["BatchResult", "TransportFactory", "Worker", "checked_transport_factory", "run_worker"]

TransportFactory = Callable[[], Transport]

HEARTBEAT_INTERVAL = 0.5
"""Seconds between heartbeats; the supervisor's timeout is many times this."""
FLUSH_GRACE = 5.0
"""Seconds after the shutdown timeout to keep trying to record outcomes of finished sends."""
TRANSPORT_CLOSE_TIMEOUT = 5.0
CANCEL_TIMEOUT = 5.0
"""Seconds to wait for a cancelled task to finish before giving up on it."""
CLAIM_LINGER = 0.01
"""While busy, how long a freed slot may wait for others before the next claim is made."""
SCREENING_PURGE_INTERVAL = 60.0
"""Seconds between purges of expired de-duplication rows and past hours' recipient counts."""


@dataclass(slots=True)
class BatchResult:
    """How many jobs were claimed, and how their attempts ended."""

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    ambiguous: int = 0
    failed: int = 0
    expired: int = 0
    deduplicated: int = 0
    """Not sent: the same content was claimed within `dedup_window` (cancelled)."""
    deferred: int = 0
    """Not sent yet: a recipient reached `recipient_hourly_cap` (pending, next hour)."""
    throttled: int = 0
    """Not sent yet: a recipient domain was at its `domain_rate_limits` (pending, soon)."""

    @property
    def recorded(self) -> int:
        """Outcomes committed (duplicates, deferrals and throttled jobs at their claim)."""
        return (
            self.sent
            + self.retried
            + self.ambiguous
            + self.failed
            + self.expired
            + self.deduplicated
            + self.deferred
            + self.throttled
        )

    def count(self, completions: Iterable[Completion | Screened]) -> None:
        for completion in completions:
            field = _RESULT_FIELD[completion.outcome]
            setattr(self, field, getattr(self, field) + 1)


_RESULT_FIELD = {
    Outcome.SENT: "sent",
    Outcome.RETRY: "retried",
    Outcome.AMBIGUOUS: "ambiguous",
    Outcome.FAILED: "failed",
    Outcome.EXPIRED: "expired",
    Outcome.LOST: "failed",
    Outcome.DUPLICATE: "deduplicated",
    Outcome.DEFERRED: "deferred",
    Outcome.THROTTLED: "throttled",
}
_SET_ASIDE_EVENT = {  # logged per job; throttled jobs are logged once per claim
    Outcome.DUPLICATE: "duplicate not sent",
    Outcome.DEFERRED: "deferred by recipient cap",
}


class _Slots:
    """The worker's delivery slots: how many sends may run at once, each with its own transport.

    Transports are made on first use and kept between messages. One whose
    send was cancelled may be mid-dialogue, so it is retired (closed at the
    end) and the slot gets a fresh one next time.
    """

    def __init__(self, size: int, factory: TransportFactory) -> None:
        self._size = size
        self._factory = factory
        self._idle: list[Transport] = []
        self._busy = 0
        self._retired: list[Transport] = []
        self.freed = asyncio.Event()

    @property
    def free(self) -> int:
        return self._size - self._busy

    def take(self) -> Transport:
        if self._busy >= self._size:
            raise RuntimeError("no free delivery slot")
        self._busy += 1
        return self._idle.pop() if self._idle else self._factory()

    async def wait_free(self, count: int, linger: float, stop: asyncio.Event) -> None:
        """Wait until `count` slots are free, or `linger` seconds after the first one is."""
        while self.free == 0 and not stop.is_set():
            self.freed.clear()
            await wait_any(stop, self.freed)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + linger
        while self.free < count and not stop.is_set():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self.freed.clear()
            await wait_any(stop, self.freed, timeout=remaining)

    def put_back(self, transport: Transport, *, reusable: bool) -> None:
        self._busy -= 1
        (self._idle if reusable else self._retired).append(transport)
        self.freed.set()

    async def close_all(self) -> None:
        transports, self._idle, self._retired = [*self._idle, *self._retired], [], []
        await asyncio.gather(
            *(with_timeout(t.close(), TRANSPORT_CLOSE_TIMEOUT) for t in transports),
            return_exceptions=True,
        )


class Worker:
    """Delivers queued mail until stopped (`run`), or one batch at a time (`run_once`).

    `owner` is the lease owner name the worker claims under; it must be
    unique among live workers. Use `run` or `run_once` on one instance, not
    both at once, and `close` (or `async with`) after `run_once`.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        owner: str,
        transport_factory: TransportFactory,
        *,
        heartbeat: Heartbeat | None = None,
        listen: bool | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner
        self.totals = BatchResult()
        """Everything this worker has claimed and recorded since it was made."""
        self._heartbeat = heartbeat
        self._listen = supports_listen(self._database_url()) if listen is None else listen
        self._log = structlog.get_logger().bind(worker=owner)
        self._outage = DatabaseOutage()
        secrets = load_secret_box(settings.secrets_key_file)
        self._deliverer = Deliverer(
            settings, owner, templates=TemplateCache(store), secrets=secrets
        )
        self._metrics = metrics
        self._limiter = RateLimiter(
            store, settings.rate_limit, on_wait=metrics.rate_limited if metrics else None
        )
        self._slots = _Slots(settings.concurrency, transport_factory)
        self._claim_batch = max(1, settings.concurrency // 2)
        self._completer = Completer(store, on_recorded=self._recorded, outage=self._outage)
        self._held: dict[str, Job] = {}
        self._sending: dict[str, asyncio.Task[Completion]] = {}
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._listener: JobListener | None = None
        self._screen_rules = screen_rules(settings, secrets)

    async def __aenter__(self) -> Worker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- the two ways to run --------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then stop gracefully (see `_stop_gracefully`)."""
        self._log.info(
            "worker started",
            concurrency=self.settings.concurrency,
            listen=self._listen,
            rate_limit=self.settings.rate_limit or None,
            dedup_window=self.settings.dedup_window or None,
            recipient_hourly_cap=self.settings.recipient_hourly_cap or None,
            domain_rate_limits=self.settings.domain_rates or None,
        )
        beat = asyncio.create_task(self._beat_forever(), name="heartbeat")
        services = [
            asyncio.create_task(self._completer.run(), name="completer"),
            asyncio.create_task(self._keep_leases(), name="leases"),
            asyncio.create_task(self._rescue_forever(), name="rescuer"),
        ]
        if self._listen:
            self._listener = JobListener(self._database_url(), self._wake.set)
            services.append(asyncio.create_task(self._listener.run(), name="listener"))
        if self._screen_rules is not None:
            services.append(asyncio.create_task(self._purge_forever(), name="screening purge"))
        crashed: BaseException | None = None
        try:
            crashed = await self._produce_while_services_run(stop, services)
        finally:
            await _cancel(services)
            await self._stop_gracefully()
            await _cancel([beat])
            self._log.info("worker stopped", **_as_fields(self.totals))
        if crashed is not None:
            raise crashed

    async def _produce_while_services_run(
        self, stop: asyncio.Event, services: list[asyncio.Task[None]]
    ) -> BaseException | None:
        """Run the producer until `stop`; if a service dies, stop too and return its error.

        Services loop forever and handle database errors themselves, so one
        that ends has hit a bug; the worker must not run on without, say,
        its completer (outcomes would never be recorded).
        """
        stop_producing = asyncio.Event()
        producer = asyncio.create_task(self._produce(stop_producing), name="producer")
        stopped = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait(
                [producer, stopped, *services], return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stop_producing.set()
            stopped.cancel()
            await asyncio.wait([producer])
        if producer.done() and not producer.cancelled() and producer.exception() is not None:
            return producer.exception()
        for service in services:
            if service in done and not service.cancelled():
                error = service.exception() or RuntimeError(f"{service.get_name()} ended")
                self._log.error("worker service died; stopping", service=service.get_name())
                return error
        return None

    async def run_once(self, limit: int | None = None) -> BatchResult:
        """Claim one batch (at most `limit`), deliver it, record the outcomes; return the counts.

        Database errors are raised, not retried: the caller (`mailqctl
        drain`) decides. Jobs still held when that happens are released by
        `close`.
        """
        want = self._slots.free if limit is None else min(limit, self._slots.free)
        claim, _ = await self._claim(want, asyncio.Event())
        completions = await asyncio.gather(*self._start(claim.jobs))
        await self._completer.flush()
        result = BatchResult(claimed=claim.claimed)
        result.count(completions)
        result.count(claim.screened)
        result.failed += len(claim.unreadable)
        return result

    async def close(self) -> None:
        """Give back what is held but unrecorded, record what is finished, close transports."""
        await _cancel(list(self._sending.values()))
        if self._completer.pending:
            with contextlib.suppress(StoreError):
                await self._completer.flush()
        await self._release_unfinished(deadline=None)
        await self._slots.close_all()

    @property
    def unrecorded(self) -> int:
        """Outcomes finished and not yet committed (kept through a database outage)."""
        return self._completer.pending

    @property
    def database_unavailable(self) -> bool:
        """Whether the last store call of this worker failed (an outage is under way)."""
        return self._outage.ongoing

    async def wait_until(
        self, predicate: Callable[[BatchResult], bool], timeout: float
    ) -> BatchResult:
        """Wait until `predicate(self.totals)` holds (re-checked at every recorded batch)."""
        async with asyncio.timeout(timeout):
            while not predicate(self.totals):
                self._progress.clear()
                await self._progress.wait()
        return self.totals

    async def wait_listening(self, timeout: float) -> None:
        """Wait until the LISTEN connection is up (PostgreSQL), so a NOTIFY cannot be missed."""
        async with asyncio.timeout(timeout):
            while self._listener is None:
                await asyncio.sleep(0.01)
            await self._listener.wait_connected()

    # -- producer ---------------------------------------------------------------

    async def _produce(self, stop: asyncio.Event) -> None:
        """Claim whenever there are free slots and maybe work; poll, or wake on NOTIFY.

        While a backlog lasts (the last claim was full), the next claim waits
        for half the slots to free up, or `CLAIM_LINGER` after the first one
        did: one claim per freed slot would make the database round trip, not
        SMTP, the limit (measured: claims of ~5 jobs cost ~1 ms of worker CPU
        per message more than claims of ~25). An idle worker claims at once.
        """
        backlog = False
        while not stop.is_set():
            if backlog:
                await self._slots.wait_free(self._claim_batch, CLAIM_LINGER, stop)
            free = self._slots.free
            if free == 0:
                self._slots.freed.clear()
                await wait_any(stop, self._slots.freed)
                continue
            self._wake.clear()  # a NOTIFY during the claim below wakes the next wait
            try:
                claim, asked = await self._claim(free, stop)
            except StoreError as exc:
                backlog = False
                await wait_any(stop, timeout=self._outage.failed(exc, "claiming jobs"))
                continue
            self._start(claim.jobs)
            backlog = claim.claimed > 0 and claim.claimed == asked
            if backlog:
                continue  # a full batch: there is probably more waiting
            await wait_any(stop, self._wake, timeout=self.settings.poll_interval)

    async def _claim(self, want: int, stop: asyncio.Event) -> tuple[ScreenedClaim, int]:
        """Take rate-limit tokens, claim up to that many jobs and hold those to send.

        Returns the claim and how many were asked for (the tokens granted).
        With `dedup_window`, `recipient_hourly_cap` or `domain_rate_limits`
        set, the store sets aside duplicates, capped and throttled jobs in
        the claim's transaction; their tokens are given back, as nothing is
        sent for them.
        """
        granted = await self._limiter.acquire(want, stop)
        if granted <= 0:
            return ScreenedClaim([]), 0
        lease = self.settings.lease_seconds
        if self._screen_rules is None:
            claim = await asyncio.to_thread(self.store.claim_batch, self.owner, granted, lease)
        else:
            claim = await asyncio.to_thread(
                self.store.claim_screened, self.owner, granted, lease, self._screen_rules
            )
        jobs = claim.jobs
        self._outage.succeeded()
        for job in jobs:
            self._held[job.id] = job
        self.totals.claimed += claim.claimed
        if self._metrics is not None:
            self._metrics.claimed(claim.claimed)
        if claim.screened:
            self._set_aside(claim.screened)
        if claim.unreadable:
            self._failed_unreadable(claim.unreadable)
        if len(jobs) < granted:
            try:
                await self._limiter.give_back(granted - len(jobs))
            except StoreError as exc:  # the tokens are lost; the limit still holds
                self._log.debug("could not give back rate-limit tokens", error=str(exc))
        return claim, granted

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
        self._progress.set()

    def _failed_unreadable(self, rows: Sequence[UnreadableRow]) -> None:
        """Count and log the rows the claim failed because they could not be read."""
        self.totals.failed += len(rows)
        if self._metrics is not None:
            self._metrics.failed.inc(len(rows))
        for row in rows:
            self._log.warning("unreadable row failed", job_id=row.job_id, error=row.error)
        self._progress.set()

    def _start(self, jobs: Sequence[Job]) -> list[asyncio.Task[Completion]]:
        tasks = []
        for job in jobs:
            transport = self._slots.take()
            task = asyncio.create_task(self._attempt(job, transport), name=f"deliver {job.id}")
            self._sending[job.id] = task
            tasks.append(task)
        return tasks

    async def _attempt(self, job: Job, transport: Transport) -> Completion:
        """Deliver in a slot, then hand the outcome to the completer.

        Even a bug must end in an outcome: a job left held would have its
        lease extended forever and never be sent.
        """
        finished = False
        try:
            completion = await self._deliverer.deliver(job, transport)
            finished = True
        except Exception as exc:
            self._log.exception("delivery crashed", job_id=job.id)
            completion = self._deliverer.crashed(job, exc)
        finally:
            self._slots.put_back(transport, reusable=finished)
            self._sending.pop(job.id, None)
        self._completer.add(completion, last_for_now=not self._sending)
        return completion

    def _recorded(self, batch: Sequence[Completion]) -> None:
        """Called by the completer once outcomes are committed."""
        loop = asyncio.get_running_loop()
        for completion in batch:
            self._held.pop(completion.job_id, None)
            if 0 < completion.retry_in_seconds < self.settings.poll_interval:
                loop.call_later(completion.retry_in_seconds, self._wake.set)
        self.totals.count(batch)
        if self._metrics is not None:
            self._metrics.recorded(batch)
        self._progress.set()

    # -- maintenance ------------------------------------------------------------

    async def _beat_forever(self) -> None:
        """Prove the event loop turns; a blocked loop misses beats and is killed."""
        if self._heartbeat is None:
            return
        while True:
            self._heartbeat.beat()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _keep_leases(self) -> None:
        """Extend the leases of held jobs, so a slow send is not taken for a dead worker."""
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            held = list(self._held)
            if not held:
                continue
            try:
                await asyncio.to_thread(
                    self.store.extend_leases, held, self.owner, self.settings.lease_seconds
                )
                self._outage.succeeded()
            except StoreError as exc:
                self._outage.failed(exc, "extending leases")

    async def _purge_forever(self) -> None:
        """Keep the screening tables small; expired rows are ignored by the claim anyway."""
        await asyncio.sleep(random.uniform(0, SCREENING_PURGE_INTERVAL))
        while True:
            try:
                await asyncio.to_thread(self.store.purge_screening, self.settings.dedup_window)
                self._outage.succeeded()
            except StoreError as exc:
                self._outage.failed(exc, "purging old de-duplication and recipient counts")
            await asyncio.sleep(SCREENING_PURGE_INTERVAL * random.uniform(0.75, 1.25))

    async def _rescue_forever(self) -> None:
        """Return jobs whose lease expired (their daemon died or hung) to the queue.

        Every worker does it, at jittered intervals: it is one cheap indexed
        statement, and so no single process is needed for it to happen.
        """
        period = self.settings.lease_seconds / 4
        longest = max(LONGEST_LEASE, 2 * self.settings.lease_seconds)  # others' may be longer
        await asyncio.sleep(random.uniform(0, period))
        while True:
            try:
                rescued = await asyncio.to_thread(self.store.rescue, longest_lease=longest)
                self._outage.succeeded()
            except StoreError as exc:
                self._outage.failed(exc, "rescuing expired leases")
                rescued = []
            if rescued:
                if self._metrics is not None:
                    self._metrics.jobs_rescued(len(rescued))
                self._log.warning("rescued jobs whose lease expired", count=len(rescued))
                self._wake.set()
            await asyncio.sleep(period * random.uniform(0.75, 1.25))

    # -- stopping ---------------------------------------------------------------

    async def _stop_gracefully(self) -> None:
        """Let sends in flight finish within the shutdown timeout, then wind down.

        Sends still running at the timeout are cancelled and their jobs
        released, like the claimed jobs that never started: they will be
        sent again (at-least-once, same Message-ID). Finished sends are
        recorded, retrying for a few seconds if the database is away.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        in_flight = list(self._sending.values())
        if in_flight:
            self._log.info("waiting for sends in flight", count=len(in_flight))
            _, late = await asyncio.wait(in_flight, timeout=self.settings.shutdown_timeout)
            if late:
                self._log.warning("cancelling sends still running at the timeout", count=len(late))
                await _cancel(list(late))
        if not await self._completer.flush_until(deadline + FLUSH_GRACE):
            self._log.error(
                "could not record outcomes before exiting; those jobs will be sent again",
                count=self._completer.pending,
            )
        await self._release_unfinished(deadline=deadline + FLUSH_GRACE)
        await self._slots.close_all()

    async def _release_unfinished(self, deadline: float | None) -> None:
        """Give back held jobs that have no outcome: not started, or cancelled mid-send."""
        loop = asyncio.get_running_loop()
        with_outcome = self._completer.pending_job_ids()
        unfinished = [job_id for job_id in self._held if job_id not in with_outcome]
        while unfinished:
            try:
                await asyncio.to_thread(self.store.release, unfinished, self.owner)
            except StoreError as exc:
                delay = self._outage.failed(exc, "releasing unsent jobs")
                if deadline is None or loop.time() + delay >= deadline:
                    self._log.error(
                        "could not release jobs; they return when their lease expires",
                        count=len(unfinished),
                    )
                    return
                await asyncio.sleep(delay)
                continue
            self._log.info("released unsent jobs", count=len(unfinished))
            for job_id in unfinished:
                self._held.pop(job_id, None)
            return

    def _database_url(self) -> str:
        return self.store.engine.url.render_as_string(hide_password=False)


async def _cancel(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Cancel and wait, so nothing is left running when this returns.

    A task that ignores its cancellation (a library that swallows it) is
    given up on after a few seconds rather than hanging the shutdown.
    """
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    done, stuck = await asyncio.wait(tasks, timeout=CANCEL_TIMEOUT)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            structlog.get_logger().error("task failed", task=_name(task), exc_info=task.exception())
    if stuck:
        structlog.get_logger().error(
            "tasks did not stop when cancelled", tasks=[_name(t) for t in stuck]
        )


def screen_rules(settings: Settings, secrets: SecretBox | None = None) -> ScreenRules | None:
    """The claim-time screening the settings ask for; None when every rule is off.

    `secrets` opens sealed template variables for the content hash (the
    box of `secrets_key_file`, loaded by the caller).
    """
    rules = ScreenRules(
        dedup_window=settings.dedup_window,
        recipient_hourly_cap=settings.recipient_hourly_cap,
        domain_rates=settings.domain_rates,
    )
    if not rules.active:
        return None
    if settings.dedup_window <= 0 or secrets is None:
        return rules
    # Sealed variables differ at every enqueue: the hash is over what they say.
    return dataclasses.replace(rules, open_variables=partial(unseal_variables, box=secrets))


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)


def _as_fields(result: BatchResult) -> dict[str, int]:
    return {name: getattr(result, name) for name in BatchResult.__slots__}


# -- the forked process ---------------------------------------------------------


def run_worker(settings: Settings, identity: WorkerIdentity, heartbeat: Heartbeat) -> int:
    """The body of a forked worker process; returns its exit code (0 after a graceful stop).

    Builds its own engine: connections inherited across fork() must not be
    used. SIGTERM stops the worker gracefully. SIGINT is ignored (the
    supervisor handles Ctrl-C and sends SIGTERM), and so is SIGHUP (the
    supervisor reloads by replacing workers). A worker that cannot start
    raises `ConfigError` (a bad `smtp_url`) or `SchemaError`, which the
    supervisor treats as a boot failure rather than a crash to restart.
    A worker whose supervisor dies (SIGKILL, the OOM killer) stops
    gracefully as if it got SIGTERM, instead of delivering on unsupervised.
    """
    from mailqd.logging import configure_logging

    supervisor = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(settings)
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        runner.run(_serve(settings, identity, heartbeat, supervisor))
    return 0


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed, else asyncio's own (None).

    The worker's event loop runs every SMTP dialogue; uvloop cuts the
    worker's CPU per message by about a fifth (docs/performance.md).
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(
    settings: Settings, identity: WorkerIdentity, heartbeat: Heartbeat, supervisor: int
) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    orphaned = asyncio.create_task(_stop_when_orphaned(supervisor, stop, identity.owner))
    make_transport = await checked_transport_factory(settings)
    # No pre-ping: it is one more round trip per store call (measured ~0.3 ms
    # of CPU each). A connection that died is noticed by the call that uses
    # it, which fails like any outage and is retried on a fresh one.
    store = Store.from_url(
        settings.database_url,
        pool_pre_ping=False,
        application_name=f"mailqd-worker-{identity.index}",
    )
    try:
        await _check_schema_if_reachable(store, identity.owner)
        worker = Worker(
            settings,
            store,
            identity.owner,
            make_transport,
            heartbeat=heartbeat,
            metrics=WorkerMetrics(limited_domains=settings.domain_rates),
        )
        await worker.run(stop)
    finally:
        orphaned.cancel()
        store.close()


async def _stop_when_orphaned(supervisor: int, stop: asyncio.Event, owner: str) -> None:
    """Set `stop` once the supervisor is gone (the worker was re-parented).

    Nobody would read this worker's heartbeat, replace it, or stop it on
    SIGTERM to the service; a fresh `mailqd` would run beside it. Stopping
    gracefully records what was sent and gives back what was not started,
    so the next daemon picks those jobs up at once.
    """
    while os.getppid() == supervisor:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
    structlog.get_logger().warning(
        "supervisor gone; stopping gracefully", worker=owner, supervisor_pid=supervisor
    )
    stop.set()


async def checked_transport_factory(settings: Settings) -> TransportFactory:
    """The factory of the slots' transports, tried once now so a bad URL fails at start.

    The SMTP password is read once here (it may come from a file), not per slot.
    """
    from mailqd.credentials import smtp_password
    from mailqd.transport import transport_from_settings

    password = smtp_password(settings)

    def make_transport() -> Transport:
        return transport_from_settings(settings, password)

    await make_transport().close()
    return make_transport


async def _check_schema_if_reachable(store: Store, owner: str) -> None:
    """Refuse an outdated schema; a database that is down is waited for by the loops instead."""
    try:
        await asyncio.to_thread(check_schema, store.engine)
    except DatabaseUnavailableError as exc:
        structlog.get_logger().warning(
            "database unavailable at start; will keep trying", worker=owner, error=str(exc)
        )
