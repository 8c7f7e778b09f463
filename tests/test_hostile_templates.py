"""Hostile templates: bombs refused fast and before they allocate, errors that keep secrets.

The renderer is tested directly (each bomb fails quickly, with the limit and
its config key named), in a fresh subprocess for memory (peak RSS), and
through a real worker on PostgreSQL and SQLite delivering to the aiosmtpd
server: the bomb job fails at its first attempt, the job beside it is sent
at its first attempt. Error texts are checked in `last_error`, the attempt
rows and the captured logs for a secret that a variable held, sealed or not.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from daemon_process import DaemonPool
from mailqd import Client
from mailqd.config import Settings, load_settings
from mailqd.daemon.worker import Worker
from mailqd.errors import ConfigError, TemplateError
from mailqd.models import Status, Template
from mailqd.secrets import generate_key_file
from mailqd.store import Store
from mailqd.templating import (
    CompiledTemplate,
    RenderBudget,
    check_template,
    compile_template,
    render,
)
from mailqd.validation import build_job
from smtp_server import SmtpServer, smtp_server_fixture
from template_bombs import BOMBS, RECURSION, SLOW_BOMBS
from test_worker import make_settings, smtp_factory

__all__ = ["smtp_server_fixture"]

SENDER = "shop@example.com"

FAST = 1.5
"""A size bomb must be refused within this many seconds, under a 5 s time budget.

Each takes well under 0.2 s on an idle machine; the margin is for a loaded
one (the tests run in parallel on shared cores). Unbounded, they take
minutes or gigabytes."""

ROOMY = RenderBudget(seconds=5.0)


def make_template(text: str, html: str | None = None, template_id: str = "t") -> CompiledTemplate:
    now = datetime.now(UTC)
    return compile_template(Template(template_id, "", text, html, now, now))


DEFAULT = RenderBudget()


def refusal(
    text: str, variables: dict[str, Any], budget: RenderBudget = DEFAULT
) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(TemplateError) as failure:
        render(make_template(text), variables, budget)
    return str(failure.value), time.monotonic() - started


# -- the renderer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "variables", "error"), [b[1:] for b in BOMBS], ids=[b[0] for b in BOMBS]
)
def test_a_bomb_is_refused_fast_naming_the_limit(
    text: str, variables: dict[str, Any], error: str
) -> None:
    message, elapsed = refusal(text, variables, ROOMY)
    assert message.startswith("template 't': "), message
    assert error in message, message
    assert " in the text body" in message, message
    assert elapsed < FAST, f"{elapsed:.2f} s"


@pytest.mark.parametrize(
    ("text", "variables", "error"), [b[1:] for b in SLOW_BOMBS], ids=[b[0] for b in SLOW_BOMBS]
)
def test_a_slow_template_stops_at_its_time_budget(
    text: str, variables: dict[str, Any], error: str
) -> None:
    message, elapsed = refusal(text, variables, RenderBudget(seconds=0.3))
    assert message == (
        "template 't': rendering took longer than 0.3 s (template_render_seconds) in the text body"
    )
    assert 0.3 <= elapsed < 0.3 + FAST, f"{elapsed:.2f} s"


@pytest.mark.parametrize("text", [r[1] for r in RECURSION], ids=[r[0] for r in RECURSION])
def test_endless_recursion_fails_with_a_clear_error(text: str) -> None:
    message, elapsed = refusal(text, {}, ROOMY)
    assert message == (
        "template 't': cannot render the text body: a macro or recursive loop nests too deeply"
    )
    assert elapsed < FAST


def test_markup_methods_in_the_html_body_are_bounded_too() -> None:
    template = make_template("x", html="{{ ('x'|safe).ljust(800000000) }}{{ x }}")
    with pytest.raises(
        TemplateError, match=r"in the html body: 'ljust' would build a string of 800000000"
    ):
        render(template, {"x": 1})


def test_the_budget_applies_to_the_whole_message_and_a_smaller_one_is_enforced() -> None:
    budget = RenderBudget(seconds=1.0, max_output_bytes=2000)
    now = datetime.now(UTC)
    template = compile_template(Template("t", "{{ s }}", "{{ 'x' * n }}", None, now, now))
    assert render(template, {"s": "hi", "n": 2000}, budget).text == "x" * 2000
    with pytest.raises(
        TemplateError,
        match=r"text body: '\*' would build a string of 2001 characters "
        r"\(template_max_output_bytes is 2000\)",
    ):
        render(template, {"s": "hi", "n": 2001}, budget)
    with pytest.raises(TemplateError, match=r"output larger than 2000 bytes .* in the text body"):
        render(make_template("{% for i in range(3) %}{{ 'é' * 400 }}{% endfor %}"), {}, budget)


def test_ordinary_templates_render_exactly_as_jinja_would() -> None:
    """Every hook on the way (calls, operators, filters, loops, ~, comparisons) keeps meaning."""
    text = "".join(
        [
            "{% set ns = namespace(total=0) %}{% for item in order.lines if item.qty %}\n",
            "{{ loop.index }}/{{ loop.length }} {{ item.name|title|center(9) }}|",
            "{{ '%5.2f' % item.price }}|{{ '{:>4}'.format(item.qty) }}",
            "{% set ns.total = ns.total + item.price * item.qty %}",
            "{% if loop.last %} last{% endif %}\n",
            "{%- endfor %}\n",
            "total {{ '%.2f'|format(ns.total) }} {{ order.tags|join(', ') }} ",
            "{{ order.tags|sort|first }} {{ 'vip' in order.tags }}\n",
            "{{ {'a': 1, 'b': [1, 2] * 2}|dictsort }} ",
            "{{ (order.lines|map(attribute='name')|list)[0] ~ '!' }} {{ 2 ** 10 }} ",
            "{{ 'ab'.ljust(4, '.') }}{{ 'x'|truncate(800000000) }}\n",
            "{%- for node in tree recursive %} {{ node.name }}",
            "{% if node.kids %}({{ loop(node.kids) }}){% endif %}{% endfor %}\n",
        ]
    )
    variables = {
        "order": {
            "lines": [
                {"name": "pen", "price": 2.5, "qty": 2},
                {"name": "gift", "price": 9.0, "qty": 0},
                {"name": "ink", "price": 1.25, "qty": 4},
            ],
            "tags": ["vip", "eu"],
        },
        "tree": [{"name": "a", "kids": [{"name": "b", "kids": []}]}],
    }
    expected = (
        "\n1/2    Pen   | 2.50|   2\n2/2    Ink   | 1.25|   4 last\n"
        "total 10.00 vip, eu eu True\n"
        "[('a', 1), ('b', [1, 2, 1, 2])] pen! 1024 ab..x a( b)\n"
    )
    assert render(make_template(text), variables).text == expected


def test_a_large_legitimate_template_is_not_refused() -> None:
    rows = [{"sku": f"SKU-{i:05d}", "name": f"item {i}", "price": i / 100} for i in range(5000)]
    text = "{% for r in rows %}{{ r.sku }} {{ r.name|title }} {{ '%.2f'|format(r.price) }}\n"
    text += "{% endfor %}"
    out = render(make_template(text), {"rows": rows}, ROOMY).text
    assert out is not None and out.count("\n") == 5000 and "SKU-04999 Item 4999 49.99" in out
    prose = "Dear customer, see https://shop.example/orders for details. " * 3000  # 180 KB
    out = render(make_template("{{ p|wordwrap(60) }}|{{ p|urlize }}"), {"p": prose}, ROOMY).text
    assert out is not None and out.count('<a href="https://shop.example/orders"') == 3000


def test_peak_memory_stays_low_while_every_bomb_is_rendered() -> None:
    """A fresh interpreter renders each bomb; its peak RSS may grow by less than 150 MB."""
    script = textwrap.dedent(
        """\
        import json, resource, sys
        from datetime import UTC, datetime, timedelta
        from mailqd.errors import TemplateError
        from mailqd.models import Template
        from mailqd.templating import RenderBudget, compile_template, render

        def run(text, variables, seconds):
            now = datetime.now(UTC)
            template = compile_template(Template("t", "", text, None, now, now))
            try:
                render(template, variables, RenderBudget(seconds=seconds))
            except TemplateError:
                return True
            return False

        bombs = json.load(sys.stdin)
        run("{{ x }}", {"x": 1}, 1.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        refused = [run(text, variables, seconds) for text, variables, seconds in bombs]
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({"refused": refused, "growth_kb": after - before}))
        """
    )
    bombs = [(b[1], b[2], 1.0) for b in BOMBS] + [(b[1], b[2], 0.2) for b in SLOW_BOMBS]
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(bombs),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout)
    assert all(result["refused"]), [
        b[0] for b, ok in zip(BOMBS + SLOW_BOMBS, result["refused"], strict=True) if not ok
    ]
    assert result["growth_kb"] < 150 * 1024, f"peak RSS grew by {result['growth_kb'] // 1024} MB"


# -- error texts never quote a variable's value ------------------------------------------

SECRET = "OTP-5501-7781"

LEAKS: list[tuple[str, str, str]] = [
    # (id, text body, what the error says instead)
    (
        "key from a variable",
        "{{ codes[otp] }}",
        "variable 'codes' has no attribute named by variable 'otp'",
    ),
    ("attribute of a value", "{{ otp.missing }}", "variable 'otp' has no attribute 'missing'"),
    (
        "attribute named by data",
        "{{ user|attr(otp) }}",
        "variable 'user' has no attribute named by variable 'otp'",
    ),
    (
        "nested holder",
        "{{ order.customer.email }}",
        "variable 'order.customer' has no attribute 'email'",
    ),
    (
        "key error in format",
        "{{ ('{' ~ otp ~ '}').format() }}",
        "cannot render the text body: KeyError: '…'",
    ),
    (
        "format spec from data",
        "{{ ('{:' ~ otp ~ '}').format(1) }}",
        "cannot render the text body: ValueError:",
    ),
    (
        "unsafe attribute from data",
        "{{ user[dunder] }}",
        "refused by the sandbox in the text body: access to attribute"
        " named by variable 'dunder' of variable 'user' is unsafe",
    ),
]


@pytest.mark.parametrize(
    ("text", "error"), [leak[1:] for leak in LEAKS], ids=[leak[0] for leak in LEAKS]
)
def test_an_error_names_the_variable_but_never_its_value(text: str, error: str) -> None:
    variables = {
        "codes": {},
        "otp": SECRET,
        "user": {"name": "x"},
        "order": {"customer": {"name": SECRET}},
        "dunder": "__class__",
    }
    with pytest.raises(TemplateError) as failure:
        render(make_template(text), variables)
    message = str(failure.value)
    assert error in message, message
    assert SECRET not in message and "5501" not in message, message


def test_a_syntax_error_is_one_clean_line() -> None:
    with pytest.raises(TemplateError) as failure:
        check_template("t", "s", "{{ 'a\x1b[31m' + }}", None)
    message = str(failure.value)
    assert message.startswith("template 't': syntax error in the text body, line 1: ")
    assert "\x1b" not in message and len(message) < 400


def test_a_source_nested_too_deeply_is_refused_when_it_is_added() -> None:
    with pytest.raises(TemplateError) as failure:
        check_template("t", "s", "{{" + "(" * 5000 + "1" + ")" * 5000 + "}}", None)
    assert str(failure.value) == (
        "template 't': the text body nests too deeply to compile (brackets, blocks)"
    )


# -- configuration -------------------------------------------------------------------------


def test_budget_keys_have_defaults_come_from_the_environment_and_are_validated() -> None:
    assert (Settings().template_render_seconds, Settings().template_max_output_bytes) == (
        1.0,
        1_000_000,
    )
    settings = load_settings(
        env={"MAILQD_TEMPLATE_RENDER_SECONDS": "0.25", "MAILQD_TEMPLATE_MAX_OUTPUT_BYTES": "5000"}
    )
    assert RenderBudget.from_settings(settings) == RenderBudget(0.25, 5000)
    for env, error in [
        (
            {"MAILQD_TEMPLATE_RENDER_SECONDS": "0"},
            "config template_render_seconds: must be at least 0.01, got 0.0",
        ),
        (
            {"MAILQD_TEMPLATE_RENDER_SECONDS": "soon"},
            "config template_render_seconds: must be a number, got 'soon'",
        ),
        (
            {"MAILQD_TEMPLATE_RENDER_SECONDS": "60"},
            "config template_render_seconds: must be at most heartbeat_timeout",
        ),
        (
            {"MAILQD_TEMPLATE_MAX_OUTPUT_BYTES": "10"},
            "config template_max_output_bytes: must be at least 1024, got 10",
        ),
        (
            {"MAILQD_TEMPLATE_MAX_OUTPUT_BYTES": "1.5"},
            "config template_max_output_bytes: must be a whole number, got '1.5'",
        ),
    ]:
        with pytest.raises(ConfigError) as failure:
            load_settings(env=env)
        assert str(failure.value) == error


# -- through a real worker ------------------------------------------------------------------


def put_template(store: Store, template_id: str, text: str) -> None:
    check_template(template_id, "", text, None)
    store.templates.put(template_id, "", text, None)


def deliver_all(settings: Settings, store: Store) -> list[dict[str, Any]]:
    """Run a worker until every queued job has an outcome; returns the log events."""

    async def scenario() -> None:
        async with Worker(settings, store, "w1", smtp_factory(settings)) as worker:
            while (await worker.run_once()).claimed:
                pass

    with structlog.testing.capture_logs() as events:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    return events


def test_a_bomb_job_fails_at_once_and_the_job_beside_it_is_sent_at_its_first_attempt(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    put_template(store, "slow", SLOW_BOMBS[0][1])
    put_template(store, "wide", BOMBS[0][1])
    put_template(store, "long", "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}")
    put_template(store, "hello", "Hello {{ name }}")
    bombs = {
        "slow": "rendering took longer than 1 s (template_render_seconds) in the text body",
        "wide": "'ljust' would build a string of 800000000 characters",
        "long": "output larger than 1000000 bytes (template_max_output_bytes) in the text body",
    }
    jobs = {
        name: store.enqueue(
            build_job(to=f"{name}@example.com", subject="s", template_id=name, variables={})
        )
        for name in bombs
    }
    good = store.enqueue(
        build_job(
            to="good@example.com", subject="s", template_id="hello", variables={"name": "Ann"}
        )
    )
    plain = store.enqueue(build_job(to="plain@example.com", subject="s", body="plain"))
    settings = make_settings(db_url, smtp_server.url(), template_render_seconds=1.0, max_attempts=3)
    started = time.monotonic()
    deliver_all(settings, store)

    assert time.monotonic() - started < 10
    attempts = [a for job_id in [*jobs.values(), good, plain] for a in store.attempts(job_id)]
    batch_start = min(a.started_at for a in attempts)
    for job_id in (good, plain):  # waited for the slow template at most its budget (1 s)
        [attempt] = store.attempts(job_id)
        done = attempt.started_at + timedelta(seconds=attempt.duration_seconds)
        assert (done - batch_start).total_seconds() < 1.0 + 3.0
    for name, error in bombs.items():
        job = store.get(jobs[name])
        assert (job.status, job.attempts) == (Status.FAILED, 1), (name, job.last_error)
        assert job.last_error is not None and error in job.last_error, job.last_error
        assert job.last_error.startswith(f"cannot compose message: template '{name}': ")
        [attempt] = store.attempts(jobs[name])
        assert attempt.outcome.value == "failed"
    for job_id in (good, plain):
        assert (store.get(job_id).status, store.get(job_id).attempts) == (Status.SENT, 1)
    received = sorted(rcpt for m in smtp_server.messages for rcpt in m.rcpt_tos)
    assert received == ["good@example.com", "plain@example.com"]
    hello = next(m for m in smtp_server.messages if "good@example.com" in m.rcpt_tos)
    assert b"Hello Ann" in hello.data


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.key"
    generate_key_file(path)
    return path


def test_a_failing_template_never_writes_a_variable_value_anywhere(
    store: Store, db_url: str, smtp_server: SmtpServer, key_file: Path
) -> None:
    put_template(store, "codes", "Your code: {{ codes[otp] }}")
    put_template(store, "spec", "{{ ('{' ~ otp ~ '}').format() }}")
    variables = {"codes": {"other": 1}, "otp": SECRET}
    with Client(db_url, secrets_key_file=str(key_file)) as client:
        sealed = [
            client.enqueue("a@example.com", "s", template_id=t, variables=variables)
            for t in ("codes", "spec")
        ]
    plain = [
        store.enqueue(
            build_job(to="b@example.com", subject="s", template_id=t, variables=variables)
        )
        for t in ("codes", "spec")
    ]
    events = deliver_all(
        make_settings(db_url, smtp_server.url(), secrets_key_file=str(key_file)), store
    )

    for job_id in sealed + plain:
        job = store.get(job_id)
        assert (job.status, job.attempts) == (Status.FAILED, 1)
        shown = [job.last_error, *(repr(a) for a in store.attempts(job_id))]
        assert "5501" not in repr(shown), shown
    assert store.get(sealed[0]).last_error == (
        "cannot compose message: template 'codes': variable 'codes' has no attribute named by "
        "variable 'otp' in the text body"
    )
    assert store.get(sealed[1]).last_error == (
        "cannot compose message: template 'spec': cannot render the text body: KeyError: '…'"
    )
    logged = [str(e.get("error")) for e in events if e.get("outcome") == "failed"]
    assert len(logged) == 4 and all(text.startswith("cannot compose message") for text in logged)
    assert "5501" not in repr(events)
    assert smtp_server.messages == []


@pytest.mark.timeout(120)
def test_the_real_daemon_survives_bombs_with_its_worker_small_and_never_restarted(
    daemons: DaemonPool, db_url: str, store: Store, smtp_server: SmtpServer
) -> None:
    """The issue's scenario end to end: a worker process, its peak RSS, the supervisor's view."""
    chosen = ("nested range", "ljust", "shared list printed", "many large values", "output")
    bodies = {b[0]: b[1] for b in [*BOMBS, *SLOW_BOMBS]}
    bombs = {}
    for number, name in enumerate(chosen):
        put_template(store, f"bomb{number}", bodies[name])
        bombs[name] = store.enqueue(
            build_job(
                to=f"b{number}@example.com", subject="s", template_id=f"bomb{number}", variables={}
            )
        )
    put_template(store, "hello", "Hello {{ name }}")
    good = store.enqueue(
        build_job(
            to="good@example.com", subject="s", template_id="hello", variables={"name": "Ann"}
        )
    )
    daemon = daemons.mailqd(
        {
            "MAILQD_DATABASE_URL": db_url,
            "MAILQD_SMTP_URL": smtp_server.url(starttls="off"),
            "MAILQD_FROM": SENDER,
            "MAILQD_WORKERS": "1",
            "MAILQD_POLL_INTERVAL": "0.2",
        }
    )
    [worker] = daemon.wait_for_workers(1, 60)

    def settled() -> bool:
        return all(store.get(j).status is Status.FAILED for j in bombs.values()) and (
            store.get(good).status is Status.SENT
        )

    daemon.wait_for(settled, "bombs failed and the good job sent", 60)
    for name, job_id in bombs.items():
        job = store.get(job_id)
        assert job.attempts == 1 and job.last_error is not None, name
        assert "template_render_seconds" in job.last_error or (
            "template_max_output_bytes" in job.last_error
        ), job.last_error
    assert store.get(good).attempts == 1
    assert [list(m.rcpt_tos) for m in smtp_server.messages] == [["good@example.com"]]
    assert daemon.worker_pids() == {worker}  # never killed nor restarted
    peak_kb = int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{worker}/status").read_text())[1])
    assert peak_kb < 150 * 1024, f"worker peak RSS {peak_kb // 1024} MB"
