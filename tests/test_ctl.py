"""`mailqctl` commands in detail, against real PostgreSQL and SQLite.

Each command's human output, `--json` keys (the documented, stable
interface in docs/cli.md), exit codes (0 done, 1 failed, 2 usage) and
one-line errors. These run the click command in this process (click's
runner: the same code, without starting an interpreter per call);
test_ctl_process.py runs every command as a real subprocess, with the
errors for an unreachable database and an unmigrated schema. The queue is
set up through the store, with times relative to the database clock.
`drain` against an SMTP server is in test_ctl_drain.py, `cleanup` under
load in test_ctl_cleanup.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from ctl_process import (
    CLEANUP_KEYS,
    EVERY_COMMAND,
    STATS_KEYS,
    Result,
    error_line,
    invoke,
    ok_json,
)
from mailqd.cli.ctl import cli
from mailqd.models import JOB_COLUMNS, Job, Outcome, Status
from mailqd.store import Completion, Store
from mailqd.validation import build_job

WINDOW_KEYS = {
    "seconds",
    "sent",
    "failed",
    "failure_rate",
    "attempts",
    "deduplicated",
    "deferred_by_recipient_cap",
    "deferred_by_relay",
}
FAILED_KEYS = {"id", "to", "subject", "attempts", "max_attempts", "last_error", "failed_at"}
ATTEMPT_KEYS = {
    "attempt",
    "started_at",
    "duration_seconds",
    "outcome",
    "smtp_code",
    "smtp_text",
    "worker",
}


def invoke_all(commands: list[list[str]], db: str | None = None) -> list[Result]:
    return [invoke(*args, db=db) for args in commands]


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def enqueue(store: Store, to: str = "alice@example.com", **fields: object) -> str:
    values: dict[str, object] = {"to": to, "subject": "Hi", "body": "Hello"}
    values.update(fields)
    return store.enqueue(build_job(**values))  # type: ignore[arg-type]


def finish(
    store: Store,
    job_id: str,
    outcome: Outcome,
    when: datetime | None = None,
    error: str = "550 5.1.1 no such user",
) -> None:
    """Claim the one due job `job_id` and record an attempt ending in `outcome`."""
    jobs = store.claim("test", 100, lease_seconds=60, now=when)
    [job] = [j for j in jobs if j.id == job_id]
    store.release([j.id for j in jobs if j.id != job_id], "test", now=when)
    store.complete([attempt(job, outcome, error, when)], now=when)


def attempt(job: Job, outcome: Outcome, error: str, when: datetime | None) -> Completion:
    return Completion(
        job_id=job.id,
        owner="test",
        attempt=job.attempts + 1,
        outcome=outcome,
        started_at=when or datetime.now(UTC),
        duration_seconds=0.2,
        smtp_code=None if outcome is Outcome.SENT else 550,
        smtp_text="250 OK" if outcome is Outcome.SENT else error,
        error=None if outcome is Outcome.SENT else error,
    )


def failed_job(
    store: Store,
    to: str = "alice@example.com",
    seconds_ago: float = 1,
    error: str = "550 5.1.1 no such user",
) -> str:
    job_id = enqueue(store, to, send_after=ago(seconds_ago + 1))
    finish(store, job_id, Outcome.FAILED, ago(seconds_ago), error)
    return job_id


# -- stats ------------------------------------------------------------------------


def test_stats_counts_windows_and_json_keys(store: Store, db_url: str, tmp_path: Path) -> None:
    sent = enqueue(store, send_after=ago(120))
    finish(store, sent, Outcome.SENT)
    failed_job(store, seconds_ago=600)  # in the hour, not the last 5 minutes
    enqueue(store, send_after=ago(90))  # due for 90 s
    enqueue(store, send_after=ago(-3600))  # scheduled
    store.cancel(enqueue(store))

    config = tmp_path / "mailqd.toml"
    config.write_text(f'database_url = "{db_url}"\n')
    by_flag = invoke("stats", "--json", db=db_url)
    by_config = invoke("--config", str(config), "stats", "--json")
    document = ok_json(by_flag)
    assert set(document) == STATS_KEYS
    assert set(document["last_5m"]) == set(document["last_1h"]) == WINDOW_KEYS
    assert document["counts"] == {
        "pending": 2,
        "sending": 0,
        "sent": 1,
        "failed": 1,
        "cancelled": 1,
    }
    assert (document["queue_depth"], document["due"]) == (2, 1)
    assert 85 < document["oldest_pending_age_seconds"] < 600
    assert document["last_5m"] == {
        "seconds": 300.0,
        "sent": 1,
        "failed": 0,
        "failure_rate": 0.0,
        "attempts": 1,
        "deduplicated": 0,
        "deferred_by_recipient_cap": 0,
        "deferred_by_relay": 0,
    }
    assert document["last_1h"]["failed"] == 1
    assert document["last_1h"]["failure_rate"] == 0.5
    assert datetime.fromisoformat(document["at"]).tzinfo is not None
    assert ok_json(by_config)["counts"] == document["counts"]

    human = invoke("stats", env={"MAILQD_DATABASE_URL": db_url})
    assert human.returncode == 0, human.stderr
    assert "queue depth" in human.stdout and "last 5 minutes" in human.stdout
    assert "50.0%" in human.stdout


# -- failed -----------------------------------------------------------------------


def test_failed_lists_newest_first_with_masked_recipients(store: Store, db_url: str) -> None:
    none, none_json = invoke_all([["failed"], ["failed", "--json"]], db=db_url)
    assert (none.returncode, none.stdout.strip()) == (0, "no failed jobs")
    assert ok_json(none_json) == {"jobs": []}

    oldest = failed_job(
        store, "carol@example.org", seconds_ago=30, error="550 <carol@example.org>: no such user"
    )
    middle = failed_job(store, "Bob <bob@example.net>", seconds_ago=20)
    newest = failed_job(store, "alice@example.com", seconds_ago=10)
    enqueue(store, "pending@example.com")

    as_json, human, empty_limit = invoke_all(
        [["failed", "--limit", "2", "--json"], ["failed"], ["failed", "--limit", "0"]], db=db_url
    )
    jobs = ok_json(as_json)["jobs"]
    assert [j["id"] for j in jobs] == [newest, middle]
    assert all(set(j) == FAILED_KEYS for j in jobs)
    assert jobs[0]["to"] == ["a***@example.com"]
    assert jobs[1]["to"] == ["b***@example.net"]
    assert (jobs[0]["attempts"], jobs[0]["max_attempts"]) == (1, 3)
    assert jobs[0]["last_error"] == "550 5.1.1 no such user"
    assert datetime.fromisoformat(jobs[0]["failed_at"]) < datetime.now(UTC)

    assert human.returncode == 0, human.stderr
    assert oldest in human.stdout and "c***@example.org" in human.stdout
    assert "550 <c***@example.org>: no such user" in human.stdout
    assert "alice@" not in human.stdout and "Bob" not in human.stdout
    assert "carol@" not in human.stdout
    assert "1/3" in human.stdout
    assert empty_limit.returncode == 2


# -- show -------------------------------------------------------------------------


def test_show_prints_every_field_the_body_and_the_attempts(store: Store, db_url: str) -> None:
    job_id = enqueue(
        store,
        "Alice <alice@example.com>",
        subject="Your [order]",
        body="Plain body line",
        html="<p>HTML body</p>",
        headers={"X-Campaign": "42"},
        send_after=ago(5),
    )
    finish(store, job_id, Outcome.FAILED, error="451 4.3.0 try later")
    store.requeue_failed([job_id])

    as_json, human, missing = invoke_all(
        [["show", job_id, "--json"], ["show", job_id], ["show", "no-such-id"]], db=db_url
    )
    document = ok_json(as_json)
    assert set(document) == {"job", "attachments", "recipients", "attempts"}
    assert set(document["job"]) == set(JOB_COLUMNS)
    job = document["job"]
    assert (job["id"], job["status"], job["attempts"]) == (job_id, "pending", 0)
    assert job["recipient_to"] == "Alice <alice@example.com>"
    assert (job["body"], job["html"]) == ("Plain body line", "<p>HTML body</p>")
    assert job["headers"] == {"X-Campaign": "42"}
    [history] = document["attempts"]
    assert set(history) == ATTEMPT_KEYS
    assert (history["outcome"], history["smtp_code"]) == ("failed", 550)

    assert human.returncode == 0, human.stderr
    for text in ("Alice <alice@example.com>", "Your [order]", "Plain body line", "451 4.3.0"):
        assert text in human.stdout
    assert "X-Campaign" in human.stdout

    assert error_line(missing) == "mailqctl: no job with id no-such-id"
    assert invoke("show", db=db_url).returncode == 2


# -- retry, requeue, cancel -------------------------------------------------------


def test_retry_by_count_by_id_and_all(store: Store, db_url: str) -> None:
    first = failed_job(store, seconds_ago=30)
    second = failed_job(store, seconds_ago=20)
    newest = failed_job(store, seconds_ago=10)
    pending = enqueue(store)

    nothing, by_count = invoke_all([["retry"], ["retry", "--max", "1", "--json"]], db=db_url)
    assert nothing.returncode == 2
    assert "Error: say which failed jobs to retry: job ids, --max N, or --all" in nothing.stderr
    assert ok_json(by_count) == {"requeued": 1}
    job = store.get(newest)
    assert (job.status, job.attempts) == (Status.PENDING, 0)
    assert job.next_attempt_at <= datetime.now(UTC) + timedelta(seconds=1)

    not_failed, unknown, mixed = invoke_all(
        [["retry", pending], ["retry", "nope"], ["retry", first, pending]], db=db_url
    )
    assert error_line(not_failed) == f"mailqctl: cannot retry job {pending}: it is pending"
    assert error_line(unknown) == "mailqctl: no job with id nope"
    assert "cannot retry" in error_line(mixed)
    assert store.get(first).status is Status.FAILED  # all or nothing

    by_id = invoke("retry", first, db=db_url)
    assert (by_id.returncode, by_id.stdout.strip()) == (0, "requeued 1 failed job")
    everything = invoke("retry", "--all", db=db_url)
    assert (everything.returncode, everything.stdout.strip()) == (0, "requeued 1 failed job")
    assert store.get(second).status is Status.PENDING
    assert store.counts().by_status == {Status.PENDING: 4}


def test_cancel_and_requeue(store: Store, db_url: str) -> None:
    job_id = enqueue(store)
    cancelled = invoke("cancel", job_id, "--json", db=db_url)
    assert ok_json(cancelled) == {"id": job_id, "status": "cancelled"}
    again, unknown = invoke_all([["cancel", job_id], ["requeue", "nope"]], db=db_url)
    assert error_line(again) == f"mailqctl: cannot cancel job {job_id}: it is cancelled"
    assert error_line(unknown) == "mailqctl: no job with id nope"

    requeued = invoke("requeue", job_id, db=db_url)
    assert requeued.returncode == 0, requeued.stderr
    assert requeued.stdout.strip() == f"requeued job {job_id}: pending, due now"
    assert store.get(job_id).status is Status.PENDING
    assert "it is pending" in error_line(invoke("requeue", job_id, db=db_url))
    human = invoke("cancel", job_id, db=db_url)
    assert human.stdout.strip() == f"cancelled job {job_id}"


# -- enqueue ----------------------------------------------------------------------


def test_enqueue_from_flags(store: Store, db_url: str, tmp_path: Path) -> None:
    html = tmp_path / "body.html"
    html.write_text("<p>Hello <b>Alice</b></p>", encoding="utf-8")
    result = invoke(
        "enqueue",
        "--to", "Alice <alice@example.com>",
        "--to", "bob@example.com",
        "--cc", "carol@example.com",
        "--from", "Shop <shop@example.com>",
        "--reply-to", "help@example.com",
        "--subject", "Grüße",
        "--body", "Hello Alice",
        "--html-file", str(html),
        "--header", "X-Campaign: 42",
        "--priority", "7",
        "--send-after", "10m",
        "--max-attempts", "5",
        "--idempotency-key", "order-1",
        "--json",
        db=db_url,
    )  # fmt: skip
    job_id = ok_json(result)["id"]
    job = store.get(job_id)
    assert job.recipient_to == "Alice <alice@example.com>, bob@example.com"
    assert (job.cc, job.from_address, job.reply_to) == (
        "carol@example.com",
        "Shop <shop@example.com>",
        "help@example.com",
    )
    assert (job.subject, job.body, job.html) == ("Grüße", "Hello Alice", html.read_text())
    assert (job.headers, job.priority, job.max_attempts) == ({"X-Campaign": "42"}, 7, 5)
    assert timedelta(minutes=9) < job.next_attempt_at - datetime.now(UTC) < timedelta(minutes=11)

    again = invoke(
        "enqueue", "--to", "x@example.com", "--body", "b", "--idempotency-key", "order-1", db=db_url
    )
    assert again.stdout.strip() == job_id  # the human output is the bare id


def test_enqueue_with_a_template_queues_its_id_and_variables(store: Store, db_url: str) -> None:
    result = invoke(
        "enqueue", "--to", "bob@example.com", "--template", "welcome",
        "--var", "name=Bob", "--var", "plan=pro=yearly",
        "--send-after", "2030-01-01T09:00:00+01:00",
        db=db_url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = store.get(result.stdout.strip())
    assert (job.template_id, job.variables) == ("welcome", {"name": "Bob", "plan": "pro=yearly"})
    assert (job.body, job.html, job.subject) == (None, None, "")
    assert job.next_attempt_at == datetime(2030, 1, 1, 8, 0, tzinfo=UTC)


MULTIPART = """\
From: Shop <shop@example.com>
To: Alice <alice@example.com>, bob@example.com
Cc: carol@example.com
Reply-To: help@example.com
Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=
X-Ignored: yes
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="b1"

--b1
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Hello Alice =E2=80=94 plain
--b1
Content-Type: text/html; charset=utf-8

<p>Hello Alice</p>
--b1--
"""


def test_enqueue_from_a_file_and_from_stdin(store: Store, db_url: str, tmp_path: Path) -> None:
    message = tmp_path / "message.eml"
    message.write_text(MULTIPART)
    from_file = invoke("enqueue", str(message), "--priority", "3", db=db_url)
    assert from_file.returncode == 0, from_file.stderr
    job = store.get(from_file.stdout.strip())
    assert job.recipient_to == "Alice <alice@example.com>, bob@example.com"
    assert (job.cc, job.reply_to) == ("carol@example.com", "help@example.com")
    assert (job.from_address, job.subject) == ("Shop <shop@example.com>", "Grüße")
    assert job.body == "Hello Alice — plain"
    assert job.html == "<p>Hello Alice</p>"
    assert (job.headers, job.priority) == (None, 3)

    plain = "To: dave@example.com\nSubject: from stdin\n\nJust text.\n"
    from_stdin = invoke("enqueue", "-", "--subject", "flag wins", "--json", db=db_url, input=plain)
    job = store.get(ok_json(from_stdin)["id"])
    assert (job.recipient_to, job.subject, job.body) == (
        "dave@example.com",
        "flag wins",
        "Just text.\n",
    )


BAD_MESSAGES = [
    (
        ["-"],
        "To: a@example.com\nSubject: =?utf-8?q?Hi=0D=0ABcc:_x@evil.example?=\n\nbody\n",
        "mailqctl: subject: must not contain CR, LF or NUL characters",
    ),
    (["-"], "To: not an address\nSubject: s\n\nbody\n", "mailqctl: to: "),
    (
        ["--to", "a@example.com\r\nBcc: x@evil.example", "--body", "b"],
        None,
        "mailqctl: to: must not contain CR, LF or NUL characters",
    ),
    (["--to", "a@@example.com", "--body", "b"], None, "mailqctl: to: "),
    (["--to", "a@example.com"], None, "mailqctl: body: one of body, html or template_id"),
    (
        ["--to", "a@example.com", "--body", "b", "--header", "Bcc: x@evil.example"],
        None,
        "mailqctl: headers: Bcc is set by mailqd",
    ),
]


def test_enqueue_refuses_bad_messages_and_writes_nothing(store: Store, db_url: str) -> None:
    results = [invoke("enqueue", *args, db=db_url, input=stdin) for args, stdin, _ in BAD_MESSAGES]
    for (_args, _stdin, expected), result in zip(BAD_MESSAGES, results, strict=True):
        assert error_line(result).startswith(expected)
        assert result.stdout == ""
    assert store.counts().by_status == {}


def test_enqueue_usage_errors_exit_2(tmp_path: Path) -> None:
    message = tmp_path / "m.eml"
    message.write_text("To: a@example.com\n\nbody\n")
    results = invoke_all(
        [
            ["enqueue", "--subject", "no recipient", "--body", "b"],
            ["enqueue", str(message), "--body", "also a body"],
            ["enqueue", "--to", "a@example.com", "--body", "b", "--var", "novalue"],
            ["enqueue", "--to", "a@example.com", "--body", "b", "--send-after", "tomorrow"],
            ["enqueue", "--to", "a@example.com", "--body", "b", "--priority", "5000"],
        ],
        db="sqlite:///never-opened.db",
    )
    for result in results:
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr


# -- cleanup ----------------------------------------------------------------------


def test_cleanup_counts_then_deletes_old_finished_jobs(store: Store, db_url: str) -> None:
    old = [enqueue(store, f"u{i}@example.com", send_after=ago(20 * 86400)) for i in range(5)]
    for job_id in old:
        finish(store, job_id, Outcome.SENT, ago(20 * 86400))
    store.cancel(enqueue(store))  # recent: kept
    recent = failed_job(store)  # recent: kept
    waiting = enqueue(store, send_after=ago(30 * 86400))  # pending, however old: kept

    dry = ok_json(invoke("cleanup", "--days", "7", "--dry-run", "--json", db=db_url))
    assert dry == {"days": 7.0, "dry_run": True, "would_delete": 5}
    assert store.counts().by_status[Status.SENT] == 5

    result = invoke("cleanup", "--days", "7", "--batch-size", "2", "--json", db=db_url)
    document = ok_json(result)
    assert set(document) == CLEANUP_KEYS
    assert (document["deleted"], document["batches"], document["dry_run"]) == (5, 3, False)
    assert 0 < document["longest_batch_seconds"] <= document["seconds"]
    assert store.attempts(old[0]) == []
    assert store.get(recent).status is Status.FAILED
    assert store.get(waiting).status is Status.PENDING
    assert store.counts().by_status == {Status.FAILED: 1, Status.CANCELLED: 1, Status.PENDING: 1}

    human, no_days = invoke_all([["cleanup", "--days", "7"], ["cleanup"]], db=db_url)
    assert human.stdout.startswith("deleted 0 finished jobs older than 7 days in 0 batches")
    assert no_days.returncode == 2  # --days is required


# -- top --------------------------------------------------------------------------


def test_top_renders_frames_without_a_terminal(store: Store, db_url: str) -> None:
    enqueue(store, send_after=ago(30))
    once, stream = invoke_all(
        [["top", "--once"], ["top", "--iterations", "3", "--interval", "0.1", "--json"]],
        db=db_url,
    )
    assert once.returncode == 0, once.stderr
    assert once.stdout.startswith("mailqd queue at ")
    assert once.stdout.count("mailqd queue at ") == 1
    for label in ("sent now", "failure rate", "queue depth", "oldest due job", "retries due"):
        assert label in once.stdout
    assert "1 (1 due now)" in once.stdout

    lines = stream.stdout.splitlines()
    assert stream.returncode == 0 and len(lines) == 3
    frames = [json.loads(line) for line in lines]
    assert all(set(frame) == STATS_KEYS for frame in frames)
    assert frames[-1]["counts"]["pending"] == 1


def test_top_iterations_print_one_frame_each(db_url: str) -> None:
    result = invoke("top", "--iterations", "2", "--interval", "0.1", db=db_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("mailqd queue at ") == 2
    assert "/s" in result.stdout  # the second frame has a current rate


# -- help -------------------------------------------------------------------------


def test_every_command_has_help_with_an_example() -> None:
    """Checked in-process: the help text is static, and this saves a dozen interpreters."""
    # `secrets generate-key` writes a key file and `dkim-record` reads one: no database.
    offline = {"secrets", "dkim-record"}
    assert set(cli.commands) == {"migrate", *offline, *(args[0] for args in EVERY_COMMAND)}
    for name, command in cli.commands.items():
        context = click.Context(command, info_name=name, parent=click.Context(cli))
        text = command.get_help(context)
        assert "Example" in text and f"mailqctl {name}" in text, name
