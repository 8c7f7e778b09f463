"""The runtime is built once from the settings, at start and on SIGHUP (`mailqd.runtime`).

Workers inherit the supervisor's runtime across fork: a key file deleted or
replaced after start changes nothing until SIGHUP, a worker started after
that (a replacement for one that died) still opens secrets and signs; a
reload with a new key takes effect; a reload whose key file is bad keeps
the runtime that works. `Client` reads no environment; `from_env` does.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from daemon_process import DaemonPool, DaemonProcess
from mailqd import Client
from mailqd.client import AsyncClient
from mailqd.config import Settings
from mailqd.errors import ConfigError
from mailqd.models import Status
from mailqd.runtime import Runtime
from mailqd.secrets import generate_key_file, is_sealed
from mailqd.store import Store
from test_dkim import write_key
from test_supervisor import base_env, migrated_sqlite

__all__ = ["migrated_sqlite"]

DEADLINE = 30.0
TEMPLATE = "Code {{ code }}"


def _env(database_url: str, key_file: Path, dkim_key: Path) -> dict[str, str]:
    return base_env(
        database_url,
        MAILQD_WORKERS="1",
        MAILQD_POLL_INTERVAL="0.1",
        MAILQD_SECRETS_KEY_FILE=str(key_file),
        MAILQD_DKIM_DOMAIN="example.com",
        MAILQD_DKIM_SELECTOR="s1",
        MAILQD_DKIM_KEY_FILE=str(dkim_key),
        MAILQD_LOG_FORMAT="json",
    )


def _enqueue_sealed(database_url: str, key_file: Path) -> str:
    with Client(database_url, secrets_key_file=str(key_file)) as client:
        if not any(t.id == "code" for t in client.list_templates()):
            client.add_template("code", TEMPLATE, text=TEMPLATE)
        return client.enqueue("a@example.com", "", template_id="code", variables={"code": "1"})


def _wait_sent(daemon: DaemonProcess, store: Store, job_id: str) -> None:
    daemon.wait_for(lambda: store.get(job_id).status is Status.SENT, f"{job_id} sent", DEADLINE)


def _replace_worker(daemon: DaemonProcess) -> int:
    """SIGKILL the one worker and wait for its replacement, forked from the supervisor."""
    [old] = daemon.wait_for_workers(1)
    daemon.signal_worker(old, signal.SIGKILL)
    [new] = daemon.wait_for(
        lambda: (pids := daemon.worker_pids()) and old not in pids and pids, "a new worker"
    )
    return new


@pytest.mark.timeout(120)
def test_workers_keep_the_runtime_built_at_start_after_the_key_files_are_gone(
    daemons: DaemonPool, migrated_sqlite: str, tmp_path: Path
) -> None:
    key_file, dkim_key = tmp_path / "secrets.key", write_key(tmp_path / "dkim.pem")
    generate_key_file(key_file)
    store = Store.from_url(migrated_sqlite)
    try:
        daemon = daemons.mailqd(_env(migrated_sqlite, key_file, dkim_key))
        _wait_sent(daemon, store, _enqueue_sealed(migrated_sqlite, key_file))
        client_key = tmp_path / "client.key"  # the application keeps its own copy
        client_key.write_bytes(key_file.read_bytes())
        key_file.unlink()
        dkim_key.unlink()
        _replace_worker(daemon)  # a worker started now reads neither file...
        job_id = _enqueue_sealed(migrated_sqlite, client_key)  # ...and this job is only its
        _wait_sent(daemon, store, job_id)
        assert store.get(job_id).attempts == 1
        assert not daemon.events("worker cannot start")
    finally:
        store.close()


@pytest.mark.timeout(120)
def test_sighup_builds_a_new_runtime_and_a_bad_reload_keeps_the_old_one(
    daemons: DaemonPool, migrated_sqlite: str, tmp_path: Path
) -> None:
    old_key, dkim_key = tmp_path / "old.key", write_key(tmp_path / "dkim.pem")
    generate_key_file(old_key)
    key_file = tmp_path / "secrets.key"
    key_file.write_bytes(old_key.read_bytes())
    store = Store.from_url(migrated_sqlite)
    try:
        daemon = daemons.mailqd(_env(migrated_sqlite, key_file, dkim_key))
        _wait_sent(daemon, store, _enqueue_sealed(migrated_sqlite, old_key))

        new_key = tmp_path / "new.key"
        generate_key_file(new_key)
        key_file.write_bytes(new_key.read_bytes())
        [old_worker] = daemon.wait_for_workers(1)
        daemon.send(signal.SIGHUP)
        daemon.wait_for_event("configuration reloaded")
        # The old generation finishes what it holds and may still claim until it
        # stops; the new key's mail is for the new generation only.
        daemon.wait_for(lambda: old_worker not in daemon.worker_pids(), "the old worker gone")
        _wait_sent(daemon, store, _enqueue_sealed(migrated_sqlite, new_key))

        key_file.write_text("not a key\n")  # a bad reload: logged, the new key stays
        daemon.send(signal.SIGHUP)
        daemon.wait_for_event("reload failed; keeping the current configuration")
        _replace_worker(daemon)
        job_id = _enqueue_sealed(migrated_sqlite, new_key)
        _wait_sent(daemon, store, job_id)
        assert len(daemon.events("configuration reloaded")) == 1
    finally:
        store.close()


def test_runtime_build_reads_the_files_once_and_names_a_bad_key(tmp_path: Path) -> None:
    key_file = tmp_path / "secrets.key"
    generate_key_file(key_file)
    runtime = Runtime.build(Settings(smtp_url="null://", secrets_key_file=str(key_file)))
    key_file.unlink()
    sealed = runtime.secrets.seal({"a": 1}) if runtime.secrets else None
    assert sealed is not None and runtime.secrets is not None
    assert runtime.secrets.open(sealed) == {"a": 1}
    make = runtime.transport_factories()["relay1"]
    assert make() is not make()
    with pytest.raises(ConfigError, match="secrets_key_file"):
        Runtime.build(Settings(secrets_key_file=str(key_file)))
    with pytest.raises(ConfigError, match="smtp_url"):
        Runtime.build(Settings(smtp_url="smtp://"))
    assert Runtime.build(Settings(smtp_url="smtp://"), transport=False).relay_factories is None


# -- Client: the key file explicitly, or the environment through from_env ----------------


def test_client_constructor_reads_no_environment(
    migrated_sqlite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "secrets.key"
    generate_key_file(key_file)
    monkeypatch.setenv("MAILQD_SECRETS_KEY_FILE", str(key_file))
    store = Store.from_url(migrated_sqlite)
    try:
        with Client(migrated_sqlite) as client:
            plain = client.enqueue("a@example.com", "s", "b", variables={"code": "1"})
        monkeypatch.setenv("MAILQD_DATABASE_URL", migrated_sqlite)
        with Client.from_env() as client:
            sealed = client.enqueue("a@example.com", "s", "b", variables={"code": "1"})
        assert store.get(plain).variables == {"code": "1"}
        assert is_sealed(store.get(sealed).variables)
    finally:
        store.close()


def test_from_env_needs_the_database_url_and_takes_an_explicit_mapping(
    migrated_sqlite: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"^database_url: MAILQD_DATABASE_URL is not set$"):
        Client.from_env({})
    missing = tmp_path / "missing.key"
    with pytest.raises(ConfigError, match="secrets_key_file"):
        Client.from_env(
            {"MAILQD_DATABASE_URL": migrated_sqlite, "MAILQD_SECRETS_KEY_FILE": str(missing)}
        )
    key_file = tmp_path / "secrets.key"
    generate_key_file(key_file)
    env = {"MAILQD_DATABASE_URL": migrated_sqlite, "MAILQD_SECRETS_KEY_FILE": str(key_file)}

    async def scenario() -> str:
        async with AsyncClient.from_env(env) as client:
            return await client.enqueue("a@example.com", "s", "b", variables={"code": "1"})

    job_id = asyncio.run(scenario())
    store = Store.from_url(migrated_sqlite)
    try:
        assert is_sealed(store.get(job_id).variables)
    finally:
        store.close()
    assert os.environ.get("MAILQD_DATABASE_URL") != migrated_sqlite
