"""The worker process: what a forked worker runs (`run_worker`), around one `Worker`.

The supervisor forks and calls `run_worker` (`mailqd.daemon.supervisor`).
It sets signals up, builds the worker's own store (connections inherited
across fork must not be used) and runs `Worker` (`mailqd.daemon.worker`)
on uvloop when installed, until SIGTERM, or until the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import structlog

from mailqd.config import Settings
from mailqd.daemon.heartbeat import Heartbeat, WorkerIdentity
from mailqd.daemon.worker import HEARTBEAT_INTERVAL, Worker
from mailqd.errors import DatabaseUnavailableError
from mailqd.metrics import WorkerMetrics
from mailqd.runtime import Runtime
from mailqd.store import Store

__all__ = ["run_worker"]


def run_worker(settings: Settings | Runtime, identity: WorkerIdentity, heartbeat: Heartbeat) -> int:
    """The body of a forked worker process; returns its exit code (0 after a graceful stop).

    Given the supervisor's `Runtime` (inherited across fork), it reads no
    key file, password file or environment; given plain `Settings` (a test
    forking a worker itself), it builds the runtime first. Builds its own
    engine: connections inherited across fork() must not be used. SIGTERM
    stops the worker gracefully. SIGINT is ignored (the supervisor handles
    Ctrl-C and sends SIGTERM), and so is SIGHUP (the supervisor reloads by
    replacing workers). A worker that cannot start raises `ConfigError` (a
    bad `smtp_url`) or `SchemaError`, which the supervisor treats as a boot
    failure rather than a crash to restart. A worker whose supervisor dies
    (SIGKILL, the OOM killer) stops gracefully as if it got SIGTERM,
    instead of delivering on unsupervised.
    """
    from mailqd.logging import configure_logging

    supervisor = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    runtime = settings if isinstance(settings, Runtime) else Runtime.build(settings)
    configure_logging(runtime.settings, secrets=runtime.log_secrets)
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        runner.run(_serve(runtime, identity, heartbeat, supervisor))
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
    runtime: Runtime, identity: WorkerIdentity, heartbeat: Heartbeat, supervisor: int
) -> None:
    settings = runtime.settings
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    orphaned = asyncio.create_task(_stop_when_orphaned(supervisor, stop, identity.owner))
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
            heartbeat=heartbeat,
            metrics=WorkerMetrics(limited_domains=settings.domain_rates),
            runtime=runtime,
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


async def _check_schema_if_reachable(store: Store, owner: str) -> None:
    """Refuse an outdated schema; a database that is down is waited for by the loops instead."""
    try:
        await asyncio.to_thread(store.check_schema)
    except DatabaseUnavailableError as exc:
        structlog.get_logger().warning(
            "database unavailable at start; will keep trying", worker=owner, error=str(exc)
        )
