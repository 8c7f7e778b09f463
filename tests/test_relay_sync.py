"""The daemon's side of the database relays (`mailqd.daemon.relay_sync`), on both databases.

Reading unseals each password and leaves an `unseal` audit row naming
this process; a row that cannot be used is left out, never an error; the
merge puts database relays where docs/configuration.md says; `RelaySync`
keeps a relay's previous settings when its row turns bad, and sees each
change once.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mailqd.config import load_settings, relay_plan
from mailqd.daemon.relay_sync import (
    DatabaseRelay,
    RelaySync,
    database_relays,
    settings_with_database_relays,
)
from mailqd.routes import RelaySpec
from mailqd.secrets import SecretBox, generate_key_file, load_secret_box
from mailqd.store import Store
from mailqd.store.relay_tables import relays as relays_table

pytestmark = pytest.mark.timeout(60)

PASSWORD = "Relay-S3cret-pw"
LATER = datetime(2999, 1, 1, tzinfo=UTC)


@pytest.fixture
def box(tmp_path: Path) -> SecretBox:
    path = tmp_path / "secrets.key"
    generate_key_file(path)
    loaded = load_secret_box(path)
    assert loaded is not None
    return loaded


def spec(name: str, position: int = 0, domains: tuple[str, ...] = ()) -> DatabaseRelay:
    return DatabaseRelay(RelaySpec(name, "null://", source="database"), position, domains)


def test_reading_unseals_each_password_once_and_audits_it(store: Store, box: SecretBox) -> None:
    registry = store.relay_registry
    registry.add("primary", "smtp://app@127.0.0.1:2525", password=PASSWORD, box=box)
    registry.add("eu", "smtp://127.0.0.1:2526", recipient_domains=["example.de"], rate_limit=3)

    found = {relay.name: relay for relay in database_relays(store, box)}

    assert found["primary"].spec.password == PASSWORD
    assert found["primary"].spec.source == "database"
    assert found["eu"].recipient_domains == ("example.de",)
    assert found["eu"].spec.rate_limit == 3.0
    unsealed = [e for e in store.audit.entries() if e.command == "unseal"]
    assert [e.target for e in unsealed] == ["primary"]  # eu has no password to unseal
    detail = json.loads(unsealed[0].detail or "{}")
    assert detail == {
        "process": "mailqd supervisor",
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    assert unsealed[0].os_user


def test_a_row_that_cannot_be_used_is_left_out_and_logged(
    store: Store, box: SecretBox, tmp_path: Path
) -> None:
    other_key = tmp_path / "other.key"
    generate_key_file(other_key)
    other_box = load_secret_box(other_key)
    store.relay_registry.add("good", "null://")
    store.relay_registry.add("other-key", "smtp://app@127.0.0.1", password=PASSWORD, box=other_box)
    with store.engine.begin() as conn:  # as plain SQL (or an older mailqctl) could write it
        conn.execute(relays_table.insert().values(name="bad-url", url="ftp://somewhere"))

    with capture_logs() as logs:
        found = database_relays(store, box)

    assert [relay.name for relay in found] == ["good"]
    left_out = {e["relay"]: e["error"] for e in logs if e["event"].startswith("a relay in the")}
    assert set(left_out) == {"other-key", "bad-url"}
    assert "cannot decrypt" in left_out["other-key"]
    assert PASSWORD not in repr(logs)
    assert [e for e in store.audit.entries() if e.command == "unseal"] == []


def test_the_merge_puts_domain_routes_first_and_the_rest_after_the_config_relays() -> None:
    settings = load_settings(env={"MAILQD_SMTP_URL": "smtp://127.0.0.1:2525 smtp://127.0.0.1:2526"})
    merged = settings_with_database_relays(
        settings,
        [
            spec("late", position=5),
            spec("early", position=1),
            spec("eu-b", position=3, domains=("example.de",)),
            spec("eu-a", position=2, domains=("example.de",)),
            spec("relay1", position=0),  # named like a config relay: the config's wins
        ],
    )
    plan = relay_plan(merged)
    assert list(plan.relays) == ["relay1", "relay2", "early", "eu-a", "eu-b", "late"]
    assert plan.relays["relay1"].url == "smtp://127.0.0.1:2525"
    assert [route.relays for route in plan.routes] == [
        ("eu-a", "eu-b"),
        ("relay1", "relay2", "early", "late"),
    ]
    assert plan.route_for("someone@example.de", "app@example.com").relays == ("eu-a", "eu-b")
    assert plan.route_for("someone@example.org", "app@example.com") is plan.default_route
    assert settings_with_database_relays(settings, []) is settings


def test_the_merge_keeps_the_config_routes_before_the_database_ones(tmp_path: Path) -> None:
    config = tmp_path / "mailqd.toml"
    config.write_text(
        '[relays.primary]\nurl = "smtp://127.0.0.1:2525"\n'
        '[relays.gmail]\nurl = "smtp://127.0.0.1:2526"\n'
        '[[routes]]\nrecipient_domains = ["gmail.com"]\nrelays = ["gmail", "primary"]\n'
        '[[routes]]\nrelays = ["primary"]\n'
    )
    settings = load_settings(config, env={})
    merged = settings_with_database_relays(
        settings, [spec("backup"), spec("de", domains=("*.de",))]
    )
    assert [(r.recipient_domains, r.relays) for r in relay_plan(merged).routes] == [
        (("gmail.com",), ("gmail", "primary")),
        (("*.de",), ("de",)),
        ((), ("primary", "backup")),
    ]
    assert [r.source for r in merged.relays] == ["config", "config", "database", "database"]


def test_sync_sees_each_change_once_and_keeps_a_relay_that_turns_bad(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "sync.key"
    generate_key_file(key_file)
    sync_box = load_secret_box(key_file)
    settings = load_settings(
        env={
            "MAILQD_DATABASE_URL": db_url,
            "MAILQD_SMTP_URL": "null://",
            "MAILQD_SECRETS_KEY_FILE": str(key_file),
        }
    )
    sync = RelaySync(Store.from_url, interval=0.0)
    try:
        assert sync.merged(settings) is settings  # no database relays: the settings as they are
        assert not sync.changed(db_url)

        store.relay_registry.add(
            "backup", "smtp://app@127.0.0.1:2525", password=PASSWORD, box=sync_box
        )
        assert sync.changed(db_url)
        assert not sync.changed(db_url)  # one change, seen once
        merged = sync.merged(settings)
        assert [r.name for r in merged.relays] == ["relay1", "backup"]
        assert merged.relays[1].password == PASSWORD
        assert [r.name for r in sync.merged(merged).relays] == ["relay1", "backup"]  # not twice

        with store.engine.begin() as conn:
            conn.execute(relays_table.update().values(url="smtp://app@[broken", updated_at=LATER))
        assert sync.changed(db_url)
        with capture_logs() as logs:
            kept = sync.merged(settings)
        assert kept.relays[1].url == "smtp://app@127.0.0.1:2525"
        assert any(e["event"] == "keeping the relay's previous settings" for e in logs)

        store.relay_registry.remove("backup")
        assert sync.changed(db_url)
        assert sync.merged(settings) is settings
    finally:
        sync.close()


def test_a_relay_naming_only_a_user_logs_in_with_the_daemons_smtp_password(
    store: Store, db_url: str
) -> None:
    with store.engine.begin() as conn:  # no password of its own (mailqctl would ask for one)
        conn.execute(relays_table.insert().values(name="shared", url="smtp://app@127.0.0.1:2525"))
    base = {"MAILQD_DATABASE_URL": db_url, "MAILQD_SMTP_URL": "null://"}
    for env, expected in (
        ({**base, "MAILQD_SMTP_PASSWORD": PASSWORD}, ["relay1", "shared"]),
        (base, []),  # nothing to log in with: left out, not a failed reload
    ):
        sync = RelaySync(Store.from_url)
        try:
            merged = sync.merged(load_settings(env=env))
            assert [r.name for r in merged.relays] == expected
        finally:
            sync.close()
