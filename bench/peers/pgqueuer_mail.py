"""A PgQueuer consumer that sends email, for the cold-start bench (bench/bench_coldstart.py).

One worker process per run of this file (the bench starts three, as mailqd
forks three workers):

    PGDSN=postgresql://... PYTHONPATH=bench python bench/peers/pgqueuer_mail.py \\
        --batch-size 16 --max-concurrent-tasks 32 --smtp-port PORT --connections 32

which runs `pgqueuer.run(factory, batch_size=..., max_concurrent_tasks=...)`
on uvloop: the supervisor `pgq run peers.pgqueuer_mail:main --batch-size 16
--max-concurrent-tasks 32 -- --smtp-port PORT` runs (PgQueuer documents
`pgqueuer.run` as "`pgq run` without the CLI"). The CLI itself cannot be
used with the typer this venv resolves: pgqueuer 1.6.0's `pgq run` fails
before starting with "'str' object has no attribute 'name'" in
`setup_fancy_logger`, with or without `--log-level`.

The factory follows PgQueuer's documented shape (docs/reference/cli.md,
"Factory pattern"; docs/guides/shared-resources.md): an
`@asynccontextmanager` that opens one asyncpg connection for the
QueueManager (the driver its docs recommend for throughput, and a plain
connection rather than a pool for the manager, as its performance guide
says), registers the entrypoint, and hands the SMTP connections to every job
through `resources`. The job's payload is the JSON of the fields mailqd's
bench enqueues (`to`, `subject`, `body`); the entrypoint builds the message
with Python's email library and sends it with aiosmtplib's `send_message`
over one of `--connections` kept-open connections (one per concurrent job,
as `--max-concurrent-tasks` allows). A job that raises is logged and
deleted, PgQueuer's default `on_failure`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from pgqueuer import PgQueuer
from pgqueuer.models import Context, Job

from peers.mail import Connections, build

ENTRYPOINT = "send_email"
DEFAULT_SENDER = "Shop <noreply@example.com>"


def _options(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peers.pgqueuer_mail")
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--sender", default=DEFAULT_SENDER)
    return parser.parse_args(args)


def _run_options(args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`pgq run`'s options this bench sets; the rest go to the factory, as after `--`."""
    parser = argparse.ArgumentParser(prog="peers.pgqueuer_mail", add_help=False)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--max-concurrent-tasks", type=int, default=None)
    return parser.parse_known_args(args)


@asynccontextmanager
async def main(args: list[str]) -> AsyncIterator[PgQueuer]:
    options = _options(args)
    connection = await asyncpg.connect(os.environ["PGDSN"])
    smtp = Connections(options.smtp_port, options.connections)
    pgq = PgQueuer.from_asyncpg_connection(connection, resources={"smtp": smtp})

    @pgq.entrypoint(ENTRYPOINT)
    async def send_email(job: Job, ctx: Context) -> None:
        assert job.payload is not None
        message = build(json.loads(job.payload), options.sender)
        connections = ctx.resources["smtp"]
        assert isinstance(connections, Connections)
        async with connections.connection() as client:
            await client.send_message(message)

    try:
        yield pgq
    finally:
        await smtp.close()
        await connection.close()


def run(argv: list[str]) -> None:
    """What `pgq run peers.pgqueuer_mail:main [options] -- [factory args]` does."""
    import pgqueuer
    import uvloop
    from pgqueuer.core.logconfig import LogLevel, setup_fancy_logger

    options, factory_args = _run_options(argv)
    setup_fancy_logger(LogLevel.WARNING)
    uvloop.run(
        pgqueuer.run(
            functools.partial(main, factory_args),
            batch_size=options.batch_size,
            max_concurrent_tasks=options.max_concurrent_tasks,
        )
    )


if __name__ == "__main__":
    run(sys.argv[1:])
