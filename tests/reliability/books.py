"""The books of a reliability scenario: every job enqueued, reconciled with what the server got.

A scenario tells `Books` every job it enqueued and whether it must be
delivered or must fail (and with which reason). At the end, `close()` reads
every row of the scenario's database and every copy the SMTP server
received (`FaultySmtp.copies`, across restarts) and counts, per job:

- delivered: `sent`, and the server accepted (answered 2xx to) at least one
  copy;
- failed as expected: `failed`, the scenario expected it to, and
  `last_error` says why (matches the expected reason);
- lost: the row is gone, or it is `sent` but no copy was accepted by the
  server (must be 0);
- stuck: still `pending` or `sending` when the scenario gave up waiting
  (must be 0);
- unexpected: `failed` although it should have been delivered, `failed`
  with another reason than expected, delivered although it should have
  failed, or `cancelled` (must be 0);
- duplicates: the server received the job's content more than once,
  counting accepted copies and unanswered ones (content received, reply
  dropped, hung or too late: the sender cannot tell whether the server
  kept it, so the conservative count includes them); copies the server
  explicitly refused (4xx/5xx) are not received. `acked twice` counts jobs
  the server explicitly accepted more than once. Every copy of a job must
  carry the same Message-ID, the one in its row (`mid_mismatch`, must be 0).

A copy is matched to its job by the `X-Rel-Token` header the scenario put
on it (independent of the Message-ID, which is what is being checked), or
for rows without one by the job id in the Message-ID. A copy that matches
no job is a `stray` (must be 0).

`close()` prints one result line and appends it, as a Markdown table row, to
the results file (`MAILQD_RELIABILITY_RESULTS`, default
`tests/reliability/last_run.md`), which holds the rows of the latest test run
(from all its pytest-xdist workers).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from faulty_smtp import ACCEPTED, UNANSWERED, Copy, FaultySmtp

from mailqd.store import Store

__all__ = ["Books", "Tally", "results_path"]

RESULTS_ENV = "MAILQD_RELIABILITY_RESULTS"
DEFAULT_RESULTS = Path(__file__).resolve().parent / "last_run.md"
HEADER = (
    "| scenario | faults injected | messages | delivered | failed as expected | lost | stuck "
    "| duplicates (acked twice) | unexpected | time |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
)
_JOB_ID_IN_MESSAGE_ID = re.compile(r"^<(.+)@[^@>]+>$")
XDIST_RUN_ENV = "PYTEST_XDIST_TESTRUNUID"
"""Set by pytest-xdist in its workers: the same id for every worker of one run."""
_PROCESS_RUN = secrets.token_hex(8)
run_mode = "CI"
"""Set to "soak" by the suite's conftest under `--soak`; written in the results file's title."""


def results_path() -> Path:
    return Path(os.environ.get(RESULTS_ENV) or DEFAULT_RESULTS)


@dataclass(frozen=True)
class Expectation:
    """What must become of a job: delivered (reason None), or failed with a reason matching."""

    fail_reason: re.Pattern[str] | None = None


@dataclass
class Tally:
    """The reconciled counts of one scenario (see the module docstring)."""

    scenario: str
    faults: str
    messages: int = 0
    delivered: int = 0
    failed_expected: int = 0
    lost: int = 0
    stuck: int = 0
    unexpected: int = 0
    duplicates: int = 0
    acked_twice: int = 0
    mid_mismatch: int = 0
    strays: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        """Every job accounted for, as the scenario expected, with nothing lost or stuck."""
        return (
            self.delivered + self.failed_expected == self.messages
            and self.lost == 0
            and self.stuck == 0
            and self.unexpected == 0
            and self.mid_mismatch == 0
            and self.strays == 0
        )

    def line(self) -> str:
        extra = ""
        if self.mid_mismatch or self.strays:
            extra = f" [Message-ID mismatches {self.mid_mismatch}, strays {self.strays}]"
        return (
            f"| {self.scenario} | {self.faults} | {self.messages:,} | {self.delivered:,} "
            f"| {self.failed_expected:,} | {self.lost} | {self.stuck} "
            f"| {self.duplicates:,} ({self.acked_twice:,}) | {self.unexpected}{extra} "
            f"| {self.seconds:.0f} s |"
        )

    def explain(self) -> str:
        shown = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        return f"{self.line()}\n  {shown}{more}" if self.problems else self.line()


class Books:
    """Every job a scenario enqueued, and what must become of it (see the module docstring)."""

    def __init__(self, scenario: str, store: Store, smtp: FaultySmtp) -> None:
        self.scenario = scenario
        self.store = store
        self.smtp = smtp
        self.faults: list[str] = []
        self.expected: dict[str, Expectation] = {}
        self.by_token: dict[str, str] = {}
        self._started = time.monotonic()

    def expect_delivered(self, job_ids: list[str], tokens: list[str] | None = None) -> None:
        self._expect(job_ids, tokens, Expectation())

    def expect_failed(
        self, job_ids: list[str], reason: str, tokens: list[str] | None = None
    ) -> None:
        """These jobs must end `failed` with a `last_error` matching the regex `reason`."""
        self._expect(job_ids, tokens, Expectation(re.compile(reason, re.IGNORECASE | re.DOTALL)))

    def _expect(self, job_ids: list[str], tokens: list[str] | None, what: Expectation) -> None:
        for job_id in job_ids:
            assert job_id not in self.expected, f"job {job_id} enqueued twice in the books"
            self.expected[job_id] = what
        if tokens is not None:
            for token, job_id in zip(tokens, job_ids, strict=True):
                self.by_token[token] = job_id

    def fault(self, description: str) -> None:
        """Note a fault the scenario injected, for the result line."""
        self.faults.append(description)

    # -- reconciling ------------------------------------------------------------

    def close(self, *, record: bool = True) -> Tally:
        """Reconcile, print the result line and (if `record`) append it to the results file."""
        tally = self.reconcile()
        print(f"\nRELIABILITY {tally.explain()}")
        if record:
            _append_result(tally.line())
        return tally

    def reconcile(self) -> Tally:
        tally = Tally(
            self.scenario,
            "; ".join(self.faults) or "none",
            messages=len(self.expected),
            seconds=time.monotonic() - self._started,
        )
        rows = self._rows()
        copies = self._copies_by_job(tally)
        for job_id, what in self.expected.items():
            row = rows.get(job_id)
            job_copies = copies.get(job_id, [])
            self._count_copies(tally, job_id, row, job_copies)
            if row is None:
                tally.lost += 1
                tally.problems.append(f"lost: job {job_id} has no row")
                continue
            status, last_error = row.status, row.last_error or ""
            accepted = sum(1 for c in job_copies if c.fate == ACCEPTED)
            if status in ("pending", "sending"):
                tally.stuck += 1
                tally.problems.append(f"stuck: job {job_id} is {status} ({last_error[:120]})")
            elif status == "sent" and accepted == 0:
                tally.lost += 1
                tally.problems.append(f"lost: job {job_id} is sent but the server accepted none")
            elif status == "sent" and what.fail_reason is None:
                tally.delivered += 1
            elif what.fail_reason and accepted:
                tally.unexpected += 1
                tally.problems.append(
                    f"unexpected: job {job_id} must fail, yet was delivered ({status})"
                )
            elif status == "failed" and what.fail_reason and what.fail_reason.search(last_error):
                tally.failed_expected += 1
            else:
                tally.unexpected += 1
                expected = f"failed /{what.fail_reason.pattern}/" if what.fail_reason else "sent"
                tally.problems.append(
                    f"unexpected: job {job_id} is {status}, expected {expected}: "
                    f"{last_error[:300]!r}"
                )
        unknown = set(rows) - set(self.expected)
        if unknown:
            tally.unexpected += len(unknown)
            tally.problems.append(f"unexpected: {len(unknown)} rows nobody enqueued")
        return tally

    def _count_copies(
        self, tally: Tally, job_id: str, row: sa.Row | None, copies: list[Copy]
    ) -> None:
        received = [c for c in copies if c.fate in (ACCEPTED, UNANSWERED)]
        if len(received) > 1:
            tally.duplicates += 1
        if sum(1 for c in copies if c.fate == ACCEPTED) > 1:
            tally.acked_twice += 1
        message_ids = {c.message_id for c in copies}
        if row is not None and row.message_id is not None and row.status == "sent":
            message_ids.add(row.message_id)
        if len(message_ids) > 1:
            tally.mid_mismatch += 1
            tally.problems.append(f"Message-ID differs between copies of {job_id}: {message_ids}")

    def _rows(self) -> dict[str, sa.Row]:
        with self.store.engine.connect() as conn:
            result = conn.execute(
                sa.text("SELECT id, status, last_error, message_id, attempts FROM email_queue")
            )
            return {row.id: row for row in result}

    def _copies_by_job(self, tally: Tally) -> dict[str, list[Copy]]:
        found: dict[str, list[Copy]] = defaultdict(list)
        for copy in list(self.smtp.copies):
            job_id = self.by_token.get(copy.token or "")
            if job_id is None and copy.message_id:
                match = _JOB_ID_IN_MESSAGE_ID.match(copy.message_id)
                job_id = match.group(1) if match else None
            if job_id is None or job_id not in self.expected:
                tally.strays += 1
                tally.problems.append(f"stray copy: token {copy.token}, {copy.message_id}")
                continue
            found[job_id].append(copy)
        return found


def _append_result(line: str) -> None:
    """Add a table row to this test run's results file, which holds that run's rows only.

    The pytest-xdist workers of one run (`-n`) share the file: each adds its
    rows under a lock. A file left by an earlier run (another run id on its
    first line) is started afresh. It is replaced whole (write, then rename),
    so a reader never sees half a row.
    """
    path = results_path()
    run = f"<!-- run {os.environ.get(XDIST_RUN_ENV) or _PROCESS_RUN} -->\n"
    with _locked(path.with_name(f".{path.name}.lock")):
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        if not text.startswith(run):
            stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
            title = f"Reliability run, {run_mode} mode, started {stamp}, {os.cpu_count()} CPUs"
            text = f"{run}{title}\n\n{HEADER}"
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(f"{text}{line}\n")
        partial.replace(path)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
