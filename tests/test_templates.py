"""Templates: stored in the database, rendered at send time in a sandbox, variables encrypted.

The store on real PostgreSQL and SQLite; delivery by an in-process `Worker`
to the aiosmtpd server over a socket, and once by the real `mailqd`
daemon; `mailqctl templates` through click's runner. What is checked is
what a user sees: the mail that arrives, the job's status and last_error,
the CLI's output and exit code, and what the database row holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ctl_process import error_line, invoke, ok_json
from daemon_process import DaemonPool
from mailqd import Client
from mailqd.client import AsyncClient
from mailqd.config import Settings
from mailqd.daemon.templates import TemplateCache
from mailqd.daemon.worker import Worker
from mailqd.errors import (
    ConfigError,
    MissingContentError,
    TemplateError,
    TemplateExistsError,
    TemplateNotFoundError,
    ValidationError,
)
from mailqd.models import Status, Template
from mailqd.secrets import generate_key_file, load_secret_box
from mailqd.store import Store
from mailqd.templating import CompiledTemplate, check_template, compile_template, render
from mailqd.validation import build_job
from smtp_server import SmtpServer, smtp_server_fixture
from test_supervisor import assert_one_line_failure, base_env, migrated_sqlite, run_mailqd
from test_worker import make_settings, smtp_factory

__all__ = ["migrated_sqlite", "smtp_server_fixture"]

DEADLINE = 15.0
SENDER = "shop@example.com"
WELCOME_TEXT = "Hello {{ name }},\nyour code is {{ code }}.\n"
WELCOME_HTML = "<p>Hello {{ name }}</p><p>Code: <b>{{ code }}</b></p>"


def deliver_all(settings: Settings, store: Store) -> None:
    """Run a worker until every queued job has an outcome (one attempt each)."""

    async def scenario() -> None:
        async with Worker(settings, store, "w1", smtp_factory(settings)) as worker:
            while (await worker.run_once()).claimed:
                pass

    asyncio.run(asyncio.wait_for(scenario(), 45))


def add_welcome(store: Store, subject: str = "Welcome, {{ name }}") -> Template:
    check_template("welcome", subject, WELCOME_TEXT, WELCOME_HTML)
    return store.templates.put("welcome", subject, WELCOME_TEXT, WELCOME_HTML)


def template_job(store: Store, variables: Any, template_id: str = "welcome", **fields: Any) -> str:
    values: dict[str, Any] = {"to": "alice@example.com", "subject": "", "template_id": template_id}
    values.update(fields)
    return store.enqueue(build_job(variables=variables, **values))


def parts(message: EmailMessage) -> tuple[str, str, str]:
    text = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert text is not None and html is not None
    return (
        str(message["Subject"]),
        text.get_content().replace("\r\n", "\n"),
        html.get_content().replace("\r\n", "\n"),
    )


def make_template(
    template_id: str, subject: str, text: str | None, html: str | None = None
) -> CompiledTemplate:
    now = datetime.now(UTC)
    return compile_template(Template(template_id, subject, text, html, now, now))


# -- the store -----------------------------------------------------------------------


def test_store_adds_refuses_a_duplicate_replaces_lists_and_deletes(store: Store) -> None:
    first = store.templates.put("welcome", "Hi {{ name }}", "text 1", None)
    assert (first.id, first.subject, first.text_body, first.html_body) == (
        "welcome",
        "Hi {{ name }}",
        "text 1",
        None,
    )
    with pytest.raises(TemplateExistsError, match="'welcome' exists already"):
        store.templates.put("welcome", "other", "text 2", None)
    assert store.templates.get("welcome").text_body == "text 1"  # nothing written

    replaced = store.templates.put("welcome", "Hey", None, "<p>2</p>", replace=True)
    assert (replaced.subject, replaced.text_body, replaced.html_body) == ("Hey", None, "<p>2</p>")
    assert replaced.created_at == first.created_at
    assert replaced.updated_at > first.updated_at
    store.templates.put("alpha", "", "a", None)
    assert [t.id for t in store.templates.all()] == ["alpha", "welcome"]

    store.templates.delete("welcome")
    with pytest.raises(TemplateNotFoundError, match="no template with id 'welcome'"):
        store.templates.get("welcome")
    with pytest.raises(TemplateNotFoundError):
        store.templates.delete("welcome")
    assert [t.id for t in store.templates.all()] == ["alpha"]


# -- rendering -----------------------------------------------------------------------


def test_render_substitutes_variables_and_escapes_only_the_html() -> None:
    template = make_template("t", "Hi {{ name }}", "Dear {{ name }}\n", "<p>{{ name }}</p>")
    rendered = render(template, {"name": "<script>alert(1)</script>"})
    assert rendered.subject == "Hi <script>alert(1)</script>"
    assert rendered.text == "Dear <script>alert(1)</script>\n"
    assert rendered.html == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert render(make_template("t", "", "x"), {}).subject is None  # the job's subject is kept


@pytest.mark.parametrize(
    ("subject", "text", "variables", "error"),
    [
        ("Hi {{ name }}", "x", {}, "template 'w': variable 'name' is undefined in the subject"),
        ("s", "{{ user.email }}", {"user": {}}, "has no attribute 'email' in the text body"),
        ("s", "{{ ''.__class__.__mro__ }}", {}, "refused by the sandbox in the text body"),
        ("s", "{{ items.append(1) }}", {"items": []}, "refused by the sandbox"),
        ("s", "{{ 'x' * 100000000 }}", {}, "refused by the sandbox"),
        ("s", "{% for i in range(10**9) %}{% endfor %}", {}, "Range too big"),
        ("{{ s }}", "x", {"s": "Hi\r\nBcc: x@evil.example"}, "rendered subject contains CR, LF"),
    ],
)
def test_render_failures_name_the_template_the_part_and_the_problem(
    subject: str, text: str, variables: dict[str, Any], error: str
) -> None:
    with pytest.raises(TemplateError, match=error.replace("(", r"\(").replace(")", r"\)")):
        render(make_template("w", subject, text), variables)


@pytest.mark.parametrize(
    ("template_id", "subject", "text", "html", "error"),
    [
        ("w", "s", "{{ name", None, "syntax error in the text body, line 1"),
        ("w", "s", None, "{% if x %}", "syntax error in the html body, line 1"),
        ("w", "s", "{{ x|nosuch }}", None, "No filter named 'nosuch'"),
        ("w", "a\nb", "x", None, "the subject must be one line"),
        ("w", "s", None, None, "needs a text body, an html body, or both"),
        ("", "s", "x", None, "is not a template id"),
        ("has space", "s", "x", None, "is not a template id"),
        ("x" * 201, "s", "x", None, "is not a template id"),
    ],
)
def test_a_broken_template_is_refused_before_it_is_stored(
    template_id: str, subject: str, text: str | None, html: str | None, error: str
) -> None:
    with pytest.raises(ValidationError, match=error):
        check_template(template_id, subject, text, html)


# -- delivery by a worker --------------------------------------------------------------


def test_template_job_is_delivered_rendered_with_both_parts(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    add_welcome(store)
    job_id = template_job(
        store, {"name": "Alice <script>x()</script>", "code": "42"}, subject="ignored"
    )
    deliver_all(make_settings(db_url, smtp_server.url()), store)

    job = store.get(job_id)
    assert (job.status, job.attempts) == (Status.SENT, 1)
    [received] = smtp_server.messages
    subject, text, html = parts(received.parsed())
    assert subject == "Welcome, Alice <script>x()</script>"  # the template's subject wins
    assert text == "Hello Alice <script>x()</script>,\nyour code is 42.\n"
    assert "Hello Alice &lt;script&gt;x()&lt;/script&gt;" in html
    assert "<script" not in html and "<b>42</b>" in html


def test_job_fields_fill_what_the_template_does_not_define(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    check_template("receipt", "", "Total: {{ total }}", None)
    store.templates.put("receipt", "", "Total: {{ total }}", None)
    template_job(
        store, {"total": "9.50"}, template_id="receipt", subject="Your receipt", html="<p>job</p>"
    )
    deliver_all(make_settings(db_url, smtp_server.url()), store)
    subject, text, html = parts(smtp_server.messages[0].parsed())
    assert (subject, text.strip()) == ("Your receipt", "Total: 9.50")
    assert "<p>job</p>" in html


def test_template_problems_fail_the_job_after_one_attempt_with_a_clear_error(
    store: Store, db_url: str, smtp_server: SmtpServer
) -> None:
    add_welcome(store)
    check_template("sneaky", "s", "{{ ''.__class__.__mro__ }}", None)
    store.templates.put("sneaky", "s", "{{ ''.__class__.__mro__ }}", None)
    check_template("header", "{{ subject }}", "x", None)
    store.templates.put("header", "{{ subject }}", "x", None)
    expected = {
        template_job(store, {"code": "1"}): (
            "cannot compose message: template 'welcome': variable 'name' is undefined "
            "in the subject"
        ),
        template_job(store, {}, template_id="nosuch"): (
            "cannot compose message: template_id: unknown template 'nosuch'"
        ),
        template_job(store, {}, template_id="sneaky"): (
            "cannot compose message: template 'sneaky': refused by the sandbox in the text body"
        ),
        template_job(store, {"subject": "Hi\r\nBcc: x@evil.example"}, template_id="header"): (
            "cannot compose message: template 'header': the rendered subject contains CR, LF"
        ),
    }
    good = template_job(store, {"name": "Bob", "code": "7"})
    deliver_all(make_settings(db_url, smtp_server.url()), store)

    for job_id, error in expected.items():
        job = store.get(job_id)
        assert (job.status, job.attempts) == (Status.FAILED, 1)
        assert job.last_error is not None and job.last_error.startswith(error), job.last_error
    assert store.get(good).status is Status.SENT
    [received] = smtp_server.messages
    assert "evil" not in received.data.decode()


def test_cached_template_is_reread_after_its_time_and_a_missing_one_is_not_cached(
    store: Store,
) -> None:
    now = [0.0]
    cache = TemplateCache(store, ttl=5.0, clock=lambda: now[0])
    add_welcome(store)

    async def scenario() -> None:
        first = await cache.get("welcome")
        assert first is not None
        store.templates.put("welcome", "New {{ name }}", "new", None, replace=True)
        now[0] = 4.9
        assert await cache.get("welcome") is first  # within the time: no read, no parse
        now[0] = 5.0
        edited = await cache.get("welcome")
        assert edited is not None and render(edited, {"name": "A"}).subject == "New A"
        now[0] = 6.0
        assert await cache.get("welcome") is edited
        store.templates.delete("welcome")
        now[0] = 11.0
        assert await cache.get("welcome") is None
        store.templates.put("welcome", "Back", "x", None)
        assert await cache.get("welcome") is not None  # found at once, not after the time
        results = await asyncio.gather(*(cache.get("welcome") for _ in range(20)))
        assert len({id(r) for r in results}) == 1

    asyncio.run(scenario())


def test_an_edited_template_is_compiled_once_however_many_deliveries_wait_for_it(
    store: Store,
) -> None:
    now = [0.0]
    cache = TemplateCache(store, ttl=5.0, clock=lambda: now[0])
    add_welcome(store)

    async def scenario() -> None:
        first = await cache.get("welcome")
        store.templates.put("welcome", "New {{ name }}", "new", None, replace=True)
        now[0] = 5.0
        results = await asyncio.gather(*(cache.get("welcome") for _ in range(20)))
        assert len({id(r) for r in results}) == 1 and results[0] is not first
        assert results[0] is not None and results[0].sources[0] == "New {{ name }}"
        now[0] = 10.0
        assert await cache.get("welcome") is results[0]  # read again, same sources: kept

    asyncio.run(scenario())


# -- encrypted variables ---------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.key"
    generate_key_file(path)
    return path


def raw_variables(store: Store, job_id: str) -> str:
    with store.engine.connect() as conn:
        value = conn.execute(
            sa.text("SELECT CAST(variables AS TEXT) FROM email_queue WHERE id = :id"),
            {"id": job_id},
        ).scalar_one()
    return str(value)


def test_encrypted_variables_are_unreadable_in_the_database_and_arrive_in_the_mail(
    store: Store, db_url: str, smtp_server: SmtpServer, key_file: Path
) -> None:
    add_welcome(store)
    secret = {"name": "Alice", "code": "s3cr3t-7781"}
    with Client(db_url, secrets_key_file=str(key_file)) as client:
        sealed = client.enqueue("alice@example.com", "", template_id="welcome", variables=secret)
        [many] = client.enqueue_many(
            [
                {
                    "to": "bob@example.com",
                    "subject": "",
                    "template_id": "welcome",
                    "variables": secret,
                }
            ]
        )
    plain = template_job(store, {"name": "Carol", "code": "plain-1"})  # e.g. by plain SQL

    for job_id in (sealed, many):
        stored = raw_variables(store, job_id)
        assert "s3cr3t" not in stored and "Alice" not in stored
        assert set(json.loads(stored)) == {"$fernet"}
    deliver_all(make_settings(db_url, smtp_server.url(), secrets_key_file=str(key_file)), store)

    assert {store.get(i).status for i in (sealed, many, plain)} == {Status.SENT}
    texts = sorted(parts(m.parsed())[1] for m in smtp_server.messages)
    assert texts == [
        "Hello Alice,\nyour code is s3cr3t-7781.\n",
        "Hello Alice,\nyour code is s3cr3t-7781.\n",
        "Hello Carol,\nyour code is plain-1.\n",
    ]


def test_encrypted_variables_without_the_right_key_fail_clearly_and_never_leak(
    store: Store, db_url: str, smtp_server: SmtpServer, key_file: Path, tmp_path: Path
) -> None:
    add_welcome(store)
    other_key = tmp_path / "other.key"
    generate_key_file(other_key)
    with Client(db_url, secrets_key_file=str(key_file)) as client:
        wrong = client.enqueue(
            "a@example.com", "", template_id="welcome", variables={"name": "s3cr3t"}
        )
        missing = client.enqueue(
            "b@example.com", "", template_id="welcome", variables={"name": "s3cr3t"}
        )
    deliver_all(make_settings(db_url, smtp_server.url(), secrets_key_file=str(other_key)), store)
    store.requeue(missing)  # wrong's failure is recorded; now one with no key at all
    deliver_all(make_settings(db_url, smtp_server.url()), store)

    wrong_job, missing_job = store.get(wrong), store.get(missing)
    assert (wrong_job.status, wrong_job.attempts) == (Status.FAILED, 1)
    assert wrong_job.last_error == (
        "cannot compose message: variables: cannot decrypt: the token was made with "
        "another key (check secrets_key_file) or is damaged"
    )
    assert missing_job.status is Status.FAILED
    assert missing_job.last_error == (
        "cannot compose message: variables: the variables are encrypted, but no "
        "secrets_key_file is configured"
    )
    assert smtp_server.messages == []


def test_an_unreadable_or_malformed_key_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a fernet key\n")
    with pytest.raises(ConfigError, match=r"secrets_key_file: .* does not hold Fernet keys"):
        load_secret_box(bad)
    with pytest.raises(ConfigError, match="secrets_key_file: cannot read"):
        Client("sqlite:///unused.db", secrets_key_file=str(tmp_path / "absent.key"))
    assert load_secret_box("") is None


def test_check_config_and_start_up_refuse_a_bad_key_file_in_one_line(
    migrated_sqlite: str, tmp_path: Path, key_file: Path
) -> None:
    missing = tmp_path / "absent.key"
    env = {**base_env(migrated_sqlite), "MAILQD_SECRETS_KEY_FILE": str(missing)}
    assert_one_line_failure(
        run_mailqd(env, "--check-config"), f"mailqd: config secrets_key_file: cannot read {missing}"
    )
    good = {**base_env(migrated_sqlite), "MAILQD_SECRETS_KEY_FILE": str(key_file)}
    assert run_mailqd(good, "--check-config").returncode == 0


def test_a_rotated_key_file_still_opens_what_the_old_key_sealed(tmp_path: Path) -> None:
    old, new = tmp_path / "old.key", tmp_path / "new.key"
    generate_key_file(old)
    generate_key_file(new)
    old_box = load_secret_box(old)
    assert old_box is not None
    sealed = old_box.seal({"code": "1"})
    rotated = tmp_path / "rotated.key"
    rotated.write_text(f"# new first\n{new.read_text()}\n{old.read_text()}")
    box = load_secret_box(rotated)
    assert box is not None and box.open(sealed) == {"code": "1"}
    assert "key" not in repr(box).replace("keys hidden", "")


# -- the client library --------------------------------------------------------------------


def test_client_manages_and_previews_templates(db_url: str) -> None:
    with Client(db_url) as client:
        added = client.add_template("welcome", "Hi {{ name }}", text=WELCOME_TEXT)
        assert added.id == "welcome" and added.html_body is None
        with pytest.raises(TemplateExistsError):
            client.add_template("welcome", "Hi", text="x")
        with pytest.raises(TemplateError, match="syntax error in the html body"):
            client.add_template("broken", "s", html="{{ oops")
        with pytest.raises(MissingContentError):
            client.add_template("empty", "s")
        client.add_template("welcome", "Hello {{ name }}", html="<p>{{ name }}</p>", replace=True)
        assert [t.id for t in client.list_templates()] == ["welcome"]  # nothing broken stored
        preview = client.render_template("welcome", {"name": "<Al>"})
        assert (preview.subject, preview.text, preview.html) == (
            "Hello <Al>",
            None,
            "<p>&lt;Al&gt;</p>",
        )
        with pytest.raises(TemplateError, match="variable 'name' is undefined"):
            client.render_template("welcome", {})
        client.delete_template("welcome")
        with pytest.raises(TemplateNotFoundError):
            client.get_template("welcome")


def test_async_client_manages_and_previews_templates(db_url: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(db_url) as client:
            await client.add_template("welcome", "Hi {{ name }}", text="Dear {{ name }}")
            assert (await client.get_template("welcome")).text_body == "Dear {{ name }}"
            assert [t.id for t in await client.list_templates()] == ["welcome"]
            assert (await client.render_template("welcome", {"name": "A"})).text == "Dear A"
            await client.delete_template("welcome")
            assert await client.list_templates() == []

    asyncio.run(scenario())


# -- mailqctl templates --------------------------------------------------------------------


TEMPLATE_KEYS = {"id", "subject", "text_body", "html_body", "created_at", "updated_at"}


def test_ctl_templates_add_list_show_render_delete(db_url: str, tmp_path: Path) -> None:
    text, html = tmp_path / "welcome.txt", tmp_path / "welcome.html"
    text.write_text(WELCOME_TEXT)
    html.write_text(WELCOME_HTML)
    added = invoke(
        "templates", "add", "welcome", "--subject", "Welcome, {{ name }}",
        "--text-file", str(text), "--html-file", str(html), db=db_url,
    )  # fmt: skip
    assert (added.returncode, added.stdout) == (0, "added template welcome\n")
    from_stdin = invoke(
        "templates", "add", "note", "--subject", "", "--text-file", "-", "--json",
        db=db_url, input="Note: {{ n }}",
    )  # fmt: skip
    document = ok_json(from_stdin)
    assert set(document) == TEMPLATE_KEYS | {"replaced"}
    assert (document["text_body"], document["replaced"]) == ("Note: {{ n }}", False)

    listed = ok_json(invoke("templates", "list", "--json", db=db_url))
    assert [t["id"] for t in listed["templates"]] == ["note", "welcome"]
    assert [t["has_html"] for t in listed["templates"]] == [False, True]
    human = invoke("templates", "list", db=db_url).stdout
    assert "welcome" in human and "2 templates" in human

    shown = ok_json(invoke("templates", "show", "welcome", "--json", db=db_url))
    assert set(shown) == TEMPLATE_KEYS
    assert (shown["text_body"], shown["html_body"]) == (WELCOME_TEXT, WELCOME_HTML)
    assert "Hello {{ name }}" in invoke("templates", "show", "welcome", db=db_url).stdout

    rendered = ok_json(
        invoke(
            "templates", "render", "welcome", "--var", "name=<b>Al</b>",
            "--vars-json", '{"code": 7, "name": "ignored"}', "--json", db=db_url,
        )
    )  # fmt: skip
    assert rendered == {
        "id": "welcome",
        "subject": "Welcome, <b>Al</b>",
        "text": "Hello <b>Al</b>,\nyour code is 7.\n",
        "html": "<p>Hello &lt;b&gt;Al&lt;/b&gt;</p><p>Code: <b>7</b></p>",
    }
    human = invoke(
        "templates", "render", "welcome", "--var", "name=Al", "--var", "code=1", db=db_url
    )
    assert "Welcome, Al" in human.stdout and "your code is 1." in human.stdout

    replaced = invoke(
        "templates", "add", "welcome", "--subject", "New", "--text-file", str(text), "--replace",
        db=db_url,
    )  # fmt: skip
    assert replaced.stdout == "replaced template welcome\n"
    deleted = invoke("templates", "delete", "welcome", "--json", db=db_url)
    assert ok_json(deleted) == {"deleted": "welcome"}
    remaining = ok_json(invoke("templates", "list", "--json", db=db_url))["templates"]
    assert [t["id"] for t in remaining] == ["note"]


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (["add", "w", "--subject", "s"], 2, "give --text-file, --html-file or both"),
        (["add", "w", "--subject", "s", "--text-file", "{bad}"], 1, "syntax error in the text"),
        (["add", "has space", "--subject", "s", "--text-file", "{ok}"], 1, "not a template id"),
        (["add", "welcome", "--subject", "s", "--text-file", "{ok}"], 1, "exists already"),
        (["add", "w", "--subject", "s", "--text-file", "{absent}"], 2, "cannot read"),
        (["render", "welcome"], 1, "template 'welcome': variable 'name' is undefined"),
        (["render", "welcome", "--vars-json", "[1]"], 2, "must be a JSON object"),
        (["render", "welcome", "--var", "novalue"], 2, "is not KEY=VALUE"),
        (["render", "nosuch"], 1, "mailqctl: no template with id 'nosuch'"),
        (["show", "nosuch"], 1, "mailqctl: no template with id 'nosuch'"),
        (["delete", "nosuch"], 1, "mailqctl: no template with id 'nosuch'"),
    ],
)
def test_ctl_templates_bad_input_is_one_line_and_writes_nothing(
    store: Store, db_url: str, tmp_path: Path, args: list[str], code: int, error: str
) -> None:
    add_welcome(store)
    (tmp_path / "bad.txt").write_text("{{ oops")
    (tmp_path / "ok.txt").write_text("fine")
    files = {"{bad}": "bad.txt", "{ok}": "ok.txt", "{absent}": "absent.txt"}
    argv = [str(tmp_path / files[a]) if a in files else a for a in args]
    result = invoke("templates", *argv, db=db_url)
    if code == 1:
        assert error in error_line(result)
    else:
        assert result.returncode == 2 and error in result.stderr, result.stderr
    assert [t.id for t in store.templates.all()] == ["welcome"]
    assert store.templates.get("welcome").subject == "Welcome, {{ name }}"


def test_ctl_secrets_generate_key_writes_a_private_key_and_never_overwrites(
    tmp_path: Path, db_url: str, store: Store
) -> None:
    path = tmp_path / "secrets.key"
    made = invoke("secrets", "generate-key", str(path))
    assert made.returncode == 0 and made.stdout == f"wrote a new key to {path} (mode 0600)\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = path.read_text()
    assert ok_json(invoke("secrets", "generate-key", str(tmp_path / "2.key"), "--json")) == {
        "path": str(tmp_path / "2.key")
    }
    assert error_line(invoke("secrets", "generate-key", str(path))) == (
        f"mailqctl: {path} exists already; a key file is never overwritten"
    )
    assert path.read_text() == key

    queued = invoke(
        "enqueue", "--to", "a@example.com", "--template", "welcome", "--var", "code=s3cr3t",
        db=db_url, env={"MAILQD_SECRETS_KEY_FILE": str(path)},
    )  # fmt: skip
    assert queued.returncode == 0, queued.stderr
    stored = raw_variables(store, queued.stdout.strip())
    assert "s3cr3t" not in stored and "$fernet" in stored


# -- the daemon, end to end ------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_daemon_delivers_a_template_job_with_encrypted_variables(
    daemons: DaemonPool, db_url: str, store: Store, smtp_server: SmtpServer, key_file: Path
) -> None:
    with Client(db_url, secrets_key_file=str(key_file)) as client:
        client.add_template("welcome", "Welcome, {{ name }}", text=WELCOME_TEXT, html=WELCOME_HTML)
        job_id = client.enqueue(
            "alice@example.com",
            "",
            template_id="welcome",
            variables={"name": "Alice", "code": "s3cr3t-e2e"},
        )
    daemon = daemons.mailqd(
        {
            "MAILQD_DATABASE_URL": db_url,
            "MAILQD_SMTP_URL": smtp_server.url(starttls="off"),
            "MAILQD_FROM": SENDER,
            "MAILQD_WORKERS": "1",
            "MAILQD_POLL_INTERVAL": "0.2",
            "MAILQD_SECRETS_KEY_FILE": str(key_file),
        }
    )
    daemon.wait_for(lambda: store.get(job_id).status is Status.SENT, "template job sent", 60)
    [received] = smtp_server.wait_for_messages(1, DEADLINE)
    subject, text, html = parts(received.parsed())
    assert subject == "Welcome, Alice"
    assert text == "Hello Alice,\nyour code is s3cr3t-e2e.\n"
    assert "<b>s3cr3t-e2e</b>" in html
    assert "s3cr3t" not in daemon.log_text()
