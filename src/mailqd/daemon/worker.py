"""The delivery worker: claims jobs, sends them over its own SMTP connections, records outcomes.

One worker is one OS process forked by the supervisor
(`mailqd.daemon.worker_process.run_worker`), or an
object in a test or in `mailqctl drain` (`Worker`). `Worker` is a thin
assembly of parts that each have one role, after River's: the producer
(`daemon.producer`) claims no more jobs than there are free delivery slots
(`daemon.slots`, one transport each, so SMTP connections are reused); the
completer (`daemon.completer`) records outcomes in batches; the
maintenance services (`daemon.rescuer`, `daemon.lease_keeper`,
`daemon.screening_purger`) run in one periodic loop (`daemon.periodic`).
The store does the SQL, the transport the SMTP, `Deliverer` the outcome
rules; this module wires them together and owns starting and stopping.

The parts announce what they do on `Worker.events`, and take "now" from
`Worker(clock=...)`: tests wait on events, and move time, instead of
reading logs or sleeping.

The event loop must never block: store calls (sync SQLAlchemy) run in
threads, and a heartbeat task proves to the supervisor that the loop turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import structlog

from mailqd.config import Settings
from mailqd.daemon.completer import Completer
from mailqd.daemon.cutoff import WatchedTransport
from mailqd.daemon.delivery import Deliverer
from mailqd.daemon.events import Events
from mailqd.daemon.heartbeat import Heartbeat
from mailqd.daemon.lease_keeper import LeaseKeeper, LeaseKeeperConfig
from mailqd.daemon.outage import DatabaseOutage
from mailqd.daemon.periodic import Periodic, Service
from mailqd.daemon.ports import Clock, DatabaseClock
from mailqd.daemon.producer import Producer, ProducerConfig
from mailqd.daemon.ratelimit import RateLimiter
from mailqd.daemon.relay_board import RelayBoard
from mailqd.daemon.rescuer import Rescuer, RescuerConfig
from mailqd.daemon.screening_purger import ScreeningPurger, ScreeningPurgerConfig
from mailqd.daemon.slots import Slots
from mailqd.daemon.tasks import cancel_and_wait, run_beside
from mailqd.daemon.templates import TemplateCache
from mailqd.daemon.totals import BatchResult, as_fields
from mailqd.errors import StoreError
from mailqd.metrics import WorkerMetrics
from mailqd.models import Job
from mailqd.routes import RelayPlan
from mailqd.runtime import Runtime, screen_rules
from mailqd.store import Completion, Store
from mailqd.store.notify import JobListener, supports_listen
from mailqd.store.store import LONGEST_LEASE
from mailqd.transport.routed import RoutedTransport
from mailqd.transport.url import TransportFactory

__all__ = [
    "BatchResult",
    "TransportFactory",
    "Worker",
    "connection_caps",
    "screen_rules",
]

HEARTBEAT_INTERVAL = 0.5
"""Seconds between heartbeats; the supervisor's timeout is many times this."""
FLUSH_GRACE = 5.0
"""Seconds after the shutdown timeout to keep trying to record outcomes of finished sends."""


class Worker:
    """Delivers queued mail until stopped (`run`), or one batch at a time (`run_once`).

    `owner` is the lease owner name the worker claims under; it must be
    unique among live workers. Use `run` or `run_once` on one instance, not
    both at once, and `close` (or `async with`) after `run_once`. `clock`
    is where every time-based store call takes its `now=` (default: the
    database's clock). `runtime` holds the parts built once from the
    settings (secrets box, DKIM signer, screening rules...); a forked worker
    gets the supervisor's, and without one they are built here from
    `settings`.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        owner: str,
        transport_factory: TransportFactory | None = None,
        *,
        heartbeat: Heartbeat | None = None,
        listen: bool | None = None,
        metrics: WorkerMetrics | None = None,
        clock: Clock | None = None,
        runtime: Runtime | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner
        self.totals = BatchResult()
        """Everything this worker has claimed and recorded since it was made."""
        self.events = Events()
        """What the parts do (claimed, recorded, rescued, ...), for tests to wait on."""
        self.clock: Clock = clock or DatabaseClock()
        self._heartbeat = heartbeat
        self._listen = supports_listen(self._database_url()) if listen is None else listen
        self._log = structlog.get_logger().bind(worker=owner)
        self._outage = DatabaseOutage(events=self.events)
        runtime = runtime or Runtime.build(settings, transport=transport_factory is None)
        self._deliverer = Deliverer(
            settings,
            owner,
            templates=TemplateCache(store),
            runtime=runtime,
            ledger=store.recipient_ledger,
            attachments=getattr(store, "attachments", None),  # a stand-in store may have none
        )
        self._metrics = metrics
        self._screen_rules = runtime.screening
        self._assemble(runtime, transport_factory)

    def _assemble(self, runtime: Runtime, transport_factory: TransportFactory | None) -> None:
        """Build the parts from the settings; each gets only what its role needs."""
        self.relays = self._relay_board(runtime, transport_factory is not None)
        plan = self.relays.plan
        factories = (
            {plan.default_route.relays[0]: transport_factory}
            if transport_factory is not None
            else runtime.transport_factories()
        )
        caps = connection_caps(plan, self.settings.workers)
        self._slots = Slots(
            self.settings.concurrency,
            partial(RoutedTransport, plan, factories, self.relays, connection_caps=caps),
        )
        self._completer = Completer(
            self.store, on_recorded=self._recorded, outage=self._outage, clock=self.clock
        )
        self._producer = self._make_producer()
        self._held = self._producer.held
        self.maintenance = Periodic(self._maintenance_services(), self._outage)
        self._sending: dict[str, asyncio.Task[Completion]] = {}
        self._transport_of: dict[str, WatchedTransport] = {}
        self._progress = asyncio.Event()
        self._listener: JobListener | None = None

    def _relay_board(self, runtime: Runtime, given_transport: bool) -> RelayBoard:
        """The relays' breakers; a transport given by the caller is one relay, the first."""
        plan = runtime.relays
        if given_transport:
            first = plan.relays[plan.default_route.relays[0]]
            plan = RelayPlan.build([first], [])
        return RelayBoard(
            self.store.relay_health,
            plan,
            runtime.breaker,
            self.owner,
            clock=self.clock,
            events=self.events,
            metrics=self._metrics,
            on_up=self._relay_up,
            rate_limiters={
                name: RateLimiter(
                    self.store, spec.rate_limit, bucket=f"relay:{name}", clock=self.clock
                )
                for name, spec in plan.relays.items()
                if spec.rate_limit > 0
            },
        )

    def _relay_up(self) -> None:
        self._producer.wake.set()

    def _make_producer(self) -> Producer:
        settings, metrics = self.settings, self._metrics
        limiter = RateLimiter(
            self.store,
            settings.rate_limit,
            on_wait=metrics.rate_limited if metrics else None,
            clock=self.clock,
        )
        config = ProducerConfig.for_slots(
            self.owner,
            settings.concurrency,
            settings.lease_seconds,
            settings.poll_interval,
            self._screen_rules,
        )
        return Producer(
            self.store,
            config,
            self._slots,
            self._start,
            limiter=limiter,
            outage=self._outage,
            clock=self.clock,
            events=self.events,
            totals=self.totals,
            metrics=metrics,
            log=self._log,
            on_progress=self._progress_made,
            claim_limit=self.relays.claim_limit,
        )

    def _maintenance_services(self) -> list[Service]:
        store, clock, events, lease = (
            self.store,
            self.clock,
            self.events,
            self.settings.lease_seconds,
        )
        services: list[Service] = [
            self.relays,
            LeaseKeeper(
                store,
                LeaseKeeperConfig(self.owner, lease),
                held=self._held.keys,
                clock=clock,
                events=events,
            ),
            Rescuer(
                store,
                RescuerConfig.for_lease(lease, LONGEST_LEASE),
                clock=clock,
                events=events,
                on_rescued=self._rescued,
            ),
        ]
        if self._screen_rules is not None:
            purge = ScreeningPurgerConfig(self.settings.dedup_window)
            services.append(ScreeningPurger(store, purge, clock=clock, events=events))
        return services

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
            asyncio.create_task(self.maintenance.run(), name="maintenance"),
        ]
        if self._listen:
            self._listener = JobListener(self._database_url(), self._producer.wake.set)
            services.append(asyncio.create_task(self._listener.run(), name="listener"))
            self.events.emit("listener_started")
        crashed: BaseException | None = None
        try:
            crashed = await run_beside(self._producer.run, stop, services, self._log)
        finally:
            await cancel_and_wait(services)
            await self._stop_gracefully()
            await cancel_and_wait([beat])
            self._log.info("worker stopped", **as_fields(self.totals))
            self.events.emit("stopped", **as_fields(self.totals))
        if crashed is not None:
            raise crashed

    async def run_once(self, limit: int | None = None) -> BatchResult:
        """Claim one batch (at most `limit`), deliver it, record the outcomes; return the counts.

        Database errors are raised, not retried: the caller (`mailqctl
        drain`) decides. Jobs still held when that happens are released by
        `close`.
        """
        want = self._slots.free if limit is None else min(limit, self._slots.free)
        claim, _ = await self._producer.claim(want, asyncio.Event())
        completions = await asyncio.gather(*self._start(claim.jobs))
        await self._completer.flush()
        result = BatchResult(claimed=claim.claimed)
        result.count(completions)
        result.count(claim.screened)
        result.failed += len(claim.unreadable)
        return result

    async def close(self) -> None:
        """Give back what is held but unrecorded, record what is finished, close transports."""
        interrupted = await self._cancel_sends(list(self._sending.values()))
        if self._completer.pending:
            with contextlib.suppress(StoreError):
                await self._completer.flush()
        await self._release_unfinished(deadline=None, interrupted=interrupted)
        await self._slots.close_all()

    @property
    def in_flight(self) -> int:
        """Sends running now."""
        return len(self._sending)

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
            if self._listener is None:
                await self.events.wait_for("listener_started", timeout=timeout)
            assert self._listener is not None
            await self._listener.wait_connected()

    def _start(self, jobs: Sequence[Job]) -> list[asyncio.Task[Completion]]:
        # Only jobs the claim did not say are without attachments (it says on both
        # databases; a row read one by one after a driver refusal says nothing).
        self._deliverer.describe_claimed([j.id for j in jobs if j.has_attachments is not False])
        tasks = []
        for job in jobs:
            transport = WatchedTransport(self._slots.take())
            task = asyncio.create_task(self._attempt(job, transport), name=f"deliver {job.id}")
            self._sending[job.id] = task
            self._transport_of[job.id] = transport
            tasks.append(task)
        return tasks

    async def _attempt(self, job: Job, transport: WatchedTransport) -> Completion:
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
            self._slots.put_back(transport.inner, reusable=finished)
            self._sending.pop(job.id, None)
            self._transport_of.pop(job.id, None)
        self._completer.add(completion, last_for_now=not self._sending)
        return completion

    def _recorded(self, batch: Sequence[Completion]) -> None:
        """Called by the completer once outcomes are committed."""
        loop = asyncio.get_running_loop()
        for completion in batch:
            self._held.pop(completion.job_id, None)
            if 0 < completion.retry_in_seconds < self.settings.poll_interval:
                loop.call_later(completion.retry_in_seconds, self._producer.wake.set)
        self.totals.count(batch)
        if self._metrics is not None:
            self._metrics.recorded(batch)
        self.events.emit("recorded", outcomes={c.job_id: c.outcome for c in batch})
        self._progress.set()

    def _progress_made(self) -> None:
        self._progress.set()

    def _rescued(self, job_ids: list[str]) -> None:
        """Called by the rescuer: the returned jobs are due now, so claim at once."""
        if self._metrics is not None:
            self._metrics.jobs_rescued(len(job_ids))
        self._producer.wake.set()

    # -- maintenance ------------------------------------------------------------

    async def _beat_forever(self) -> None:
        """Prove the event loop turns; a blocked loop misses beats and is killed."""
        if self._heartbeat is None:
            return
        while True:
            self._heartbeat.beat()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    # -- stopping ---------------------------------------------------------------

    async def _stop_gracefully(self) -> None:
        """Let sends in flight finish within the shutdown timeout, then wind down.

        Sends still running at the timeout are cancelled and their jobs
        released, like the claimed jobs that never started: they will be
        sent again (at-least-once, same Message-ID). Each release is
        recorded as a `shutdown` attempt row; only a send cancelled after
        its content went to the server uses an attempt (`_release_unfinished`).
        Finished sends are recorded, retrying for a few seconds if the
        database is away.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_timeout
        in_flight = list(self._sending.values())
        interrupted: dict[str, bool | None] = {}
        if in_flight:
            self._log.info("waiting for sends in flight", count=len(in_flight))
            self.events.emit("waiting_for_sends", count=len(in_flight))
            _, late = await asyncio.wait(in_flight, timeout=self.settings.shutdown_timeout)
            if late:
                self._log.warning("cancelling sends still running at the timeout", count=len(late))
                interrupted = await self._cancel_sends(list(late))
        if not await self._completer.flush_until(deadline + FLUSH_GRACE):
            self._log.error(
                "could not record outcomes before exiting; those jobs will be sent again",
                count=self._completer.pending,
            )
        await self._release_unfinished(deadline=deadline + FLUSH_GRACE, interrupted=interrupted)
        await self._slots.close_all()

    async def _cancel_sends(
        self, tasks: Sequence[asyncio.Task[Completion]]
    ) -> dict[str, bool | None]:
        """Cancel these attempts; returns, per job whose send began, whether its content went out.

        Read from each attempt's transport just before the cancellation,
        with no await in between (`mailqd.daemon.cutoff`): True after DATA,
        False before, None when the transport cannot say. An attempt still
        composing is not in it: its job is given back as not started.
        """
        cancelling = set(tasks)
        watched = self._transport_of
        interrupted = {
            job_id: watched[job_id].reached_data()
            for job_id, task in self._sending.items()
            if task in cancelling and job_id in watched and watched[job_id].began
        }
        await cancel_and_wait(list(tasks))
        return interrupted

    async def _release_unfinished(
        self, deadline: float | None, interrupted: Mapping[str, bool | None] | None = None
    ) -> None:
        """Give back held jobs that have no outcome: not started, or cancelled mid-send.

        `interrupted` holds the sends cancelled (`_cancel_sends`). Each job
        is recorded as a `shutdown` give-back saying which; one whose
        content had gone to the server, or may have (the transport cannot
        say), uses an attempt: the server may have the message, so the next
        send is a resend (docs/reliability.md).
        """
        loop = asyncio.get_running_loop()
        interrupted = interrupted or {}
        with_outcome = self._completer.pending_job_ids()
        unfinished = [job_id for job_id in self._held if job_id not in with_outcome]
        reasons = {job_id: _shutdown_reason(job_id, interrupted) for job_id in unfinished}
        counted = {job_id for job_id in unfinished if interrupted.get(job_id, False) is not False}
        while unfinished:
            try:
                await asyncio.to_thread(
                    partial(
                        self.store.release,
                        unfinished,
                        self.owner,
                        self.clock.now(),
                        reasons=reasons,
                        counted=counted,
                    )
                )
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
            self._log.info("released unsent jobs", count=len(unfinished), counted=len(counted))
            self.events.emit("released", job_ids=unfinished, counted=sorted(counted))
            for job_id in unfinished:
                self._held.pop(job_id, None)
            return

    def _database_url(self) -> str:
        return self.store.url


def _shutdown_reason(job_id: str, interrupted: Mapping[str, bool | None]) -> str:
    """The attempt row's text of a job given back when its worker stopped."""
    if job_id not in interrupted:
        return "shutdown: given back before its send started"
    said = interrupted[job_id]
    if said is False:
        return "shutdown: send cancelled as the worker stopped, before DATA"
    if said:
        return (
            "shutdown: send cancelled as the worker stopped, after its content was sent "
            "(the server may have it)"
        )
    return "shutdown: send cancelled as the worker stopped, maybe after DATA (no phase known)"


def connection_caps(plan: RelayPlan, workers: int) -> dict[str, asyncio.Semaphore]:
    """A relay's `max_connections` (per daemon) as each of the daemon's workers' share."""
    return {
        name: asyncio.Semaphore(max(1, math.ceil(spec.max_connections / max(1, workers))))
        for name, spec in plan.relays.items()
        if spec.max_connections > 0
    }
