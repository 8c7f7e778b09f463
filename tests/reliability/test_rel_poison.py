"""Scenario 5: poison input, written by plain SQL past every check the client makes.

Rows with NULLs wherever the schema allows them, subjects, bodies and
recipient lists over the daemon's limits (max_subject_length, ...), invalid
addresses, JSON of the wrong shape in `variables` and `headers`,
unknown template ids, CR/LF injection in every header-bound column. They are
queued at a higher priority than a batch of ordinary mail, so the daemon
meets them first. Each bad job must fail alone, with an error that names
the field and the problem; the weird-but-valid ones must be delivered
intact; the daemon must not crash or stall; the ordinary mail behind them
must all be delivered. Nothing injected may reach the server.

The client library's own checks are covered by property-based tests in
`test_rel_enqueue_properties.py`.
"""

from __future__ import annotations

import email.policy
import json
from dataclasses import dataclass, field
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from faulty_smtp import TOKEN_HEADER, FaultySmtp
from harness import MakeScenario, Scenario
from sqlalchemy.exc import DataError

from daemon_process import DaemonPool
from mailqd.store import upgrade
from mailqd.store.engine import make_engine

MB = 1_000_000
POISON_PRIORITY = 10
SERVER_SIZE_LIMIT = 16 * 2**20
# Above the server's limit, so that a 20 MB body is composed and then refused by
# the transport against the SIZE the server advertises (before MAIL: #12); the
# claim-time limits themselves are covered in tests/test_content.py.
DAEMON_MAX_BODY_BYTES = 24 * 2**20
VICTIM = "victim@example.com"
NULLABLE = (
    "html", "template_id", "variables", "cc", "bcc", "reply_to", "from_address", "expires_at",
    "max_attempts", "idempotency_key", "message_id", "last_error", "lease_owner",
    "lease_expires_at", "sent_at",
)  # fmt: skip


@dataclass
class Row:
    """One row to INSERT by plain SQL, and what must become of it (None: delivered)."""

    name: str
    columns: dict[str, Any]
    fails_with: str | None = None
    token: bool = True
    """Put an X-Rel-Token header on it (when its `headers` are not the poison)."""
    job_id: str = field(default="", init=False)


def poison_rows() -> list[Row]:
    bad = [
        Row("invalid address", {"recipient_to": "not-an-address"}, r"recipient_to.*address"),
        Row("empty recipient list", {"recipient_to": ""}, r"no recipients"),
        Row("only commas", {"recipient_to": " , , "}, r"recipient_to: holds an empty address"),
        Row("two @", {"recipient_to": "a@b@example.com"}, r"recipient_to"),
        Row("space in domain", {"recipient_to": "alice@exa mple.com"}, r"recipient_to"),
        Row("300-char address", {"recipient_to": "x" * 300 + "@example.com"}, r"recipient_to"),
        Row("CR/LF in recipient", {"recipient_to": f"a@example.com\r\nBcc: {VICTIM}"}, r"CR, LF"),
        Row("CR/LF in subject", {"subject": f"Hi\r\nBcc: {VICTIM}"}, r"subject.*CR, LF"),
        Row("LF in subject", {"subject": "Hi\nX-Injected: yes"}, r"subject.*CR, LF"),
        Row("CR in subject", {"subject": "Hi\rX-Injected: yes"}, r"subject.*CR, LF"),
        Row("CR/LF in reply_to", {"reply_to": f"r@example.com\nBcc: {VICTIM}"}, r"reply_to"),
        Row("CR/LF in From", {"from_address": f"f@example.com\r\nBcc: {VICTIM}"}, r"from_addr"),
        Row("CR/LF in cc", {"cc": f"c@example.com\r\nBcc: {VICTIM}"}, r"\bcc\b.*CR, LF"),
        Row(
            "CR/LF in a header value",
            {"headers": json.dumps({"X-Evil": f"v\r\nBcc: {VICTIM}"})},
            r"headers.*CR, LF",
            token=False,
        ),
        Row(
            "header name with a space",
            {"headers": '{"Bad Name": "v"}'},
            r"header name",
            token=False,
        ),
        Row("header name with a colon", {"headers": '{"X-A:B": "v"}'}, r"header name", token=False),
        Row(
            "From as extra header",
            {"headers": '{"From": "boss@example.com"}'},
            r"set by mailqd",
            token=False,
        ),
        Row(
            "headers a JSON array",
            {"headers": '["not", "an object"]'},
            r"headers.*JSON object",
            token=False,
        ),
        Row("header value a number", {"headers": '{"X-N": 5}'}, r"must be text", token=False),
        Row("variables a JSON array", {"variables": "[1, 2, 3]"}, r"variables.*JSON object"),
        Row("variables a JSON string", {"variables": '"text"'}, r"variables.*JSON object"),
        Row(
            "unknown template",
            {"template_id": "no-such-template", "body": None},
            r"unknown template",
        ),
        Row("unknown template, with a body", {"template_id": "welcome"}, r"unknown template"),
        Row("no body, html or template", {"body": None}, r"neither a body nor html"),
        Row("malformed From", {"from_address": "not an address"}, r"from_address"),
        Row("two From addresses", {"from_address": "a@example.com, b@example.com"}, r"exactly one"),
        Row("malformed cc", {"cc": "bad address"}, r"\bcc\b"),
        Row("malformed Message-ID", {"message_id": "no brackets, spaces"}, r"message_id"),
        Row(
            "extreme priority",
            {"priority": 2_147_483_647},
            r"priority: must be between -1000 and 1000",
        ),
        Row("max_attempts 0", {"max_attempts": 0}, r"max_attempts: .* 1 and 1000, got 0"),
        Row("max_attempts -1", {"max_attempts": -1}, r"max_attempts: .* 1 and 1000, got -1"),
        Row("expired before it was sent", {"expires_at": "2000-01-01T00:00:00+00:00"}, r"expired"),
        Row("own id with a space (no Message-ID)", {"id": "order 42"}, r"message_id"),
        Row(
            "20 MB body: too big for the server",
            {"body": ("z" * 99 + "\n") * (20 * MB // 100)},
            r"larger than the \d+ bytes the server accepts \(its SIZE\)",
        ),
        Row("100 KB subject of words", {"subject": "word " * 20_000}, r"max_subject_length"),
        Row("100 KB subject, one word", {"subject": "x" * 100_000}, r"max_subject_length"),
        Row(
            "too many recipients",
            {"recipient_to": ", ".join(f"r{i}@example.com" for i in range(101))},
            r"max_recipients",
        ),
    ]
    weird_but_valid = [
        Row("NULL in every nullable column", dict.fromkeys(NULLABLE)),
        Row("variables JSON null", {"variables": "null"}),
        Row("empty subject", {"subject": ""}),
        Row("998-character subject of words", {"subject": ("word " * 200)[:998]}),
        Row("998-character subject, one word", {"subject": "x" * 998}),
        Row("non-ASCII local part (SMTPUTF8)", {"recipient_to": "josé@example.com"}),
        Row(
            "12 MB body (the client's default limit is 10 MB)",
            {"body": ("y" * 99 + "\n") * 120_000},
        ),
        Row("1 MB body on one line", {"body": "q" * MB}),
        Row("lines that are dots", {"body": ".\n..\n.hidden\nend\n.\n"}),
        Row("bare CR and LF", {"body": "a\rb\r\nc\nd"}),
        Row("Unicode everywhere", {"subject": "Grüße 🎉 日本語", "body": "Ünïcödé 🎉 текст"}),
        Row("html only, with a script", {"body": None, "html": "<p>hi</p><script>x()</script>"}),
        Row(
            "quoted display names",
            {"recipient_to": '"Doe, John" <j@example.com>, A <a@example.com>'},
        ),
        Row("50 recipients", {"recipient_to": ", ".join(f"r{i}@example.com" for i in range(50))}),
        Row("nested variables, no template", {"variables": '{"a": {"b": [1, {"c": null}]}}'}),
        Row("empty headers object", {"headers": "{}"}, token=False),
        Row("negative attempts", {"attempts": -5}),
    ]
    return bad + weird_but_valid


def insert_rows(scenario: Scenario, rows: list[Row]) -> None:
    """INSERT each row by plain SQL (as another application would) and note it in the books."""
    postgres = scenario.store.dialect == "postgresql"
    with scenario.store.engine.begin() as conn:
        for number, row in enumerate(rows):
            token = f"{scenario.slug}.poison.{number}"
            values = {
                "recipient_to": f"poison{number}@example.com",
                "subject": f"poison: {row.name}",
                "body": f"poison row {number}: {row.name}",
                "priority": POISON_PRIORITY,
                **row.columns,
            }
            if row.token and "headers" not in row.columns:
                values["headers"] = json.dumps({TOKEN_HEADER: token})
            names = ", ".join(values)
            params = ", ".join(
                f"CAST(:{name} AS jsonb)" if postgres and name in ("headers", "variables")
                else f"CAST(:{name} AS timestamptz)" if postgres and name == "expires_at"
                else f":{name}"
                for name in values
            )  # fmt: skip
            row.job_id = conn.execute(
                sa.text(f"INSERT INTO email_queue ({names}) VALUES ({params}) RETURNING id"),
                values,
            ).scalar_one()
    for number, row in enumerate(rows):
        tokens = [f"{scenario.slug}.poison.{number}"] if row.token else None
        if row.fails_with is None:
            scenario.books.expect_delivered([row.job_id], tokens)
        else:
            scenario.books.expect_failed([row.job_id], row.fails_with, tokens)


def run_poison(scenario: Scenario, rows: list[Row], good: int) -> None:
    smtp = scenario.smtp
    smtp.stop()
    smtp.size_limit = SERVER_SIZE_LIMIT
    smtp.keep_content = True
    smtp.start()
    insert_rows(scenario, rows)
    scenario.enqueue(good)  # ordinary mail, queued behind the poison
    daemon = scenario.start_daemon(MAILQD_MAX_BODY_BYTES=str(DAEMON_MAX_BODY_BYTES))
    bad = sum(1 for r in rows if r.fails_with)
    scenario.books.fault(f"{bad} bad rows, {len(rows) - bad} odd but valid rows, by plain SQL")
    scenario.finish(daemon, drain_timeout=120)

    exits = daemon.events("worker exited")
    assert len(exits) == 3 and all(e.get("exit_code") == 0 for e in exits), exits
    assert not daemon.events("worker restart scheduled"), "no worker may die of a poison row"
    for copy in smtp.copies:
        assert VICTIM not in copy.recipients, "an injected Bcc reached the server"
        assert b"X-Injected" not in (copy.content or b"")[:100_000]
    check_content(scenario, rows)


def check_content(scenario: Scenario, rows: list[Row]) -> None:
    """The odd but valid rows arrive as written."""
    by_job = {}
    for copy in scenario.smtp.copies:
        if copy.content is not None and copy.message_id:
            by_job[copy.message_id] = copy
    named = {row.name: row for row in rows}
    dots = message_of(scenario, by_job, named["lines that are dots"].job_id)
    assert dots.get_content().splitlines() == [".", "..", ".hidden", "end", "."]
    unicode = message_of(scenario, by_job, named["Unicode everywhere"].job_id)
    assert str(unicode["Subject"]) == "Grüße 🎉 日本語"
    assert unicode.get_content().strip() == "Ünïcödé 🎉 текст"
    if "1 MB body on one line" in named:
        long_line = message_of(scenario, by_job, named["1 MB body on one line"].job_id)
        assert long_line.get_content().rstrip("\r\n") == "q" * MB
    words = message_of(scenario, by_job, named["998-character subject of words"].job_id)
    assert str(words["Subject"]).strip() == ("word " * 200)[:998].strip()


def message_of(scenario: Scenario, copies: dict[str, Any], job_id: str) -> Any:
    message_id = scenario.store.get(job_id).message_id
    assert message_id in copies, f"job {job_id} was not received"
    return BytesParser(policy=email.policy.default).parsebytes(copies[message_id].content)


def test_poison_rows_fail_alone_and_good_mail_behind_them_is_delivered(
    make_scenario: MakeScenario,
) -> None:
    scenario = make_scenario("5. poison input (PostgreSQL)", "poison")
    run_poison(scenario, poison_rows(), good=scenario.scale(ci=500, soak=5000))


def test_broken_json_cannot_even_be_queued_on_postgresql(make_scenario: MakeScenario) -> None:
    scenario = make_scenario("5. broken JSON (PostgreSQL)", "brokenjson")
    with pytest.raises(DataError), scenario.store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO email_queue (recipient_to, body, variables) "
                "VALUES ('a@example.com', 'x', CAST(:v AS jsonb))"
            ),
            {"v": '{"broken": '},
        )


def test_poison_rows_on_sqlite_including_broken_json(
    smtp: FaultySmtp, daemons: DaemonPool, soak: bool, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'poison.db'}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    scenario = Scenario("5. poison input (SQLite)", "sqlpoison", url, smtp, daemons, soak=soak)
    try:
        rows = [r for r in poison_rows() if "MB" not in r.name] + [
            Row("variables: broken JSON", {"variables": '{"broken": '}, r"variables.*JSON object"),
            Row(
                "headers: broken JSON", {"headers": "{X-A: b"}, r"headers.*JSON object", token=False
            ),
        ]
        run_poison(scenario, rows, good=scenario.scale(ci=200, soak=2000))
    finally:
        scenario.close()
        daemons.close()
