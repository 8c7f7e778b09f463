"""Job data that tries to drive the operator's terminal: `mailqctl` shows it, never obeys it.

Rows are given hostile text by plain SQL (what an enqueue-only role or a
remote server's reply can put there): CSI and OSC sequences (clear the
screen, set the title, a fake hyperlink), a C1 CSI, BEL, backspace, CR,
a bidi override, rich markup. Every command that shows such a value is
run both on a pseudo-terminal (rich styles its output there, as for a
person) and in a pipe. No control character from the data may reach the
output, its escaped form (`\\x1b[2J`) must be visible, and `--json` must
give back the exact original value.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import re
import struct
import subprocess
import termios
import time
import tty
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from ctl_process import MAILQCTL, ctl_env, mailqctl, ok_json
from mailqd import Client
from mailqd.cli.safe import json_safe, printable
from mailqd.config import load_settings
from mailqd.logging import configure_logging
from mailqd.models import Outcome
from mailqd.store import Completion, Store
from mailqd.store.schema import email_queue, email_templates, rate_limit

CLEAR = "\x1b[2J"
TITLE = "\x1b]0;pwned\x07"
LINK = "\x1b]8;;https://evil.example/\x1b\\click here\x1b]8;;\x1b\\"
C1_CSI = "\x9b31m"
SUBJECT = f"Invoice {CLEAR}{TITLE}{LINK} {C1_CSI} [bold red]urgent[/] \u202eevil\x08\x08\rZ\x7f"
DISPLAY_NAME = f'"Eve {TITLE}\u2066" <eve@example.com>'
ERROR = f"550 {CLEAR}rejected {TITLE}\x1b[31mred\x1b[0m\r\n{LINK}"
REPLY = f"550 5.1.1 {TITLE} no such user\x07\x1b[1A\x1b[2K"
TEMPLATE_ID = f"welcome{CLEAR}"
TEMPLATE_SUBJECT = f"Hi {TITLE}{{{{ name }}}}"
TEMPLATE_TEXT = f"Hello {{{{ name }}}}\n{CLEAR}\x1b[31mred\r\nbye\x9b2J\n"
DOMAIN = f"evil{TITLE}.example"
VARIABLES = {"name": f"{CLEAR}Eve", f"key{TITLE}": 1}

VISIBLE = ["\\x1b[2J", "\\x1b]0;pwned\\x07", "\\x9b31m", "\\u202e"]
"""Escaped forms that must be seen where the subject is shown whole."""

# What may legitimately be on the terminal: rich's SGR styles (bold headers, colours).
_SGR = re.compile(r"\x1b\[[0-9;]*m")
_CONTROL = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]"
)


def hostile_job(store: Store, db_url: str) -> str:
    """A failed job whose subject, recipients, error, variables and attempt reply are hostile."""
    with Client(db_url) as client:
        job_id = client.enqueue("alice@example.com", "placeholder", "body")
    [job] = store.claim("test", 1, lease_seconds=60)
    store.complete(
        [
            Completion(
                job_id=job.id,
                owner="test",
                attempt=1,
                outcome=Outcome.FAILED,
                started_at=datetime.now(UTC),
                duration_seconds=0.1,
                smtp_code=550,
                smtp_text=REPLY,
                error=ERROR,
            )
        ]
    )
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(email_queue)
            .where(email_queue.c.id == job_id)
            .values(
                subject=SUBJECT,
                recipient_to=DISPLAY_NAME,
                cc=f"carol{CLEAR}@example.com",
                body=f"line 1\r\n{CLEAR}line 2\x1b]0;t\x07\n",
                variables=VARIABLES,
                template_id=TEMPLATE_ID,
                headers={"X-Tag": f"{TITLE}tag"},
            )
        )
        conn.execute(
            sa.insert(email_templates).values(
                id=TEMPLATE_ID, subject=TEMPLATE_SUBJECT, text_body=TEMPLATE_TEXT
            )
        )
        conn.execute(
            sa.insert(rate_limit).values(
                name=f"domain:{DOMAIN}",
                tokens=0.0,
                refilled_at=time.time(),
                reserved_until=time.time() + 3600,
            )
        )
    return job_id


def on_terminal(*args: str, db: str, columns: int = 300) -> tuple[int, str]:
    """Run `mailqctl ARGS` with stdout and stderr on a pseudo-terminal; what the terminal got.

    The terminal is in raw mode, so a CR in the output is one the command
    wrote, not the line discipline's translation of LF.
    """
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 60, columns, 0, 0))
    tty.setraw(terminal)
    env = ctl_env({"TERM": "xterm-256color"})
    for key in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TTY_COMPATIBLE"):
        env.pop(key, None)
    process = subprocess.Popen(
        [MAILQCTL, "--database-url", db, *args],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    received = bytearray()
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(controller)
    code = process.wait(timeout=120)
    return code, received.decode("utf-8")


def assert_inert(output: str, *, terminal: bool) -> None:
    """No control character but LF; on a terminal, only rich's own SGR styles."""
    if terminal:
        assert _SGR.search(output), "no styling: rich did not take this for a terminal"
        output = _SGR.sub("", output)
    found = sorted({f"U+{ord(c):04X}" for c in _CONTROL.findall(output)})
    assert not found, (found, output)


def both_ways(*args: str, db: str) -> list[str]:
    """`mailqctl ARGS` on a terminal and in a pipe: each output, checked to be inert."""
    code, shown = on_terminal(*args, db=db)
    assert code == 0, shown
    assert_inert(shown, terminal=True)
    piped = mailqctl(*args, db=db)
    assert piped.returncode == 0, piped.stderr
    assert_inert(piped.stdout + piped.stderr, terminal=False)
    return [shown, piped.stdout]


@pytest.mark.runs_for(6)
def test_show_escapes_every_field_and_json_is_exact(store: Store, db_url: str) -> None:
    job_id = hostile_job(store, db_url)

    for output in both_ways("show", job_id, db=db_url):
        plain = _SGR.sub("", output)
        for visible in VISIBLE:
            assert visible in plain, (visible, plain)
        assert "[bold red]urgent[/]" in plain  # markup printed, not applied
        assert "\\x1b]8;;https://evil.example/" in plain  # the hyperlink shown as text
        assert "no such user\\x07" in plain  # the attempt's reply
        assert "line 1\n\\x1b[2Jline 2" in plain  # the body: CRLF a line break, ESC shown

    document = ok_json(mailqctl("show", job_id, "--json", db=db_url))
    job = document["job"]
    assert (job["subject"], job["recipient_to"], job["last_error"]) == (
        SUBJECT,
        DISPLAY_NAME,
        ERROR,
    )
    assert (job["variables"], job["template_id"]) == (VARIABLES, TEMPLATE_ID)
    assert job["headers"] == {"X-Tag": f"{TITLE}tag"}
    assert document["attempts"][0]["smtp_text"] == REPLY


def test_raw_json_has_no_control_byte(store: Store, db_url: str) -> None:
    job_id = hostile_job(store, db_url)
    for args in (["show", job_id, "--json"], ["failed", "--json"], ["templates", "list", "--json"]):
        result = mailqctl(*args, db=db_url)
        assert result.returncode == 0, result.stderr
        assert_inert(result.stdout, terminal=False)
        json.loads(result.stdout)


def test_failed_escapes_subject_recipients_and_error(store: Store, db_url: str) -> None:
    hostile_job(store, db_url)

    for output in both_ways("failed", db=db_url):
        plain = _SGR.sub("", output)
        assert "\\x1b[2J" in plain and "\\x1b]0;pwned\\x07" in plain
        assert "\\x1b[2Jrejected \\x1b]0;pwned\\x07\\x1b[31mred" in plain

    [job] = ok_json(mailqctl("failed", "--json", db=db_url))["jobs"]
    assert job["subject"] == SUBJECT


def test_stats_and_top_escape_domain_names(store: Store, db_url: str) -> None:
    hostile_job(store, db_url)
    for args in (["stats"], ["top", "--once"]):
        for output in both_ways(*args, db=db_url):
            assert "evil\\x1b]0;pwned\\x07.example" in _SGR.sub("", output)

    limits = ok_json(mailqctl("stats", "--json", db=db_url))["rate_limits"]["domains"]
    assert list(limits) == [DOMAIN]


def test_templates_list_and_show_escape_ids_and_sources(store: Store, db_url: str) -> None:
    hostile_job(store, db_url)

    for output in both_ways("templates", "list", db=db_url):
        assert "welcome\\x1b[2J" in _SGR.sub("", output)
    for output in both_ways("templates", "show", TEMPLATE_ID, db=db_url):
        plain = _SGR.sub("", output)
        assert "Hi \\x1b]0;pwned\\x07{{ name }}" in plain
        assert "\\x1b[2J\\x1b[31mred\nbye\\x9b2J" in plain  # CRLF a line break, the rest shown

    shown = ok_json(mailqctl("templates", "show", TEMPLATE_ID, "--json", db=db_url))
    assert (shown["id"], shown["subject"], shown["text_body"]) == (
        TEMPLATE_ID,
        TEMPLATE_SUBJECT,
        TEMPLATE_TEXT,
    )


def test_errors_that_quote_input_are_escaped(store: Store, db_url: str) -> None:
    """An id pasted from hostile text is quoted back escaped, on one line."""
    hostile_job(store, db_url)
    for args in (["show", f"nope{TITLE}\nsecond line"], ["templates", "show", f"x{CLEAR}"]):
        code, shown = on_terminal(*args, db=db_url)
        assert code == 1, shown
        assert len(shown.strip("\n").splitlines()) == 1, shown
        assert_inert(shown, terminal=False)
        assert "\\x1b" in shown
        piped = mailqctl(*args, db=db_url)
        assert piped.returncode == 1 and len(piped.stderr.splitlines()) == 1, piped.stderr
        assert_inert(piped.stderr, terminal=False)


def test_render_escapes_variables_in_the_preview(store: Store, db_url: str) -> None:
    hostile_job(store, db_url)
    args = ["templates", "render", TEMPLATE_ID, "--var", f"name={TITLE}Eve"]
    for output in both_ways(*args, db=db_url):
        assert "\\x1b]0;pwned\\x07Eve" in _SGR.sub("", output)
    rendered: dict[str, Any] = ok_json(mailqctl(*args, "--json", db=db_url))
    assert rendered["subject"] == f"Hi {TITLE}{TITLE}Eve"


# --- the escaping rule itself ---------------------------------------------------------


UNSAFE = [chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]] + [
    "\u061c",
    "\u200b",
    "\u200e",
    "\u200f",
    "\u2028",
    "\u2029",
    *(chr(c) for c in range(0x202A, 0x202F)),
    *(chr(c) for c in range(0x2066, 0x206A)),
    "\u2060",
    "\ufeff",
    "\ud800",
]


@pytest.mark.parametrize("char", UNSAFE, ids=[f"U+{ord(c):04X}" for c in UNSAFE])
def test_every_unsafe_character_prints_as_a_visible_escape(char: str) -> None:
    shown = printable(f"a{char}b")
    assert char not in shown and shown.startswith("a\\") and shown.endswith("b")
    shown.encode("utf-8")  # even a lone surrogate can be written
    dumped = json_safe(json.dumps({"v": char}, ensure_ascii=False))
    assert char not in dumped and json.loads(dumped) == {"v": char}


def test_text_people_write_is_left_alone() -> None:
    text = "Grüße, 中文, עברית, emoji 👨\u200d👩\u200d👧, C:\\path, [bold]"
    assert printable(text) == text
    assert printable("a\tb\nc\r\nd", multiline=True) == "a\tb\nc\nd"
    assert printable("a\tb\nc\r\nd") == "a\\tb\\nc\\r\\nd"


def test_console_log_lines_show_escapes_in_messages_and_values() -> None:
    """`drain` on a terminal logs in the console format: a reply's escapes must not act there."""
    stream = io.StringIO()
    configure_logging(load_settings(env={"MAILQD_LOG_FORMAT": "console"}), stream=stream)
    structlog.get_logger().warning(f"attempt {CLEAR}failed", error=ERROR, reply=REPLY)
    logging.getLogger("aiosmtplib").warning("reply %s", TITLE)

    assert_inert(stream.getvalue(), terminal=False)
    assert "attempt \\x1b[2Jfailed" in stream.getvalue()
    assert "reply \\x1b]0;pwned\\x07" in stream.getvalue()
