"""mailqd under systemd: the notify protocol on a real socket, and the unit files.

The daemon runs as a subprocess with `NOTIFY_SOCKET` pointing at a datagram
socket this test binds, as systemd does for `Type=notify` units, and
`WATCHDOG_USEC` as `WatchdogSec=` sets it. The unit files are checked with
`systemd-analyze verify` (skipped where systemd-analyze is missing, except
in CI, which installs it).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_process import DaemonPool
from external_tools import require_tool
from mailqd import Client
from mailqd.cli.daemon import _watchdog_seconds
from mailqd.store import upgrade
from mailqd.store.engine import make_engine

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
INSTALL_PREFIX = "/opt/mailqd/bin/"
STATUS = re.compile(r"^STATUS=(\d+) workers?, (\d+) sent, (\d+) failed, queue depth (\d+)$")


class NotifySocket:
    """A bound NOTIFY_SOCKET that records every datagram, in order, from a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(data.decode())

    def states(self) -> list[str]:
        """Every message but STATUS= and WATCHDOG=1: the lifecycle, in order."""
        return [m for m in self.messages if not m.startswith(("STATUS=", "WATCHDOG="))]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify")
    yield listener
    listener.close()


@pytest.fixture
def migrated_sqlite(sqlite_url: str) -> str:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    return sqlite_url


def test_notify_ready_status_watchdog_reloading_and_stopping(
    daemons: DaemonPool, migrated_sqlite: str, notify_socket: NotifySocket
) -> None:
    daemon = daemons.mailqd(
        {
            "MAILQD_DATABASE_URL": migrated_sqlite,
            "MAILQD_SMTP_URL": "null://",
            "MAILQD_WORKERS": "3",
            "MAILQD_POLL_INTERVAL": "0.1",
            "NOTIFY_SOCKET": str(notify_socket.path),
            "WATCHDOG_USEC": "1000000",  # WatchdogSec=1: a ping every half second
        }
    )
    daemon.wait_for(lambda: notify_socket.states() == ["READY=1"], "READY=1")
    assert len(daemon.worker_pids()) == 3, "READY=1 comes once the workers run"
    with Client(migrated_sqlite) as client:
        client.enqueue_many([{"to": "a@example.com", "subject": "s", "body": "b"}] * 5)

    def status_after_delivery() -> str | None:
        statuses = [m for m in notify_socket.messages if m.startswith("STATUS=")]
        latest = STATUS.match(statuses[-1]) if statuses else None
        return statuses[-1] if latest and latest[2] == "5" and latest[4] == "0" else None

    last = daemon.wait_for(status_after_delivery, "STATUS= showing the 5 messages sent")
    assert last == "STATUS=3 workers, 5 sent, 0 failed, queue depth 0"
    assert all(STATUS.match(m) for m in notify_socket.messages if m.startswith("STATUS="))
    daemon.wait_for(lambda: notify_socket.messages.count("WATCHDOG=1") >= 3, "three watchdog pings")

    daemon.send(signal.SIGHUP)
    daemon.wait_for(
        lambda: notify_socket.states() == ["READY=1", "RELOADING=1", "READY=1"],
        "RELOADING=1 then READY=1",
    )
    daemon.send(signal.SIGTERM)
    assert daemon.wait_exit() == 0
    daemon.wait_for(
        lambda: notify_socket.states() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"],
        "STOPPING=1 last",
        may_exit=True,
    )


def test_watchdog_interval_is_taken_only_for_this_process() -> None:
    me = str(os.getpid())
    assert _watchdog_seconds({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert _watchdog_seconds({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": me}) == 2.0
    assert _watchdog_seconds({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert _watchdog_seconds({"WATCHDOG_USEC": "0"}) is None
    assert _watchdog_seconds({}) is None


# -- the unit files ------------------------------------------------------------------


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify`, with no warning at all.

    verify checks that ExecStart= programs exist, so the copies checked point
    at this virtualenv's scripts instead of the documented /opt/mailqd.
    """
    analyze = require_tool("systemd-analyze")
    scripts = Path(sys.executable).parent
    units = sorted(UNITS.iterdir())
    assert {u.name for u in units} == {
        "mailqd.service",
        "mailqd-cleanup.service",
        "mailqd-cleanup.timer",
    }
    for unit in units:
        text = unit.read_text()
        (tmp_path / unit.name).write_text(text.replace(INSTALL_PREFIX, f"{scripts}/"))
    result = subprocess.run(
        [analyze, "verify", *(u.name for u in units)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_daemon_unit_is_notify_hardened_and_keeps_secrets_out() -> None:
    service = (UNITS / "mailqd.service").read_text()
    settings = dict(
        line.split("=", 1) for line in service.splitlines() if "=" in line and line[0] != "#"
    )
    assert settings["Type"] == "notify"
    assert settings["KillMode"] == "mixed"
    assert settings["User"] == "mailqd"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
    }.items():
        assert settings[key] == value, key
    assert settings["EnvironmentFile"].startswith("-/etc/mailqd/")
    assert not re.search(r"^Environment=.*MAILQD_(DATABASE|SMTP)_URL", service, re.MULTILINE)
    timer = (UNITS / "mailqd-cleanup.timer").read_text()
    assert "OnCalendar=daily" in timer
    cleanup = (UNITS / "mailqd-cleanup.service").read_text()
    assert f"ExecStart={INSTALL_PREFIX}mailqctl cleanup --days " in cleanup
