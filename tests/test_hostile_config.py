"""Malformed URLs and configuration: one line naming the key, no password, no traceback.

Each database and SMTP URL below is wrong in a way an operator meets
(a password with an unencoded `@ / ? #`, a bad port, an unknown scheme,
no host, garbage), and holds a password made of two marked halves. It goes
through every entry that reads it: `mailqd --check-config`, `mailqd`
itself, `mailqctl` (a command that reads the database, and `drain` for
SMTP) and `Client`/`AsyncClient`. Each must end with exactly one line on
stderr naming the key, and neither half of the password anywhere in
stdout or stderr. Then broken files: config, key files, DKIM keys.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ctl_process import EVERY_COMMAND, MAILQCTL, ctl_env
from daemon_process import MAILQD, daemon_env
from mailqd import AsyncClient, Client
from mailqd.errors import ConfigError
from mailqd.store import Store
from mailqd.store.migrate import upgrade

HEAD, TAIL = "Hq7head", "Tw9tail"
"""The two halves of every password below: neither may be printed, whatever splits them."""

BAD_DATABASE_URLS = {
    "@ in the password": f"postgresql://app:{HEAD}@{TAIL}:w0rd@127.0.0.1/db",
    "@ and a port": f"postgresql://app:{HEAD}@{TAIL}@127.0.0.1:5432/db",
    "/ in the password": f"postgresql://app:{HEAD}/{TAIL}@127.0.0.1/db",
    "? in the password": f"postgresql://app:{HEAD}?{TAIL}@127.0.0.1/db",
    "# in the password": f"postgresql://app:{HEAD}#{TAIL}@127.0.0.1/db",
    "port not a number": f"postgresql://app:{HEAD}{TAIL}@127.0.0.1:port/db",
    "port out of range": f"postgresql://app:{HEAD}{TAIL}@127.0.0.1:99999/db",
    "port zero": f"postgresql://app:{HEAD}{TAIL}@127.0.0.1:0/db",
    "unknown scheme": f"mysql://app:{HEAD}{TAIL}@127.0.0.1/db",
    "unknown driver": f"postgresql+asyncpg://app:{HEAD}{TAIL}@127.0.0.1/db",
    "sqlite with a host": f"sqlite://app:{HEAD}{TAIL}@127.0.0.1/mailqd.db",
    "garbage": f"{HEAD} {TAIL}",
    "no scheme": f"app:{HEAD}{TAIL}@127.0.0.1/db",
}

BAD_SMTP_URLS = {
    "@ in the password": f"smtp://app:{HEAD}@{TAIL}:w0rd@127.0.0.1",
    "/ in the password": f"smtp://app:{HEAD}/{TAIL}@127.0.0.1:25",
    "? in the password": f"smtp://app:{HEAD}?{TAIL}@127.0.0.1",
    "# in the password": f"smtp://app:{HEAD}#{TAIL}@127.0.0.1",
    "port not a number": f"smtp://app:{HEAD}{TAIL}@127.0.0.1:port",
    "port out of range": f"smtps://app:{HEAD}{TAIL}@127.0.0.1:70000",
    "unknown scheme": f"ftp://app:{HEAD}{TAIL}@127.0.0.1",
    "empty host": f"smtp://app:{HEAD}{TAIL}@",
    "empty host, a port": f"smtp://app:{HEAD}{TAIL}@:25",
    "garbage": f"{HEAD} {TAIL}",
    "bad option": f"smtp://app:{HEAD}{TAIL}@127.0.0.1?{HEAD}={TAIL}",
}

Result = subprocess.CompletedProcess[str]
TIMEOUT = 60.0


def run(argv: Sequence[str], env: Mapping[str, str]) -> Result:
    """Run a command in a session of its own; on a timeout its whole group is killed.

    A `mailqd` that did not refuse its configuration would otherwise run on,
    with its workers, after the test gave up on it.
    """
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env),
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{argv} did not end within {TIMEOUT} s: it took the configuration as good")
    return subprocess.CompletedProcess(list(argv), process.returncode, stdout, stderr)


def run_each(commands: Sequence[tuple[Sequence[str], Mapping[str, str]]]) -> list[Result]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda command: run(*command), commands))


def assert_one_line(result: Result, prefix: str, *, code: int = 1) -> str:
    """Exit `code`, one stderr line starting with `prefix`, no password half, no traceback."""
    shown = result.stdout + result.stderr
    assert result.returncode == code, (result.returncode, shown)
    assert "Traceback" not in shown, shown
    for half in (HEAD, TAIL):
        assert half not in shown, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.fixture
def migrated_sqlite(sqlite_url: str) -> str:
    store = Store.from_url(sqlite_url)
    upgrade(store.engine)
    store.close()
    return sqlite_url


def daemon_commands(env: Mapping[str, str]) -> list[tuple[list[str], dict[str, str]]]:
    """`mailqd --check-config` and `mailqd` (which must stop at start) with `env`."""
    full = daemon_env(env)
    return [([str(MAILQD), "--check-config"], full), ([str(MAILQD)], full)]


# --- database_url -------------------------------------------------------------------


@pytest.mark.parametrize("url", BAD_DATABASE_URLS.values(), ids=BAD_DATABASE_URLS.keys())
def test_a_bad_database_url_is_one_line_everywhere(url: str) -> None:
    env = {"MAILQD_DATABASE_URL": url, "MAILQD_SMTP_URL": "null://"}
    commands = [*daemon_commands(env), ([MAILQCTL, "stats"], ctl_env(env))]
    check, daemon, stats = run_each(commands)
    assert_one_line(check, "mailqd: config database_url: ")
    assert_one_line(daemon, "mailqd: config database_url: ")
    assert_one_line(stats, "mailqctl: config database_url: ")


def test_a_bad_database_url_given_as_a_flag_is_one_line() -> None:
    url = BAD_DATABASE_URLS["@ in the password"]
    results = run_each(
        [
            ([MAILQCTL, "--database-url", url, "failed"], ctl_env()),
            ([str(MAILQD), "--database-url", url, "--check-config"], daemon_env()),
        ]
    )
    for result, prog in zip(results, ("mailqctl", "mailqd"), strict=True):
        assert_one_line(result, f"{prog}: config database_url: ")


@pytest.mark.parametrize("url", BAD_DATABASE_URLS.values(), ids=BAD_DATABASE_URLS.keys())
def test_a_bad_database_url_is_a_config_error_from_the_client(url: str) -> None:
    for make in (Client, AsyncClient):
        with pytest.raises(ConfigError) as caught:
            make(url)
        error = caught.value
        assert error.key == "database_url"
        assert str(error).startswith("database_url: ")
        assert "\n" not in str(error)
        for half in (HEAD, TAIL):
            assert half not in str(error) and half not in repr(error)
        # No driver exception behind it, whose text could hold the URL.
        assert error.__cause__ is None and error.__suppress_context__


@pytest.mark.parametrize("url", [None, 42, "", "   "])
def test_a_database_url_that_is_not_text_is_a_config_error(url: object) -> None:
    with pytest.raises(ConfigError, match=r"^database_url: (must be a string|is empty)"):
        Client(url)  # type: ignore[arg-type]


@pytest.mark.parametrize("password", ["pa:ss:word", "p%40ss%2Fw%3Fo%23rd%3A"])
def test_colons_and_percent_encoded_specials_are_fine(pg_url: str, password: str) -> None:
    """RFC 3986 allows `:` in the password (the first one separates); the rest is encoded."""
    user, _, rest = pg_url.partition("://")[2].partition("@")
    url = f"postgresql://{user.split(':')[0]}:{password}@{rest}"  # trust auth: any password
    results = run_each(
        [
            ([MAILQCTL, "--database-url", url, "stats", "--json"], ctl_env()),
            ([str(MAILQD), "--check-config"], daemon_env({"MAILQD_DATABASE_URL": url})),
        ]
    )
    for result in results:
        assert result.returncode == 0, result.stderr
    assert ":***@" in results[1].stdout and password not in results[1].stdout


# --- smtp_url -----------------------------------------------------------------------


@pytest.mark.parametrize("url", BAD_SMTP_URLS.values(), ids=BAD_SMTP_URLS.keys())
def test_a_bad_smtp_url_is_one_line_everywhere(url: str, migrated_sqlite: str) -> None:
    env = {"MAILQD_DATABASE_URL": migrated_sqlite, "MAILQD_SMTP_URL": url}
    commands = [
        *daemon_commands(env),
        ([MAILQCTL, "drain"], ctl_env(env)),
        ([MAILQCTL, "stats"], ctl_env(env)),
    ]
    check, daemon, drain, stats = run_each(commands)
    assert_one_line(check, "mailqd: config smtp_url: ")
    assert_one_line(daemon, "mailqd: config smtp_url: ")
    assert_one_line(drain, "mailqctl: config smtp_url: ")
    # `stats` never reads smtp_url: it works, and shows nothing of it.
    assert stats.returncode == 0, stats.stderr
    assert HEAD not in stats.stdout + stats.stderr and TAIL not in stats.stdout + stats.stderr


# --- files ----------------------------------------------------------------------------


def _config_cases(tmp_path: Path) -> dict[str, Path]:
    """Config files that cannot be used, each hiding a password that must not be printed."""
    cases = {
        "not UTF-8": b'database_url = "postgresql://app:' + HEAD.encode() + b'\xff@h/db"\n',
        "unterminated string": f'database_url = "postgresql://app:{HEAD}{TAIL}@h/db\n'.encode(),
        "a list for a URL": f'smtp_url = ["smtp://app:{HEAD}{TAIL}@h"]\n'.encode(),
        "a table for a URL": f'[database_url]\nurl = "postgresql://app:{HEAD}{TAIL}@h"\n'.encode(),
        "a number for a password": f"smtp_password = 1{len(HEAD)}\n".encode(),
        "unknown key": f'databse_url = "postgresql://app:{HEAD}{TAIL}@h/db"\n'.encode(),
        "bad URL in the file": f'database_url = "postgresql://app:{HEAD}@{TAIL}@h/db"\n'.encode(),
        "mailqd not a table": b"mailqd = 5\n",
    }
    paths = {}
    for name, content in cases.items():
        path = tmp_path / (name.replace(" ", "_") + ".toml")
        path.write_bytes(content)
        paths[name] = path
    directory = tmp_path / "a_directory.toml"
    directory.mkdir()
    paths["a directory"] = directory
    paths["missing"] = tmp_path / "missing.toml"
    return paths


def test_a_config_file_that_cannot_be_used_is_one_line(tmp_path: Path) -> None:
    paths = _config_cases(tmp_path)
    commands = []
    for path in paths.values():
        env = {"MAILQD_CONFIG": str(path)}  # MAILQD_DATABASE_URL would win over the file's
        commands += [*daemon_commands(env), ([MAILQCTL, "stats"], ctl_env(env))]
    results = iter(run_each(commands))
    for name in paths:
        for prog in ("mailqd", "mailqd", "mailqctl"):
            line = assert_one_line(next(results), f"{prog}: config ")
            assert name != "missing" or "does not exist" in line


def test_key_files_that_cannot_be_used_are_one_line(tmp_path: Path, migrated_sqlite: str) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe\x00\x1b[2J")
    empty = tmp_path / "empty.key"
    empty.write_text("")
    directory = tmp_path / "keys"
    directory.mkdir()
    missing = tmp_path / "missing.key"
    files = [garbage, binary, empty, directory, missing]
    dkim = {"MAILQD_DKIM_DOMAIN": "example.com", "MAILQD_DKIM_SELECTOR": "s1"}
    cases: list[tuple[dict[str, str], str]] = []
    for path in files:
        cases.append(({"MAILQD_SECRETS_KEY_FILE": str(path)}, "secrets_key_file"))
        cases.append(({**dkim, "MAILQD_DKIM_KEY_FILE": str(path)}, "dkim_key_file"))
        if path is garbage:
            continue  # one line of text is a fine password
        cases.append(
            (
                {"MAILQD_SMTP_URL": "smtp://app@127.0.0.1", "MAILQD_SMTP_PASSWORD_FILE": str(path)},
                "smtp_password_file",
            )
        )
    cases.append(({"MAILQD_DKIM_DOMAIN": "example.com"}, "dkim_"))
    commands = [
        command
        for env, _key in cases
        for command in daemon_commands({"MAILQD_DATABASE_URL": migrated_sqlite, **env})
    ]
    results = iter(run_each(commands))
    for env, key in cases:
        for _ in range(2):
            result = next(results)
            line = assert_one_line(result, f"mailqd: config {key}")
            assert "\x1b" not in line, (env, line)
    for path in (garbage, binary, empty, directory, missing):
        with pytest.raises(ConfigError, match=r"^secrets_key_file: "):
            Client(migrated_sqlite, secrets_key_file=str(path))


def test_an_unexpected_error_is_one_line_without_its_message(migrated_sqlite: str) -> None:
    """A bug is named by its type and where it was raised; its text (a URL, job data) is not."""
    env = daemon_env({"MAILQD_DATABASE_URL": migrated_sqlite})
    script = (
        "import sys; from mailqd.cli import daemon\n"
        "def broken(*a, **k): raise RuntimeError(" + repr(f"{HEAD}{TAIL}") + ")\n"
        "daemon.check_configuration = broken\n"
        "sys.argv = ['mailqd', '--check-config']; daemon.main()\n"
    )
    result = run([os.fspath(Path(MAILQCTL).with_name("python")), "-c", script], env)
    line = assert_one_line(result, "mailqd: internal error: RuntimeError at ")
    assert "please report it" in line


# --- every command, and bytes that are not text -----------------------------------------


def test_every_mailqctl_command_refuses_a_bad_database_url_in_one_line() -> None:
    env = ctl_env({"MAILQD_DATABASE_URL": BAD_DATABASE_URLS["@ in the password"]})
    commands = [*EVERY_COMMAND, ["migrate"], ["templates", "show", "x"], ["dkim-record"]]
    results = run_each([([MAILQCTL, *args], env) for args in commands])
    for args, result in zip(commands, results, strict=True):
        line = assert_one_line(result, "mailqctl: config database_url: ")
        assert "unencoded '@'" in line, args


def test_arguments_and_settings_that_are_not_utf8_are_one_line(migrated_sqlite: str) -> None:
    undecodable = os.fsdecode(b"\xff\xfe")  # what Python makes of such bytes: lone surrogates
    commands = [
        ([MAILQCTL, "--database-url", migrated_sqlite, "show", undecodable], ctl_env()),
        ([str(MAILQD), "--smtp-url", undecodable, "--check-config"], daemon_env()),
        ([MAILQCTL, "stats"], ctl_env({"MAILQD_DATABASE_URL": f"sqlite:///{undecodable}"})),
        (
            [str(MAILQD), "--check-config"],
            daemon_env({"MAILQD_DATABASE_URL": migrated_sqlite, "MAILQD_FROM": undecodable}),
        ),
    ]
    show, flag, env_url, env_from = run_each(commands)
    assert assert_one_line(show, "mailqctl: ", code=2) == (
        "mailqctl: argument 4 is not valid UTF-8 text"
    )
    assert assert_one_line(flag, "mailqd: ", code=2) == "mailqd: argument 2 is not valid UTF-8 text"
    assert_one_line(env_url, "mailqctl: config database_url: is not valid UTF-8 text")
    assert_one_line(env_from, "mailqd: config from: is not valid UTF-8 text")
