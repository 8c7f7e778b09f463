"""The systems bench/bench_coldstart.py starts cold: mailqd, PgQueuer, a bare aiosmtplib loop.

Shared by the bench scripts (run as `python bench/NAME.py`, so this folder
is on sys.path). Each readies N messages with itself stopped (`load`),
starts (`start`, returning the perf_counter at the first exec), names its
processes for bench_daemon's `CpuMeter` (`pid`, `worker_pids`), says when
its queue holds every outcome (`recorded`), and stops (`stop`, `reset`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from bench_daemon import SENDER, Daemon, Queue, daemon_env, enqueue, libpq_url, message
from mailqd import Client
from peers.mail import build, envelope

BENCH_DIR = Path(__file__).resolve().parent
ENQUEUE_BATCH = 1000
STOP_TIMEOUT = 30.0


class System(Protocol):
    name: str

    def describe(self) -> str: ...
    def prepare(self) -> None: ...
    def load(self, n: int) -> None: ...
    def start(self) -> float: ...
    @property
    def pid(self) -> int | None: ...
    def worker_pids(self) -> list[int]: ...
    def check_alive(self) -> None: ...
    def recorded(self) -> bool: ...
    def stop(self) -> None: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


class Mailqd:
    """`mailqd` as bench_daemon runs it; the messages enqueued with `Client.enqueue_many`."""

    name = "mailqd"

    def __init__(
        self, url: str, queue: Queue, port: int, workdir: Path, workers: int, concurrency: int
    ) -> None:
        self.queue, self.workers, self.concurrency = queue, workers, concurrency
        self.client = Client(url)
        env = daemon_env(url, port, workers, concurrency)
        self.daemon = Daemon(env, workdir / "mailqd.log", workers)

    def describe(self) -> str:
        return (
            f"`mailqd`, {self.workers} workers x concurrency {self.concurrency}, log level warning"
        )

    def prepare(self) -> None:
        pass

    def load(self, n: int) -> None:
        enqueue(self.client, n, "cold")

    def start(self) -> float:
        return self.daemon.start()

    @property
    def pid(self) -> int | None:
        return self.daemon.pid

    def worker_pids(self) -> list[int]:
        return self.daemon.worker_pids()

    def check_alive(self) -> None:
        self.daemon.check_alive()

    def recorded(self) -> bool:
        return not self.queue.unfinished()

    def stop(self) -> None:
        self.daemon.stop()

    def reset(self) -> None:
        self.queue.empty()

    def close(self) -> None:
        self.daemon.kill()
        self.client.close()


class _Processes:
    """A few processes of a peer, each in a session of its own, with a log file each."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name, self.workdir = name, workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argvs: list[list[str]], env: dict[str, str], stdin: int | None) -> float:
        started = time.perf_counter()
        for i, argv in enumerate(argvs):
            with (self.workdir / f"{self.name}-{i}.log").open("ab") as log:
                self.procs.append(
                    subprocess.Popen(
                        argv, env=env, cwd=BENCH_DIR, stdin=stdin, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True,
                    )
                )  # fmt: skip
        return started

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self, *, exit_ok: bool = False) -> None:
        for i, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None and not (exit_ok and code == 0):
                log = self.workdir / f"{self.name}-{i}.log"
                tail = log.read_text(errors="replace").splitlines()[-20:]
                raise SystemExit(f"{self.name} process {i} exited with {code}:\n" + "\n".join(tail))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []

    def logs_contain(self, text: str) -> bool:
        return all(
            text in (self.workdir / f"{self.name}-{i}.log").read_text(errors="replace")
            for i in range(len(self.procs))
        )


class PgQueuerPeer:
    """3 processes of peers/pgqueuer_mail.py (`pgq run`'s supervisor) on the same database."""

    name = "pgqueuer"

    def __init__(
        self, url: str, queue: Queue, port: int, workdir: Path, workers: int, concurrency: int
    ) -> None:
        self.dsn = libpq_url(url)
        self.queue, self.port, self.workers, self.concurrency = queue, port, workers, concurrency
        self.batch_size = max(1, concurrency // 2)  # PgQueuer's floor: max tasks >= 2 x batch
        self.pgq = str(Path(sys.executable).with_name("pgq"))
        self.env = {**os.environ, "PGDSN": self.dsn, "PYTHONPATH": str(BENCH_DIR)}
        self.processes = _Processes("pgqueuer", workdir)

    def describe(self) -> str:
        from importlib.metadata import version

        return (
            f"PgQueuer {version('pgqueuer')} (asyncpg {version('asyncpg')}), {self.workers} x"
            f" peers/pgqueuer_mail.py (`pgq run`'s supervisor) --batch-size {self.batch_size}"
            f" --max-concurrent-tasks {self.concurrency}, {self.concurrency} SMTP connections each"
        )

    def prepare(self) -> None:
        """`pgq install` (durable, its default) and `pgq autovac`, as its docs' checklist says."""
        for command in (["install"], ["autovac"]):
            subprocess.run(
                [self.pgq, *command], env=self.env, check=True, capture_output=True, timeout=120
            )

    def load(self, n: int) -> None:
        asyncio.run(self._enqueue(n))

    async def _enqueue(self, n: int) -> None:
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        from peers.pgqueuer_mail import ENTRYPOINT

        connection = await asyncpg.connect(self.dsn)
        try:
            queries = Queries(AsyncpgDriver(connection))
            for start in range(0, n, ENQUEUE_BATCH):
                count = min(n, start + ENQUEUE_BATCH) - start
                payloads: list[bytes | None] = [
                    json.dumps(message(i, "cold")).encode() for i in range(start, start + count)
                ]
                await queries.enqueue([ENTRYPOINT] * count, payloads, [0] * count)
        finally:
            await connection.close()

    def start(self) -> float:
        argv = [
            sys.executable, str(BENCH_DIR / "peers" / "pgqueuer_mail.py"),
            "--batch-size", str(self.batch_size), "--max-concurrent-tasks", str(self.concurrency),
            "--smtp-port", str(self.port), "--connections", str(self.concurrency),
            "--sender", SENDER,
        ]  # fmt: skip
        return self.processes.start([argv] * self.workers, self.env, subprocess.DEVNULL)

    pid = None

    def worker_pids(self) -> list[int]:
        return self.processes.pids()

    def check_alive(self) -> None:
        self.processes.check_alive()

    def recorded(self) -> bool:
        """Its queue table is empty: every job's outcome moved to pgqueuer_log."""
        return not self.queue.scalar("SELECT EXISTS (SELECT 1 FROM pgqueuer)")

    def stop(self) -> None:
        self.processes.stop()

    def reset(self) -> None:
        self.queue.conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")
        self.queue.conn.execute("VACUUM ANALYZE pgqueuer")

    def close(self) -> None:
        self.processes.stop()


class BareLoop:
    """3 processes of peers/bare_aiosmtplib.py, each with a third of the prebuilt messages."""

    name = "bare"

    def __init__(self, port: int, workdir: Path, workers: int, concurrency: int) -> None:
        self.port, self.workers, self.concurrency = port, workers, concurrency
        self.workdir = workdir
        self.processes = _Processes("bare", workdir)
        self.files: list[Path] = []

    def describe(self) -> str:
        return (
            f"{self.workers} processes x {self.concurrency} kept-open aiosmtplib connections,"
            " prebuilt bytes (SMTP.sendmail), no queue"
        )

    def prepare(self) -> None:
        pass

    def load(self, n: int) -> None:
        """Build the messages now, before the clock: the loop only sends."""
        shares: list[list[tuple[str, list[str], bytes]]] = [[] for _ in range(self.workers)]
        for i in range(n):
            fields = message(i, "cold")
            shares[i % self.workers].append(
                (*envelope(fields, SENDER), build(fields, SENDER).as_bytes())
            )
        self.files = []
        for k, share in enumerate(shares):
            path = self.workdir / f"bare-{k}.pickle"
            path.write_bytes(pickle.dumps(share))
            self.files.append(path)

    def start(self) -> float:
        script = str(BENCH_DIR / "peers" / "bare_aiosmtplib.py")
        argvs = [
            [sys.executable, script, str(self.port), str(path), str(self.concurrency)]
            for path in self.files
        ]
        env = {**os.environ, "PYTHONPATH": str(BENCH_DIR)}
        return self.processes.start(argvs, env, subprocess.PIPE)

    pid = None

    def worker_pids(self) -> list[int]:
        return self.processes.pids()

    def check_alive(self) -> None:
        self.processes.check_alive()

    def recorded(self) -> bool:
        return self.processes.logs_contain("sent ")

    def stop(self) -> None:
        for proc in self.processes.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        self.processes.stop()

    def reset(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.stop()
