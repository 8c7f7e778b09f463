"""Content checks (#6): HTML sanitizing, input limits at every entry, SMTPUTF8.

Each entry point is covered: the client (PostgreSQL and SQLite), `mailqctl
enqueue`, and rows inserted by plain SQL, which are checked when a worker
claims them (the real daemon against a real SMTP server). DKIM is in
tests/test_dkim.py.
"""

from __future__ import annotations

import email.policy
import json
import re
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import Parser
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa

from ctl_process import error_line, invoke
from daemon_process import DaemonPool
from mailqd import Client
from mailqd.compose import compose
from mailqd.compose.sanitize import sanitize_html
from mailqd.errors import (
    HeaderInjectionError,
    LimitExceededError,
    PermanentDeliveryError,
    ValidationError,
)
from mailqd.models import Status
from mailqd.store import Store
from mailqd.validation import Limits
from smtp_server import SmtpServer, smtp_server_fixture
from test_compose import build, make_job, parse, text_of
from test_daemon_e2e import daemon_env, stop, wait_all
from test_transport import run, send_each, smtp

__all__ = ["smtp_server_fixture"]

VICTIM = "victim@example.com"


def parse_utf8(data: bytes) -> EmailMessage:
    """Parse a message whose headers may hold UTF-8 (RFC 6532), as a SMTPUTF8 reader does."""
    return cast(EmailMessage, Parser(policy=email.policy.default).parsestr(data.decode()))


def row_count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM email_queue")).scalar_one())


# --- sanitizing -------------------------------------------------------------------------

ATTACKS = [
    ("<p>hi</p><script>alert(1)</script>", "alert"),
    ("<SCRIPT SRC=https://evil.example/x.js></SCRIPT><p>hi</p>", "evil"),
    ('<p onclick="steal()">hi</p>', "steal"),
    ('<img src="https://ok.example/a.png" onerror="steal()">', "steal"),
    ('<a href="javascript:steal()">hi</a>', "steal"),
    ('<a href=" JaVaScRiPt:steal()">hi</a>', "steal"),
    ('<a href="vbscript:steal()">hi</a>', "steal"),
    ('<img src="data:image/svg+xml;base64,PHN2Zz4=">', "data:"),
    ("<svg onload=steal()><p>hi</p></svg>", "steal"),
    ('<iframe src="https://evil.example"></iframe><p>hi</p>', "evil"),
    ("<style>body{background:url(https://evil.example)}</style><p>hi</p>", "evil"),
    ('<p style="background:url(https://evil.example/t.gif)">hi</p>', "evil"),
    ('<form action="https://evil.example"><input name=p></form>', "evil"),
    ("<!-- <script>steal()</script> --><p>hi</p>", "steal"),
]


@pytest.mark.parametrize(("html", "gone"), ATTACKS)
def test_sanitize_removes_what_could_run_or_load(html: str, gone: str) -> None:
    cleaned = sanitize_html(html)
    assert gone.lower() not in cleaned.lower()
    assert "<script" not in cleaned.lower()
    assert " on" not in cleaned.lower()


def test_sanitize_keeps_formatting_tables_images_and_links() -> None:
    html = (
        '<h1>Order</h1><p style="color: #333; font-weight: bold">Hi <b>Al</b> <i>x</i></p>'
        '<table width="600" cellpadding="4"><tr><td align="right">1</td></tr></table>'
        '<img src="https://shop.example/logo.png" alt="Logo"><img src="cid:logo@shop" alt="L">'
        '<a href="https://shop.example/o/1?a=1&amp;b=2">order</a> '
        '<a href="mailto:help@shop.example">mail</a> <a href="tel:+4930123">call</a>'
    )
    cleaned = sanitize_html(html)
    for kept in (
        "<h1>Order</h1>",
        'style="color:#333;font-weight:bold"',
        "<b>Al</b>",
        '<td align="right">1</td>',
        'width="600"',
        'src="https://shop.example/logo.png"',
        'src="cid:logo@shop"',
        'href="https://shop.example/o/1?a=1&amp;b=2"',
        'href="mailto:help@shop.example"',
        'href="tel:+4930123"',
        'rel="noopener noreferrer"',
    ):
        assert kept in cleaned, kept


def test_html_parts_are_sanitized_and_the_text_part_comes_from_the_clean_html() -> None:
    html = (
        '<html><head><title>Secret title</title></head><body><p onclick="steal()">Hello '
        '<a href="javascript:steal()">click</a></p><script>steal()</script></body></html>'
    )
    parsed = parse(build(body=None, html=html))
    plain, rich = (cast(Any, part) for part in parsed.iter_parts())

    assert "steal" not in text_of(rich) and "<script" not in text_of(rich)
    assert "Hello" in text_of(rich)
    assert text_of(plain) == "Hello click\n"  # no title, no script, no javascript: target


# --- limits at enqueue ---------------------------------------------------------------------

SMALL = Limits(max_recipients=3, max_subject_length=10, max_body_bytes=50)
OVER_LIMITS = [
    pytest.param(
        {"to": ["a@example.com", "b@example.com"], "cc": "c@example.com", "bcc": "d@example.com"},
        "max_recipients",
        id="recipients",
    ),
    pytest.param({"subject": "s" * 11}, "max_subject_length", id="subject"),
    pytest.param({"body": "b" * 51}, "max_body_bytes", id="body"),
    pytest.param({"html": "é" * 26}, "max_body_bytes", id="html-utf8-bytes"),
]


@pytest.mark.parametrize(("change", "limit"), OVER_LIMITS)
def test_client_refuses_what_is_over_its_limits_and_writes_nothing(
    db_url: str, store: Store, change: dict[str, Any], limit: str
) -> None:
    fine: dict[str, Any] = {"to": "a@example.com", "subject": "Hi", "body": "Hello"}
    call = {**fine, **change}
    with Client(db_url, limits=SMALL) as client:
        with pytest.raises(LimitExceededError, match=limit):
            client.enqueue(**call)
        with pytest.raises(LimitExceededError, match=rf"messages\[1\].*{limit}"):
            client.enqueue_many([fine, call])
        assert row_count(store) == 0
        client.enqueue(  # exactly at every limit
            ["a@example.com", "b@example.com"], "s" * 10, "b" * 50, "é" * 25, cc="c@example.com"
        )
    assert row_count(store) == 1


def test_mailqctl_enqueue_uses_the_configured_limits(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    html = tmp_path / "big.html"
    html.write_text("<p>" + "é" * 30 + "</p>", encoding="utf-8")
    limits = {
        "MAILQD_MAX_RECIPIENTS": "2",
        "MAILQD_MAX_SUBJECT_LENGTH": "10",
        "MAILQD_MAX_BODY_BYTES": "50",
    }
    cases = [
        (["--to", "a@example.com,b@example.com", "--cc", "c@example.com", "--body", "b"],
         "mailqctl: to: more than 2 recipients in all (max_recipients)"),
        (["--to", "a@example.com", "--subject", "s" * 11, "--body", "b"],
         "mailqctl: subject: longer than 10 characters (max_subject_length)"),
        (["--to", "a@example.com", "--body", "b" * 51],
         "mailqctl: body: larger than 50 bytes (max_body_bytes)"),
        (["--to", "a@example.com", "--html-file", str(html)],
         "mailqctl: html: larger than 50 bytes (max_body_bytes)"),
    ]  # fmt: skip
    for args, expected in cases:
        result = invoke("enqueue", *args, db=db_url, env=limits)
        assert error_line(result) == expected
    assert row_count(store) == 0
    accepted = invoke("enqueue", "--to", "a@example.com", "--body", "b" * 51, db=db_url)
    assert accepted.returncode == 0, accepted.stderr  # the defaults are far higher


# --- header injection at every entry -------------------------------------------------------

INJECTIONS: list[tuple[str, Any]] = [
    ("subject", f"Hi\r\nBcc: {VICTIM}"),
    ("subject", "Hi\nX-Injected: yes"),
    ("to", f"a@example.com\nBcc: {VICTIM}"),
    ("cc", f"c@example.com\rBcc: {VICTIM}"),
    ("bcc", "d@example.com\r\nX-Injected: yes"),
    ("reply_to", f"r@example.com\r\nBcc: {VICTIM}"),
    ("from_address", f"f@example.com\nBcc: {VICTIM}"),
    ("headers", {"X-Note": f"v\r\nBcc: {VICTIM}"}),
    ("headers", {f"X-Note\r\nBcc: {VICTIM}\r\nX-A": "v"}),
    ("headers", {"X-Note": "nul\x00"}),
]


def test_client_refuses_header_injection_in_every_field(db_url: str, store: Store) -> None:
    with Client(db_url) as client:
        for field, value in INJECTIONS:
            call: dict[str, Any] = {"to": "a@example.com", "subject": "Hi", "body": "b"}
            call[field] = value
            with pytest.raises(HeaderInjectionError):
                client.enqueue(**call)
    assert row_count(store) == 0


def test_mailqctl_enqueue_refuses_header_injection_in_every_flag(db_url: str, store: Store) -> None:
    base = ["--to", "a@example.com", "--body", "b"]
    cases = [
        ([*base, "--subject", f"Hi\r\nBcc: {VICTIM}"], "mailqctl: subject: must not contain CR"),
        ([*base, "--cc", f"c@example.com\nBcc: {VICTIM}"], "mailqctl: cc: must not contain CR"),
        ([*base, "--bcc", "d@example.com\rX-I: y"], "mailqctl: bcc: must not contain CR"),
        ([*base, "--reply-to", f"r@example.com\nBcc: {VICTIM}"], "mailqctl: reply_to: must not"),
        ([*base, "--from", f"f@example.com\r\nBcc: {VICTIM}"], "mailqctl: from_address: must not"),
        ([*base, "--header", f"X-Note: v\r\nBcc: {VICTIM}"], "mailqctl: headers[X-Note]: must not"),
    ]
    for args, expected in cases:
        assert error_line(invoke("enqueue", *args, db=db_url)).startswith(expected)
    assert row_count(store) == 0


# --- SMTPUTF8 -------------------------------------------------------------------------------


def test_client_accepts_an_internationalized_address_and_stores_it_as_given(
    db_url: str, store: Store
) -> None:
    with Client(db_url) as client:
        job_id = client.enqueue("Jörg <jörg@exämple.org>", "Grüße", "Hallo", cc="用户@例子.广告")
    job = store.get(job_id)
    assert (job.recipient_to, job.cc) == ("Jörg <jörg@exämple.org>", "用户@例子.广告")


def test_an_internationalized_address_is_composed_as_utf8_and_marked_smtputf8() -> None:
    outgoing = compose(
        make_job(recipient_to="Jörg <jörg@exämple.org>", subject="Grüße"),
        default_from="shop@example.com",
    )
    assert outgoing.smtputf8
    assert outgoing.recipients == ("jörg@xn--exmple-cua.org",)  # the domain as A-labels
    head = outgoing.data.split(b"\r\n\r\n", 1)[0]
    assert "To: =?utf-8?b?SsO2cmc=?= <jörg@xn--exmple-cua.org>".encode() in head  # RFC 6532
    assert b"Subject: =?utf-8?" in head  # the subject and names stay RFC 2047-encoded
    assert not compose(make_job(), default_from="shop@example.com").smtputf8


def test_smtputf8_server_receives_the_unicode_address(smtp_server: SmtpServer) -> None:
    """The test server offers SMTPUTF8 by default, as aiosmtpd does."""
    outgoing = compose(
        make_job(recipient_to="José <josé@example.com>", bcc="用户@example.com"),
        default_from="Zoë <zoë@example.com>",
    )
    [result] = send_each(smtp(smtp_server.url(starttls="off")), outgoing)
    [received] = smtp_server.wait_for_messages(1)

    assert result.smtp_code == 250
    assert "SMTPUTF8" in received.mail_options
    assert received.mail_from == "zoë@example.com"
    assert received.rcpt_tos == ("josé@example.com", "用户@example.com")
    parsed = parse_utf8(received.data)
    assert parsed["To"].addresses[0].addr_spec == "josé@example.com"
    assert parsed["From"].addresses[0].addr_spec == "zoë@example.com"
    assert parsed["Bcc"] is None


@pytest.fixture
def ascii_smtp_server() -> Iterator[SmtpServer]:
    """A server that does not offer SMTPUTF8."""
    with SmtpServer(smtputf8=False) as server:
        yield server


def test_server_without_smtputf8_fails_the_message_permanently(
    ascii_smtp_server: SmtpServer,
) -> None:
    outgoing = compose(make_job(recipient_to="josé@example.com"), default_from="s@example.com")
    transport = smtp(ascii_smtp_server.url(starttls="off"))

    async def scenario() -> PermanentDeliveryError:
        try:
            with pytest.raises(PermanentDeliveryError) as caught:
                await transport.send(outgoing)
            await transport.send(compose(make_job(), default_from="s@example.com"))
            return caught.value
        finally:
            await transport.close()

    error = run(scenario())
    assert "needs SMTPUTF8" in str(error) and "does not offer" in str(error)
    assert [m.rcpt_tos for m in ascii_smtp_server.wait_for_messages(1)] == [("alice@example.com",)]


# --- rows inserted by plain SQL, checked when claimed ------------------------------------------

CLAIM_LIMITS = {
    "MAILQD_MAX_RECIPIENTS": "3",
    "MAILQD_MAX_SUBJECT_LENGTH": "40",
    "MAILQD_MAX_BODY_BYTES": "1000",
}
BAD_ROWS: list[tuple[dict[str, Any], str]] = [
    ({"recipient_to": "a@example.com, b@example.com", "cc": "c@example.com",
      "bcc": "d@example.com"}, r"recipient_to: more than 3 recipients in all \(max_recipients\)"),
    ({"subject": "s" * 41}, r"subject: longer than 40 characters \(max_subject_length\)"),
    ({"body": "b" * 1001}, r"body: larger than 1000 bytes \(max_body_bytes\)"),
    ({"html": "<p>" + "é" * 600 + "</p>"}, r"html: larger than 1000 bytes \(max_body_bytes\)"),
    ({"subject": f"Hi\r\nBcc: {VICTIM}"}, r"subject: must not contain CR, LF or NUL"),
    ({"recipient_to": f"a@example.com\nBcc: {VICTIM}"}, r"recipient_to: must not contain CR"),
    ({"headers": json.dumps({"X-A": f"v\r\nBcc: {VICTIM}"})}, r"headers\[X-A\]: must not"),
    ({"recipient_to": "a@@example.com"}, r"recipient_to: .*malformed"),
    ({"recipient_to": "x" * 65 + "@example.com"}, r"recipient_to: .*malformed local part"),
    ({"recipient_to": "josé@example.com"}, r"needs SMTPUTF8, which the server does not offer"),
]  # fmt: skip


def insert_row(store: Store, **columns: Any) -> str:
    values = {"recipient_to": "sql@example.com", "subject": "sql", "body": "sql body", **columns}
    postgres = store.dialect == "postgresql"
    params = ", ".join(
        f"CAST(:{name} AS jsonb)" if postgres and name in ("headers", "variables") else f":{name}"
        for name in values
    )
    with store.engine.begin() as conn:
        return str(
            conn.execute(
                sa.text(f"INSERT INTO email_queue ({', '.join(values)}) VALUES ({params}) "
                        "RETURNING id"),
                values,
            ).scalar_one()
        )  # fmt: skip


@pytest.mark.timeout(120)
def test_bad_sql_rows_fail_once_naming_the_problem_and_good_mail_behind_is_sent(
    daemons: DaemonPool, db_url: str, store: Store, ascii_smtp_server: SmtpServer
) -> None:
    smtp_server = ascii_smtp_server
    bad = [(insert_row(store, priority=10, **row), error) for row, error in BAD_ROWS]
    scripted = insert_row(
        store,
        priority=10,
        body=None,
        html='<p onclick="steal()">Hello <b>you</b></p><script>steal()</script>',
    )
    with Client(db_url) as client:
        good = [client.enqueue(f"u{i}@example.com", f"good {i}", "fine") for i in range(5)]

    daemon = daemons.mailqd(daemon_env(db_url, smtp_server, MAILQD_WORKERS="1", **CLAIM_LIMITS))
    wait_all(daemon, store, Status.FAILED, len(bad), "the bad rows failed")
    wait_all(daemon, store, Status.SENT, len(good) + 1, "the good mail sent")
    stop(daemon)

    for job_id, error in bad:
        job = store.get(job_id)
        assert (job.status, job.attempts) == (Status.FAILED, 1), job
        assert job.last_error is not None
        assert re.search(error, job.last_error), (error, job.last_error)
    received = {m.parsed()["Message-ID"]: m for m in smtp_server.messages}
    assert len(received) == len(good) + 1
    for message in received.values():
        assert VICTIM not in message.rcpt_tos
        assert b"X-Injected" not in message.data and b"Bcc:" not in message.data
    html_mail = received[store.get(scripted).message_id]
    assert b"steal" not in html_mail.data and b"onclick" not in html_mail.data
    assert b"<b>you</b>" in html_mail.data
    assert not daemon.events("worker restart scheduled")


def test_client_limits_default_to_the_daemons_defaults() -> None:
    from mailqd.config import Settings

    assert Limits.from_settings(Settings()) == Limits()
    with pytest.raises(ValidationError):
        compose(make_job(subject="s" * 999), default_from="s@example.com")
