"""The Django email backend, in a real Django project (tests/django_project) on PostgreSQL.

Mail goes through `django.core.mail` (`send_mail`, `EmailMultiAlternatives`,
`send_mass_mail`, `mail_admins`) into the queue, and an in-process mailqd
`Worker` delivers it to the aiosmtpd test server: what arrives is what the
Django application built. The project's database is one PostgreSQL
database of this run, migrated for mailqd; each test starts with an empty
queue. Django's test runner is not used.

Tests marked `needs_attachments` run once the client takes attachments
(`Client.enqueue(..., attachments=...)`, branches attachstore and
attachcompose); until then they are skipped with that reason.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.mime.image import MIMEImage
from email.mime.text import MIMEText

import django
import pytest
from django.core import mail
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.test import override_settings

from mailqd import Attachment, Client
from mailqd.config import Settings
from mailqd.contrib.django import EmailBackend
from mailqd.contrib.django.messages import enqueue_arguments
from mailqd.daemon.worker import Worker
from mailqd.errors import InvalidAddressError, MailqError, SchemaError, ValidationError
from mailqd.models import Job
from mailqd.store import Store, upgrade
from mailqd.store.engine import make_engine
from mailqd.transport import Transport, transport_from_url
from pg import MakeDatabase
from smtp_server import ReceivedMessage, SmtpServer, smtp_server_fixture

__all__ = ["smtp_server_fixture"]

DEADLINE = 15.0
SENDER = "Shop <shop@example.com>"  # the project's DEFAULT_FROM_EMAIL
CLIENT_TAKES_ATTACHMENTS = "attachments" in inspect.signature(Client.enqueue).parameters
needs_attachments = pytest.mark.skipif(
    not CLIENT_TAKES_ATTACHMENTS,
    reason="Client.enqueue takes no attachments yet (branches attachstore, attachcompose)",
)


@pytest.fixture(scope="session")
def django_database(make_pg_database: MakeDatabase, pg_template: str) -> str:
    """The Django project's database (migrated for mailqd), and Django set up on it."""
    url = make_pg_database(prefix="mailqd_django", template=pg_template)
    os.environ["MAILQD_TEST_DJANGO_DATABASE_URL"] = url
    os.environ["MAILQD_TEST_DJANGO_UNMIGRATED_URL"] = make_pg_database(prefix="mailqd_django")
    os.environ["DJANGO_SETTINGS_MODULE"] = "django_project.settings"
    django.setup()
    return url


@pytest.fixture
def queue(django_database: str) -> Iterator[Store]:
    """A store on the project's database, its queue emptied for this test."""
    store = Store.from_url(django_database)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE email_queue CASCADE")
    yield store
    store.close()
    connections.close_all()


def jobs(store: Store) -> list[Job]:
    with store.engine.connect() as conn:
        ids = [row[0] for row in conn.exec_driver_sql("SELECT id FROM email_queue ORDER BY id")]
    return [store.get(job_id) for job_id in ids]


def deliver(store: Store, server: SmtpServer, count: int) -> list[ReceivedMessage]:
    """Run a mailqd worker until it has sent `count` jobs; what the server received."""
    settings = Settings().replace(
        database_url=store.url,
        smtp_url=server.url(),
        from_address="mailqd@example.com",
        poll_interval=0.05,
        smtp_timeout=5.0,
        shutdown_timeout=2.0,
    )

    def transport() -> Transport:
        return transport_from_url(settings.smtp_url, timeout=settings.smtp_timeout)

    async def scenario() -> None:
        async with Worker(settings, store, "django-test", transport) as worker:
            sent = 0
            while sent < count:
                result = await worker.run_once()
                assert result.claimed, f"only {sent} of {count} jobs were due"
                sent += result.sent

    asyncio.run(asyncio.wait_for(scenario(), 45))
    return server.wait_for_messages(count, DEADLINE)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- delivery ------------------------------------------------------------------------


def test_send_mail_is_queued_and_delivered_to_the_smtp_server(
    queue: Store, smtp_server: SmtpServer
) -> None:
    assert mail.send_mail("Welcome", "Hello Alice", None, ["alice@example.com"]) == 1

    [message] = deliver(queue, smtp_server, 1)
    parsed = message.parsed()
    assert message.rcpt_tos == ("alice@example.com",)
    assert parsed["Subject"] == "Welcome"
    assert parsed["From"] == SENDER
    assert parsed["To"] == "alice@example.com"
    assert parsed.get_content().strip() == "Hello Alice"


def test_a_multi_alternatives_message_arrives_whole(queue: Store, smtp_server: SmtpServer) -> None:
    message = mail.EmailMultiAlternatives(
        subject="Your order",
        body="Order 42 is on its way.",
        from_email="Orders <orders@example.com>",
        to=["Alice <alice@example.com>"],
        cc=["bob@example.com"],
        bcc=["audit@example.com"],
        reply_to=["support@example.com"],
        headers={"X-Campaign": "spring"},
    )
    message.attach_alternative("<p>Order <b>42</b> is on its way.</p>", "text/html")
    assert message.send() == 1

    [received] = deliver(queue, smtp_server, 1)
    parsed = received.parsed()
    assert sorted(received.rcpt_tos) == [
        "alice@example.com",
        "audit@example.com",
        "bob@example.com",
    ]
    assert parsed["From"] == "Orders <orders@example.com>"
    assert parsed["To"] == "Alice <alice@example.com>"
    assert parsed["Cc"] == "bob@example.com"
    assert parsed["Reply-To"] == "support@example.com"
    assert parsed["Bcc"] is None
    assert parsed["X-Campaign"] == "spring"
    assert parsed.get_content_type() == "multipart/alternative"
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and html is not None
    assert text.get_content().strip() == "Order 42 is on its way."
    assert "Order <b>42</b> is on its way." in html.get_content()


def test_an_html_body_is_sent_as_the_html_part(queue: Store, smtp_server: SmtpServer) -> None:
    message = mail.EmailMessage("News", "<p>Hello <i>there</i></p>", to=["alice@example.com"])
    message.content_subtype = "html"
    assert message.send() == 1

    [job] = jobs(queue)
    assert (job.body, job.html) == (None, "<p>Hello <i>there</i></p>")
    [received] = deliver(queue, smtp_server, 1)
    html = received.parsed().get_body(("html",))
    assert html is not None and "Hello <i>there</i>" in html.get_content()


@needs_attachments
def test_attachments_and_an_inline_image_arrive_with_their_bytes_and_names(
    queue: Store, smtp_server: SmtpServer
) -> None:
    pdf = b"%PDF-1.4 invoice " + bytes(range(256)) * 40
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
    logo = MIMEImage(png, "png")
    logo.add_header("Content-ID", "<logo>")
    logo.add_header("Content-Disposition", "inline", filename="logo.png")
    message = mail.EmailMultiAlternatives(
        "Invoice", "Your invoice is attached.", to=["alice@example.com"]
    )
    message.attach_alternative('<p>Thanks</p><img src="cid:logo">', "text/html")
    message.attach("Rechnung März.pdf", pdf, "application/pdf")
    message.attach("notes.txt", "plain text notes\n", "text/plain")
    message.attach(logo)
    assert message.send() == 1

    [received] = deliver(queue, smtp_server, 1)
    parsed = received.parsed()
    parts = {part.get_filename(): part for part in parsed.walk() if part.get_filename()}
    assert set(parts) == {"Rechnung März.pdf", "notes.txt", "logo.png"}
    assert parts["Rechnung März.pdf"].get_payload(decode=True) == pdf
    assert parts["Rechnung März.pdf"].get_content_type() == "application/pdf"
    assert parts["notes.txt"].get_payload(decode=True) == b"plain text notes\n"
    assert parts["logo.png"].get_payload(decode=True) == png
    assert parts["logo.png"]["Content-ID"] == "<logo>"
    html = parsed.get_body(("html",))
    assert html is not None and 'src="cid:logo"' in html.get_content()


def test_django_attachments_become_mailqd_attachments(django_database: str) -> None:
    """What the backend hands the client, while the client cannot deliver attachments yet."""
    logo = MIMEImage(b"\x89PNG\r\n\x1a\n", "png")
    logo.add_header("Content-ID", "<logo>")
    latin = MIMEText("Grüße", "plain", "iso-8859-1")
    latin.add_header("Content-Disposition", "attachment", filename="gruss.txt")
    message = mail.EmailMessage("Invoice", "body", to=["alice@example.com"])
    message.attach("Rechnung März.pdf", b"%PDF-1.4", "application/pdf")
    message.attach("notes.txt", "notes", None)
    message.attach(logo)
    message.attach(latin)

    assert enqueue_arguments(message)["attachments"] == [
        Attachment("Rechnung März.pdf", b"%PDF-1.4", "application/pdf"),
        Attachment("notes.txt", b"notes", "text/plain"),
        Attachment(
            "attachment-3.png", b"\x89PNG\r\n\x1a\n", "image/png", inline=True, content_id="logo"
        ),
        Attachment("gruss.txt", "Grüße".encode(), "text/plain"),
    ]
    assert "attachments" not in enqueue_arguments(mail.EmailMessage("Hi", "b", to=["a@b.example"]))


def test_mail_admins_is_queued_to_the_admins(queue: Store, smtp_server: SmtpServer) -> None:
    mail.mail_admins("disk full", "/var is at 99%")

    [received] = deliver(queue, smtp_server, 1)
    parsed = received.parsed()
    assert received.rcpt_tos == ("ops@example.com",)
    assert parsed["Subject"] == "[shop] disk full"
    assert parsed["From"] == "server@example.com"


def test_send_mass_mail_returns_the_count_and_queues_each_message(queue: Store) -> None:
    datatuple = [
        (f"Hello {name}", f"Hi {name}", None, [f"{name}@example.com"])
        for name in ("alice", "bob", "carol")
    ]
    assert mail.send_mass_mail(datatuple) == 3

    assert sorted((j.recipient_to, j.subject) for j in jobs(queue)) == [
        ("alice@example.com", "Hello alice"),
        ("bob@example.com", "Hello bob"),
        ("carol@example.com", "Hello carol"),
    ]


def test_a_message_with_no_recipient_is_skipped_and_not_counted(queue: Store) -> None:
    connection = mail.get_connection()
    empty = mail.EmailMessage("Nobody", "to no one")
    full = mail.EmailMessage("Someone", "to alice", to=["alice@example.com"])
    assert connection.send_messages([empty, full]) == 1
    assert [j.subject for j in jobs(queue)] == ["Someone"]


# -- transactions ------------------------------------------------------------------


def test_a_rollback_inside_atomic_queues_nothing(queue: Store) -> None:
    class Abandoned(Exception):
        pass

    with pytest.raises(Abandoned), transaction.atomic():
        assert mail.send_mail("Receipt", "Thanks", None, ["alice@example.com"]) == 1
        raise Abandoned

    assert jobs(queue) == []


def test_a_commit_of_atomic_queues_it_and_not_before(queue: Store) -> None:
    with transaction.atomic():
        assert mail.send_mail("Receipt", "Thanks", None, ["alice@example.com"]) == 1
        assert jobs(queue) == []  # another connection sees nothing before the commit

    [job] = jobs(queue)
    assert (job.recipient_to, job.subject, job.status) == (
        "alice@example.com",
        "Receipt",
        "pending",
    )


def test_with_a_database_url_the_job_is_committed_on_its_own(
    queue: Store, django_database: str
) -> None:
    """The documented difference: outside Django's connection, a rollback does not undo it."""
    with override_settings(MAILQD={"DATABASE_URL": django_database}):

        class Abandoned(Exception):
            pass

        with pytest.raises(Abandoned), transaction.atomic():
            mail.send_mail("Receipt", "Thanks", None, ["alice@example.com"])
            raise Abandoned

    assert [j.subject for j in jobs(queue)] == ["Receipt"]


def test_a_database_url_may_be_sqlite(queue: Store, sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    engine.dispose()
    with override_settings(MAILQD={"DATABASE_URL": sqlite_url}):
        assert mail.send_mail("Local", "on SQLite", None, ["alice@example.com"]) == 1

    local = Store.from_url(sqlite_url)
    try:
        assert [j.subject for j in jobs(local)] == ["Local"]
    finally:
        local.close()
    assert jobs(queue) == []


# -- errors and fail_silently --------------------------------------------------------


def test_fail_silently_swallows_a_refused_message_and_returns_0(queue: Store) -> None:
    assert mail.send_mail("Hi", "body", None, ["not an address"], fail_silently=True) == 0
    with pytest.raises(InvalidAddressError):
        mail.send_mail("Hi", "body", None, ["not an address"])
    assert jobs(queue) == []


def test_fail_silently_queues_the_good_messages_of_a_batch(queue: Store) -> None:
    datatuple = [
        ("one", "body", None, ["alice@example.com"]),
        ("two", "body", None, ["not an address"]),
        ("three", "body", None, ["bob@example.com"]),
    ]
    assert mail.send_mass_mail(datatuple, fail_silently=True) == 2
    assert sorted(j.subject for j in jobs(queue)) == ["one", "three"]


def test_without_fail_silently_a_refused_message_queues_none_of_its_batch(queue: Store) -> None:
    datatuple = [
        ("one", "body", None, ["alice@example.com"]),
        ("two", "body", None, ["not an address"]),
    ]
    with pytest.raises(InvalidAddressError):
        mail.send_mass_mail(datatuple)
    assert jobs(queue) == []


def test_fail_silently_swallows_an_unreachable_database(queue: Store) -> None:
    url = f"postgresql://mailqd@127.0.0.1:{closed_port()}/nowhere?connect_timeout=2"
    with override_settings(MAILQD={"DATABASE_URL": url}):
        assert mail.send_mail("Hi", "body", None, ["alice@example.com"], fail_silently=True) == 0
        with pytest.raises(MailqError):
            mail.send_mail("Hi", "body", None, ["alice@example.com"])


@pytest.mark.parametrize("through", ["database-url", "django-connection"])
def test_a_database_without_mailqds_tables_says_to_migrate(queue: Store, through: str) -> None:
    setting: dict[str, object] = (
        {"DATABASE_URL": os.environ["MAILQD_TEST_DJANGO_UNMIGRATED_URL"]}
        if through == "database-url"
        else {"USE_DJANGO_CONNECTION": True, "DATABASE_ALIAS": "unmigrated"}
    )
    with override_settings(MAILQD=setting):
        with pytest.raises(SchemaError, match="mailqctl migrate"):
            mail.send_mail("Hi", "body", None, ["alice@example.com"])
        assert mail.send_mail("Hi", "body", None, ["alice@example.com"], fail_silently=True) == 0


def test_headers_mailqd_writes_itself_are_refused(queue: Store) -> None:
    message = mail.EmailMessage(
        "Hi", "body", to=["alice@example.com"], headers={"Message-ID": "<mine@example.com>"}
    )
    with pytest.raises(ValidationError, match="Message-ID"):
        message.send()
    assert jobs(queue) == []


def test_an_alternative_other_than_html_is_refused_by_name(queue: Store) -> None:
    message = mail.EmailMultiAlternatives("Hi", "body", to=["alice@example.com"])
    message.attach_alternative("BEGIN:VCALENDAR", "text/calendar")
    with pytest.raises(ValidationError, match="text/calendar"):
        message.send()


# -- mailqd's options ----------------------------------------------------------------


def test_options_pass_through_the_message_attribute(queue: Store) -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    message = mail.EmailMessage("Digest", "body", to=["alice@example.com"])
    message.mailqd = {  # type: ignore[attr-defined]
        "priority": 10,
        "send_after": later,
        "expires_at": later + timedelta(days=1),
        "max_attempts": 7,
    }
    assert message.send() == 1

    [job] = jobs(queue)
    assert (job.priority, job.max_attempts) == (10, 7)
    assert job.next_attempt_at == later
    assert job.expires_at == later + timedelta(days=1)


def test_options_pass_through_x_mailqd_headers_which_are_not_sent(
    queue: Store, smtp_server: SmtpServer
) -> None:
    message = mail.EmailMessage(
        "Alert",
        "body",
        to=["alice@example.com"],
        headers={
            "X-Mailqd-Priority": "50",
            "x-mailqd-max-attempts": "2",
            "X-Ticket": "T-1",
        },
    )
    assert message.send() == 1

    [job] = jobs(queue)
    assert (job.priority, job.max_attempts) == (50, 2)
    assert job.headers == {"X-Ticket": "T-1"}
    [received] = deliver(queue, smtp_server, 1)
    parsed = received.parsed()
    assert parsed["X-Ticket"] == "T-1"
    assert not [name for name in parsed if name.lower().startswith("x-mailqd")]


def send_twice_with_one_key() -> list[int]:
    counts = []
    for _ in range(2):
        message = mail.EmailMessage("Digest", "body", to=["alice@example.com"])
        message.extra_headers["X-Mailqd-Idempotency-Key"] = "digest-2026-12-02"
        counts.append(message.send())
    return counts


def test_an_idempotency_key_through_a_database_url_queues_one_job(
    queue: Store, django_database: str
) -> None:
    with override_settings(MAILQD={"DATABASE_URL": django_database}):
        assert send_twice_with_one_key() == [1, 1]  # accepted twice, queued once
    assert [j.idempotency_key for j in jobs(queue)] == ["digest-2026-12-02"]


def test_an_idempotency_key_through_djangos_connection_queues_one_job(queue: Store) -> None:
    assert send_twice_with_one_key() == [1, 1]
    assert [j.idempotency_key for j in jobs(queue)] == ["digest-2026-12-02"]


def test_a_template_and_its_variables_pass_through(
    queue: Store, smtp_server: SmtpServer, django_database: str
) -> None:
    with Client(django_database) as client:
        client.add_template("welcome", "Welcome, {{ name }}", text="Hello {{ name }}!")
    message = mail.EmailMessage(
        to=["alice@example.com"],
        headers={"X-Mailqd-Template-Id": "welcome", "X-Mailqd-Variables": '{"name": "Alice"}'},
    )
    assert message.send() == 1

    [received] = deliver(queue, smtp_server, 1)
    parsed = received.parsed()
    assert parsed["Subject"] == "Welcome, Alice"
    assert parsed.get_content().strip() == "Hello Alice!"


@pytest.mark.parametrize(
    ("set_option", "refused"),
    [
        (lambda m: setattr(m, "mailqd", {"priority": 1, "urgency": 2}), "urgency"),
        (lambda m: m.extra_headers.update({"X-Mailqd-Urgency": "2"}), "X-Mailqd-Urgency"),
        (lambda m: m.extra_headers.update({"X-Mailqd-Priority": "high"}), "integer"),
        (lambda m: m.extra_headers.update({"X-Mailqd-Send-After": "tomorrow"}), "ISO 8601"),
    ],
    ids=["unknown-attribute-key", "unknown-header", "bad-integer", "bad-time"],
)
def test_a_wrong_option_is_refused_by_name(queue: Store, set_option: object, refused: str) -> None:
    message = mail.EmailMessage("Hi", "body", to=["alice@example.com"])
    set_option(message)  # type: ignore[operator]
    with pytest.raises(ValidationError, match=refused):
        message.send()
    assert jobs(queue) == []


# -- configuration -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        (None, "must be a dict"),
        ({}, "needs DATABASE_URL"),
        ({"DATABASE_URL": "postgresql:///x", "POOL": 3}, "unknown key"),
        ({"DATABASE_URL": "postgresql:///x", "USE_DJANGO_CONNECTION": True}, "not both"),
        ({"USE_DJANGO_CONNECTION": True, "DATABASE_ALIAS": "local"}, "psycopg 3"),
        ({"USE_DJANGO_CONNECTION": True, "DATABASE_ALIAS": "other"}, "not in settings.DATABASES"),
        ({"DATABASE_URL": "mysql://db/x"}, "database_url"),
        ({"DATABASE_URL": "postgresql:///x", "LIMITS": {"max_recipient": 5}}, "LIMITS"),
    ],
    ids=[
        "missing",
        "empty",
        "unknown-key",
        "both",
        "sqlite-alias",
        "no-alias",
        "bad-url",
        "limits",
    ],
)
def test_a_bad_mailqd_setting_is_improperly_configured(
    django_database: str, setting: object, says: str
) -> None:
    with override_settings(MAILQD=setting), pytest.raises(ImproperlyConfigured, match=says):
        EmailBackend()
