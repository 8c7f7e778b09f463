"""Scenario 5, the client side: property-based tests (Hypothesis) over `Client.enqueue`.

- Whatever `enqueue` accepts is written as given (it round-trips through
  the database) and can be composed into a message that says the same thing:
  the client never queues a job the daemon is bound to refuse.
- Whatever it refuses raises a named `ValidationError` subclass naming the
  field, and writes nothing.

Example counts are modest in CI and larger under `--soak`.
"""

from __future__ import annotations

import email.policy
import string
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from email.parser import BytesParser
from email.utils import getaddresses
from typing import Any

import pytest
import sqlalchemy as sa
from harness import migrated_database
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailqd import Client
from mailqd.compose import compose
from mailqd.errors import (
    HeaderInjectionError,
    InvalidAddressError,
    MissingContentError,
    ValidationError,
)
from mailqd.models import Job
from mailqd.store import Store
from pg import PostgresServer

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
NAME_CHARS = string.ascii_letters + string.digits + " äöüÉßÑçØ日本"
# Anything but what validation refuses (CR, LF, NUL) and what no database
# can store (lone surrogates).
TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x00")
BODY_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")

INTL_ATEXT = ATEXT[:20] + "äöüéßñçøДж日本語"  # non-ASCII local parts go out with SMTPUTF8
local_parts = (
    st.lists(
        st.text(ATEXT, min_size=1, max_size=12) | st.text(INTL_ATEXT, min_size=1, max_size=8),
        min_size=1,
        max_size=3,
    )
    .map(".".join)
    .filter(lambda local: len(local.encode()) <= 64)
)
# RFC 5890 reserves labels with "--" in the third and fourth places (the
# R-LDH labels) for Punycode ("xn--"); email-validator refuses the others.
labels = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"
)
domains = st.builds(
    lambda parts, tld: ".".join([*parts, tld]),
    st.lists(labels, min_size=1, max_size=3),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
)
addr_specs = st.builds(lambda local, domain: f"{local}@{domain}", local_parts, domains)
names = st.text(NAME_CHARS, min_size=1, max_size=20).map(str.strip).filter(bool)
mailboxes = st.one_of(addr_specs, st.builds(lambda n, a: f"{n} <{a}>", names, addr_specs))
header_names = st.from_regex(r"X-[A-Za-z0-9][A-Za-z0-9-]{0,15}", fullmatch=True)
header_values = st.text(TEXT, max_size=60)
# Addresses from a wider alphabet than is valid, so that some are refused:
# whatever the client lets through must be one the composer can send.
loose_addresses = st.builds(
    lambda name, local, domain: f"{name} <{local}@{domain}>" if name else f"{local}@{domain}",
    st.none() | names,
    st.text(ATEXT + '."() éü日\\', min_size=1, max_size=20),
    domains | st.text(string.ascii_lowercase + "-._éü日[]0123456789", min_size=1, max_size=20),
)
datetimes = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2200, 1, 1),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
    ),
)


@st.composite
def valid_calls(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments of an `enqueue` call that must be accepted."""
    body = draw(st.none() | st.text(BODY_TEXT, max_size=300))
    html = draw(st.none() | st.text(BODY_TEXT, max_size=300).map(lambda t: f"<p>{t}</p>"))
    if not body and html is None:
        body = draw(st.text(BODY_TEXT, min_size=1, max_size=50))
    send_after = draw(st.none() | datetimes)
    expires_at = draw(st.none() | datetimes)
    if send_after and expires_at and expires_at <= send_after:
        expires_at = send_after + timedelta(days=1)
    return {
        "to": draw(st.lists(mailboxes, min_size=1, max_size=4)),
        "subject": draw(st.text(TEXT, max_size=200)),
        "body": body,
        "html": html,
        "cc": draw(st.none() | st.lists(mailboxes, min_size=1, max_size=2)),
        "bcc": draw(st.none() | st.lists(addr_specs, min_size=1, max_size=2)),
        "reply_to": draw(st.none() | mailboxes),
        "from_address": draw(st.none() | mailboxes),
        "headers": draw(st.none() | st.dictionaries(header_names, header_values, max_size=3)),
        "priority": draw(st.integers(-1000, 1000)),
        "send_after": send_after,
        "expires_at": expires_at,
        "max_attempts": draw(st.none() | st.integers(1, 100)),
        "idempotency_key": draw(st.none() | st.uuids().map(str)),
    }  # fmt: skip


def _insert(text: str, at: int, what: str) -> str:
    at = min(at, len(text))
    return text[:at] + what + text[at:]


def _set(**values: Any) -> Callable[[dict[str, Any], st.DrawFn], None]:
    """A spoiler that sets arguments; a value that is a strategy is drawn."""

    def spoil(call: dict[str, Any], draw: st.DrawFn) -> None:
        for name, value in values.items():
            call[name] = draw(value) if isinstance(value, st.SearchStrategy) else value

    return spoil


def _break_subject(call: dict[str, Any], draw: st.DrawFn) -> None:
    breaker = draw(st.sampled_from(["\r", "\n", "\r\n", "\x00"]))
    call["subject"] = _insert(call["subject"], draw(st.integers(0, 200)), breaker)


def _break_recipient(call: dict[str, Any], draw: st.DrawFn) -> None:
    breaker = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    call["to"] = [call["to"][0] + breaker + "Bcc: victim@example.com"]


INJECTIONS = st.sampled_from(["\r\n", "\n", "\r"]).map(lambda b: f"v{b}Bcc: victim@example.com")
MALFORMED = st.sampled_from(
    ["no-at-sign", "a@b@example.com", "a b@example.com", "@example.com", "a@", "a@-x.com"]
)
RESERVED = st.sampled_from(["Subject", "From", "bcc", "Message-ID"])

Spoiler = tuple[str, Callable[[dict[str, Any], st.DrawFn], None], type[ValidationError], str]
"""(what is wrong, how to make a valid call so, the error class, the field it must name)."""
SPOILERS: list[Spoiler] = [
    ("CR/LF/NUL in the subject", _break_subject, HeaderInjectionError, "subject"),
    ("CR/LF in a header value", _set(headers=INJECTIONS.map(lambda v: {"X-Evil": v})),
     HeaderInjectionError, "header"),
    ("CR/LF in a recipient", _break_recipient, HeaderInjectionError, "to"),
    ("no recipient", _set(to=st.sampled_from([[], "", " , "])), InvalidAddressError, "to"),
    ("malformed recipient", _set(to=MALFORMED), InvalidAddressError, "to"),
    ("invisible character in a local part", _set(to="jo\u200bsé@example.com"),
     InvalidAddressError, "to"),
    ("malformed cc", _set(cc="not an address"), InvalidAddressError, "cc"),
    ("two senders", _set(from_address="a@example.com, b@example.com"),
     InvalidAddressError, "from_address"),
    ("no content", _set(body=None, html=None), MissingContentError, "body"),
    ("NUL in the body", _set(body="a\x00b"), ValidationError, "body"),
    ("subject too long", _set(subject="s" * 999), ValidationError, "subject"),
    ("priority out of range", _set(priority=st.sampled_from([-1001, 1001, 10**9])),
     ValidationError, "priority"),
    ("naive send_after", _set(send_after=datetime(2030, 1, 1), expires_at=None),
     ValidationError, "send_after"),
    ("max_attempts below 1", _set(max_attempts=st.integers(-5, 0)),
     ValidationError, "max_attempts"),
    ("reserved header", _set(headers=RESERVED.map(lambda name: {name: "x"})),
     ValidationError, "headers"),
    ("header name with a colon", _set(headers={"X-A:B": "v"}), ValidationError, "headers"),
    ("empty idempotency key", _set(idempotency_key=""), ValidationError, "idempotency_key"),
]  # fmt: skip


@st.composite
def invalid_calls(draw: st.DrawFn) -> tuple[dict[str, Any], Spoiler]:
    call = draw(valid_calls())
    spoiler = draw(st.sampled_from(SPOILERS))
    spoiler[1](call, draw)
    return call, spoiler


@pytest.fixture
def client_and_store(owned_pg: PostgresServer) -> Iterator[tuple[Client, Store]]:
    url = migrated_database(owned_pg, "mailqd_prop")
    with Client(url) as client:
        store = Store.from_url(url)
        yield client, store
        store.close()


def examples(soak: bool) -> Any:
    return settings(
        max_examples=1000 if soak else 60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def row_count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM email_queue")).scalar_one())


def addresses(value: Any) -> list[tuple[str, str]]:
    """(display name, addr-spec) pairs of an address argument or a stored column."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [(name, addr) for name, addr in getaddresses(items)]


def test_whatever_enqueue_accepts_round_trips_and_can_be_sent(
    client_and_store: tuple[Client, Store], soak: bool
) -> None:
    client, store = client_and_store

    @examples(soak)
    @given(call=valid_calls())
    def check(call: dict[str, Any]) -> None:
        if call["idempotency_key"] is not None:  # a key seen before would return that job
            call["idempotency_key"] += f"-{uuid.uuid4()}"
        job_id = client.enqueue(**call)
        job = store.get(job_id)
        assert job.status == "pending" and job.attempts == 0
        assert addresses(job.recipient_to) == addresses(call["to"])
        assert addresses(job.cc) == addresses(call["cc"])
        assert addresses(job.bcc) == addresses(call["bcc"])
        assert (job.subject, job.body, job.html) == (call["subject"], call["body"], call["html"])
        assert job.headers == (call["headers"] or None)
        assert (job.priority, job.max_attempts) == (call["priority"], call["max_attempts"])
        assert job.idempotency_key == call["idempotency_key"]
        assert job.expires_at == call["expires_at"]
        if call["send_after"] is not None:
            assert job.next_attempt_at == call["send_after"]
        check_composes_to_the_same_message(job, call)

    check()


def check_composes_to_the_same_message(job: Job, call: dict[str, Any]) -> None:
    """The daemon can build this job's message, and it says what the caller asked for."""
    outgoing = compose(job, default_from="Sender <sender@example.com>")
    message = BytesParser(policy=email.policy.default).parsebytes(outgoing.data)
    assert _words(str(message["Subject"] or "")) == _words(call["subject"])
    for name, value in (call["headers"] or {}).items():
        assert _words(str(message[name] or "")) == _words(value)
    wanted = {
        addr.lower()
        for _, addr in addresses(call["to"]) + addresses(call["cc"]) + addresses(call["bcc"])
    }
    assert {r.lower() for r in outgoing.recipients} == wanted
    if call["body"] is not None:
        plain = message.get_body(("plain",))
        assert plain is not None
        assert _lines(plain.get_content()) == _lines(call["body"])


def _words(text: str) -> list[str]:
    """Header text as a reader sees it: its words, whatever whitespace is between them.

    The composer folds long headers and RFC 2047-encodes non-ASCII ones with
    the standard library, which treats every character `str.splitlines`
    knows (VT, FF, FS, GS, RS, NEL, U+2028, U+2029) as a line break and so
    turns it into folding whitespace, and a parser strips the whitespace
    (Unicode's, NBSP included) around a header's value.
    """
    return text.split()


def _lines(text: str) -> str:
    """Text as it travels: CRLF, CR and LF all end a line; the final line break is optional."""
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")


def test_whatever_enqueue_refuses_names_the_field_and_writes_nothing(
    client_and_store: tuple[Client, Store], soak: bool
) -> None:
    client, store = client_and_store

    @examples(soak)
    @given(case=invalid_calls())
    def check(case: tuple[dict[str, Any], Spoiler]) -> None:
        call, (what, _, error, field) = case
        before = row_count(store)
        with pytest.raises(ValidationError) as raised:
            client.enqueue(**call)
        assert isinstance(raised.value, error), f"{what}: {raised.value!r}"
        assert field in raised.value.field, f"{what}: the error names {raised.value.field!r}"
        assert row_count(store) == before, f"{what}: a row was written"

    check()


def test_every_address_the_client_accepts_can_be_sent(
    client_and_store: tuple[Client, Store], soak: bool
) -> None:
    client, store = client_and_store

    @examples(soak)
    @given(address=loose_addresses)
    def check(address: str) -> None:
        try:
            job_id = client.enqueue(address, "subject", "body")
        except InvalidAddressError:
            return
        compose(store.get(job_id), default_from="sender@example.com")

    check()
