"""Hostile addresses (#15): a display name never smuggles a recipient in, at any entry.

Every form below is refused with `InvalidAddressError` naming the field, and
nothing is written: through `Client.enqueue`, `enqueue_many`, each address
field, `mailqctl enqueue` flags and an `.eml` file. The same text inserted by
plain SQL fails at its first attempt naming the column, and is never sent.
The tricky but valid forms (a quoted comma, a quoted name that looks like an
address, non-ASCII names, encoded words) are delivered by a real worker to a
real SMTP server, and the exact RCPT set is asserted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import idna
import pytest
import sqlalchemy as sa
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ctl_process import error_line, invoke, ok_json
from mailqd import Client
from mailqd.compose import compose
from mailqd.daemon.worker import Worker
from mailqd.errors import InvalidAddressError, ValidationError
from mailqd.logging import mask_address, mask_address_list
from mailqd.models import Status
from mailqd.rules import format_address, parse_address_list
from mailqd.store import Store
from mailqd.store.screening import recipients_of
from mailqd.validation import build_job, parse_addresses
from smtp_server import SmtpServer, smtp_server_fixture
from test_compose import make_job
from test_content import insert_row, row_count
from test_worker import DEADLINE, SENDER, make_settings, run, running, smtp_factory

__all__ = ["smtp_server_fixture"]

VICTIM = "victim@example.com"

SMUGGLING = [
    f"attacker@gmail.co m <{VICTIM}>",  # the case: a space in the name's domain
    f"evil@evil.example <{VICTIM}>",  # a name that is an address
    f"<attacker@evil.example> <{VICTIM}>",  # two angle addresses
    f"attacker@evil.example\t<{VICTIM}>",
    "attacker @evil.example",  # a space before the @
    f"attacker@evil.example {VICTIM}",  # two addresses, no comma
    f"Name, Other <{VICTIM}>",  # an unquoted comma splits off a bare name
    f"a@evil.example; {VICTIM}",  # ; is no separator
    f"friends: {VICTIM};",  # a group
    f"Name (comment) <{VICTIM}>",  # comments are refused, not dropped
    f"<{VICTIM}",  # unclosed
    f"{VICTIM}>",
    f'"unterminated <{VICTIM}>',
    f"Evil [x] <{VICTIM}>",
    f"Evil\\ <{VICTIM}>",
    "=?utf-8?q?x=0D=0ABcc:_victim@example.com?= <a@example.com>",  # CR LF from an encoded word
    "victim@[127.0.0.1]",  # a domain literal
    "victim@10.0.0.1",  # an IP address as a domain
    "@localhost",
    "<@relay.example:victim@example.com>",  # a source route
    '"quoted local"@example.com',
    "victim@example.com\u2028",  # a Unicode line separator
    "victim@exa\u200bmple.com",  # an invisible character in the domain
    "a@example.com,,b@example.com",
]
FIELDS = ["to", "cc", "bcc", "reply_to", "from_address"]


def call_with(field: str, value: str) -> dict[str, Any]:
    call: dict[str, Any] = {"to": "ok@example.com", "subject": "Hi", "body": "Hello"}
    call[field] = value
    return call


# --- the client -----------------------------------------------------------------------


@pytest.mark.parametrize("field", FIELDS)
def test_the_client_refuses_every_smuggling_form_in_every_field(
    db_url: str, store: Store, field: str
) -> None:
    with Client(db_url) as client:
        for text in SMUGGLING:
            with pytest.raises(InvalidAddressError) as caught:
                client.enqueue(**call_with(field, text))
            assert caught.value.field == field, (text, caught.value)
            assert str(caught.value).startswith(f"{field}: "), text
            with pytest.raises(InvalidAddressError, match=rf"messages\[1\]\.{field}: "):
                client.enqueue_many([call_with("to", "ok@example.com"), call_with(field, text)])
            # A list of strings is checked item by item, each as an address list.
            if field in ("to", "cc", "bcc"):
                with pytest.raises(InvalidAddressError):
                    client.enqueue(**call_with(field, ["ok2@example.com", text]))  # type: ignore[arg-type]
    assert row_count(store) == 0


def test_refusals_say_what_is_wrong() -> None:
    """The message tells the caller what to fix, not just that something is wrong."""
    cases = [
        (f"attacker@gmail.co m <{VICTIM}>", "holds an unquoted '@'"),
        (f"<a@evil.example> <{VICTIM}>", "holds an unquoted '<'"),
        (f"Name, Other <{VICTIM}>", "'Name' is not a valid e-mail address"),
        ("victim@[127.0.0.1]", "domain literals such as [127.0.0.1] are refused"),
        ("victim@10.0.0.1", "'10.0.0.1' is not a mail domain"),
        ("@localhost", "it needs local@domain"),
        ("attacker @evil.example", "malformed local part"),
    ]
    for text, problem in cases:
        with pytest.raises(InvalidAddressError) as caught:
            build_job(text, "Hi", "Hello")
        assert problem in caught.value.problem, (text, caught.value.problem)


# --- mailqctl enqueue -----------------------------------------------------------------


FLAGS = {"to": "--to", "cc": "--cc", "bcc": "--bcc", "reply_to": "--reply-to"}
FLAGS["from_address"] = "--from"


@pytest.mark.parametrize("field", FIELDS)
def test_mailqctl_enqueue_refuses_every_smuggling_form_in_every_flag(
    db_url: str, store: Store, field: str
) -> None:
    for text in SMUGGLING:
        args = ["--body", "b", FLAGS[field], text]
        if field != "to":
            args += ["--to", "ok@example.com"]
        line = error_line(invoke("enqueue", *args, db=db_url))
        assert line.startswith(f"mailqctl: {field}: "), (text, line)
    assert row_count(store) == 0


EML = "From: shop@example.com\r\n{header}\r\nSubject: Hi\r\n\r\nHello\r\n"


@pytest.mark.parametrize(
    ("header", "field"),
    [
        (f"To: attacker@gmail.co m <{VICTIM}>", "to"),
        (f"To: ok@example.com,\r\n evil@evil.example <{VICTIM}>", "to"),  # folded
        (f"Cc: <a@evil.example> <{VICTIM}>", "cc"),
        (f"To: ok@example.com\r\nBcc: friends: {VICTIM};", "bcc"),
        (f"To: ok@example.com\r\nReply-To: evil@evil.example <{VICTIM}>", "reply_to"),
    ],
)
def test_mailqctl_enqueue_refuses_an_eml_whose_header_smuggles_a_recipient(
    db_url: str, store: Store, tmp_path: Path, header: str, field: str
) -> None:
    eml = tmp_path / "message.eml"
    eml.write_bytes(EML.format(header=header).encode())
    line = error_line(invoke("enqueue", str(eml), db=db_url))
    assert line.startswith(f"mailqctl: {field}: "), line
    assert row_count(store) == 0


def test_mailqctl_enqueue_keeps_an_eml_display_name_whole(
    db_url: str, store: Store, tmp_path: Path
) -> None:
    """A quoted comma, an encoded word and raw UTF-8 (RFC 6532) read as the daemon reads them."""
    header = (
        'To: "Smith, John" <john@example.com>,\r\n'
        " =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jm@example.com>\r\n"
        "Cc: Zoë Café <zoe@example.fr>"
    )
    eml = tmp_path / "message.eml"
    eml.write_bytes(EML.format(header=header).encode())
    job = store.get(ok_json(invoke("enqueue", str(eml), "--json", db=db_url))["id"])
    assert job.recipient_to == '"Smith, John" <john@example.com>, Jörg Müller <jm@example.com>'
    assert job.cc == "Zoë Café <zoe@example.fr>"


# --- what is accepted is delivered, to exactly its addresses ------------------------------


def test_tricky_but_valid_addresses_are_delivered_to_exactly_their_addr_specs(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    with Client(db_url) as client:
        job_id = client.enqueue(
            [
                '"Smith, John" <john@example.com>',
                '"attacker@evil.example" <named@example.com>',  # quoted: only a name
                "John Q. Public <jqp@example.com>",
                '"a \\"quoted\\" word" <q@example.com>',
                "=?utf-8?q?J=C3=B6rg?= <jorg@example.com>",
            ],
            "Hi",
            "Hello",
            cc='山田 太郎 <taro@example.jp>, "Doe, Jane" <jane@example.org>',
            bcc="Hidden Person <hidden@example.net>",
            reply_to='"Support, Team" <support@example.com>',
            from_address='"Shop, Inc." <shop@example.com>',
        )

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.sent + t.failed >= 1, DEADLINE)

    run(scenario)
    assert store.get(job_id).status is Status.SENT
    [received] = smtp_server.messages
    assert received.mail_from == "shop@example.com"
    assert set(received.rcpt_tos) == {
        "john@example.com",
        "named@example.com",
        "jqp@example.com",
        "q@example.com",
        "jorg@example.com",
        "taro@example.jp",
        "jane@example.org",
        "hidden@example.net",
    }
    assert len(received.rcpt_tos) == 8
    parsed = received.parsed()
    assert [(a.display_name, a.addr_spec) for a in parsed["To"].addresses] == [
        ("Smith, John", "john@example.com"),
        ("attacker@evil.example", "named@example.com"),
        ("John Q. Public", "jqp@example.com"),
        ('a "quoted" word', "q@example.com"),
        ("Jörg", "jorg@example.com"),
    ]
    assert [a.display_name for a in parsed["Cc"].addresses] == ["山田 太郎", "Doe, Jane"]
    assert parsed["Reply-To"].addresses[0].display_name == "Support, Team"
    assert parsed["From"].addresses[0].display_name == "Shop, Inc."
    assert b"hidden@example.net" not in received.data and b"Bcc" not in received.data


def test_smuggling_rows_from_plain_sql_fail_naming_the_column_and_are_never_sent(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url())
    columns = ["recipient_to", "cc", "bcc", "reply_to", "from_address"]
    forms = [f"attacker@gmail.co m <{VICTIM}>", f"<a@evil.example> <{VICTIM}>", "a@[127.0.0.1]"]
    bad = {insert_row(store, **{column: text}): column for column in columns for text in forms}
    with Client(db_url) as client:
        good = client.enqueue("good@example.com", "good", "fine")

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.sent + t.failed >= len(bad) + 1, DEADLINE)

    run(scenario)
    for job_id, column in bad.items():
        job = store.get(job_id)
        assert (job.status, job.attempts) == (Status.FAILED, 1), job
        assert job.last_error is not None
        assert job.last_error.startswith(f"cannot compose message: {column}: "), job.last_error
    assert store.get(good).status is Status.SENT
    assert [m.rcpt_tos for m in smtp_server.messages] == [("good@example.com",)]


# --- one parser: the client, the composer, the screening and the masking agree ----------------

ADDRESS_TEXT = st.lists(
    st.sampled_from([*'ab@.<>," \\()[]:;=?\t', "x.COM", "a@b.com", "<c@d.org>", "ö"]),
    max_size=12,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(text=ADDRESS_TEXT)
@example(text="a@b.comö")  # internationalized domains: the envelope holds their A-labels
@example(text="a@ö")
def test_the_client_and_the_composer_accept_and_refuse_the_same_addresses(text: str) -> None:
    """Refused: by both, with the same words. Accepted: sent to exactly those addr-specs."""
    try:
        stored = parse_addresses("to", text)
    except ValidationError as refused:
        with pytest.raises(ValidationError) as caught:
            compose(make_job(recipient_to=text), default_from=SENDER)
        assert caught.value.problem == refused.problem
        return
    if not stored:
        return
    job = make_job(recipient_to=", ".join(stored))
    message = compose(job, default_from=SENDER)
    expected: dict[tuple[str, str], str] = {}
    for item in stored:
        spec = item[item.rindex("<") + 1 : -1] if item.endswith(">") else item
        local, _, domain = spec.rpartition("@")
        # The envelope carries the domain in A-labels (IDNA 2008, UTS #46), as written otherwise.
        ascii_domain = domain if domain.isascii() else idna.encode(domain, uts46=True).decode()
        expected.setdefault((local, ascii_domain.lower()), f"{local}@{ascii_domain}")
    assert message.recipients == tuple(expected.values())
    assert recipients_of(job) == sorted({r.lower() for r in message.recipients})


@settings(max_examples=300, deadline=None)
@given(name=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=60))
def test_any_display_name_the_client_stores_reads_back_as_itself(name: str) -> None:
    """The stored form of a name (quoted when needed) is parsed back by the composer unchanged,
    and is never taken for an address, whatever it holds."""
    [stored] = parse_addresses("to", format_address(name, "a@example.com"))
    [address] = parse_address_list("recipient_to", stored)
    assert (address.name, address.envelope) == (name, "a@example.com")


def test_masking_and_screening_read_a_quoted_comma_as_one_address() -> None:
    text = '"Smith, John" <john@example.com>, b@example.org'
    assert mask_address_list(text) == ["j***@example.com", "b***@example.org"]
    assert recipients_of(make_job(recipient_to=text)) == ["b@example.org", "john@example.com"]
    assert mask_address('"Smith, John" <john@example.com>') == "j***@example.com"
    smuggled = mask_address_list(f"attacker@gmail.co m <{VICTIM}>")
    assert smuggled == ["a***@gmail.co m <v***@example.com>"]  # shown masked, not split


def test_mailqctl_failed_shows_a_quoted_comma_as_one_masked_address(
    db_url: str, store: Store
) -> None:
    job_id = insert_row(store, recipient_to='"Smith, John" <john@example.com>')
    with store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE email_queue SET status = 'failed', last_error = 'x' WHERE id = :id"),
            {"id": job_id},
        )
    [row] = ok_json(invoke("failed", "--json", db=db_url))["jobs"]
    assert row["to"] == ["j***@example.com"]
