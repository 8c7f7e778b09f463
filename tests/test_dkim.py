"""DKIM (#6): the daemon signs every message; receivers can verify it against the DNS record.

Verification uses dkimpy's own verifier with a `dnsfunc` that answers with
the record `mailqctl dkim-record` prints, so what the docs tell an operator
to publish is what is checked. Tampered copies must fail, or the check
would prove nothing.
"""

from __future__ import annotations

import email
import hashlib
import re
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ctl_process import error_line, invoke, ok_json
from daemon_process import DaemonPool
from mailqd import Client, signing
from mailqd.config import Settings
from mailqd.errors import ConfigError
from mailqd.models import Status
from mailqd.signing import (
    SIGNED_HEADERS,
    DkimSigner,
    rsassa_pkcs1_v1_5_sign,
    signed_header_names,
)
from mailqd.store import Store
from smtp_server import SmtpServer, smtp_server_fixture
from test_daemon_e2e import daemon_env, stop, wait_all
from test_supervisor import assert_one_line_failure, base_env, migrated_sqlite, run_mailqd

__all__ = ["migrated_sqlite", "smtp_server_fixture"]

DOMAIN, SELECTOR = "example.com", "mail2026"


def write_key(path: Path, *, pkcs1: bool = False) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fmt = (
        serialization.PrivateFormat.TraditionalOpenSSL
        if pkcs1
        else serialization.PrivateFormat.PKCS8
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    )
    return path


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_key(tmp_path_factory.mktemp("dkim") / "dkim.pem")


def dkim_env(key: Path) -> dict[str, str]:
    return {
        "MAILQD_DKIM_DOMAIN": DOMAIN,
        "MAILQD_DKIM_SELECTOR": SELECTOR,
        "MAILQD_DKIM_KEY_FILE": str(key),
    }


def dns_answering(record: str) -> dkim.DNSFunc:  # type: ignore[name-defined]
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode()
        return record.encode()

    return lookup


def published_record(key: Path) -> str:
    """What `mailqctl dkim-record` tells the operator to publish (its TXT strings joined)."""
    zone_line = invoke("dkim-record", env=dkim_env(key))
    assert zone_line.returncode == 0, zone_line.stderr
    name, _, rest = zone_line.stdout.strip().partition(" IN TXT ")
    assert name == f"{SELECTOR}._domainkey.{DOMAIN}."
    strings = re.findall(r'"([^"]*)"', rest)
    assert all(len(s) <= 255 for s in strings)
    as_json = ok_json(invoke("dkim-record", "--json", env=dkim_env(key)))
    assert as_json["value"] == "".join(strings)
    return "".join(strings)


@pytest.mark.timeout(120)
def test_every_delivered_message_verifies_and_a_tampered_one_does_not(
    daemons: DaemonPool, migrated_sqlite: str, smtp_server: SmtpServer, key_file: Path
) -> None:
    store = Store.from_url(migrated_sqlite)
    with Client(migrated_sqlite) as client:
        client.enqueue("alice@example.com", "Plain", "Hello Alice\n.\n..dots\n")
        client.enqueue(
            "Jörg Müller <joerg@example.de>",
            "Grüße 🎉",
            "Hallo",
            "<p onclick='x()'>Hallo <b>Jörg</b></p>",
            cc="carol@example.net",
            bcc="hidden@example.org",
            reply_to="help@example.com",
            headers={"X-Order": "42"},
        )
        client.enqueue("josé@example.com", "SMTPUTF8", body=None, html="<h1>Olá</h1>")
    daemon = daemons.mailqd(daemon_env(migrated_sqlite, smtp_server, **dkim_env(key_file)))
    wait_all(daemon, store, Status.SENT, 3, "3 messages sent")
    stop(daemon)
    store.close()

    dnsfunc = dns_answering(published_record(key_file))
    received = smtp_server.wait_for_messages(3)
    for message in received:
        assert message.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
        signature = message.data.split(b"\r\n\r\n", 1)[0].decode()
        assert f"d={DOMAIN};" in signature and f"s={SELECTOR};" in signature
        assert dkim.verify(message.data, dnsfunc=dnsfunc), message.data[:800]

        data = message.data
        body_changed = data + b"P.S. also click here\r\n"
        subject_changed = re.sub(rb"\r\nSubject: [^\r]*", b"\r\nSubject: Win a prize", data)
        cc_added = data.replace(b"\r\nMIME-Version:", b"\r\nCc: x@evil.example\r\nMIME-Version:")
        for tampered in (body_changed, subject_changed, cc_added):
            assert tampered != message.data
            assert not dkim.verify(tampered, dnsfunc=dnsfunc)


def test_a_signature_does_not_verify_against_another_key(tmp_path: Path, key_file: Path) -> None:
    signer = DkimSigner.from_settings(Settings(**settings_for(key_file)))
    other = DkimSigner.from_settings(Settings(**settings_for(write_key(tmp_path / "other.pem"))))
    assert signer is not None and other is not None
    signed = signer.sign(b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\n")
    assert dkim.verify(signed, dnsfunc=dns_answering(signer.dns_record_value()))
    assert not dkim.verify(signed, dnsfunc=dns_answering(other.dns_record_value()))


def settings_for(key: Path) -> dict[str, str]:
    return {"dkim_domain": DOMAIN, "dkim_selector": SELECTOR, "dkim_key_file": str(key)}


def test_pkcs1_keys_work_too(tmp_path: Path) -> None:
    signer = DkimSigner.from_settings(
        Settings(**settings_for(write_key(tmp_path / "k.pem", pkcs1=True)))
    )
    assert signer is not None
    signed = signer.sign(b"From: a@example.com\r\nTo: b@example.com\r\n\r\nbody\r\n")
    assert dkim.verify(signed, dnsfunc=dns_answering(signer.dns_record_value()))


@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_the_openssl_rsa_step_gives_dkimpys_exact_bytes(key_file: Path, algorithm: str) -> None:
    """The signer replaces only dkimpy's pure-Python RSA; the signature must not change."""
    numbers = dkim.crypto.parse_pem_private_key(key_file.read_bytes())
    for text in (b"", b"a header block", bytes(range(256)) * 40):
        digest = hashlib.new(algorithm, text)
        assert rsassa_pkcs1_v1_5_sign(digest, numbers) == dkim.crypto.RSASSA_PKCS1_v1_5_sign(
            digest, numbers
        )


def test_signing_uses_the_openssl_rsa_step(key_file: Path) -> None:
    signer = DkimSigner.from_settings(Settings(**settings_for(key_file)))
    assert signer is not None
    assert dkim.RSASSA_PKCS1_v1_5_sign is rsassa_pkcs1_v1_5_sign
    again = DkimSigner.from_settings(Settings(**settings_for(key_file)))  # installed once
    assert again is not None and dkim.RSASSA_PKCS1_v1_5_sign is rsassa_pkcs1_v1_5_sign


def test_signing_really_takes_the_openssl_fast_path(key_file: Path) -> None:
    """Installing the hook proves nothing if dkimpy stopped calling it by that name: the
    OpenSSL key cache is filled only from inside the hook, so after a sign it holds the
    key. The signature still verifies with dkimpy's own (pure-Python) RSA."""
    signer = DkimSigner.from_settings(Settings(**settings_for(key_file)))
    assert signer is not None
    modulus = dkim.crypto.parse_pem_private_key(signer.private_key)["modulus"]
    signing._OPENSSL_KEYS.clear()

    signed = signer.sign(COMPOSED)

    assert list(signing._OPENSSL_KEYS) == [modulus]
    assert dkim.verify(signed, dnsfunc=dns_answering(signer.dns_record_value()))


COMPOSED = (
    b"From: Shop <shop@example.com>\r\nTo: alice@example.com\r\nSubject: Your receipt\r\n"
    b"Date: Tue, 01 Dec 2026 21:00:00 +0000\r\nMessage-ID: <r1@example.com>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nTotal: 10 EUR\r\n"
)
ADDED_ABOVE = [
    b"Subject: Your account is locked, log in at evil.example",
    b"From: Bank <security@bank.example>",
    b"To: someone-else@example.com",
    b"Date: Mon, 01 Jan 2035 00:00:00 +0000",
    b"Message-ID: <forged@example.com>",
    b"Reply-To: thief@evil.example",
    b"Cc: thief@evil.example",
]


def fields_named(data: bytes, name: str) -> list[str]:
    return email.message_from_bytes(data).get_all(name) or []


def add_above_the_signed_headers(signed: bytes, field: bytes) -> bytes:
    """`field` inserted right after the DKIM-Signature, above every header it signs
    (where a mail client finds, and shows, the first Subject or From)."""
    signature_end = re.search(rb"\r\n(?![ \t])", signed)
    assert signature_end is not None
    cut = signature_end.end()
    return signed[:cut] + field + b"\r\n" + signed[cut:]


@pytest.mark.parametrize("field", ADDED_ABOVE, ids=lambda f: f.split(b":")[0].decode())
def test_a_displayed_header_added_above_the_signed_one_breaks_the_signature(
    key_file: Path, field: bytes
) -> None:
    """RFC 6376 section 8.15: without oversigning, a verifier checks the bottom-most Subject
    (the signed one) and passes the message whose top Subject the reader sees."""
    signer = DkimSigner.from_settings(Settings(**settings_for(key_file)))
    assert signer is not None
    dnsfunc = dns_answering(signer.dns_record_value())
    signed = signer.sign(COMPOSED)
    assert dkim.verify(signed, dnsfunc=dnsfunc)

    tampered = add_above_the_signed_headers(signed, field)
    name = field.split(b":")[0].decode()
    assert len(fields_named(tampered, name)) == len(fields_named(COMPOSED, name)) + 1
    assert not dkim.verify(tampered, dnsfunc=dnsfunc)

    signed_once = dkim.sign(  # what mailqd did before: each header listed once
        COMPOSED, SELECTOR.encode(), DOMAIN.encode(), signer.private_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[name.encode() for name in SIGNED_HEADERS],
    ) + COMPOSED  # fmt: skip
    # Present once, the forgery used to pass (dkimpy's verifier itself checks for a second
    # From, other verifiers need not; for the absent Cc and Reply-To it never did).
    if fields_named(COMPOSED, name) and name != "From":
        assert dkim.verify(add_above_the_signed_headers(signed_once, field), dnsfunc=dnsfunc)


def test_h_lists_each_displayed_header_once_more_than_it_occurs(key_file: Path) -> None:
    signer = DkimSigner.from_settings(Settings(**settings_for(key_file)))
    assert signer is not None
    signed = signer.sign(COMPOSED)
    h = re.search(rb"h=([^;]*);", signed.split(b"\r\n\r\n")[0].replace(b"\r\n", b""))
    assert h is not None
    names = [name.strip() for name in h.group(1).replace(b" ", b"").split(b":")]
    assert names == [
        b"from", b"from", b"to", b"to", b"cc", b"subject", b"subject", b"date", b"date",
        b"message-id", b"message-id", b"reply-to", b"mime-version", b"content-type",
    ]  # fmt: skip
    two_subjects = COMPOSED.replace(b"Subject: Your", b"Subject: A\r\nsubject : Your")
    assert signed_header_names(two_subjects).count(b"subject") == 3
    assert signed_header_names(b"From: a@x\r\n\r\nSubject: in the body\r\n")[:3] == [
        b"from",
        b"from",
        b"to",
    ]


def test_no_dkim_keys_means_no_signing() -> None:
    assert DkimSigner.from_settings(Settings()) is None


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"dkim_domain": DOMAIN}, "dkim_selector, dkim_key_file missing"),
        ({"dkim_selector": SELECTOR}, "dkim_domain, dkim_key_file missing"),
        ({"dkim_key_file": "/k.pem"}, "dkim_domain, dkim_selector missing"),
        ({"dkim_domain": DOMAIN, "dkim_selector": SELECTOR}, "dkim_key_file missing"),
        ({"dkim_domain": DOMAIN, "dkim_key_file": "/k.pem"}, "dkim_selector missing"),
    ],
)
def test_a_partial_dkim_configuration_names_what_is_missing(
    given: dict[str, str], missing: str
) -> None:
    with pytest.raises(ConfigError, match=missing):
        DkimSigner.from_settings(Settings(**given))


def bad_key_files(directory: Path) -> dict[str, Path]:
    garbage = directory / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    encrypted = directory / "encrypted.pem"
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass"),
        )
    )
    elliptic = directory / "ec.pem"
    elliptic.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {
        "missing": directory / "nope.pem",
        "garbage": garbage,
        "encrypted": encrypted,
        "elliptic": elliptic,
        "directory": directory,
    }


def test_an_unusable_key_file_is_a_config_error(tmp_path: Path) -> None:
    for name, path in bad_key_files(tmp_path).items():
        with pytest.raises(ConfigError, match=r"dkim_key_file: (cannot read|.* holds no)") as e:
            DkimSigner.from_settings(Settings(**settings_for(path)))
        assert str(path) in str(e.value), name


def test_check_config_and_start_up_refuse_a_bad_dkim_setup_in_one_line(
    migrated_sqlite: str, tmp_path: Path, daemons: DaemonPool, key_file: Path
) -> None:
    missing = tmp_path / "nope.pem"
    result = run_mailqd({**base_env(migrated_sqlite), **dkim_env(missing)}, "--check-config")
    assert_one_line_failure(result, f"mailqd: config dkim_key_file: cannot read {missing}: ")

    partial = {**base_env(migrated_sqlite), "MAILQD_DKIM_DOMAIN": DOMAIN}
    assert_one_line_failure(
        run_mailqd(partial, "--check-config"), "mailqd: config dkim_selector: DKIM needs"
    )

    good = run_mailqd({**base_env(migrated_sqlite), **dkim_env(key_file)}, "--check-config")
    assert good.returncode == 0, good.stderr

    daemon = daemons.mailqd({**base_env(migrated_sqlite), **dkim_env(missing)})
    assert daemon.wait_exit(timeout=30) == 1
    assert "dkim_key_file: cannot read" in daemon.log_text()
    assert not daemon.events("worker started")


def test_dkim_record_without_dkim_configured_is_a_clear_error() -> None:
    assert error_line(invoke("dkim-record")).startswith(
        "mailqctl: config dkim_domain: DKIM is not configured"
    )
