"""A real PostgreSQL server for the test suite: found, or started and thrown away.

Tests never mock the database. This module finds a server to run them against,
in this order:

1. ``MAILQD_TEST_PG_URL``: an explicit server URL (``postgresql://user@host:port/db``;
   the database named in it is only used for administration). If it is set and
   does not answer, that is an error: nothing silently falls back.
2. A probe of ``MAILQD_TEST_PG_PROBE`` (``host:port``, default ``127.0.0.1:5432``)
   as user ``postgres``; ``MAILQD_TEST_PG_PROBE=none`` skips the probe.
3. A throwaway cluster started with the PostgreSQL server binaries in a temporary
   directory, on a free port, removed again by ``close()``. ``initdb`` and
   ``pg_ctl`` refuse to run as root, so as root they run as the ``postgres`` user.
   The binaries are looked up in ``MAILQD_TEST_PG_BINDIR``, then the newest
   ``/usr/lib/postgresql/*/bin`` (Debian), then ``PATH``.

Each test run then works in databases of its own (``create_database`` /
``drop_database``), so two runs against one server never see each other's rows.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

PG_URL_ENV = "MAILQD_TEST_PG_URL"
PG_PROBE_ENV = "MAILQD_TEST_PG_PROBE"
PG_BINDIR_ENV = "MAILQD_TEST_PG_BINDIR"
DEFAULT_PROBE = "127.0.0.1:5432"
READY_TIMEOUT = 60.0

StopMode = Literal["smart", "fast", "immediate"]

MakeDatabase = Callable[..., str]
"""The ``make_pg_database`` fixture: ``(prefix="mailqd_test", template=None) -> URL``."""


def libpq_url(url: str) -> str:
    """The URL as psycopg/libpq wants it (``postgresql://``, no SQLAlchemy driver)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_url(url: str, database: str | None = None) -> str:
    """The URL as mailqd and SQLAlchemy want it (``postgresql+psycopg://``)."""
    parsed = make_url(url).set(drivername="postgresql+psycopg")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def answers(url: str, connect_timeout: int = 2) -> bool:
    """Whether a PostgreSQL server accepts a connection at ``url`` right now."""
    try:
        with psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=connect_timeout):
            return True
    except psycopg.OperationalError:
        return False


def wait_until_accepting(url: str, timeout: float = READY_TIMEOUT) -> None:
    """Poll ``url`` with a connection until the server accepts it, or raise at the deadline."""
    deadline = time.monotonic() + timeout
    interval = 0.01
    while not answers(url):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"PostgreSQL at {url} did not accept connections in {timeout}s")
        time.sleep(interval)
        interval = min(interval * 2, 0.5)


class PostgresServer:
    """A PostgreSQL server for tests; ``owned`` when this process started it.

    A server found elsewhere (env URL or probe) is only borrowed: ``stop()`` and
    ``close()`` leave it alone, and ``start()``/``restart()`` refuse. An owned
    one can be stopped and started again (for database-outage tests) and is
    removed, data directory and all, by ``close()``.
    """

    def __init__(self, admin_url: str, cluster: _Cluster | None = None) -> None:
        self.admin_url = libpq_url(admin_url)
        self._cluster = cluster

    @property
    def url(self) -> str:
        """The administrative ``postgresql://`` URL (same as ``admin_url``)."""
        return self.admin_url

    @property
    def owned(self) -> bool:
        return self._cluster is not None

    @property
    def directory(self) -> Path | None:
        """The temp dir holding an owned cluster's data, socket and log; None when borrowed."""
        return None if self._cluster is None else self._cluster.root

    @property
    def port(self) -> int:
        port = make_url(self.admin_url).port
        return 5432 if port is None else port

    def start(self) -> None:
        """Start the owned server again and return once it accepts connections."""
        self._owned_cluster().start()
        wait_until_accepting(self.admin_url)

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server if this process started it; a borrowed server is left running.

        ``immediate`` is a crash (no checkpoint; the next start runs recovery).
        """
        if self._cluster is not None:
            self._cluster.stop(mode)

    def restart(self, mode: StopMode = "fast") -> None:
        self._owned_cluster()
        self.stop(mode)
        self.start()

    def close(self) -> None:
        """Stop an owned server and delete its files; idempotent, a no-op when borrowed."""
        if self._cluster is not None:
            self._cluster.destroy()

    def _owned_cluster(self) -> _Cluster:
        if self._cluster is None:
            raise RuntimeError(f"the server at {self.admin_url} was not started by the tests")
        return self._cluster

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresServer({self.admin_url!r}, owned={self.owned})"


class _Cluster:
    """A throwaway cluster in a temp dir, driven by ``initdb`` and ``pg_ctl``."""

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir = bindir
        self.root = root
        self.port = port
        self.datadir = root / "data"
        self.sockdir = root / "sock"
        self.logfile = root / "postgres.log"
        self.running = False
        self.destroyed = False

    def init(self) -> None:
        self._run_as_postgres(
            [
                str(self.bindir / "initdb"),
                "--pgdata",
                str(self.datadir),
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )

    def start(self) -> None:
        server_options = (
            f"-p {self.port} -k {shlex.quote(str(self.sockdir))}"
            " -c listen_addresses=127.0.0.1 -c fsync=off"
        )
        self._run_as_postgres(
            [
                str(self.bindir / "pg_ctl"),
                "--pgdata",
                str(self.datadir),
                "--log",
                str(self.logfile),
                "--options",
                server_options,
                "--wait",
                f"--timeout={int(READY_TIMEOUT)}",
                "start",
            ]
        )
        self.running = True

    def stop(self, mode: StopMode) -> None:
        self._run_as_postgres(
            [str(self.bindir / "pg_ctl"), "--pgdata", str(self.datadir), "--mode", mode, "stop"]
        )
        self.running = False

    def destroy(self) -> None:
        if self.destroyed:
            return
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        self.destroyed = True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _run_as_postgres(self, argv: Sequence[str]) -> None:
        result = subprocess.run(
            [*_as_postgres_prefix(), *argv],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(argv)} failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}\n--- server log ---\n{self.log_tail()}"
            )


def _as_postgres_prefix() -> list[str]:
    """``initdb``/``pg_ctl`` refuse root, so as root they run as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)


def find_bindir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` live; raise with a hint when they are not installed."""
    explicit = os.environ.get(PG_BINDIR_ENV)
    if explicit:
        return Path(explicit)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=_major_version)
    if debian:
        return Path(debian[-1]).parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError(
        "no PostgreSQL server answered and pg_ctl was not found: set "
        f"{PG_URL_ENV}=postgresql://user@host:port/postgres, or install the server "
        "(Debian: apt-get install postgresql), or set "
        f"{PG_BINDIR_ENV} to the directory holding initdb and pg_ctl"
    )


def _major_version(pg_ctl: str) -> tuple[int, ...]:
    """``/usr/lib/postgresql/15/bin/pg_ctl`` -> ``(15,)``, so that 15 sorts after 9.6."""
    version = Path(pg_ctl).parent.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_owned_postgres(port: int | None = None) -> PostgresServer:
    """Start a throwaway cluster this process owns, and return once it accepts connections.

    With ``port=None`` a free port is picked (and another one tried should it be
    taken before the server binds it). Call ``close()`` (or use ``with``) to remove it.
    """
    bindir = find_bindir()
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        cluster = _Cluster(bindir, Path(tempfile.mkdtemp(prefix="mailqd-pg-")), port or free_port())
        server = PostgresServer(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres", cluster)
        atexit.register(server.close)
        try:
            _chown_to_postgres(cluster.root)
            cluster.sockdir.mkdir()
            _chown_to_postgres(cluster.sockdir)
            cluster.init()
            server.start()
            return server
        except BaseException as error:
            server.close()
            if attempt == attempts - 1 or not isinstance(error, RuntimeError):
                raise
    raise AssertionError("unreachable")


def find_or_start_postgres() -> PostgresServer:
    """The server the test run uses: env URL, else the probed server, else a throwaway one."""
    explicit = os.environ.get(PG_URL_ENV)
    if explicit:
        if not answers(explicit):
            raise RuntimeError(f"{PG_URL_ENV}={explicit} does not accept connections")
        return PostgresServer(explicit)
    probe = os.environ.get(PG_PROBE_ENV, DEFAULT_PROBE)
    if probe.lower() != "none":
        probed_url = f"postgresql://postgres@{probe}/postgres"
        if answers(probed_url):
            return PostgresServer(probed_url)
    return start_owned_postgres()


def unique_database_name(prefix: str = "mailqd_test") -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def create_database(admin_url: str, name: str, template: str | None = None) -> str:
    """Create database ``name`` and return its ``postgresql+psycopg://`` URL.

    ``template`` clones an existing database (which must have no open connections),
    e.g. one that already holds the migrated schema.
    """
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
    with psycopg.connect(libpq_url(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)
    return sqlalchemy_url(admin_url, database=name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, first disconnecting whoever still uses it."""
    with psycopg.connect(libpq_url(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        statement = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
        if conn.info.server_version >= 130000:
            # A client reconnecting between the terminate and the drop is disconnected too.
            statement = sql.SQL("{} WITH (FORCE)").format(statement)
        conn.execute(statement)
