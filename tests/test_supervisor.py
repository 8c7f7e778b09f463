"""The supervisor and the `mailqd` command, tested from the outside.

The daemon runs as a real subprocess against a real database, the way
systemd runs it (foreground, `MAILQD_*` environment), with `null://` as the
mail transport. Behaviour the real worker should never show (crash loops,
hangs, ignoring SIGTERM) is produced by running the real start-up path with
a stand-in worker function (`standin_workers`). Every wait has a deadline;
nothing sleeps and hopes.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from daemon_process import MAILQD, DaemonPool, DaemonProcess, daemon_env, process_state
from mailqd import Client
from mailqd.daemon.supervisor import RestartBackoff
from mailqd.models import Outcome, Status
from mailqd.store import Store, upgrade
from mailqd.store.engine import make_engine
from pg import free_port

pytestmark = pytest.mark.timeout(60)

SECRET = "hunter2-Secret"


@pytest.fixture
def migrated_sqlite(sqlite_url: str) -> str:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    return sqlite_url


def base_env(database_url: str, **extra: str) -> dict[str, str]:
    return {"MAILQD_DATABASE_URL": database_url, "MAILQD_SMTP_URL": "null://", **extra}


def supervisor_events(
    daemon: DaemonProcess, event: str, **fields: object
) -> list[dict[str, object]]:
    return daemon.events(event, component="supervisor", **fields)


def wait_supervisor_event(
    daemon: DaemonProcess, event: str, /, *, at_least: int = 1, **fields: Any
) -> list[dict[str, Any]]:
    return daemon.wait_for_event(event, at_least=at_least, component="supervisor", **fields)


def wait_workers_ready(daemon: DaemonProcess, count: int) -> None:
    """Wait for the real workers' own start event: from then on they stop gracefully on SIGTERM.

    (A worker signalled before it installed its handler dies of the signal
    instead, having claimed nothing, which the tests that check exit codes avoid.)
    """

    def ready() -> bool:
        return len([e for e in daemon.events("worker started") if "worker" in e]) >= count

    daemon.wait_for(ready, f"{count} workers ready")


def logged_at(record: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(record["timestamp"]))


def new_pool(daemon: DaemonProcess, size: int, replacing: set[int]) -> set[int] | None:
    """The worker pids, once there are `size` of them and none is in `replacing`."""
    pids = daemon.worker_pids()
    return pids if len(pids) == size and not pids & replacing else None


def stop_and_check_exit(daemon: DaemonProcess, expected: int = 0) -> None:
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == expected, daemon.log_tail()
    assert daemon.worker_pids() == set()


# -- the restart delay, as a unit ------------------------------------------------


def test_restart_delay_doubles_to_a_cap_and_resets_after_a_long_life() -> None:
    backoff = RestartBackoff(initial=0.1, cap=1.0, stable_after=60.0)
    delays = [backoff.delay_after(lifetime=0.5) for _ in range(7)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert backoff.delay_after(lifetime=61.0) == 0.1
    assert backoff.delay_after(lifetime=0.5) == 0.2


# -- mailqd --check-config -------------------------------------------------------


def run_mailqd(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAILQD), *args],
        env=daemon_env(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], starts: str) -> str:
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(starts), result.stderr
    return result.stderr


def test_check_config_accepts_a_good_configuration(migrated_sqlite: str) -> None:
    result = run_mailqd(base_env(migrated_sqlite), "--check-config", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(
        f"mailqd: configuration OK (database {migrated_sqlite}, schema 0"
    )
    assert result.stdout.endswith(", 2 workers)\n")


def test_check_config_on_postgresql_never_prints_the_password(pg_url: str) -> None:
    # The test server trusts local connections, so a wrong password still connects.
    url = make_url(pg_url).set(password=SECRET).render_as_string(hide_password=False)
    result = run_mailqd(base_env(url, MAILQD_WORKERS="1"), "--check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("mailqd: configuration OK (database postgresql+psycopg://")
    assert ":***@" in result.stdout
    assert result.stdout.endswith(", 1 worker)\n")
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"MAILQD_WORKERS": "0"}, "mailqd: config workers: must be at least 1, got 0\n"),
        ({"MAILQD_WORKERS": "many"}, "mailqd: config workers: must be a whole number"),
        ({"MAILQD_SMTP_URL": "ftp://mail.example.com"}, "mailqd: config smtp_url: "),
    ],
)
def test_check_config_rejects_a_bad_value_in_one_line(
    migrated_sqlite: str, env: dict[str, str], expected: str
) -> None:
    result = run_mailqd({**base_env(migrated_sqlite), **env}, "--check-config")
    assert_one_line_failure(result, expected)


def test_check_config_rejects_an_unknown_key_in_the_file(
    migrated_sqlite: str, tmp_path: Path
) -> None:
    config = tmp_path / "mailqd.toml"
    config.write_text("wokers = 2\n")
    result = run_mailqd(base_env(migrated_sqlite), "--config", str(config), "--check-config")
    assert_one_line_failure(result, "mailqd: config wokers: unknown key")


def test_check_config_reports_an_unreachable_database_without_the_password() -> None:
    url = f"postgresql://mailqd:{SECRET}@127.0.0.1:{free_port()}/mailqd"
    stderr = assert_one_line_failure(
        run_mailqd(base_env(url), "--check-config"), "mailqd: database unavailable: "
    )
    assert SECRET not in stderr


def test_check_config_reports_an_unmigrated_schema(sqlite_url: str) -> None:
    result = run_mailqd(base_env(sqlite_url), "--check-config")
    assert_one_line_failure(
        result, "mailqd: the database has no mailqd schema; run `mailqctl migrate`\n"
    )


# -- refusing to start -----------------------------------------------------------


@pytest.mark.parametrize(
    ("migrated", "extra", "expected"),
    [
        (False, {}, "mailqd: the database has no mailqd schema; run `mailqctl migrate`\n"),
        (True, {"MAILQD_WORKERS": "-1"}, "mailqd: config workers: must be at least 1, got -1\n"),
    ],
    ids=["unmigrated", "bad-config"],
)
def test_mailqd_refuses_to_start_with_one_line(
    daemons: DaemonPool,
    sqlite_url: str,
    migrated: bool,
    extra: dict[str, str],
    expected: str,
) -> None:
    if migrated:
        engine = make_engine(sqlite_url)
        upgrade(engine)
        engine.dispose()
    daemon = daemons.mailqd(base_env(sqlite_url, **extra))
    assert daemon.wait_exit() == 1
    assert daemon.log_text() == expected


# -- running the real daemon -----------------------------------------------------


def test_starts_the_configured_workers_and_stops_them_on_sigterm(
    daemons: DaemonPool, migrated_sqlite: str, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.settimeout(10)
        env = base_env(migrated_sqlite, MAILQD_WORKERS="3", NOTIFY_SOCKET=str(tmp_path / "notify"))
        daemon = daemons.mailqd(env)
        pids = daemon.wait_for_workers(3)
        assert next_state_change(systemd) == b"READY=1"
        assert_workers_run_then_stop_cleanly(daemon, pids)
        assert next_state_change(systemd) == b"STOPPING=1"


def next_state_change(systemd: socket.socket) -> bytes:
    """The next notification that is not a STATUS= line (those come whenever counts change)."""
    while True:
        message = systemd.recv(1000)
        if not message.startswith(b"STATUS="):
            return message


def assert_workers_run_then_stop_cleanly(daemon: DaemonProcess, pids: set[int]) -> None:
    started = wait_supervisor_event(daemon, "worker started", at_least=3)
    assert {event["pid"] for event in started} == pids
    assert all(str(event["owner"]).endswith(f":{event['pid']}") for event in started)
    wait_workers_ready(daemon, 3)

    stop_and_check_exit(daemon)
    exits = supervisor_events(daemon, "worker exited")
    assert {event["pid"] for event in exits} == pids
    assert all(event["exit_code"] == 0 for event in exits)
    assert all(process_state(pid) is None for pid in pids)


def test_ctrl_c_to_the_process_group_is_a_graceful_stop(
    daemons: DaemonPool, migrated_sqlite: str
) -> None:
    """A terminal's Ctrl-C reaches every process; workers leave the stop to the supervisor."""
    daemon = daemons.mailqd(base_env(migrated_sqlite, MAILQD_WORKERS="2"))
    daemon.wait_for_workers(2)
    wait_workers_ready(daemon, 2)
    daemon.signal_group(signal.SIGINT)
    assert daemon.wait_exit() == 0
    exits = supervisor_events(daemon, "worker exited")
    assert [event["exit_code"] for event in exits] == [0, 0]


def test_killed_worker_is_replaced_and_its_jobs_are_given_back(
    daemons: DaemonPool, db_url: str, store: Store
) -> None:
    daemon = daemons.mailqd(base_env(db_url, MAILQD_WORKERS="2"))
    pids = daemon.wait_for_workers(2)
    victim = min(pids)
    [started] = wait_supervisor_event(daemon, "worker started", pid=victim)
    owner = str(started["owner"])

    # Make the victim hold three jobs, leased for an hour: only the supervisor's
    # rescue can bring them back within this test. They are scheduled an hour
    # ahead so the live workers do not take them first.
    later = datetime.now(UTC) + timedelta(hours=1)
    with Client(db_url) as client:
        ids = [
            client.enqueue("a@example.com", f"held {n}", "x", send_after=later) for n in range(3)
        ]
    held = store.claim(owner, limit=3, lease_seconds=3600, now=later + timedelta(minutes=1))
    assert sorted(job.id for job in held) == sorted(ids)

    daemon.signal_worker(victim, signal.SIGKILL)
    daemon.wait_for(lambda: new_pool(daemon, 2, replacing={victim}), "a replacement worker")
    assert victim not in daemon.worker_pids()
    wait_supervisor_event(daemon, "worker exited", pid=victim, signal="SIGKILL")
    wait_supervisor_event(daemon, "jobs given back", owner=owner, count=3)

    def all_sent() -> bool:
        return all(store.get(job_id).status is Status.SENT for job_id in ids)

    daemon.wait_for(all_sent, "the given-back jobs to be delivered")
    for job_id in ids:
        lost = [a for a in store.attempts(job_id) if a.outcome is Outcome.LOST]
        assert [a.worker for a in lost] == [owner]
    stop_and_check_exit(daemon)


def test_sighup_reloads_the_config_file_and_keeps_the_old_one_when_invalid(
    daemons: DaemonPool, migrated_sqlite: str, tmp_path: Path
) -> None:
    config = tmp_path / "mailqd.toml"
    config.write_text("workers = 2\n")
    daemon = daemons.mailqd(base_env(migrated_sqlite), ["--config", str(config)])
    first = daemon.wait_for_workers(2)

    config.write_text("workers = 3\n")
    daemon.send(signal.SIGHUP)
    wait_supervisor_event(daemon, "configuration reloaded", workers=3)
    second = daemon.wait_for(
        lambda: new_pool(daemon, 3, replacing=first), "three new workers and none of the old"
    )

    config.write_text("workers = 0\n")
    daemon.send(signal.SIGHUP)
    [failed] = wait_supervisor_event(daemon, "reload failed; keeping the current configuration")
    assert failed["error"] == "config workers: must be at least 1, got 0"
    assert daemon.worker_pids() == second
    stop_and_check_exit(daemon)


# -- misbehaving workers (stand-ins) ---------------------------------------------


def test_crash_loop_restarts_are_spaced_with_growing_delay(
    daemons: DaemonPool, migrated_sqlite: str
) -> None:
    daemon = daemons.supervisor(
        base_env(migrated_sqlite, MAILQD_WORKERS="1"), "standin_workers:crash_at_boot"
    )
    scheduled = wait_supervisor_event(daemon, "worker restart scheduled", at_least=5)[:5]
    assert [event["delay"] for event in scheduled] == [0.1, 0.2, 0.4, 0.8, 1.6]
    assert all(event["slot"] == 0 for event in scheduled)
    # The delays are honoured: each replacement starts no sooner than announced.
    restarts = supervisor_events(daemon, "worker started")[1:5]
    for plan, start in zip(scheduled, restarts, strict=False):
        waited = logged_at(start) - logged_at(plan)
        assert waited >= timedelta(seconds=plan["delay"] - 0.005), (plan, start)
    exits = supervisor_events(daemon, "worker exited")
    assert all(event["exit_code"] == 1 for event in exits)
    stop_and_check_exit(daemon)


def test_worker_boot_error_stops_the_supervisor_with_exit_code_3(
    daemons: DaemonPool, migrated_sqlite: str
) -> None:
    daemon = daemons.supervisor(
        base_env(migrated_sqlite, MAILQD_WORKERS="2"), "standin_workers:boot_error"
    )
    assert daemon.wait_exit() == 3
    assert len(supervisor_events(daemon, "worker started")) == 2  # and no restart
    assert supervisor_events(daemon, "a worker failed to boot; stopping mailqd")
    assert supervisor_events(daemon, "worker restart scheduled") == []


def test_hung_worker_is_killed_and_replaced(daemons: DaemonPool, migrated_sqlite: str) -> None:
    env = base_env(
        migrated_sqlite,
        MAILQD_WORKERS="1",
        MAILQD_HEARTBEAT_TIMEOUT="1",
        MAILQD_SHUTDOWN_TIMEOUT="0",
    )
    daemon = daemons.supervisor(env, "standin_workers:hung", kill_grace=0.5)
    [hung] = daemon.wait_for_workers(1)
    wait_supervisor_event(daemon, "worker hung; terminating it", pid=hung)
    wait_supervisor_event(daemon, "worker did not stop in time; killing it", pid=hung)
    wait_supervisor_event(daemon, "worker exited", pid=hung, signal="SIGKILL")
    daemon.wait_for(lambda: daemon.worker_pids() - {hung}, "a replacement worker")
    stop_and_check_exit(daemon)


def test_graceful_stop_kills_a_worker_that_outlives_the_shutdown_timeout(
    daemons: DaemonPool, migrated_sqlite: str
) -> None:
    env = base_env(migrated_sqlite, MAILQD_WORKERS="2", MAILQD_SHUTDOWN_TIMEOUT="0")
    daemon = daemons.supervisor(env, "standin_workers:stubborn", kill_grace=0.5)
    daemon.wait_for_workers(2)
    daemon.wait_for_event("stand-in worker running", at_least=2)
    stop_and_check_exit(daemon, expected=0)
    killed = supervisor_events(daemon, "worker exited", signal="SIGKILL")
    assert len(killed) == 2


@pytest.mark.parametrize(
    "signals",
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM), (signal.SIGQUIT,)],
    ids=["sigterm-twice", "sigint-then-sigterm", "sigquit"],
)
def test_immediate_stop_kills_the_workers_and_exits_1(
    daemons: DaemonPool, migrated_sqlite: str, signals: tuple[signal.Signals, ...]
) -> None:
    env = base_env(migrated_sqlite, MAILQD_WORKERS="2", MAILQD_SHUTDOWN_TIMEOUT="60")
    daemon = daemons.supervisor(env, "standin_workers:stubborn", kill_grace=60)
    daemon.wait_for_workers(2)
    daemon.wait_for_event("stand-in worker running", at_least=2)
    first, *rest = signals
    daemon.send(first)
    if rest:
        # Identical signals sent back to back coalesce into one (POSIX, and
        # Python's handler flag): a "second" signal is one sent after the first
        # was handled.
        wait_supervisor_event(daemon, "stopping gracefully")
        daemon.send(rest[0])
    assert daemon.wait_exit(timeout=10) == 1
    assert supervisor_events(daemon, "stopping immediately")
    assert len(supervisor_events(daemon, "worker exited", signal="SIGKILL")) == 2
    assert daemon.worker_pids() == set()
