"""Prometheus metrics: their names, the workers' counters, and the page the sidecar serves.

mailqd's counters live in worker processes, which die and are replaced, so
they use prometheus-client's multiprocess mode: before forking, the
supervisor points `PROMETHEUS_MULTIPROC_DIR` at a directory of its own,
created fresh for each daemon start (`use_multiprocess_dir`). Each worker
writes its counters and histograms to memory-mapped files named after its
pid, and the sidecar's `/metrics` sums every file in the directory. The
files of dead workers are kept, so what a dead worker counted is neither
lost nor counted twice: its replacement has another pid and starts its own
files at zero. (A recycled pid reopens the dead worker's file and counts on
from its value, which is just as exact.)

The supervisor's own state (workers alive, restarts), the queue gauges and
the relays' health read from the database are not counted by workers; the
sidecar adds them at scrape time with `SupervisorCollector`. It also shows
`mailqd_relay_failures_total` at 0 for every configured relay and reason
that no worker has counted yet (`render`), so an alert's `increase()` sees
a relay's first failure.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from mailqd.errors import RELAY_REASONS
from mailqd.models import Outcome, QueueCounts, RecipientStatus, Status
from mailqd.store import Completion
from mailqd.store.screening import Screened

__all__ = [
    "CLAIM_BATCH_BUCKETS",
    "CONTENT_TYPE",
    "SEND_DURATION_BUCKETS",
    "DatabaseGauges",
    "PoolStatus",
    "SupervisorCollector",
    "WorkerMetrics",
    "counter_total",
    "make_multiprocess_dir",
    "process_dead",
    "queue_gauges",
    "render",
    "use_multiprocess_dir",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SEND_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
"""Seconds; 10 is a bucket edge because the slow-delivery alert is on p95 > 10 s."""
CLAIM_BATCH_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500)

RELAY_FAILURES = "mailqd_relay_failures"
_FAILED_OUTCOMES = (Outcome.FAILED, Outcome.EXPIRED)
_WORKER_OUTCOMES = (Outcome.SENT, Outcome.RETRY, Outcome.AMBIGUOUS, Outcome.FAILED, Outcome.EXPIRED)


# -- the multiprocess directory ----------------------------------------------------


def make_multiprocess_dir() -> str:
    """A new private directory (mode 0700) for one daemon run's metric files."""
    return tempfile.mkdtemp(prefix="mailqd-metrics-")


def use_multiprocess_dir(directory: str) -> None:
    """Make metrics created from now on, here and in children forked later, write to `directory`.

    prometheus-client picks its value class when it is first imported and
    reads the directory from the environment when a metric is created, so
    both are set here, before any worker is forked. Replacing
    `values.ValueClass` is the one patch of prometheus-client's internals;
    the package is pinned to the tested range and a contract test
    (tests/test_monitoring.py) checks that metrics made after it write here.
    """
    os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def process_dead(pid: int, directory: str) -> None:
    """Bookkeeping for a worker that exited: drops its live gauges, keeps its counters."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


# -- what a worker counts ----------------------------------------------------------


class WorkerMetrics:
    """The counters and histograms one worker process bumps.

    Made in the worker after fork (`registry=None`: nothing registers them
    in-process; the sidecar reads their files). The worker calls the
    hooks where it records outcomes, claims, waits for the rate limit, meets
    a relay failure and records recipients refused.
    """

    def __init__(self, limited_domains: Iterable[str] = ()) -> None:
        """`limited_domains`: the keys of `domain_rate_limits`, shown at 0 from the start."""
        self.sent = Counter(
            "mailqd_email_sent",
            "Messages delivered (the SMTP server accepted them), counted when recorded.",
            registry=None,
        )
        self.failed = Counter(
            "mailqd_email_failed",
            "Messages that failed permanently (rejected, out of attempts, or expired).",
            registry=None,
        )
        self.attempts = Counter(
            "mailqd_email_attempts",
            "Delivery attempts recorded, by outcome (sent, retry, ambiguous, failed, expired).",
            ["outcome"],
            registry=None,
        )
        self.duration = Histogram(
            "mailqd_email_send_duration_seconds",
            "Time one delivery attempt took: composing, SMTP dialogue, server reply.",
            buckets=SEND_DURATION_BUCKETS,
            registry=None,
        )
        self.claim_batch = Histogram(
            "mailqd_claim_batch_size",
            "Jobs returned by each claim query (0 when nothing was due).",
            buckets=CLAIM_BATCH_BUCKETS,
            registry=None,
        )
        self.rate_limit_waits = Counter(
            "mailqd_rate_limit_waits",
            "Times a worker waited for the shared rate limit before claiming.",
            registry=None,
        )
        self.rate_limit_wait_seconds = Counter(
            "mailqd_rate_limit_wait_seconds",
            "Seconds workers spent waiting for the shared rate limit.",
            registry=None,
        )
        self.rescued = Counter(
            "mailqd_jobs_rescued",
            "Jobs whose lease expired (their daemon died or hung) returned to the queue.",
            registry=None,
        )
        self.deduplicated = Counter(
            "mailqd_deduplicated",
            "Jobs not sent (cancelled) because the same content was claimed within dedup_window.",
            registry=None,
        )
        self.cap_deferred = Counter(
            "mailqd_recipient_cap_deferred",
            "Claims put off to the next hour because a recipient reached recipient_hourly_cap.",
            registry=None,
        )
        self.domain_throttled = Counter(
            "mailqd_domain_throttled",
            "Claimed jobs put off because their recipient domain was at its domain_rate_limits.",
            ["domain"],
            registry=None,
        )
        self.relay_failures = Counter(
            RELAY_FAILURES,
            "Relay failures (the relay's fault, not the message's), by relay and reason.",
            ["relay", "reason"],
            registry=None,
        )
        self.refused_recipients = Counter(
            "mailqd_recipients_refused",
            "Recipients a relay refused for good (5xx) in messages sent to other recipients.",
            registry=None,
        )
        for outcome in _WORKER_OUTCOMES:
            self.attempts.labels(outcome=outcome.value)  # so every outcome shows, at 0
        for domain in limited_domains:
            self.domain_throttled.labels(domain=domain)

    def recorded(self, batch: Sequence[Completion]) -> None:
        """Outcomes committed to the database: counted once, after the commit."""
        for completion in batch:
            self.attempts.labels(outcome=completion.outcome.value).inc()
            if completion.outcome is not Outcome.DEFERRED:  # the relay was not reached
                self.duration.observe(completion.duration_seconds)
            refused = sum(r.status is RecipientStatus.REFUSED for r in completion.recipients)
            if refused:
                self.recipients_refused(refused)
            if completion.outcome is Outcome.SENT:
                self.sent.inc()
            elif completion.outcome in _FAILED_OUTCOMES:
                self.failed.inc()

    def screened(self, screened: Sequence[Screened]) -> None:
        """Jobs the claim set aside (already recorded in the same transaction)."""
        for item in screened:
            if item.outcome is Outcome.DUPLICATE:
                self.deduplicated.inc()
            elif item.outcome is Outcome.DEFERRED:
                self.cap_deferred.inc()
            elif item.outcome is Outcome.THROTTLED:
                self.domain_throttled.labels(domain=item.domain).inc()

    def claimed(self, count: int) -> None:
        self.claim_batch.observe(count)

    def rate_limited(self, seconds: float) -> None:
        self.rate_limit_waits.inc()
        self.rate_limit_wait_seconds.inc(seconds)

    def jobs_rescued(self, count: int) -> None:
        self.rescued.inc(count)

    def relay_failed(self, relay: str, reason: str) -> None:
        """One relay failure (`RelayUnavailableError`), `reason` one of `RELAY_REASONS`.

        Counted once per failure met, whether or not it opened the breaker;
        `down` counts sends not tried because the relay was marked down.
        """
        self.relay_failures.labels(relay=relay, reason=reason).inc()

    def recipients_refused(self, count: int) -> None:
        """Recipients refused (5xx) in a message that was sent to the others."""
        if count > 0:
            self.refused_recipients.inc(count)


# -- what the sidecar adds at scrape time ------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """The supervisor's state as the sidecar sees it; a new immutable copy each loop turn."""

    workers: int
    """Live worker processes of the current configuration (not those being retired)."""
    desired: int
    stopping: bool
    worker_deaths: int
    """Workers that exited without being asked to (crash, signal, hung)."""
    jobs_given_back: int
    """Jobs the supervisor returned to the queue after their worker died."""
    started_at: float
    """Wall-clock time the supervisor started (epoch seconds)."""


@dataclass(frozen=True, slots=True)
class DatabaseGauges:
    """What the sidecar's latest database answer says: the queue, and which relays are up."""

    counts: QueueCounts
    due: int
    """Pending jobs due now (not those scheduled for later or waiting for a retry)."""
    relays_up: tuple[tuple[str, bool], ...] = ()
    """Every configured relay, in the configuration's order, and whether it is up."""


class SupervisorCollector(Collector):
    """The metrics the supervisor and the database know, computed at scrape time.

    `queue` returns the cached database answer, or raises `MailqError` when
    the database does not answer: the queue and relay gauges are then left
    out and `mailqd_database_up` is 0.
    """

    def __init__(
        self,
        status: Callable[[], PoolStatus],
        queue: Callable[[], DatabaseGauges],
        version: str,
    ) -> None:
        self._status = status
        self._queue = queue
        self._version = version

    def collect(self) -> Iterator[Metric]:
        from mailqd.errors import MailqError

        status = self._status()
        yield _gauge("mailqd_workers", "Worker processes running.", status.workers)
        yield _gauge("mailqd_workers_desired", "Worker processes configured.", status.desired)
        yield _counter(
            "mailqd_worker_deaths",
            "Workers that exited unexpectedly (crash, signal, hung) and were replaced.",
            status.worker_deaths,
        )
        yield _counter(
            "mailqd_jobs_given_back",
            "Jobs returned to the queue by the supervisor after their worker died.",
            status.jobs_given_back,
        )
        yield _gauge(
            "mailqd_start_time_seconds", "When this mailqd started (Unix time).", status.started_at
        )
        info = GaugeMetricFamily("mailqd_build_info", "mailqd version.", labels=["version"])
        info.add_metric([self._version], 1)
        yield info
        try:
            gauges = self._queue()
        except MailqError:
            yield _gauge("mailqd_database_up", "1 if the last database query answered.", 0)
            return
        yield _gauge("mailqd_database_up", "1 if the last database query answered.", 1)
        yield from queue_gauges(gauges)


def queue_gauges(gauges: DatabaseGauges) -> Iterator[Metric]:
    """The queue and relay gauges; the same numbers on every daemon sharing the database."""
    counts = gauges.counts
    yield _gauge(
        "mailqd_email_queue_depth",
        "Jobs not finished yet: pending (due or not) plus being sent.",
        counts.depth,
    )
    yield _gauge(
        "mailqd_email_pending_count", "Jobs waiting to be sent (due or not).", counts.pending
    )
    yield _gauge("mailqd_email_sending_count", "Jobs claimed and being sent.", counts.sending)
    yield _gauge(
        "mailqd_email_failed_count",
        "Jobs that failed permanently and are kept for review (mailqctl failed).",
        counts.by_status.get(Status.FAILED, 0),
    )
    yield _gauge(
        "mailqd_email_oldest_due_age_seconds",
        "How long the oldest due pending job has waited; 0 when none is due.",
        counts.oldest_due_age_seconds or 0.0,
    )
    yield _gauge(
        "mailqd_email_due_count",
        "Pending jobs due now: not those scheduled for later or waiting for their retry.",
        gauges.due,
    )
    up = GaugeMetricFamily(
        "mailqd_relay_up",
        "1 while the relay's circuit breaker lets mail through, 0 while it is marked down.",
        labels=["relay"],
    )
    for relay, is_up in gauges.relays_up:
        up.add_metric([relay], 1 if is_up else 0)
    yield up


def render(directory: str, supervisor: Collector, relays: Sequence[str] = ()) -> bytes:
    """The `/metrics` page: every process's files summed, plus the supervisor's metrics.

    `relays` are the configured relays' names: their failure counters show
    at 0 for each reason until a worker counts one.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerFiles(directory, relays))
    registry.register(supervisor)
    return generate_latest(registry)


class _WorkerFiles(Collector):
    """Every worker's metric files summed, with the relay failure counters filled in at 0."""

    def __init__(self, directory: str, relays: Sequence[str]) -> None:
        self._directory = directory
        self._relays = relays

    def collect(self) -> Iterator[Metric]:
        merge = MultiProcessCollector.merge
        merged = merge(_files(self._directory), accumulate=True)  # type: ignore[no-untyped-call]
        failures: Metric | None = None
        for metric in merged:
            if metric.name == RELAY_FAILURES:
                failures = metric
            else:
                yield metric
        if failures is None:
            if not self._relays:
                return
            failures = CounterMetricFamily(
                RELAY_FAILURES,
                "Relay failures (the relay's fault, not the message's), by relay and reason.",
            )
        yield _with_zeros(failures, self._relays)


def _with_zeros(failures: Metric, relays: Sequence[str]) -> Metric:
    """`failures` plus a 0 sample for each relay and reason it has none of."""
    name = RELAY_FAILURES + "_total"
    seen = {(s.labels.get("relay"), s.labels.get("reason")) for s in failures.samples}
    for relay in relays:
        for reason in RELAY_REASONS:
            if (relay, reason) not in seen:
                failures.samples.append(Sample(name, {"relay": relay, "reason": reason}, 0.0))
    return failures


def counter_total(directory: str, name: str) -> float:
    """One unlabelled counter's value summed over every process's files (for STATUS=)."""
    merged = MultiProcessCollector.merge(_files(directory))  # type: ignore[no-untyped-call]
    for metric in merged:
        if metric.name == name:
            return float(sum(s.value for s in metric.samples if s.name == name + "_total"))
    return 0.0


def _files(directory: str) -> list[str]:
    try:
        return [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".db")]
    except FileNotFoundError:
        return []


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)
