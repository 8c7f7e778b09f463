"""The relay as an adversary: an SMTP server (or a man-in-the-middle) that cannot steer mailqd.

Each case runs against a scripted raw-socket relay (tests/scripted_relay.py)
and asserts the outcome of the message the misbehaviour hit and of the next
one: a reply out of turn leaves the current message ambiguous (retried with
the same Message-ID) and never fails the next one, which goes out on a new
connection; buffers stay bounded; what the relay says is stored redacted and
escaped. The transport cases run with and without pipelining where that
changes what is on the wire; the worker cases run on both databases.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mailqd.compose import OutgoingMessage
from mailqd.config import Settings
from mailqd.daemon.worker import Worker
from mailqd.errors import (
    AmbiguousDeliveryError,
    ConfigError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from mailqd.models import Outcome, Status
from mailqd.store import Store
from mailqd.transport import SmtpTransport, transport_from_url
from mailqd.transport.replies import MAX_REPLY_BYTES
from mailqd.transport.url import parse_smtp_url
from mailqd.validation import build_job
from scripted_relay import Connection, Script, ScriptedRelay
from test_worker import running

T = TypeVar("T")
DEADLINE = 20.0
USER = "relay-user@example.com"
PASSWORD = "s3cr3t-Pa55:word"
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
PASSWORD_B64 = base64.b64encode(PASSWORD.encode()).decode()
SECRETS = (PASSWORD, PLAIN, PASSWORD_B64)
ESCAPES = b"\x1b]0;owned\x07\x1b[2J\x1b[31m\xc2\x9b\xff"  # OSC title, CSI, C1 CSI, bad UTF-8


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), DEADLINE * 2)

    return asyncio.run(bounded())


def smtp(url: str) -> SmtpTransport:
    transport = transport_from_url(url, timeout=5.0, local_hostname="client.test")
    assert isinstance(transport, SmtpTransport)
    return transport


def message(n: int) -> OutgoingMessage:
    data = f"From: a@example.com\r\nSubject: {n}\r\nMessage-ID: <{n}@example.com>\r\n\r\nHi\r\n"
    return OutgoingMessage("a@example.com", ("b@example.com",), data.encode(), f"<{n}@example.com>")


async def hung_up(connection: Connection) -> None:
    await asyncio.wait_for(connection.hung_up.wait(), DEADLINE)


def assert_clean(text: str | None) -> None:
    """No secret in any form, no raw control character (LF joins reply lines)."""
    assert text is not None
    for secret in SECRETS:
        assert secret not in text
    assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in text), text


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def pipelining(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


# --- out of turn: the current message is ambiguous, the next one is sent ----------------


def out_of_turn(script: Script) -> tuple[str, int, list[bytes], int]:
    """Send two messages; the first connection plays `script`, the next ones behave.

    Returns the first message's error (it must be ambiguous), the second's reply
    code, the contents the relay received and how many connections it saw.
    """

    async def scenario() -> tuple[str, int, list[bytes], int]:
        async with ScriptedRelay(script) as relay:
            transport = smtp(relay.url())
            with pytest.raises(AmbiguousDeliveryError) as caught:
                await transport.send(message(1))
            assert not transport.is_connected
            assert transport.buffered_bytes == 0
            second = await transport.send(message(2))
            await transport.close()
            await hung_up(relay.connections[0])
            return str(caught.value), second.smtp_code or 0, relay.received, len(relay.connections)

    return run(scenario)


def test_early_250_right_after_354_makes_the_current_message_ambiguous(pipelining: bool) -> None:
    """The relay says 250 before the content, then would reject it with 554: the 250 is
    not taken as acceptance, and the 554 never becomes the next message's failure."""
    script = Script(
        replies={"DATA": b"354 go ahead\r\n250 2.0.0 queued early\r\n", "DOT": b"554 no\r\n"},
        pipelining=pipelining,
    )
    error, second, received, connections = out_of_turn(script)

    assert "replied out of turn during DATA" in error
    assert second == 250
    assert connections == 2
    assert [b"Subject: 2" in content for content in received] == [True]  # 1 never went out


def test_extra_replies_after_the_dot_make_the_current_message_ambiguous(pipelining: bool) -> None:
    script = Script(replies={"DOT": b"250 2.0.0 queued\r\n554 5.0.0 not really\r\n"})
    script.pipelining = pipelining
    error, second, received, connections = out_of_turn(script)

    assert "replied out of turn during end of DATA" in error
    assert (second, connections) == (250, 2)
    assert [b"Subject: 1" in received[0], b"Subject: 2" in received[1]] == [True, True]


def test_a_refusal_with_a_reply_out_of_turn_is_ambiguous_not_permanent() -> None:
    """554 then 250 to the content: which is the verdict? Not a permanent failure."""
    script = Script(replies={"DOT": b"554 5.7.1 rejected\r\n250 2.0.0 accepted after all\r\n"})
    error, second, received, connections = out_of_turn(script)

    assert "replied out of turn during end of DATA" in error
    assert (second, connections, len(received)) == (250, 2, 2)


def test_a_reply_to_a_command_not_yet_sent_makes_the_current_message_ambiguous() -> None:
    """Without PIPELINING, RCPT is written only after MAIL's reply: a second reply with
    it answers a command the relay has not seen."""
    script = Script(replies={"MAIL": b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n"}, pipelining=False)
    error, second, received, connections = out_of_turn(script)

    assert "replied out of turn during RCPT TO" in error
    assert (second, connections) == (250, 2)
    assert len(received) == 1 and b"Subject: 2" in received[0]


def test_a_flood_after_354_is_not_buffered_and_the_next_message_is_sent() -> None:
    error, second, received, connections = out_of_turn(Script(flood="DATA"))

    assert "replied out of turn during DATA" in error
    assert (second, connections) == (250, 2)
    assert len(received) == 1


# --- idle connections -----------------------------------------------------------------------


def idle_misbehaviour(script: Script) -> tuple[Connection, int, int]:
    """Send one message, let the relay act on the idle connection, then send the next."""

    async def scenario() -> tuple[Connection, int, int]:
        async with ScriptedRelay(script) as relay:
            transport = smtp(relay.url())
            first = await transport.send(message(1))
            assert first.smtp_code == 250
            highest = 0

            async def watch() -> None:
                nonlocal highest
                while True:
                    highest = max(highest, transport.buffered_bytes)
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            relay.poke.set()
            await hung_up(relay.connections[0])
            watcher.cancel()
            assert not transport.is_connected
            second = await transport.send(message(2))
            await transport.close()
            assert len(relay.connections) == 2 and len(relay.received) == 2
            return relay.connections[0], highest, second.smtp_code or 0

    return run(scenario)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_complete_replies_on_an_idle_connection_closes_it() -> None:
    before = rss_bytes()
    first, highest, second = idle_misbehaviour(Script(flood="IDLE"))

    assert first.flooded > 0  # the relay did flood
    assert highest <= MAX_REPLY_BYTES
    assert rss_bytes() - before < 16 * 1024 * 1024
    assert second == 250  # the next message went out, on a new connection


def test_unsolicited_bytes_while_idle_close_the_connection() -> None:
    first, _, second = idle_misbehaviour(Script(replies={"IDLE": b"250 2.0.0 hello again\r\n"}))

    assert first.verbs[-1] == "DATA"  # no QUIT: it was closed at once
    assert second == 250


def test_a_reply_that_never_ends_is_refused_at_the_cap_and_the_next_message_is_sent() -> None:
    script = Script(flood="MAIL", replies={"MAIL": b""}, flood_line=b"250-" + b"x" * 60 + b"\r\n")

    async def scenario() -> None:
        async with ScriptedRelay(script) as relay:
            transport = smtp(relay.url())
            with pytest.raises(TransientDeliveryError) as caught:
                await transport.send(message(1))
            assert not isinstance(caught.value, AmbiguousDeliveryError)  # before any content
            assert f"longer than {MAX_REPLY_BYTES} bytes" in str(caught.value)
            assert transport.buffered_bytes == 0
            assert (await transport.send(message(2))).smtp_code == 250
            await transport.close()
            assert len(relay.received) == 1

    run(scenario)


def test_an_idle_connection_is_closed_after_idle_timeout() -> None:
    async def scenario() -> None:
        async with ScriptedRelay() as relay:
            transport = smtp(relay.url(idle_timeout="0.2"))
            assert (await transport.send(message(1))).smtp_code == 250
            await hung_up(relay.connections[0])
            assert relay.connections[0].quit
            assert not transport.is_connected
            assert (await transport.send(message(2))).smtp_code == 250
            await transport.close()
            assert len(relay.connections) == 2

    run(scenario)


def test_idle_timeout_is_read_from_the_url_and_checked() -> None:
    assert parse_smtp_url("smtp://mx.test").idle_timeout == 30.0
    settings = parse_smtp_url("smtp://mx.test?idle_timeout=2.5")
    assert settings.idle_timeout == 2.5
    assert settings.redacted_url() == "smtp://mx.test:25?idle_timeout=2.5"
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ConfigError, match="idle_timeout must be a positive number"):
            parse_smtp_url(f"smtp://mx.test?idle_timeout={bad}")


# --- what the relay says: redacted and escaped ----------------------------------------------

ECHO = b"535 5.7.8 bad credentials {plain} for {user} with {password}\r\n"


@pytest.mark.parametrize("method", ["PLAIN", "LOGIN"])
def test_credentials_echoed_in_535_are_redacted(method: str) -> None:
    async def scenario() -> None:
        script = Script(auth=method, replies={"AUTH": ECHO})
        async with ScriptedRelay(script, Script(auth=method)) as relay:
            transport = smtp(relay.url(f"{USER.replace('@', '%40')}:{PASSWORD}"))
            with pytest.raises(TransientDeliveryError) as caught:
                await transport.send(message(1))
            sent = b" ".join(relay.connections[0].auth_sent).decode()
            assert (PLAIN if method == "PLAIN" else PASSWORD_B64) in sent  # what was echoed
            error = caught.value
            assert error.smtp_code == 535
            for text in (str(error), error.smtp_text):
                assert_clean(text)
                assert "***" in (text or "")
            assert (await transport.send(message(2))).smtp_code == 250  # next connection: 235
            await transport.close()

    run(scenario)


ESCAPED = "\\x1b]0;owned\\x07\\x1b[2J\\x1b[31m\\x9b\\xff"


def test_escape_sequences_in_replies_are_shown_escaped(pipelining: bool) -> None:
    refusal = Script(replies={"RCPT": b"550 5.1.1 " + ESCAPES + b" no user\r\n"})
    acceptance = Script(replies={"DOT": b"250 2.0.0 " + ESCAPES + b"\r\n"})
    refusal.pipelining = acceptance.pipelining = pipelining

    async def scenario() -> tuple[PermanentDeliveryError, str | None]:
        async with ScriptedRelay(refusal, acceptance) as relay:
            transport = smtp(relay.url())
            with pytest.raises(PermanentDeliveryError) as caught:
                await transport.send(message(1))
            result = await transport.send(message(2))
            await transport.close()
            return caught.value, result.smtp_text

    error, accepted = run(scenario)
    for text in (str(error), error.smtp_text, accepted):
        assert_clean(text)
        assert ESCAPED in (text or "")


# --- through the worker, on both databases ----------------------------------------------


def worker_settings(db_url: str, smtp_url: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "smtp_url": smtp_url,
        "from_address": "sender@example.com",
        "concurrency": 1,  # one connection at a time: the scripts go to the jobs in turn
        "backoff_base": 0.05,
        "backoff_max": 0.2,
        "backoff_jitter": 0.0,
        "poll_interval": 0.05,
        "shutdown_timeout": 2.0,
        "smtp_timeout": 5.0,
    }
    values.update(changes)
    return Settings().replace(**values)


@contextlib.asynccontextmanager
async def working(store: Store, settings: Settings) -> AsyncIterator[Worker]:
    """An in-process worker running in the background until the block ends."""

    def transport() -> Any:
        return transport_from_url(settings.smtp_url, timeout=settings.smtp_timeout)

    async with running(Worker(settings, store, "w1", transport)) as worker:
        yield worker


async def work_until(store: Store, settings: Settings, done: Callable[[Any], bool]) -> None:
    async with working(store, settings) as worker:
        await worker.wait_until(done, DEADLINE)


def enqueue_two(store: Store) -> list[str]:
    return store.enqueue_many(
        [build_job(to=f"user{n}@example.com", subject=f"subject {n}", body="hi") for n in (1, 2)]
    )


def outcomes(store: Store, job_ids: list[str]) -> list[list[Outcome]]:
    return sorted([a.outcome for a in store.attempts(job_id)] for job_id in job_ids)


def test_worker_early_250_leaves_the_job_ambiguous_and_sends_the_next(
    store: Store, db_url: str
) -> None:
    script = Script(replies={"DATA": b"354 go\r\n250 2.0.0 early\r\n", "DOT": b"554 no\r\n"})

    async def scenario() -> list[bytes]:
        async with ScriptedRelay(script) as relay:
            settings = worker_settings(db_url, relay.url())
            await work_until(store, settings, lambda t: t.sent >= 2)
            return relay.received

    job_ids = enqueue_two(store)
    received = run(scenario)

    assert outcomes(store, job_ids) == [[Outcome.AMBIGUOUS, Outcome.SENT], [Outcome.SENT]]
    jobs = [store.get(job_id) for job_id in job_ids]
    assert [job.status for job in jobs] == [Status.SENT, Status.SENT]
    assert all(job.last_error is None or "554" not in job.last_error for job in jobs)
    for job in jobs:  # each went out once, the retried one with its first Message-ID
        assert sum(f"Message-ID: {job.message_id}".encode() in c for c in received) == 1
    assert len(received) == 2


def test_worker_stores_echoed_credentials_redacted(store: Store, db_url: str) -> None:
    """An AUTH refusal that echoes the credentials: a relay failure (the job deferred, the
    relay marked down), and wherever its text is kept, the secrets are masked."""
    scripts = [Script(auth="PLAIN", replies={"AUTH": ECHO}), Script(auth="PLAIN")]

    async def scenario() -> None:
        async with ScriptedRelay(*scripts) as relay:
            url = relay.url(f"{USER.replace('@', '%40')}:{PASSWORD}")
            settings = worker_settings(db_url, url, relay_probe_interval=0.2)
            await work_until(store, settings, lambda t: t.relay_deferred >= 1 and t.sent >= 2)
            assert PLAIN.encode() in relay.connections[0].auth_sent

    job_ids = enqueue_two(store)
    run(scenario)

    assert [store.get(j).status for j in job_ids] == [Status.SENT, Status.SENT]
    [deferred] = [a for j in job_ids for a in store.attempts(j) if a.outcome is Outcome.DEFERRED]
    assert deferred.smtp_code == 535
    [relay_state] = store.relay_health.states()
    for text in (deferred.smtp_text, relay_state.last_error):
        assert_clean(text)
        assert "535" in (text or "") and "***" in (text or "")


def test_worker_stores_escape_sequences_escaped(store: Store, db_url: str) -> None:
    script = Script(replies={"RCPT": b"550 5.1.1 " + ESCAPES + b" no user\r\n"})

    async def scenario() -> None:
        async with ScriptedRelay(script) as relay:
            settings = worker_settings(db_url, relay.url())
            await work_until(store, settings, lambda t: t.failed >= 1 and t.sent >= 1)

    job_ids = enqueue_two(store)
    run(scenario)

    assert outcomes(store, job_ids) == [[Outcome.FAILED], [Outcome.SENT]]
    [failed] = [store.get(j) for j in job_ids if store.get(j).status is Status.FAILED]
    [attempt] = store.attempts(failed.id)
    for text in (failed.last_error, attempt.smtp_text):
        assert_clean(text)
        assert ESCAPED in (text or "")


def test_worker_memory_stays_flat_under_an_idle_flood_and_the_next_job_is_sent(
    store: Store, db_url: str
) -> None:
    [first_id] = store.enqueue_many([build_job(to="first@example.com", subject="1", body="hi")])

    async def scenario() -> tuple[str, int, int]:
        async with ScriptedRelay(Script(flood="IDLE")) as relay:
            async with working(store, worker_settings(db_url, relay.url())) as worker:
                await worker.wait_until(lambda t: t.sent >= 1, DEADLINE)
                before = rss_bytes()
                relay.poke.set()
                await hung_up(relay.connections[0])
                job = build_job(to="next@example.com", subject="2", body="hi")
                [next_id] = store.enqueue_many([job])
                await worker.wait_until(lambda t: t.sent >= 2, DEADLINE)
                grown = rss_bytes() - before
            return next_id, grown, relay.connections[0].flooded

    next_id, grown, flooded = run(scenario)

    assert flooded > 0
    assert grown < 16 * 1024 * 1024
    assert outcomes(store, [first_id, next_id]) == [[Outcome.SENT], [Outcome.SENT]]
