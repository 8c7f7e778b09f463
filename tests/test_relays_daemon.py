"""A running `mailqd` picks up relays changed in the database within seconds, without a restart.

The supervisor polls `mailqd_relays` and, on a change, reloads as SIGHUP
does: a new generation of workers with the merged relays. It unseals a
relay's password itself (an `unseal` audit row with its pid), and a relay
it cannot use is logged and left out: the daemon keeps running.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctl_process import invoke
from daemon_process import DaemonPool, DaemonProcess
from mailqd import Client
from mailqd.models import Status
from mailqd.secrets import generate_key_file
from mailqd.store import Store
from mailqd.store.relay_tables import relays as relays_table
from pg import free_port
from smtp_server import SmtpServer

pytestmark = pytest.mark.timeout(90)

PASSWORD = "Relay-S3cret-pw"
PICK_UP = 10.0
"""Seconds a daemon may take to use a changed relay (it looks every 2 s)."""


def relay_reloads(daemon: DaemonProcess) -> list[dict[str, object]]:
    return daemon.events(
        "reloading configuration", component="supervisor", reason="relays changed in the database"
    )


def test_a_relay_added_in_the_database_is_picked_up_without_a_restart(
    daemons: DaemonPool, db_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "secrets.key"
    generate_key_file(key_file)
    env = {
        "MAILQD_DATABASE_URL": db_url,
        "MAILQD_SMTP_URL": "null://",
        "MAILQD_SECRETS_KEY_FILE": str(key_file),
        "MAILQD_WORKERS": "1",
    }
    daemon = daemons.mailqd(env)
    [first] = daemon.wait_for_workers(1)
    daemon.wait_for_event("worker started", component="supervisor")
    assert relay_reloads(daemon) == []  # nothing changed: no reload

    added = invoke(
        "relays", "add", "backup", "smtp://app@127.0.0.1:2525", "--password-stdin",
        db=db_url, env=env, input=PASSWORD + "\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    daemon.wait_for(lambda: relay_reloads(daemon), "a reload for the new relay", PICK_UP)
    daemon.wait_for_event("configuration reloaded", component="supervisor", timeout=PICK_UP)
    daemon.wait_for(lambda: first not in daemon.worker_pids(), "the old worker replaced")
    daemon.wait_for_workers(1)

    store = Store.from_url(db_url)
    try:
        [unsealed] = [e for e in store.audit.entries() if e.command == "unseal"]
        assert unsealed.target == "backup" and unsealed.os_user
        assert json.loads(unsealed.detail or "{}")["pid"] == daemon.pid

        # A relay the daemon cannot use (here a URL no mailqctl would write) is left out.
        with store.engine.begin() as conn:
            conn.execute(relays_table.insert().values(name="broken", url="smtp://[nope"))
        daemon.wait_for_event(
            "a relay in the database cannot be used; left out",
            component="supervisor",
            relay="broken",
            timeout=PICK_UP,
        )
        daemon.wait_for_event("configuration reloaded", at_least=2, timeout=PICK_UP)
        daemon.wait_for_workers(1)
        assert daemon.returncode is None
    finally:
        store.close()
    assert PASSWORD not in daemon.log_text()
    daemon.send(15)
    assert daemon.wait_exit() == 0


def test_a_daemon_whose_relay_is_down_delivers_through_a_relay_added_in_the_database(
    daemons: DaemonPool, db_url: str
) -> None:
    closed = f"smtp://127.0.0.1:{free_port()}?starttls=off&timeout=2"
    env = {
        "MAILQD_DATABASE_URL": db_url,
        "MAILQD_SMTP_URL": closed,
        "MAILQD_WORKERS": "1",
        "MAILQD_POLL_INTERVAL": "0.2",
        "MAILQD_MAX_ATTEMPTS": "1",
    }
    with SmtpServer() as smtp, Client(db_url) as client:
        daemon = daemons.mailqd(env)
        daemon.wait_for_workers(1)
        job_id = client.enqueue("someone@example.com", "through the new relay", "body")
        store = Store.from_url(db_url)
        try:
            daemon.wait_for(
                lambda: any(
                    s.relay == "relay1" and s.failures for s in store.relay_health.states()
                ),
                "the config's relay to fail",
            )
            added = invoke(
                "relays", "add", "working", smtp.url(starttls="off"), "--position", "0",
                db=db_url, env=env,
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            [message] = smtp.wait_for_messages(1, timeout=PICK_UP + 10)
            assert list(message.rcpt_tos) == ["someone@example.com"]
            daemon.wait_for(lambda: store.get(job_id).status is Status.SENT, "the job sent")
            assert store.get(job_id).attempts <= 1  # the relay outage used no attempt
        finally:
            store.close()
        daemon.send(15)
        assert daemon.wait_exit() == 0
