"""Every limit on every entry (#15): the client, `mailqctl enqueue`, and plain SQL rows.

The client refuses with a `ValidationError` naming the field and writes
nothing; `mailqctl enqueue` prints the same words; the same value inserted
by plain SQL (where the database can hold it) fails at its first attempt,
its `last_error` naming the column, and never stops the worker: the good
job behind the bad rows is sent at its first attempt.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from ctl_process import error_line, invoke
from mailqd import Client
from mailqd.daemon.worker import Worker
from mailqd.errors import ValidationError
from mailqd.models import Status
from mailqd.store import Store
from smtp_server import SmtpServer, smtp_server_fixture
from test_content import insert_row, row_count
from test_worker import DEADLINE, make_settings, run, running, smtp_factory

__all__ = ["smtp_server_fixture"]

EAST = timezone(timedelta(hours=-5))  # a session TimeZone west of UTC puts times east of it
MB5 = "x" * (5 * 1024 * 1024)

# (change to a good enqueue call, the field named, the problem as a regex)
CLIENT_CASES: list[tuple[dict[str, Any], str, str]] = [
    ({"priority": 1001}, "priority", r"must be between -1000 and 1000"),
    ({"priority": 10**12}, "priority", r"must be between -1000 and 1000"),
    ({"priority": 1.5}, "priority", r"must be an integer"),
    ({"max_attempts": 0}, "max_attempts", r"must be between 1 and 1000, got 0"),
    ({"max_attempts": 3_000_000_000}, "max_attempts", r"must be between 1 and 1000"),
    ({"max_attempts": True}, "max_attempts", r"must be an integer"),
    ({"expires_at": datetime(9999, 12, 31, 20, tzinfo=EAST)}, "expires_at", r"years 1 and 9998"),
    ({"expires_at": datetime(9999, 1, 1, tzinfo=UTC)}, "expires_at", r"years 1 and 9998"),
    ({"send_after": datetime(1, 1, 1, 1, tzinfo=timezone(timedelta(hours=5)))}, "send_after",
     r"years 1 and 9998"),
    ({"send_after": "tomorrow"}, "send_after", r"must be a datetime"),
    ({"idempotency_key": "k" * 256}, "idempotency_key", r"1 to 255 characters"),
    ({"idempotency_key": "a\x00b"}, "idempotency_key", r"must not contain NUL"),
    ({"idempotency_key": "a\ud800b"}, "idempotency_key", r"lone surrogate"),
    ({"template_id": "t\x00"}, "template_id", r"must not contain CR, LF or NUL"),
    ({"template_id": "t\udc80"}, "template_id", r"lone surrogate"),
    ({"variables": {"name": "a\x00b"}}, "variables", r"\['name'\] contains a NUL"),
    ({"variables": {"a": [{"b": "\ud800"}]}}, "variables", r"\['a'\]\[0\]\['b'\] is not valid"),
    ({"variables": {"k\x00": "v"}}, "variables", r"the key of \['k\\x00'\] contains a NUL"),
    ({"subject": "Hi\udc80"}, "subject", r"lone surrogate"),
    ({"body": "a\x00b"}, "body", r"must not contain NUL"),
    ({"body": "a\ud800b"}, "body", r"lone surrogate"),
    ({"html": "<p>\x00</p>"}, "html", r"must not contain NUL"),
    ({"headers": {"X-Long": "x" * 991}}, "headers[X-Long]", r"longer than 998 characters"),
    ({"headers": {"X-" + "n" * 1000: "v"}}, "headers", r"header name is longer than 996"),
    ({"headers": {f"X-{i}": MB5 for i in range(10)}}, "headers[X-0]", r"longer than 998"),
    ({"headers": {f"X-{i}": "v" for i in range(51)}}, "headers", r"more than 50 extra headers"),
    ({"headers": {f"X-{i}": "v" * 900 for i in range(40)}}, "headers", r"larger than 32768 bytes"),
    ({"headers": {"Sender": "boss@example.com"}}, "headers", r"Sender is set by mailqd"),
    ({"headers": {"Return-Path": "<x@example.com>"}}, "headers", r"Return-Path is set by mailqd"),
    ({"headers": {"Content-Disposition": "attachment"}}, "headers", r"is set by mailqd"),
    ({"headers": {"Content-ID": "<x@y>"}}, "headers", r"is set by mailqd"),
    ({"headers": {"X-Bad": "v\ud800"}}, "headers[X-Bad]", r"lone surrogate"),
    ({"to": "N" * 257 + " <a@example.com>"}, "to", r"display name is longer than 256"),
    ({"from_address": '"' + "N" * 300 + '" <a@example.com>'}, "from_address", r"longer than 256"),
]  # fmt: skip


@pytest.mark.timeout(120)
def test_the_client_refuses_every_limit_naming_the_field_and_writes_nothing(
    db_url: str, store: Store
) -> None:
    with Client(db_url) as client:
        for change, field, problem in CLIENT_CASES:
            call: dict[str, Any] = {"to": "a@example.com", "subject": "Hi", "body": "Hello"}
            call.update(change)
            with pytest.raises(ValidationError, match=problem) as caught:
                client.enqueue(**call)
            assert caught.value.field == field, (change.keys(), caught.value)
            with pytest.raises(ValidationError, match=re.escape(f"messages[0].{field}: ")):
                client.enqueue_many([call])
    assert row_count(store) == 0


def test_mailqctl_enqueue_refuses_the_same_values_with_the_same_words(
    db_url: str, store: Store
) -> None:
    base = ["--to", "a@example.com", "--subject", "Hi", "--body", "b"]
    cases = [
        (["--expires-at", "9999-12-31T20:00:00-05:00"], "expires_at: must be between the years"),
        (["--idempotency-key", "k" * 256], "idempotency_key: must be a string of 1 to 255"),
        (["--header", "X-Long: " + "x" * 991], "headers[X-Long]: 'X-Long: value' is longer"),
        (["--header", "Sender: boss@example.com"], "headers: Sender is set by mailqd"),
        (["--header", "Content-ID: <x@y>"], "headers: Content-ID is set by mailqd"),
        (["--to", "N" * 257 + " <b@example.com>"], "to: a display name is longer than 256"),
    ]
    for args, expected in cases:
        line = error_line(invoke("enqueue", *base, *args, db=db_url))
        assert line.startswith(f"mailqctl: {expected}"), (args, line)
    # Integer flags are usage errors (exit 2), checked against the same ranges.
    for flag, value, bound in [
        ("--priority", "1001", "-1000<=x<=1000"),
        ("--max-attempts", "3000000000", "1<=x<=1000"),
        ("--max-attempts", "0", "1<=x<=1000"),
    ]:
        result = invoke("enqueue", *base, flag, value, db=db_url)
        assert result.returncode == 2 and bound in result.stderr, result.stderr
    assert row_count(store) == 0


# (columns of a plain SQL row, the dialects that can hold them, the start of `last_error`)
SQL_CASES: list[tuple[dict[str, Any], tuple[str, ...], str]] = [
    ({"message_id": f"<{'m' * 2000}@example.com>"}, ("sqlite", "postgresql"),
     "message_id: longer than 250 characters"),
    ({"message_id": "<a b@example.com>"}, ("sqlite", "postgresql"), "message_id: must look like"),
    ({"max_attempts": 3_000_000_000}, ("sqlite",), "max_attempts: must be between 1 and 1000"),
    ({"max_attempts": 1001}, ("sqlite", "postgresql"), "max_attempts: must be between 1 and 1000"),
    ({"max_attempts": 0}, ("sqlite", "postgresql"), "max_attempts: must be between 1 and 1000"),
    ({"priority": 10**12}, ("sqlite",), "priority: must be between -1000 and 1000"),
    ({"priority": -5000}, ("sqlite", "postgresql"), "priority: must be between -1000 and 1000"),
    ({"expires_at": "9999-06-01 00:00:00.000"}, ("sqlite", "postgresql"),
     "expires_at: must be between the years 1 and 9998"),
    ({"idempotency_key": "a\x00b"}, ("sqlite",), "idempotency_key: must not contain NUL"),
    ({"idempotency_key": "k" * 300}, ("sqlite",), "idempotency_key: must be a string of 1 to 255"),
    ({"template_id": "t\x00"}, ("sqlite",), "template_id: must not contain NUL"),
    ({"variables": json.dumps({"name": "a\x00b"})}, ("sqlite",),
     "variables: ['name'] contains a NUL character"),
    ({"subject": "Hi\x00"}, ("sqlite",), "cannot compose message: subject: must not contain CR"),
    ({"body": "a\x00b"}, ("sqlite",), "cannot compose message: body: must not contain NUL"),
    ({"headers": json.dumps({"X-Long": "x" * 991})}, ("sqlite", "postgresql"),
     "cannot compose message: headers[X-Long]: 'X-Long: value' is longer than 998"),
    ({"headers": json.dumps({f"X-{i}": MB5 for i in range(10)})}, ("sqlite", "postgresql"),
     "cannot compose message: headers[X-0]: 'X-0: value' is longer than 998"),
    ({"headers": json.dumps({"X-" + "n" * 1000: "v"})}, ("sqlite", "postgresql"),
     "cannot compose message: headers: a header name is longer than 996"),
    ({"headers": json.dumps({f"X-{i}": "v" * 900 for i in range(40)})}, ("sqlite", "postgresql"),
     "cannot compose message: headers: larger than 32768 bytes in all"),
    ({"headers": json.dumps({"Sender": "boss@example.com"})}, ("sqlite", "postgresql"),
     "cannot compose message: headers: Sender is set by mailqd"),
    ({"recipient_to": "N" * 257 + " <a@example.com>"}, ("sqlite", "postgresql"),
     "cannot compose message: recipient_to: a display name is longer than 256"),
    ({"recipient_to": "victim@[127.0.0.1]"}, ("sqlite", "postgresql"),
     "cannot compose message: recipient_to: 'victim@[127.0.0.1]' is not accepted"),
    ({"recipient_to": "@localhost"}, ("sqlite", "postgresql"),
     "cannot compose message: recipient_to: '@localhost' is not a valid e-mail address"),
]  # fmt: skip


@pytest.mark.timeout(120)
def test_plain_sql_rows_out_of_the_rules_fail_at_their_first_attempt_naming_the_column(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(db_url, smtp_server.url(), concurrency=2)
    bad = {
        insert_row(store, **columns): error
        for columns, dialects, error in SQL_CASES
        if store.dialect in dialects
    }
    with Client(db_url) as client:
        good = client.enqueue("good@example.com", "good", "fine")

    async def scenario() -> None:
        async with running(Worker(settings, store, "w1", smtp_factory(settings))) as worker:
            await worker.wait_until(lambda t: t.sent + t.failed >= len(bad) + 1, DEADLINE)
        assert (worker.totals.sent, worker.totals.failed) == (1, len(bad))

    run(scenario)
    for job_id, error in bad.items():
        job = store.get(job_id)
        assert (job.status, job.attempts) == (Status.FAILED, 1), (error, job.status)
        assert job.last_error is not None and job.last_error.startswith(error), job.last_error
    sent = store.get(good)
    assert (sent.status, sent.attempts) == (Status.SENT, 1)
    assert [m.rcpt_tos for m in smtp_server.messages] == [("good@example.com",)]
