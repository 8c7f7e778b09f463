"""Throughput from a cold start: mailqd against PgQueuer and a bare aiosmtplib loop.

    .venv/bin/pip install -e '.[bench]'        # pgqueuer[asyncpg], py-spy
    .venv/bin/python bench/bench_coldstart.py [--messages 20000] [--rounds 3]
    .venv/bin/python bench/bench_coldstart.py --profile [--messages 20000] [--rounds 1]

Each round, for each system in turn (the order rotates from round to
round): N ~2 KB messages (bench_daemon's `message()` corpus) are made ready
with the system stopped, then the system is started and timed from its
process start until Postfix's `smtp-sink` has received all N (counted at the
sink, every 2 ms). The systems:

- mailqd: the `mailqd` command, 3 workers (bench_daemon's settings); the N
  are enqueued with `Client.enqueue_many`, 1,000 per transaction.
- PgQueuer: 3 worker processes of peers/pgqueuer_mail.py, each what `pgq run
  peers.pgqueuer_mail:main --batch-size 16 --max-concurrent-tasks 32` runs
  (`pgqueuer.run`, on uvloop), asyncpg driver, 32 kept-open SMTP connections
  each; the N are enqueued with `Queries.enqueue`, 1,000 per call; schema
  from `pgq install` (durable) and `pgq autovac`. See peers/pgqueuer_mail.py.
- bare loop: 3 processes sending prebuilt bytes with `aiosmtplib.SMTP.sendmail`
  over 32 kept-open connections each, no queue (peers/bare_aiosmtplib.py).

Printed per system and round: msg/s with start-up included, the time to the
first delivery, msg/s from the first delivery to the last, the time until
the system's queue had every outcome recorded (mailqd: nothing pending or
sending; PgQueuer: its queue table empty), and
CPU per message of the system's processes, of the PostgreSQL backends serving
the database (autovacuum included) and of the sink (bench_daemon's
`CpuMeter`, from the start until the sink has all N); then medians, and
mailqd's ratio to each peer (of the medians, and the range of the per-round
ratios).

`--profile` runs mailqd alone, with `py-spy record` on each worker, and
prints the workers' CPU per message split into claim, compose, SMTP
dialogue, outcome recording and the rest (bench/coldprofile.py).

Database: as bench_daemon (a throwaway one unless `--database-url`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench_daemon import CpuMeter, Queue, Sink, load_average, uses_uvloop
from benchdb import add_database_url_option, run_bench
from coldprofile import Profiler, Split
from coldsystems import BareLoop, Mailqd, PgQueuerPeer, System

SINK_POLL_SECONDS = 0.002
ALIVE_CHECK_SECONDS = 0.25
DELIVERY_TIMEOUT = 600.0
RECORDED_TIMEOUT = 120.0


@dataclass
class Run:
    system: str
    round: int
    messages: int
    seconds: float  # process start -> the sink has all N
    first_seconds: float  # process start -> the sink has the first
    recorded_seconds: float | None  # process start -> the queue has every outcome
    cpu: dict[str, float] = field(default_factory=dict)
    split: Split | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def steady_rate(self) -> float:
        """From the first delivery to the last: how fast it delivers once it has started."""
        return (self.messages - 1) / max(self.seconds - self.first_seconds, 1e-9)

    def cpu_us(self, *roles: str) -> float:
        return sum(self.cpu.get(role, 0.0) for role in roles) / self.messages * 1e6


def measure(
    system: System, queue: Queue, sink: Sink, n: int, rnd: int, profiler: Profiler | None
) -> Run:
    """Ready N with `system` stopped, start it, wait until the sink has them all."""
    system.load(n)
    baseline = sink.received() or 0
    meter = CpuMeter(queue, system, sink)
    meter.start()  # before the system: its processes count from zero
    started = system.start()
    if profiler is not None:
        profiler.start(system.worker_pids)
    try:
        now, first = _wait_delivered(system, sink, baseline, n, started)
    finally:
        cpu = meter.stop()
        split = profiler.stop() if profiler is not None else None
    recorded = _wait_recorded(system, started)
    system.stop()
    system.reset()
    return Run(system.name, rnd, n, now - started, first, recorded, cpu, split)


def _wait_delivered(
    system: System, sink: Sink, baseline: int, n: int, started: float
) -> tuple[float, float]:
    """Poll the sink until it has N more than `baseline`; returns perf_counter then, and the
    first delivery's delay after `started`."""
    first: float | None = None
    next_check = started + ALIVE_CHECK_SECONDS
    while True:
        now = time.perf_counter()
        got = (sink.received() or 0) - baseline
        if first is None and got > 0:
            first = now - started
        if got >= n:
            assert first is not None
            return now, first
        if now > next_check:
            system.check_alive()
            next_check = now + ALIVE_CHECK_SECONDS
            if now - started > DELIVERY_TIMEOUT:
                late = now - started
                raise SystemExit(f"{system.name}: {got} of {n} at the sink after {late:.0f} s")
        time.sleep(SINK_POLL_SECONDS)


def _wait_recorded(system: System, started: float) -> float | None:
    deadline = time.perf_counter() + RECORDED_TIMEOUT
    while not system.recorded():
        if time.perf_counter() > deadline:
            return None
        time.sleep(0.02)
    return time.perf_counter() - started


# -- the report ------------------------------------------------------------------

_HEADER = (
    f"  {'round':<6}{'system':<10}{'msg/s':>8}{'first':>8}{'after':>8}{'all':>8}{'recorded':>10}"
    f"{'system':>9}{'postgres':>9}{'sink':>7}{'total':>7}"
)


def print_run(run: Run) -> None:
    recorded = "-" if run.recorded_seconds is None else f"{run.recorded_seconds:.2f}"
    print(
        f"  {run.round:<6}{run.system:<10}{run.rate:>8,.0f}{run.first_seconds:>7.2f}s"
        f"{run.steady_rate:>8,.0f}"
        f"{run.seconds:>7.2f}s{recorded:>9}s"
        f"{run.cpu_us('supervisor', 'workers'):>9,.0f}{run.cpu_us('postgres', 'autovacuum'):>9,.0f}"
        f"{run.cpu_us('sink'):>7,.0f}{run.cpu_us(*run.cpu):>7,.0f}",
        flush=True,
    )


def print_summary(runs: Sequence[Run], names: Sequence[str]) -> None:
    print("\nmedians")
    medians: dict[str, float] = {}
    for name in names:
        mine = [r for r in runs if r.system == name]
        medians[name] = statistics.median(r.rate for r in mine)
        first = statistics.median(r.first_seconds for r in mine)
        steady = statistics.median(r.steady_rate for r in mine)
        cpu = statistics.median(r.cpu_us(*r.cpu) for r in mine)
        rates = ", ".join(f"{r.rate:,.0f}" for r in mine)
        print(
            f"  {name:<10}{medians[name]:>8,.0f} msg/s (runs: {rates}); first delivery"
            f" {first:.2f} s, then {steady:,.0f} msg/s; all processes {cpu:,.0f} us/msg"
        )
    if "mailqd" not in medians or len(medians) < 2:
        return
    print("\nmailqd's ratio to each peer")
    for name in names:
        if name == "mailqd":
            continue
        per_round = [
            m.rate / p.rate
            for m in runs
            if m.system == "mailqd"
            for p in runs
            if p.system == name and p.round == m.round
        ]
        print(
            f"  to {name:<10} {medians['mailqd'] / medians[name]:.2f}x of the medians;"
            f" per round {min(per_round):.2f}-{max(per_round):.2f}x"
        )


def print_legend() -> None:
    print(
        "msg/s: N / (process start -> the sink has all N), start-up included. first: process start"
        " -> first message at the sink.\nafter: msg/s from the first message to the last. all:"
        " process start -> all N at the sink.\nrecorded: process start -> the queue has every"
        " outcome written.\nCPU columns, us per message: system (its"
        " processes), postgres (backends of this database + autovacuum),\nsink (smtp-sink), total;"
        " from the system's start until the sink had all N.\n"
    )


def run(args: argparse.Namespace, url: str, workdir: Path) -> None:
    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, {uses_uvloop()};"
        f" load average at start {load_average()}"
    )
    sink = Sink(workdir)
    if sink.program is None:
        raise SystemExit("this bench needs Postfix's smtp-sink: apt-get install postfix")
    sink.start()
    queue = Queue(url)
    systems: list[System] = []
    try:
        queue.prepare()
        systems.append(Mailqd(url, queue, sink.port, workdir, args.workers, args.concurrency))
        if not args.profile:
            systems.append(
                PgQueuerPeer(url, queue, sink.port, workdir, args.workers, args.concurrency)
            )
            systems.append(BareLoop(sink.port, workdir, args.workers, args.concurrency))
        for system in systems:
            system.prepare()
        print(f"sink: {sink.kind} on 127.0.0.1:{sink.port}")
        for system in systems:
            print(f"{system.name}: {system.describe()}")
        profiler = None
        if args.profile:
            pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            profiler = Profiler(pyspy, workdir, args.profile_rate)
            print(f"profile: {pyspy} record --format raw --nonblocking --rate {args.profile_rate}")
        print(f"\n{args.messages:,} messages of ~2 KB, {args.rounds} rounds\n")
        print_legend()
        print(_HEADER)
        runs: list[Run] = []
        for rnd in range(1, args.rounds + 1):
            shift = (rnd - 1) % len(systems)
            for system in systems[shift:] + systems[:shift]:
                result = measure(system, queue, sink, args.messages, rnd, profiler)
                runs.append(result)
                print_run(result)
        print_summary(runs, [s.name for s in systems])
        if args.profile:
            print_profile(runs)
        print(f"\nload average at end {load_average()}")
    finally:
        for system in systems:
            system.close()
        queue.close()
        sink.stop()


def print_profile(runs: Sequence[Run]) -> None:
    print("\nworker CPU per message, by py-spy samples (rounds pooled)")
    pooled = Split()
    for r in runs:
        if r.split is not None:
            pooled.merge(r.split)
    pooled.print(sum(r.cpu.get("workers", 0.0) for r in runs), sum(r.messages for r in runs))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_database_url_option(parser)
    parser.add_argument("--messages", type=int, default=20_000, help="messages per run (20,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all systems (3)")
    parser.add_argument("--workers", type=int, default=3, help="processes per system (3)")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent sends per process (32)"
    )
    parser.add_argument("--profile", action="store_true", help="mailqd alone, under py-spy")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s (100)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = parser.parse_args(argv)
    run_bench(run, args, "mailqd-coldbench-", args.keep_logs)


if __name__ == "__main__":
    main()
