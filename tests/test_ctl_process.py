"""`mailqctl` as an operator runs it: the installed command, in a subprocess.

Against real PostgreSQL and SQLite: every command once, with its `--json`
keys and exit codes; and the one-line errors (never a traceback) of every
command for an unreachable database and an unmigrated schema. The
details of each command are in test_ctl.py (in-process); `drain` against
an SMTP server in test_ctl_drain.py.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ctl_process import (
    CLEANUP_KEYS,
    DRAIN_KEYS,
    EVERY_COMMAND,
    STATS_KEYS,
    error_line,
    mailqctl,
    ok_json,
    run_all,
)
from mailqd.models import Job, Outcome, Status
from mailqd.store import Completion, Store
from pg import MakeDatabase

UNMIGRATED = "mailqctl: the database has no mailqd schema; run `mailqctl migrate`"


def fail_one(store: Store) -> str:
    """Turn the one due job into a permanently failed one; returns its id."""
    [job] = store.claim("test", 1, lease_seconds=60)
    store.complete([_failed(job)])
    return job.id


def _failed(job: Job) -> Completion:
    return Completion(
        job_id=job.id,
        owner="test",
        attempt=1,
        outcome=Outcome.FAILED,
        started_at=datetime.now(UTC),
        duration_seconds=0.1,
        smtp_code=550,
        smtp_text="550 no such user",
        error="550 no such user",
    )


@pytest.mark.runs_for(9)
def test_every_command_as_a_subprocess(store: Store, db_url: str) -> None:
    migrated = mailqctl("migrate", db=db_url)
    assert (migrated.returncode, "nothing to do" in migrated.stdout) == (0, True)
    failed_id = ok_json(
        mailqctl("enqueue", "--to", "f@example.com", "--body", "x", "--json", db=db_url)
    )["id"]
    assert fail_one(store) == failed_id
    flagged = ok_json(
        mailqctl(
            "enqueue", "--to", "a@example.com", "--subject", "s", "--body", "b", "--json", db=db_url
        )
    )["id"]
    piped = mailqctl("enqueue", "-", db=db_url, input="To: b@example.com\nSubject: s\n\nbody\n")
    assert piped.returncode == 0, piped.stderr
    assert store.get(piped.stdout.strip()).body == "body\n"

    stats, failed, show, missing, top_once, top_json, dry_run, no_choice = run_all(
        [
            ["stats", "--json"],
            ["failed", "--json"],
            ["show", flagged, "--json"],
            ["show", "no-such-id"],
            ["top", "--once"],
            ["top", "--iterations", "2", "--interval", "0.1", "--json"],
            ["cleanup", "--days", "30", "--dry-run", "--json"],
            ["retry"],
        ],
        db=db_url,
    )
    document = ok_json(stats)
    assert set(document) == STATS_KEYS
    assert document["counts"] == {
        "pending": 2,
        "sending": 0,
        "sent": 0,
        "failed": 1,
        "cancelled": 0,
    }
    [listed] = ok_json(failed)["jobs"]
    assert (listed["id"], listed["to"]) == (failed_id, ["f***@example.com"])
    assert set(ok_json(show)) == {"job", "attachments", "recipients", "attempts"}
    assert ok_json(show)["job"]["id"] == flagged
    assert error_line(missing) == "mailqctl: no job with id no-such-id"
    assert top_once.returncode == 0 and "queue depth" in top_once.stdout
    frames = [json.loads(line) for line in top_json.stdout.splitlines()]
    assert len(frames) == 2 and all(set(frame) == STATS_KEYS for frame in frames)
    assert ok_json(dry_run) == {"days": 30.0, "dry_run": True, "would_delete": 0}
    assert no_choice.returncode == 2 and "--all" in no_choice.stderr

    cancelled, retried = run_all(
        [["cancel", flagged, "--json"], ["retry", "--all", "--json"]], db_url
    )
    assert ok_json(cancelled) == {"id": flagged, "status": "cancelled"}
    assert ok_json(retried) == {"requeued": 1}
    requeued = mailqctl("requeue", flagged, "--json", db=db_url)
    assert ok_json(requeued) == {"id": flagged, "status": "pending"}

    drained = mailqctl("drain", "--json", db=db_url, env={"MAILQD_SMTP_URL": "null://"})
    document = ok_json(drained)
    assert set(document) == DRAIN_KEYS
    assert (document["claimed"], document["sent"]) == (3, 3)
    assert store.counts().by_status == {Status.SENT: 3}

    cleaned = ok_json(mailqctl("cleanup", "--days", "0", "--json", db=db_url))
    assert set(cleaned) == CLEANUP_KEYS
    assert cleaned["deleted"] == 3


@pytest.mark.runs_for(6)
def test_every_command_reports_an_unreachable_database() -> None:
    url = "postgresql://mailqd:s3cret@127.0.0.1:1/mailqd"
    commands = [*EVERY_COMMAND, ["migrate"]]
    for args, result in zip(commands, run_all(commands, db=url), strict=True):
        line = error_line(result)
        assert line.startswith("mailqctl: database unavailable"), (args, line)
        assert "s3cret" not in line


def test_an_unreachable_sqlite_file_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'no-such-directory' / 'mailqd.db'}"
    for result in run_all([["stats"], ["migrate"]], db=url):
        assert error_line(result).startswith("mailqctl: database unavailable: unable to open")


def test_every_command_refuses_an_unmigrated_schema(sqlite_url: str) -> None:
    for args, result in zip(EVERY_COMMAND, run_all(EVERY_COMMAND, db=sqlite_url), strict=True):
        assert error_line(result) == UNMIGRATED, args


def test_an_unmigrated_postgresql_database_is_refused(make_pg_database: MakeDatabase) -> None:
    commands = [["stats", "--json"], ["drain"], ["enqueue", "--to", "a@example.com", "--body", "b"]]
    for args, result in zip(commands, run_all(commands, db=make_pg_database()), strict=True):
        assert error_line(result) == UNMIGRATED, args


def test_bad_database_urls_are_one_line() -> None:
    unsupported, garbage = run_all(
        [
            ["--database-url", "mysql://u@h/db", "stats"],
            ["--database-url", "not a url", "stats"],
        ]
    )
    assert error_line(unsupported).startswith("mailqctl: config database_url: 'mysql")
    assert error_line(garbage).startswith("mailqctl: config database_url: not a database URL")
