"""Transports: URL parsing, and SMTP behaviour against a real (scripted) aiosmtpd server."""

from __future__ import annotations

import asyncio
import email.policy
import socket
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from email.parser import BytesParser
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailqd.compose import OutgoingMessage, compose
from mailqd.errors import (
    AmbiguousDeliveryError,
    ConfigError,
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from mailqd.models import Job, Status
from mailqd.transport import (
    MaildirTransport,
    NullTransport,
    SendResult,
    SmtpTransport,
    StartTLS,
    Transport,
    redact_url,
    transport_from_url,
)
from mailqd.transport.url import parse_smtp_url
from smtp_server import (
    DROP,
    HANG,
    SmtpServer,
    make_self_signed_certificate,
    server_tls_context,
)

T = TypeVar("T")


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def smtp_server(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """The scripted server, offering PIPELINING or not: every dialogue test runs both ways."""
    with SmtpServer(pipelining=request.param) as server:
        yield server


PASSWORD = "s3cr3t-Pa55"
TEST_DEADLINE = 30.0  # no scenario comes near this; it only stops a hang


def run(coroutine: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, TEST_DEADLINE)

    return asyncio.run(bounded())


def smtp(url: str, **options: Any) -> SmtpTransport:
    transport = transport_from_url(url, local_hostname="client.test", **options)
    assert isinstance(transport, SmtpTransport)
    return transport


def message(
    *recipients: str, sender: str = "sender@example.com", body: bytes = b"Hello\r\n"
) -> OutgoingMessage:
    recipients = recipients or ("rcpt@example.com",)
    data = b"From: sender@example.com\r\nSubject: test\r\n\r\n" + body
    return OutgoingMessage(sender, recipients, data, "<id@example.com>")


async def sending(transport: Transport, *messages: OutgoingMessage) -> list[SendResult]:
    """Send each message in turn, then close the transport."""
    try:
        return [await transport.send(outgoing) for outgoing in messages]
    finally:
        await transport.close()


async def refused(transport: Transport, error: type[DeliveryError]) -> DeliveryError:
    """Send one message, expecting `error`; close the transport; return the error."""
    try:
        with pytest.raises(error) as caught:
            await transport.send(message())
        return caught.value
    finally:
        await transport.close()


def send_each(transport: Transport, *messages: OutgoingMessage) -> list[SendResult]:
    return run(sending(transport, *messages))


def send_expecting(transport: Transport, error: type[DeliveryError]) -> DeliveryError:
    return run(refused(transport, error))


def make_job(**fields: Any) -> Job:
    now = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
    values: dict[str, Any] = dict.fromkeys(
        ["html", "template_id", "variables", "cc", "bcc", "reply_to", "from_address",
         "headers", "max_attempts", "last_error", "expires_at", "idempotency_key",
         "lease_owner", "lease_expires_at", "message_id", "sent_at"]
    )  # fmt: skip
    values.update(
        id="2f1d7c9a-0000-4000-8000-000000000001",
        recipient_to="Jörg Müller <joerg@example.de>",
        subject="Grüße",
        body="Hallo Jörg,\nbis bald.\n",
        status=Status.SENDING,
        priority=0,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    values.update(fields)
    return Job(**values)


# --- URLs -------------------------------------------------------------------------------


def test_plain_smtp_url_defaults() -> None:
    settings = parse_smtp_url("smtp://mail.example.com")

    assert (settings.host, settings.port) == ("mail.example.com", 25)
    assert settings.implicit_tls is False
    assert settings.starttls is StartTLS.OPPORTUNISTIC
    assert settings.tls_verify is True
    assert settings.username is None
    assert settings.password is None
    assert settings.timeouts.connect == settings.timeouts.data == 30.0


def test_smtp_url_with_credentials_and_options() -> None:
    settings = parse_smtp_url(
        "smtp://me%40example.com:p%2F%3F%23%40ss@Mail.Example.com:587"
        "?starttls=required&tls_verify=false&timeout=7.5",
        data_timeout=120,
    )

    assert (settings.host, settings.port) == ("mail.example.com", 587)
    assert settings.username == "me@example.com"
    assert settings.password == "p/?#@ss"
    assert settings.starttls is StartTLS.REQUIRED
    assert settings.tls_verify is False
    assert (settings.timeouts.connect, settings.timeouts.command) == (7.5, 7.5)
    assert settings.timeouts.data == 120


def test_colon_in_password_needs_no_escaping() -> None:
    assert parse_smtp_url("smtp://u:a:b@host").password == "a:b"


def test_smtps_url_means_implicit_tls_on_port_465() -> None:
    settings = parse_smtp_url("smtps://user:pw@smtp.example.com")

    assert (settings.port, settings.implicit_tls) == (465, True)


def test_maildir_and_null_urls(tmp_path: Path) -> None:
    maildir = transport_from_url(f"maildir://{tmp_path}/mail")

    assert isinstance(maildir, MaildirTransport)
    assert maildir.path == tmp_path / "mail"
    assert isinstance(transport_from_url("null://"), NullTransport)


def test_repr_and_redaction_never_show_the_password() -> None:
    transport = transport_from_url(f"smtp://me:{PASSWORD}@mail.example.com:587?starttls=required")

    assert PASSWORD not in repr(transport)
    assert "me:***@mail.example.com:587" in repr(transport)
    assert PASSWORD not in repr(parse_smtp_url(f"smtp://me:{PASSWORD}@h"))
    assert redact_url(f"smtp://me:{PASSWORD}@h:25") == "smtp://me:***@h:25"
    assert redact_url("smtp://me:pa/ss?x#y@h:25") == "smtp://me:***@h:25"
    assert redact_url("smtp://h:25") == "smtp://h:25"


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mail.example.com:25",
        f"ftp://u:{PASSWORD}@host",
        f"smtp://u:{PASSWORD}@",
        f"smtp://u:{PASSWORD}@host:abc",
        f"smtp://u:{PASSWORD}@host:0",
        f"smtp://u:{PASSWORD}@host:70000",
        "smtp://u:s3cr3t/Pa55@host",  # unescaped "/" ends the authority inside the password
        "smtp://u:s3cr3t?Pa55@host",
        "smtp://u:s3cr3t#Pa55@host",
        "smtp://u:s3cr3t@Pa55@host:x",
        f"smtp://u:{PASSWORD}@host/path",
        f"smtp://u:{PASSWORD}@host?verify=no",
        f"smtp://u:{PASSWORD}@host?starttls=maybe",
        f"smtp://u:{PASSWORD}@host?tls_verify=perhaps",
        f"smtp://u:{PASSWORD}@host?timeout=-1",
        f"smtp://u:{PASSWORD}@host?timeout=soon",
        f"smtp://u:{PASSWORD}@host?timeout=1&timeout=2",
        f"smtps://u:{PASSWORD}@host?starttls=required",
        "smtp://user@host",
        f"smtp://:{PASSWORD}@host",
        f"smtp://u:{PASSWORD}@[::1",
        "maildir://host/path",
        "maildir://",
        "null://something",
    ],
)
def test_bad_urls_raise_config_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        transport_from_url(url)

    error = caught.value
    assert error.key == "smtp_url"
    for secret in (PASSWORD, "s3cr3t", "Pa55"):
        assert secret not in str(error)
        assert secret not in repr(error)
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None


# --- SMTP: delivery -----------------------------------------------------------------------


def test_composed_message_round_trips_over_smtp(smtp_server: SmtpServer) -> None:
    job = make_job(cc="carol@example.net", bcc="Hidden <hidden@example.org>")
    outgoing = compose(job, default_from="Mailer <noreply@example.com>")

    [result] = send_each(smtp(smtp_server.url()), outgoing)

    assert result.smtp_code == 250
    assert result.refused == {}
    [received] = smtp_server.wait_for_messages(1)
    assert received.mail_from == "noreply@example.com"
    assert received.rcpt_tos == ("joerg@example.de", "carol@example.net", "hidden@example.org")
    assert received.data == outgoing.data
    parsed = received.parsed()
    assert parsed["Subject"] == "Grüße"
    assert parsed["To"].addresses[0].display_name == "Jörg Müller"
    assert parsed["Bcc"] is None
    assert parsed["Message-ID"] == f"<{job.id}@example.com>"
    assert parsed.get_content().replace("\r\n", "\n") == "Hallo Jörg,\nbis bald.\n"


def test_lines_starting_with_a_dot_survive_dot_stuffing(smtp_server: SmtpServer) -> None:
    body = b".\r\n..two\r\n.three\r\nbare\nlf"
    send_each(smtp(smtp_server.url()), message(body=body))

    [received] = smtp_server.wait_for_messages(1)
    assert received.data.endswith(b"\r\n\r\n.\r\n..two\r\n.three\r\nbare\r\nlf\r\n")


def test_one_connection_is_reused_for_many_messages(smtp_server: SmtpServer) -> None:
    count = 5
    results = send_each(smtp(smtp_server.url()), *(message() for _ in range(count)))

    assert [result.smtp_code for result in results] == [250] * count
    received = smtp_server.wait_for_messages(count)
    assert smtp_server.connections == 1
    assert {item.connection for item in received} == {1}


def test_reconnects_after_the_server_closed_the_connection(smtp_server: SmtpServer) -> None:
    transport = smtp(smtp_server.url())

    async def scenario() -> None:
        await transport.send(message())
        smtp_server.drop_connections()
        await transport.send(message())
        await transport.close()

    run(scenario())
    received = smtp_server.wait_for_messages(2)
    assert smtp_server.connections == 2
    assert [item.connection for item in received] == [1, 2]


def test_421_on_a_reused_connection_is_retried_on_a_fresh_one(smtp_server: SmtpServer) -> None:
    transport = smtp(smtp_server.url())

    async def scenario() -> None:
        await transport.send(message())
        smtp_server.mail_replies.append("421 4.4.2 idle too long, closing")
        await transport.send(message())
        await transport.close()

    run(scenario())
    assert [item.connection for item in smtp_server.wait_for_messages(2)] == [1, 2]


def test_421_on_a_fresh_connection_is_transient(smtp_server: SmtpServer) -> None:
    smtp_server.mail_replies.append("421 4.3.2 system not accepting network messages")

    error = send_expecting(smtp(smtp_server.url()), TransientDeliveryError)

    assert error.smtp_code == 421
    assert smtp_server.connections == 1


def test_transport_recovers_after_a_failure(smtp_server: SmtpServer) -> None:
    transport = smtp(smtp_server.url())
    smtp_server.data_replies.append("451 4.3.0 try again later")

    async def scenario() -> SendResult:
        with pytest.raises(TransientDeliveryError):
            await transport.send(message())
        assert not transport.is_connected
        result = await transport.send(message())
        await transport.close()
        return result

    assert run(scenario()).smtp_code == 250
    assert smtp_server.connections == 2
    assert len(smtp_server.wait_for_messages(1)) == 1


# --- SMTP: error classification ----------------------------------------------------------


def test_451_at_end_of_data_is_transient_with_its_code(smtp_server: SmtpServer) -> None:
    smtp_server.data_replies.append("451 4.3.0 mailbox temporarily unavailable")

    error = send_expecting(smtp(smtp_server.url()), TransientDeliveryError)

    assert not isinstance(error, AmbiguousDeliveryError)
    assert error.smtp_code == 451
    assert error.smtp_text is not None and "temporarily unavailable" in error.smtp_text


def test_550_at_end_of_data_is_permanent_with_its_code(smtp_server: SmtpServer) -> None:
    smtp_server.data_replies.append("550 5.7.1 message content rejected")

    error = send_expecting(smtp(smtp_server.url()), PermanentDeliveryError)

    assert error.smtp_code == 550
    assert smtp_server.messages == []


def test_550_to_mail_from_is_permanent(smtp_server: SmtpServer) -> None:
    smtp_server.mail_replies.append("550 5.7.1 sender rejected")

    assert send_expecting(smtp(smtp_server.url()), PermanentDeliveryError).smtp_code == 550


def test_some_recipients_refused_is_a_partial_success(smtp_server: SmtpServer) -> None:
    smtp_server.rcpt_replies["nobody@example.com"] = "550 5.1.1 no such user"
    smtp_server.rcpt_replies["full@example.com"] = "452 4.2.2 mailbox full"
    outgoing = message("ok@example.com", "nobody@example.com", "full@example.com")

    [result] = send_each(smtp(smtp_server.url()), outgoing)

    assert result.smtp_code == 250
    assert result.refused == {
        "nobody@example.com": (550, "5.1.1 no such user"),
        "full@example.com": (452, "4.2.2 mailbox full"),
    }
    [received] = smtp_server.wait_for_messages(1)
    assert received.rcpt_tos == ("ok@example.com",)


def test_all_recipients_refused_permanently_is_permanent(smtp_server: SmtpServer) -> None:
    smtp_server.rcpt_replies["rcpt@example.com"] = "550 5.1.1 no such user"

    error = send_expecting(smtp(smtp_server.url()), PermanentDeliveryError)

    assert error.smtp_code == 550
    assert smtp_server.messages == []


def test_all_recipients_refused_some_temporarily_is_transient(smtp_server: SmtpServer) -> None:
    smtp_server.rcpt_replies["a@example.com"] = "550 5.1.1 no such user"
    smtp_server.rcpt_replies["b@example.com"] = "451 4.7.1 greylisted"

    async def scenario() -> DeliveryError:
        transport = smtp(smtp_server.url())
        with pytest.raises(TransientDeliveryError) as caught:
            await transport.send(message("a@example.com", "b@example.com"))
        await transport.close()
        return caught.value

    error = run(scenario())
    assert error.smtp_code == 451


def test_server_down_is_transient() -> None:
    with socket.socket() as reserved:  # bound but not listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        error = send_expecting(smtp(f"smtp://127.0.0.1:{port}"), TransientDeliveryError)

    assert error.smtp_code is None
    assert "connect" in str(error)


def test_no_reply_to_end_of_data_is_ambiguous(smtp_server: SmtpServer) -> None:
    smtp_server.data_replies.append(HANG)
    transport = smtp(smtp_server.url(), data_timeout=0.5)

    error = send_expecting(transport, AmbiguousDeliveryError)

    assert isinstance(error, TransientDeliveryError)  # retried, like any transient failure
    assert error.smtp_code is None
    assert "end of DATA" in str(error)
    assert not transport.is_connected


def test_connection_dropped_after_data_is_ambiguous(smtp_server: SmtpServer) -> None:
    smtp_server.data_replies.append(DROP)

    send_expecting(smtp(smtp_server.url()), AmbiguousDeliveryError)


def test_connection_dropped_before_data_is_transient_not_ambiguous(
    smtp_server: SmtpServer,
) -> None:
    smtp_server.mail_replies.append(DROP)

    error = send_expecting(smtp(smtp_server.url()), TransientDeliveryError)

    assert not isinstance(error, AmbiguousDeliveryError)


def test_no_reply_to_mail_from_is_transient_not_ambiguous(smtp_server: SmtpServer) -> None:
    smtp_server.mail_replies.append(HANG)

    # The short timeout covers every command, but only MAIL FROM goes unanswered;
    # 2 s leaves the greeting and EHLO ample time on a loaded machine.
    error = send_expecting(smtp(smtp_server.url(), timeout=2.0), TransientDeliveryError)

    assert not isinstance(error, AmbiguousDeliveryError)
    assert "MAIL FROM" in str(error)


def test_cancelled_send_drops_the_connection(smtp_server: SmtpServer) -> None:
    """A shutdown may cancel a send mid-DATA; the connection state is then unknown."""
    smtp_server.data_replies.append(HANG)
    transport = smtp(smtp_server.url())

    async def scenario() -> SendResult:
        sending = asyncio.create_task(transport.send(message()))
        await asyncio.to_thread(smtp_server.wait_for, lambda: smtp_server.data_received == 1)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert not transport.is_connected
        result = await transport.send(message())
        await transport.close()
        return result

    assert run(scenario()).smtp_code == 250
    assert smtp_server.connections == 2


# --- SMTP: TLS and AUTH --------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def starttls_server(certificate: tuple[Path, Path]) -> Iterator[SmtpServer]:
    with SmtpServer(starttls_context=server_tls_context(*certificate)) as server:
        yield server


def test_starttls_required_without_server_support_is_transient(smtp_server: SmtpServer) -> None:
    error = send_expecting(smtp(smtp_server.url(starttls="required")), TransientDeliveryError)

    assert "STARTTLS" in str(error)
    assert smtp_server.messages == []


def test_starttls_is_used_when_offered(starttls_server: SmtpServer) -> None:
    send_each(smtp(starttls_server.url(tls_verify="false")), message())

    [received] = starttls_server.wait_for_messages(1)
    assert received.tls is True


def test_starttls_off_sends_in_the_clear(starttls_server: SmtpServer) -> None:
    send_each(smtp(starttls_server.url(starttls="off")), message())

    assert starttls_server.wait_for_messages(1)[0].tls is False


def test_untrusted_certificate_is_refused_when_verifying(starttls_server: SmtpServer) -> None:
    error = send_expecting(smtp(starttls_server.url()), TransientDeliveryError)

    assert "certificate" in str(error).lower()
    assert starttls_server.messages == []


def test_smtps_uses_implicit_tls(certificate: tuple[Path, Path]) -> None:
    with SmtpServer(implicit_tls_context=server_tls_context(*certificate)) as server:
        send_each(smtp(server.url("smtps", tls_verify="false")), message())

        assert server.wait_for_messages(1)[0].tls is True


def test_auth_logs_in_with_percent_decoded_credentials(starttls_server: SmtpServer) -> None:
    with SmtpServer(auth=("me@example.com", "p/ss:w@rd")) as server:
        send_each(smtp(server.url(user="me@example.com:p/ss:w@rd", starttls="off")), message())

        assert server.logins == ["me@example.com"]
        assert len(server.wait_for_messages(1)) == 1


def test_wrong_password_is_transient_and_not_disclosed() -> None:
    with SmtpServer(auth=("me", "right")) as server:
        url = server.url(user=f"me:{PASSWORD}", starttls="off")
        error = send_expecting(smtp(url), TransientDeliveryError)

    assert error.smtp_code == 535
    assert PASSWORD not in str(error)
    assert "AUTH" in str(error)


def test_password_is_not_sent_over_an_unencrypted_connection_by_default() -> None:
    with SmtpServer(auth=("me", PASSWORD)) as server:
        error = send_expecting(smtp(server.url(user=f"me:{PASSWORD}")), TransientDeliveryError)

        assert "unencrypted" in str(error)
        assert server.logins == []


def test_auth_over_starttls(certificate: tuple[Path, Path]) -> None:
    context = server_tls_context(*certificate)
    with SmtpServer(starttls_context=context, auth=("me", PASSWORD)) as server:
        send_each(smtp(server.url(user=f"me:{PASSWORD}", tls_verify="false")), message())

        assert server.logins == ["me"]
        assert server.wait_for_messages(1)[0].tls is True


# --- maildir and null ----------------------------------------------------------------------


def test_maildir_writes_a_parseable_file_into_new(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    outgoing = compose(make_job(), default_from="noreply@example.com")

    result, _ = send_each(transport_from_url(f"maildir://{root}"), outgoing, outgoing)

    assert result.smtp_code == 250
    assert sorted(path.name for path in root.iterdir()) == ["cur", "new", "tmp"]
    assert list((root / "tmp").iterdir()) == []
    files = sorted((root / "new").iterdir())
    assert len(files) == 2
    parsed = BytesParser(policy=email.policy.default).parsebytes(files[0].read_bytes())
    assert parsed["Subject"] == "Grüße"
    assert parsed["Message-ID"] == outgoing.message_id


def test_maildir_that_cannot_be_written_is_transient(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")

    send_expecting(transport_from_url(f"maildir://{blocker}/mail"), TransientDeliveryError)


def test_null_transport_discards(tmp_path: Path) -> None:
    [result] = send_each(transport_from_url("null://"), message())

    assert result == SendResult(smtp_code=250, smtp_text="discarded", refused={})


def test_every_transport_satisfies_the_protocol(tmp_path: Path) -> None:
    transports: list[Callable[[], Transport]] = [
        lambda: transport_from_url("smtp://localhost"),
        lambda: transport_from_url(f"maildir://{tmp_path}"),
        lambda: transport_from_url("null://"),
    ]
    for make in transports:
        assert isinstance(make(), Transport)


# --- pipelining (RFC 2920) ----------------------------------------------------------------


class _StrictPipeliningServer:
    """A bare SMTP server on a socket that answers MAIL, RCPT and DATA only once all
    three have arrived, all replies in one write: a client that waits for MAIL's reply
    before sending RCPT waits forever, and one that reads a single reply per packet
    loses the rest. Offers PIPELINING only when asked to.
    """

    def __init__(self, offer: bool, ok: bytes = b"250 OK") -> None:
        self.offer = offer
        self.ok = ok + b"\r\n"  # the reply to MAIL and each RCPT
        self.batches: list[list[bytes]] = []  # the envelope commands answered together
        self.contents: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 strict.test ESMTP\r\n")
        pending: list[bytes] = []
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                offer = b"250-PIPELINING\r\n" if self.offer else b""
                writer.write(b"250-strict.test\r\n" + offer + b"250 SIZE 1000000\r\n")
            elif verb in (b"MAIL", b"RCPT"):
                pending.append(line)
                if not self.offer:
                    writer.write(self.ok)
            elif verb == b"DATA":
                pending.append(line)
                replies = self.ok * (len(pending) - 1) if self.offer else b""
                writer.write(replies + b"354 go ahead\r\n")
                self.batches.append(pending)
                self.contents.append(await reader.readuntil(b"\r\n.\r\n"))
                writer.write(b"250 2.0.0 queued\r\n")
                pending = []
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            await writer.drain()
        writer.close()

    def run(self, scenario: Callable[[str], Awaitable[T]]) -> T:
        async def serve() -> T:
            server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            async with server:
                return await scenario(f"smtp://127.0.0.1:{port}?starttls=off")

        return run(serve())


def test_mail_rcpt_and_data_go_out_together_and_replies_that_arrive_together_are_all_read() -> None:
    server = _StrictPipeliningServer(offer=True)
    outgoing = [message("a@example.com", "b@example.com"), message("c@example.com")]

    results = server.run(lambda url: sending(smtp(url), *outgoing))

    assert [(r.smtp_code, r.refused) for r in results] == [(250, {}), (250, {})]
    assert [len(batch) for batch in server.batches] == [4, 3]  # MAIL, RCPT…, DATA at once
    assert server.batches[0][1:] == [
        b"RCPT TO:<a@example.com>\r\n",
        b"RCPT TO:<b@example.com>\r\n",
        b"DATA\r\n",
    ]
    assert all(content.endswith(b"Hello\r\n.\r\n") for content in server.contents)


def test_many_recipients_replies_arriving_together_are_not_taken_for_one_long_reply() -> None:
    """400 RCPT replies of 100 bytes arrive in one write: 40 KB, more than the reader's
    8 KB limit for one reply (MAX_REPLY_BYTES), which applies to each reply awaited,
    not to the lot."""
    server = _StrictPipeliningServer(offer=True, ok=b"250 2.1.5 " + b"x" * 90)
    recipients = [f"r{n}@example.com" for n in range(400)]

    [result] = server.run(lambda url: sending(smtp(url), message(*recipients)))
    assert (result.smtp_code, result.refused) == (250, {})
    assert len(server.batches[0]) == 402


def test_without_pipelining_offered_each_command_waits_for_its_reply() -> None:
    server = _StrictPipeliningServer(offer=False)

    [result] = server.run(lambda url: sending(smtp(url), message()))
    assert result.smtp_code == 250
    assert [len(batch) for batch in server.batches] == [3]


def test_pipelining_false_in_the_url_sends_one_command_at_a_time() -> None:
    """For a server that offers PIPELINING and handles it badly.

    The strict server withholds MAIL's reply until DATA arrives: a client
    talking one command at a time waits for it, and times out.
    """
    assert parse_smtp_url("smtp://mx.test").pipelining is True
    settings = parse_smtp_url("smtp://mx.test?pipelining=false")
    assert settings.pipelining is False
    assert settings.redacted_url() == "smtp://mx.test:25?pipelining=false"
    server = _StrictPipeliningServer(offer=True)

    one_by_one = "&pipelining=false&timeout=0.5"
    error = server.run(lambda url: refused(smtp(url + one_by_one), TransientDeliveryError))
    assert "MAIL FROM failed: timed out" in str(error)
    assert server.batches == []


# --- what mailqd relies on in aiosmtplib (pinned in pyproject.toml) -----------------------


def test_aiosmtplib_contract_the_public_members_the_transport_uses() -> None:
    """The transport uses aiosmtplib for set-up only, through these public members; the
    reply reader then takes the connection over from `SMTP.transport`. A release that
    changes them fails here, not in production (the pin is the tested major)."""
    import inspect

    import aiosmtplib

    for name in ("connect", "ehlo", "helo", "starttls", "login", "supports_extension"):
        assert callable(getattr(aiosmtplib.SMTP, name)), name
    assert callable(aiosmtplib.SMTP.get_transport_info) and callable(aiosmtplib.SMTP.close)
    parameters = inspect.signature(aiosmtplib.SMTP).parameters
    for name in ("hostname", "port", "use_tls", "start_tls", "validate_certs", "timeout",
                 "local_hostname"):  # fmt: skip
        assert name in parameters, name
    error = aiosmtplib.SMTPResponseException(535, "no")
    assert (error.code, error.message) == (535, "no")
    assert issubclass(aiosmtplib.SMTPHeloError, aiosmtplib.SMTPResponseException)

    async def transport_after_set_up(url: str) -> tuple[bool, bool]:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=int(url.rsplit(":", 1)[1]))
        client.timeout = 5.0
        await client.connect(start_tls=False)
        live = client.transport is not None and not client.transport.is_closing()
        settable = callable(getattr(client.transport, "set_protocol", None))
        client.close()
        return live, settable

    with SmtpServer() as server:
        url = server.url().split("?")[0]
        assert run(transport_after_set_up(url)) == (True, True)
