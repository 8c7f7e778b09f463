"""Configuration: one typed object from defaults, TOML, environment and flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailqd.config import Settings, key_names, load_settings
from mailqd.errors import ConfigError


def test_defaults_need_nothing_installed() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.database_url.startswith("sqlite:///")
    assert settings.metrics_listen.startswith("127.0.0.1:")
    assert (settings.workers, settings.max_attempts) == (3, 3)
    assert (settings.backoff_base, settings.backoff_factor) == (60.0, 2.0)


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "mailqd.toml"
    path.write_text('[mailqd]\nworkers = 5\nfrom = "shop@example.com"\nrate_limit = 10\n')
    env = {"MAILQD_WORKERS": "7", "MAILQD_LOG_FORMAT": "json"}
    settings = load_settings(path, env=env, overrides={"workers": 2, "database_url": None})
    assert settings.workers == 2
    assert settings.from_address == "shop@example.com"
    assert (settings.rate_limit, settings.log_format) == (10.0, "json")
    assert load_settings(path, env=env).workers == 7
    assert load_settings(env={"MAILQD_CONFIG": str(path)}).workers == 5


def test_every_key_is_settable_from_the_environment() -> None:
    for key in key_names():
        assert f"MAILQD_{key.upper()}"
    assert "from" in key_names() and "database_url" in key_names()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAILQD_WORKERS": "many"}, "config workers: must be a whole number, got 'many'"),
        ({"MAILQD_WORKERS": "0"}, "config workers: must be at least 1"),
        ({"MAILQD_LOG_FORMAT": "xml"}, "config log_format: must be one of auto, json, console"),
        ({"MAILQD_METRICS_LISTEN": "9000"}, "config metrics_listen: must be HOST:PORT"),
        ({"MAILQD_DATABASE_URL": "mysql://x/y"}, "config database_url: 'mysql' is not supported"),
        ({"MAILQD_BACKOFF_BASE": "-1"}, "config backoff_base: must be at least 0"),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_unknown_or_broken_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("workers = 3\nwrokers = 4\n")
    with pytest.raises(ConfigError, match="config wrokers: unknown key"):
        load_settings(path, env={})
    path.write_text("workers = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(path, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})
