"""`mailqd --check-config --probe`: what each relay offers, found without sending mail.

Against real servers: aiosmtpd (tests/smtp_server.py) configured with
STARTTLS, AUTH, SIZE and PIPELINING, and the raw-socket relay
(tests/scripted_relay.py), which records every command line, to show that
the probe's session is EHLO, AUTH, QUIT and never MAIL. The command runs
as a subprocess with a TOML config, the way an operator runs it.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_process import MAILQD, daemon_env
from mailqd.store import upgrade
from mailqd.store.engine import make_engine
from mailqd.transport.probe import ProbeReport, probe
from mailqd.transport.url import parse_smtp_url
from pg import free_port
from scripted_relay import Script, ScriptedRelay
from smtp_server import SmtpServer, make_self_signed_certificate, server_tls_context

pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = "app", "s3cret-Relay-pw"
NOT_USED = "451 4.3.0 the probe must never send MAIL"


@pytest.fixture
def database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'mailqd.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def relay(certificate: tuple[Path, Path]) -> Iterator[SmtpServer]:
    """aiosmtpd with STARTTLS, AUTH (LOGIN, PLAIN), SIZE and PIPELINING; MAIL would be refused."""
    with SmtpServer(starttls_context=server_tls_context(*certificate), auth=(USER, PASSWORD)) as s:
        s.mail_replies.append(NOT_USED)
        yield s


def check_config(
    database: str, config: str | None = None, tmp_path: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    args = [str(MAILQD), "--check-config", "--probe"]
    if config is not None:
        assert tmp_path is not None
        path = tmp_path / "mailqd.toml"
        path.write_text(config)
        args += ["--config", str(path)]
    return subprocess.run(
        args,
        env=daemon_env({"MAILQD_DATABASE_URL": database, **env}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def relay_lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Each `relay NAME ...` line of stdout, by relay name."""
    lines = [line for line in result.stdout.splitlines() if line.startswith("relay ")]
    return {line.split()[1]: line for line in lines}


def assert_nothing_sent(server: SmtpServer) -> None:
    assert list(server.mail_replies) == [NOT_USED]  # no MAIL FROM reached the server
    assert server.messages == [] and server.data_received == 0


def test_probe_says_what_a_relay_offers_and_that_auth_works(
    relay: SmtpServer, database: str, tmp_path: Path
) -> None:
    (tmp_path / "relay.pw").write_text(PASSWORD + "\n")
    config = f"""
        [relays.primary]
        url = "smtp://{USER}@127.0.0.1:{relay.port}?tls_verify=false"
        password_file = "{tmp_path / "relay.pw"}"
        [relays.dev]
        url = "maildir://{tmp_path / "mail"}"
        [relays.sink]
        url = "null://"
    """
    result = check_config(database, config, tmp_path)

    assert result.returncode == 0, result
    assert result.stdout.startswith("mailqd: configuration OK")
    lines = relay_lines(result)
    assert list(lines) == ["primary", "dev", "sink"]
    primary = lines["primary"]
    assert primary.startswith(f"relay primary smtp://{USER}:***@127.0.0.1:{relay.port}")
    assert "ok (TLS by STARTTLS, AUTH ok)" in primary
    offers = primary.partition("; offers ")[2].split(", ")
    assert offers == [
        "STARTTLS",
        "AUTH LOGIN PLAIN",
        "PIPELINING",
        "SIZE 33554432",  # aiosmtpd's default data_size_limit
        "8BITMIME",
        "SMTPUTF8",
    ]
    assert lines["dev"].endswith(f"maildir://{tmp_path / 'mail'}: local, nothing to probe")
    assert lines["sink"] == "relay sink null://: local, nothing to probe"
    assert PASSWORD not in result.stdout + result.stderr
    assert relay.logins == [USER]  # logged in once, over TLS
    assert_nothing_sent(relay)


def test_a_closed_port_fails_the_check_naming_the_relay_and_why(database: str) -> None:
    port = free_port()
    result = check_config(database, MAILQD_SMTP_URL=f"smtp://127.0.0.1:{port}")

    assert result.returncode == 1, result
    line = relay_lines(result)["relay1"]
    assert line.startswith(f"relay relay1 smtp://127.0.0.1:{port}: FAILED, cannot be reached")
    assert "connect failed" in line
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("mailqd: probe failed, on the default route: relay relay1 ")
    assert "cannot be reached" in result.stderr


def test_a_wrong_password_fails_the_check_without_showing_either_password(
    relay: SmtpServer, database: str, tmp_path: Path
) -> None:
    wrong = "Wr0ng-Secret-pw"
    config = f"""
        [relays.primary]
        url = "smtp://{USER}@127.0.0.1:{relay.port}?tls_verify=false"
        password = "{wrong}"
    """
    result = check_config(database, config, tmp_path)

    assert result.returncode == 1, result
    line = relay_lines(result)["primary"]
    assert "FAILED, refuses AUTH: " in line and "535" in line
    assert "; offers STARTTLS, AUTH LOGIN PLAIN" in line  # what it offered before refusing
    assert (
        result.stderr == "mailqd: probe failed, on the default route: relay primary refuses AUTH\n"
    )
    assert wrong not in result.stdout + result.stderr
    assert relay.logins == []
    assert_nothing_sent(relay)


def test_a_failing_relay_off_the_default_route_is_shown_but_passes(
    relay: SmtpServer, database: str, tmp_path: Path
) -> None:
    config = f"""
        [relays.primary]
        url = "smtp://127.0.0.1:{relay.port}?starttls=off"
        [relays.partner]
        url = "smtp://127.0.0.1:{relay.port}?starttls=required"
        [[routes]]
        recipient_domains = ["partner.example"]
        relays = ["partner"]
        [[routes]]
        relays = ["primary"]
    """
    result = check_config(database, config, tmp_path)

    assert result.returncode == 0, result
    lines = relay_lines(result)
    assert ": ok (no TLS); offers STARTTLS, AUTH" in lines["primary"]
    # The certificate is self-signed and verified: TLS fails, and says how to proceed.
    assert "FAILED (not on the default route), TLS failed: " in lines["partner"]
    assert "tls_verify=false" in lines["partner"]
    assert result.stderr == ""
    assert_nothing_sent(relay)


def test_probe_needs_check_config(database: str) -> None:
    result = subprocess.run(
        [str(MAILQD), "--probe"],
        env=daemon_env({"MAILQD_DATABASE_URL": database}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--probe goes with --check-config" in result.stderr


# -- the session, command by command --------------------------------------------


def run_probe(url: str) -> ProbeReport:
    return asyncio.run(asyncio.wait_for(probe(parse_smtp_url(url, timeout=5)), 10))


async def probe_scripted(script: Script, userinfo: str) -> tuple[ProbeReport, list[str], bool]:
    async with ScriptedRelay(script) as relay:
        report = await probe(parse_smtp_url(relay.url(userinfo), timeout=5))
        [connection] = relay.connections
        await asyncio.wait_for(connection.hung_up.wait(), 5)
        return report, connection.verbs, connection.quit


def test_the_probe_session_is_ehlo_auth_quit_and_never_mail() -> None:
    report, verbs, quit = asyncio.run(probe_scripted(Script(auth="PLAIN"), f"{USER}:{PASSWORD}"))
    assert verbs == ["EHLO", "AUTH", "QUIT"] and quit
    assert report.ok and report.logged_in is True
    assert (report.encryption, report.size, report.auth_mechanisms) == (None, 1000000, ("PLAIN",))


def test_a_refused_login_is_one_auth_then_quit() -> None:
    script = Script(auth="LOGIN", replies={"AUTH": b"535 5.7.8 bad credentials\r\n"})
    report, verbs, quit = asyncio.run(probe_scripted(script, f"{USER}:{PASSWORD}"))
    assert verbs == ["EHLO", "AUTH", "QUIT"] and quit  # one AUTH exchange, no second mechanism
    assert (report.ok, report.reason, report.logged_in) == (False, "auth", False)
    assert report.error is not None and "535 5.7.8 bad credentials" in report.error
    assert PASSWORD not in report.error and PASSWORD not in report.url


def test_without_a_user_no_auth_is_tried() -> None:
    report, verbs, quit = asyncio.run(probe_scripted(Script(auth="PLAIN"), ""))
    assert verbs == ["EHLO", "QUIT"] and quit
    assert report.ok and report.logged_in is None and report.auth_mechanisms == ("PLAIN",)


def test_starttls_required_but_not_offered_is_a_tls_failure() -> None:
    with SmtpServer() as plain:
        report = run_probe(plain.url(starttls="required"))
        assert (report.ok, report.reason, report.starttls) == (False, "tls", False)
        assert report.error is not None and "does not offer STARTTLS" in report.error
        assert report.greeted and report.pipelining  # what it did offer is still reported
        assert plain.messages == []


def test_implicit_tls_is_reported(certificate: tuple[Path, Path]) -> None:
    with SmtpServer(implicit_tls_context=server_tls_context(*certificate)) as server:
        report = run_probe(server.url("smtps", tls_verify="false"))
    assert report.ok and report.encryption == "implicit TLS" and not report.starttls


def test_a_relay_that_never_greets_is_a_timeout() -> None:
    async def scenario() -> ProbeReport:
        hung_up = asyncio.Event()

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # says nothing; returns when the client gives up
            hung_up.set()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            report = await probe(parse_smtp_url(f"smtp://127.0.0.1:{port}?timeout=0.5"))
            await asyncio.wait_for(hung_up.wait(), 5)  # the probe closed its connection
        return report

    report = asyncio.run(scenario())
    assert (report.ok, report.reason, report.greeted) == (False, "timeout", False)
