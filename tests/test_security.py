"""Secrets: where the SMTP password comes from, and that no secret or message ever gets out.

The password sources are checked as units (they are configuration). The
leak checks run the real `mailqd` and `mailqctl` against a real database
and a real SMTP server with AUTH, and grep everything they print.
"""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
import structlog
from sqlalchemy.engine import make_url

from ctl_process import error_line, mailqctl
from daemon_process import MAILQD, DaemonPool, daemon_env
from mailqd import Client
from mailqd.config import Settings, load_settings
from mailqd.credentials import redact_url, smtp_password
from mailqd.errors import ConfigError
from mailqd.logging import configure_logging
from mailqd.models import Status
from mailqd.store import Store
from mailqd.transport import SmtpTransport, transport_from_settings
from pg import free_port
from smtp_server import SmtpServer

pytestmark = pytest.mark.timeout(90)

PASSWORD = "Pw-7c1e!never-printed"
DB_PASSWORD = "Db-5e0a!never-printed"
BODY = "BODY-TEXT-c41d9e"
ADDRESSES = ("dora.private@example.com", "erik.private@example.net", "fay.retry@example.org")
TLS_WARNING = "TLS certificate verification is off"


def settings_from(env: Mapping[str, str]) -> Settings:
    return load_settings(env=dict(env))


def resolved_password(env: Mapping[str, str], process_env: Mapping[str, str] = {}) -> str | None:
    settings = settings_from(env)
    transport = transport_from_settings(settings, smtp_password(settings, process_env))
    assert isinstance(transport, SmtpTransport)
    return transport.settings.password


# -- where the password comes from ----------------------------------------------------------


def test_the_password_comes_from_the_url_the_environment_a_file_or_systemd(
    tmp_path: Path,
) -> None:
    password_file = tmp_path / "smtp_password"
    password_file.write_text(f"{PASSWORD}\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "smtp_password").write_text(PASSWORD)
    user_only = {"MAILQD_SMTP_URL": "smtp://mailer@mail.example.com"}

    assert resolved_password({"MAILQD_SMTP_URL": "smtp://mailer:p%2Fw@mail.example.com"}) == "p/w"
    assert resolved_password({**user_only, "MAILQD_SMTP_PASSWORD": PASSWORD}) == PASSWORD
    file_env = {**user_only, "MAILQD_SMTP_PASSWORD_FILE": str(password_file)}
    assert resolved_password(file_env) == PASSWORD  # one trailing newline dropped
    systemd = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert resolved_password(user_only, systemd) == PASSWORD
    # The systemd credential is the fallback: an explicit source wins without a conflict.
    explicit = {**user_only, "MAILQD_SMTP_PASSWORD": "other-password"}
    assert resolved_password(explicit, systemd) == "other-password"
    # No user and no password: no AUTH, whatever the credentials directory holds.
    assert resolved_password({"MAILQD_SMTP_URL": "smtp://mail.example.com"}, {}) is None


@pytest.mark.parametrize(
    ("env", "key", "problem"),
    [
        (
            {"MAILQD_SMTP_URL": f"smtp://u:{PASSWORD}@h", "MAILQD_SMTP_PASSWORD": PASSWORD},
            "smtp_password",
            "the SMTP password is set twice, here and in smtp_url",
        ),
        (
            {"MAILQD_SMTP_PASSWORD": PASSWORD, "MAILQD_SMTP_PASSWORD_FILE": "/etc/mailqd/pw"},
            "smtp_password_file",
            "the SMTP password is set twice, here and in smtp_password",
        ),
    ],
)
def test_two_passwords_are_refused_naming_both(env: dict[str, str], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from(env)
    assert (caught.value.key, caught.value.problem) == (key, problem + "; keep only one")
    assert PASSWORD not in str(caught.value)


def test_bad_password_sources_name_the_key_never_the_content(tmp_path: Path) -> None:
    user_only = {"MAILQD_SMTP_URL": "smtp://mailer@mail.example.com"}
    empty = tmp_path / "empty"
    empty.write_text("\n")
    two_lines = tmp_path / "two-lines"
    two_lines.write_text(f"{PASSWORD}\n{PASSWORD}\n")
    cases = {
        str(tmp_path / "missing"): "cannot read the password file",
        str(tmp_path): "cannot read the password file",  # a directory
        str(empty): "is empty",
        str(two_lines): "holds more than one line",
    }
    for path, problem in cases.items():
        settings = settings_from({**user_only, "MAILQD_SMTP_PASSWORD_FILE": path})
        with pytest.raises(ConfigError, match=problem) as caught:
            transport_from_settings(settings)
        assert caught.value.key == "smtp_password_file"
        assert PASSWORD not in str(caught.value)

    no_user = settings_from({"MAILQD_SMTP_URL": "smtp://h", "MAILQD_SMTP_PASSWORD": PASSWORD})
    with pytest.raises(ConfigError, match="smtp_url has no user name") as caught:
        transport_from_settings(no_user)
    assert caught.value.key == "smtp_password"
    with pytest.raises(ConfigError, match="a user name is given without a password") as caught:
        transport_from_settings(settings_from(user_only), None)
    assert PASSWORD not in str(caught.value)


def test_a_secret_given_as_a_number_is_not_echoed(tmp_path: Path) -> None:
    config = tmp_path / "mailqd.toml"
    config.write_text("smtp_password = 73519246\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, env={})
    assert str(caught.value) == "config smtp_password: must be a string"


def test_settings_repr_shows_no_secret(tmp_path: Path) -> None:
    settings = settings_from(
        {
            "MAILQD_DATABASE_URL": f"postgresql://app:{DB_PASSWORD}@db/mail",
            "MAILQD_SMTP_URL": f"smtp://mailer:{PASSWORD}@mail.example.com",
        }
    )
    with_env = settings_from(
        {"MAILQD_SMTP_URL": "smtp://mailer@h", "MAILQD_SMTP_PASSWORD": PASSWORD}
    )
    for text in (repr(settings), str(settings), repr(with_env), f"{with_env}"):
        assert PASSWORD not in text and DB_PASSWORD not in text
    assert "database_url='postgresql://app:***@db/mail'" in repr(settings)
    assert "smtp_url='smtp://mailer:***@mail.example.com'" in repr(settings)
    assert redact_url(f"smtp://mailer:{PASSWORD}@h?tls_verify=false") == (
        "smtp://mailer:***@h?tls_verify=false"
    )


ESCAPED_PASSWORD = 'Pw"quo\\te-Straße!never'
"""A password both renderers escape: a quote, a backslash, a non-ASCII letter."""


@pytest.mark.parametrize("log_format", ["json", "console"])
@pytest.mark.parametrize("password", [PASSWORD, ESCAPED_PASSWORD], ids=["plain", "escaped"])
def test_logs_hide_a_secret_whoever_puts_it_in_a_line(password: str, log_format: str) -> None:
    """Also a password that the JSON or console renderer escapes (quote, backslash, ß)."""
    pipe = io.StringIO()
    settings = Settings(
        database_url=f"postgresql://app:{DB_PASSWORD}@db/mail",
        smtp_url="smtp://mailer@mail.example.com",
        smtp_password=password,
        log_format=log_format,
    )
    configure_logging(settings, stream=pipe)
    structlog.get_logger().error("careless", detail=f"login {password} to db {DB_PASSWORD}")
    logging.getLogger("sqlalchemy.pool").error("connect with %s failed", DB_PASSWORD)
    try:
        raise RuntimeError(f"driver says {password}")
    except RuntimeError:
        structlog.get_logger().exception("crashed")
    text = pipe.getvalue()
    for secret in (password, DB_PASSWORD):
        for printed in (secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]):
            assert printed not in text
    if log_format == "json":
        records = [json.loads(line) for line in text.splitlines()]
        assert records[0]["detail"] == "login *** to db ***"
        assert records[1]["event"] == "connect with *** failed"
        assert "driver says ***" in records[2]["exception"]
    else:
        assert "login *** to db ***" in text and "driver says ***" in text


# -- the real programs, grepped -------------------------------------------------------------


def run_mailqd(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAILQD), *args], env=daemon_env(env), capture_output=True, text=True, timeout=30
    )


def assert_nothing_secret(text: str) -> None:
    for secret in (PASSWORD, DB_PASSWORD, BODY, *ADDRESSES):
        assert secret not in text, f"{secret!r} appears in:\n{text}"


def test_a_daemon_run_with_a_systemd_credential_leaks_nothing_and_warns_once_about_tls(
    daemons: DaemonPool, pg_url: str, tmp_path: Path
) -> None:
    dora, erik, fay = ADDRESSES
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "smtp_password").write_text(f"{PASSWORD}\n")
    # The tables' owner, with a password: the test server trusts local logins, so it connects.
    db_url = make_url(pg_url).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    with SmtpServer(auth=("mailer", PASSWORD)) as smtp:
        smtp.rcpt_replies[erik] = f"550 5.1.1 <{erik}>: no such user"
        smtp.data_replies.append(f"451 4.3.0 {fay} greylisted")
        with Client(db_url) as client:
            ids = [
                client.enqueue(f"Fay <{fay}>", "retried", f"{BODY} 1"),
                client.enqueue(dora, "sent", f"{BODY} 2", cc=erik),
                client.enqueue(erik, "bounced", f"{BODY} 3"),
            ]
        env = {
            "MAILQD_DATABASE_URL": db_url,
            # tls_verify=false: the server speaks no TLS here; only the warning is checked.
            "MAILQD_SMTP_URL": f"smtp://mailer@{smtp.host}:{smtp.port}"
            "?starttls=off&tls_verify=false",
            "CREDENTIALS_DIRECTORY": str(credentials),
            "MAILQD_WORKERS": "2",
            "MAILQD_CONCURRENCY": "1",
            "MAILQD_BACKOFF_BASE": "0.2",
            "MAILQD_POLL_INTERVAL": "0.1",
            "MAILQD_LOG_LEVEL": "debug",
        }
        checked = run_mailqd(env, "--check-config")
        daemon = daemons.mailqd(env)
        store = Store.from_url(db_url)
        try:
            daemon.wait_for(
                lambda: (
                    [store.get(i).status for i in ids] == [Status.SENT, Status.SENT, Status.FAILED]
                ),
                "two sent, one bounced",
            )
        finally:
            store.close()
        daemon.send(signal.SIGTERM)
        assert daemon.wait_exit() == 0
        assert smtp.logins and set(smtp.logins) == {"mailer"}

    assert checked.returncode == 0, checked.stderr
    assert ":***@" in checked.stdout
    assert "smtp smtp://mailer@127.0.0.1:" in checked.stdout
    assert "(password from credential smtp_password)" in checked.stdout
    assert_nothing_secret(checked.stdout + checked.stderr)

    log = daemon.log_text()
    assert_nothing_secret(log)
    [warning] = [r for r in daemon.events() if TLS_WARNING in str(r.get("event"))]
    assert (warning["level"], warning["component"]) == ("warning", "supervisor")
    assert warning["smtp"].startswith("smtp://mailer@127.0.0.1:")
    attempts = daemon.events("delivery attempt")
    assert {(r["outcome"], r["smtp_code"]) for r in attempts} >= {("retry", 451), ("failed", 550)}


def test_error_paths_print_no_secret(tmp_path: Path, pg_url: str) -> None:
    unreachable = f"postgresql://app:{DB_PASSWORD}@127.0.0.1:{free_port()}/mail"
    smtp = f"smtp://mailer:{PASSWORD}@127.0.0.1:25"
    outputs = []
    # The database is down at start: the daemon and --check-config say so in one line.
    for args in ((), ("--check-config",)):
        result = run_mailqd({"MAILQD_DATABASE_URL": unreachable, "MAILQD_SMTP_URL": smtp}, *args)
        assert result.returncode == 1
        assert result.stderr.startswith("mailqd: database unavailable: "), result.stderr
        outputs.append(result.stdout + result.stderr)
    # Bad configurations that involve the secrets.
    bad = [
        {"MAILQD_SMTP_URL": smtp, "MAILQD_SMTP_PASSWORD": PASSWORD},
        {"MAILQD_SMTP_URL": f"smtp://mailer:{PASSWORD}@host/oops"},
        {"MAILQD_SMTP_URL": "smtp://h", "MAILQD_SMTP_PASSWORD": PASSWORD},
        {"MAILQD_SMTP_URL": "smtp://m@h", "MAILQD_SMTP_PASSWORD_FILE": str(tmp_path / "none")},
        {"MAILQD_DATABASE_URL": f"mysql://app:{DB_PASSWORD}@db/mail"},
    ]
    for env in bad:
        result = run_mailqd({"MAILQD_DATABASE_URL": pg_url, **env}, "--check-config")
        assert result.returncode == 1, result
        assert result.stderr.startswith("mailqd: config "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        outputs.append(result.stdout + result.stderr)
    # mailqctl, database down.
    line = error_line(mailqctl("stats", db=unreachable))
    assert line.startswith("mailqctl: database unavailable: "), line
    outputs.append(line)
    assert_nothing_secret("\n".join(outputs))
