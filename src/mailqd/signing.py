"""DKIM signing of outgoing messages (RFC 6376), with dkimpy.

Configured by three keys that go together: `dkim_domain` (the d= domain),
`dkim_selector` (s=) and `dkim_key_file` (an unencrypted RSA private key in
PEM, PKCS#1 or PKCS#8). The key is read and checked once, when the daemon
starts (and on SIGHUP), into the `Runtime` its workers inherit, so a missing
or unusable key is a `ConfigError` at start rather than a failure of every
message.

Each composed message is signed just before it is sent, with relaxed/relaxed
canonicalization over the headers mailqd writes itself (`SIGNED_HEADERS`).
The ones a receiver shows (`OVERSIGNED`: From, To, Cc, Subject, Date,
Reply-To, Message-ID) are listed in h= once more than the message holds
them, as RFC 6376 section 8.15 advises: the extra entry signs "no further
field of this name", so a second `Subject:` added above the signed one (the
one a mail client shows) breaks the signature, as does a Cc or Reply-To
added to a message that had none.

The body hash (bh=) is computed here, 16 KB at a time, with RFC
6376's relaxed body canonicalization (`relaxed_body_hash`); dkimpy is given
the header block only, and canonicalizes the headers and builds the field
from it (`DKIM.gen_header`, as its own `sign` does). dkimpy's `sign` splits
the whole message into lines and copies its body several times: for a
message with a 20 MB attachment that was some 130 MB more and a second of
CPU, where this holds 16 KB beside the message (docs/performance.md,
"Attachments"). tests/test_dkim.py and tests/test_attachments_compose.py
verify the result with dkimpy's verifier.

dkimpy canonicalizes the headers and builds the field; only its RSA step, big
integer arithmetic in pure Python (~7 ms per 2048-bit signature, which
would cap a worker near 140 signed messages a second), is done by OpenSSL
through `cryptography` instead (~0.1 ms). RSASSA-PKCS1-v1_5 is
deterministic, so the bytes are the same either way (tests/test_dkim.py
checks that against dkimpy's own function).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from mailqd.errors import ConfigError, ValidationError
from mailqd.rules.domains import is_dns_name

if TYPE_CHECKING:
    from mailqd.config import Settings

__all__ = ["OVERSIGNED", "SIGNED_HEADERS", "DkimSigner", "dns_record_value", "signed_header_names"]

OVERSIGNED = ("From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To")
SIGNED_HEADERS = (*OVERSIGNED, "MIME-Version", "Content-Type")
_OVERSIGNED_NAMES = tuple(name.lower().encode("ascii") for name in OVERSIGNED)
_ONCE_NAMES = tuple(name.lower().encode("ascii") for name in SIGNED_HEADERS[len(OVERSIGNED) :])
_OVERSIGNED_FIELD = re.compile(
    rb"^(" + b"|".join(re.escape(name) for name in _OVERSIGNED_NAMES) + rb")[ \t]*:",
    re.IGNORECASE | re.MULTILINE,
)
_KEYS = ("dkim_domain", "dkim_selector", "dkim_key_file")
_PEM_BLOCK = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\n.*?\n-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL
)


@dataclass(frozen=True, slots=True)
class DkimSigner:
    """Signs messages for one domain and selector with one private key."""

    domain: str
    selector: str
    key_file: str
    private_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _use_openssl_for_rsa()

    @classmethod
    def from_settings(cls, settings: Settings) -> DkimSigner | None:
        """The signer the settings ask for; None when DKIM is not configured.

        Raises `ConfigError` when only some of the three keys are set, or
        when the key file cannot be read or holds no usable RSA key.
        """
        values = {key: getattr(settings, key) for key in _KEYS}
        missing = [key for key, value in values.items() if not value]
        if len(missing) == len(_KEYS):
            return None
        if missing:
            given = [key for key in _KEYS if key not in missing]
            raise ConfigError(
                missing[0],
                f"DKIM needs dkim_domain, dkim_selector and dkim_key_file together; "
                f"{', '.join(given)} set but {', '.join(missing)} missing",
            )
        for key in ("dkim_domain", "dkim_selector"):
            if not is_dns_name(values[key]):
                raise ConfigError(key, f"must be a DNS name in ASCII, got {values[key]!r}")
        return cls(
            domain=values["dkim_domain"].lower(),
            selector=values["dkim_selector"],
            key_file=values["dkim_key_file"],
            private_key=_read_private_key(values["dkim_key_file"]),
        )

    def sign(self, message: bytes) -> bytes:
        """The message with a DKIM-Signature header in front.

        Raises `ValidationError` if dkimpy cannot sign this message (it
        cannot parse its header), which fails the job like any message that
        cannot be composed.
        """
        try:
            signature = self._signature_field(message)
        except dkim.DKIMException as exc:
            raise ValidationError("dkim", f"cannot sign the message: {exc}") from None
        return bytes(signature) + message

    def _signature_field(self, message: bytes) -> bytes:
        """The DKIM-Signature field, as `dkim.sign` would write it (rsa-sha256, relaxed/relaxed).

        The fields are those of dkimpy's `DKIM.sign`, in its order; the
        body hash is `relaxed_body_hash`'s, and dkimpy sees the header
        block alone.
        """
        head_end = _head_end(message)
        signer = dkim.DKIM(message[:head_end] + b"\r\n", linesep=b"\r\n")
        include = tuple(name.lower() for name in signed_header_names(message))
        canonicalization = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        domain = self.domain.encode("ascii")
        signer.hasher = hashlib.sha256
        signer.include_headers = include
        fields = [
            (b"v", b"1"),
            (b"a", b"rsa-sha256"),
            (b"c", canonicalization.to_c_value()),
            (b"d", domain),
            (b"i", b"@" + domain),
            (b"q", b"dns/txt"),
            (b"s", self.selector.encode("ascii")),
            (b"t", str(int(time.time())).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", base64.b64encode(relaxed_body_hash(message, head_end))),
            (b"b", b"0" * 60),  # dkimpy's placeholder, so b= folds onto its own line
        ]
        key = _PARSED_KEYS.get(self.private_key)
        if key is None:  # parsed once: dkimpy's ASN.1 parser costs ~0.7 ms a message
            key = _PARSED_KEYS[self.private_key] = parse_pem_private_key(self.private_key)
        header = signer.gen_header(fields, include, canonicalization, b"DKIM-Signature", key)
        return b"DKIM-Signature: " + bytes(header)

    def dns_record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def dns_record_value(self) -> str:
        return dns_record_value(self.private_key)

    def zone_file_record(self) -> str:
        """The TXT record as a zone-file line; the value is split into strings of at most
        255 characters, the DNS limit, which a verifier joins back together."""
        value = self.dns_record_value()
        strings = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
        return f"{self.dns_record_name()}. IN TXT ( {strings} )"


def signed_header_names(message: bytes) -> list[bytes]:
    """The h= list for `message`: each `OVERSIGNED` name once more than it occurs, then the rest."""
    end = message.find(b"\r\n\r\n")
    if end == -1:
        end = message.find(b"\n\n")
    head = message if end == -1 else message[: end + 2]
    counts = dict.fromkeys(_OVERSIGNED_NAMES, 1)
    for name in _OVERSIGNED_FIELD.findall(head):
        counts[name.lower()] += 1
    return [name for name, count in counts.items() for _ in range(count)] + list(_ONCE_NAMES)


_BODY_CHUNK = 16 * 1024
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP_RUN = re.compile(rb"[\t ]+")
_TRAILING_WSP_END = re.compile(rb"[\t ]+\Z")


def _head_end(message: bytes) -> int:
    """Where the header block ends: just after the CRLF of its last field (or the end)."""
    end = message.find(b"\r\n\r\n")
    return len(message) if end == -1 else end + 2


def relaxed_body_hash(message: bytes, head_end: int) -> bytes:
    """SHA-256 of the body after `head_end` (past the blank line), relaxed (RFC 6376 3.4.4).

    Line ends are read as the transport sends them (CR, LF or CRLF become
    CRLF); whitespace at the end of a line is removed and runs of it made
    one space; empty lines at the end are ignored, and a non-empty body
    ends with CRLF. Read 16 KB of whole lines at a time, so the
    whitespace rules only run over the pieces that have whitespace.
    """
    digest = hashlib.sha256()
    position = min(len(message), head_end + 2)
    pending_line_ends = 0
    written = False
    while position < len(message):
        cut = message.find(b"\n", position + _BODY_CHUNK)
        end = len(message) if cut == -1 else cut + 1
        chunk = message[position:end]
        position = end
        if chunk.count(b"\r\n") != chunk.count(b"\n") or chunk.count(b"\r") != chunk.count(b"\n"):
            chunk = _LINE_ENDING.sub(b"\r\n", chunk)
        if b" " in chunk or b"\t" in chunk:  # base64 has none: no regex over it
            chunk = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(b"\r\n", chunk))
        if position >= len(message) and not chunk.endswith(b"\r\n"):
            chunk = _TRAILING_WSP_END.sub(b"", chunk)
        content = chunk.rstrip(b"\r\n")
        if content:
            digest.update(b"\r\n" * pending_line_ends)
            digest.update(content)
            written = True
            pending_line_ends = (len(chunk) - len(content)) // 2
        else:
            pending_line_ends += len(chunk) // 2
    if written:
        digest.update(b"\r\n")
    return digest.digest()


_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_OPENSSL_KEYS: dict[int, rsa.RSAPrivateKey] = {}
_PARSED_KEYS: dict[bytes, Any] = {}


def rsassa_pkcs1_v1_5_sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's `RSASSA_PKCS1_v1_5_sign(hash, private_key)`, computed by OpenSSL.

    `digest` is dkimpy's hash object (it has `name` and `digest()`);
    `private_key` is the key as dkimpy parsed it, a dict of its numbers.
    """
    key = _OPENSSL_KEYS.get(private_key["modulus"])
    if key is None:
        key = _openssl_key(private_key)
        _OPENSSL_KEYS[private_key["modulus"]] = key
    algorithm = _HASHES[digest.name.lower()]()
    return key.sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


def _openssl_key(numbers: dict[str, int]) -> rsa.RSAPrivateKey:
    public = rsa.RSAPublicNumbers(numbers["publicExponent"], numbers["modulus"])
    return rsa.RSAPrivateNumbers(
        p=numbers["prime1"],
        q=numbers["prime2"],
        d=numbers["privateExponent"],
        dmp1=numbers["exponent1"],
        dmq1=numbers["exponent2"],
        iqmp=numbers["coefficient"],
        public_numbers=public,
    ).private_key()


def _use_openssl_for_rsa() -> None:
    """Point dkimpy's signing step at `rsassa_pkcs1_v1_5_sign` (see the module docstring).

    dkimpy looks the function up by name in its package when it signs; its
    own stays in `dkim.crypto`, untouched, for verifying and for the test.
    Installed once (later calls find it in place). A dkimpy that no longer
    signs through that name would silently take ~70 times longer per
    message, so that is refused here, at start (dkimpy is pinned to the
    tested range; tests/test_dkim.py checks the fast path is taken).
    """
    current = getattr(dkim, "RSASSA_PKCS1_v1_5_sign", None)
    if current is rsassa_pkcs1_v1_5_sign:
        return
    if current is None or current is not getattr(dkim.crypto, "RSASSA_PKCS1_v1_5_sign", None):
        raise RuntimeError(
            "dkimpy no longer signs through dkim.RSASSA_PKCS1_v1_5_sign; "
            "mailqd's OpenSSL RSA step cannot be installed (see mailqd.signing)"
        )
    dkim.RSASSA_PKCS1_v1_5_sign = rsassa_pkcs1_v1_5_sign


def dns_record_value(private_key_pem: bytes) -> str:
    """The TXT record that publishes the public half of a PEM RSA private key."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(private_key_pem, password=None)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode('ascii')}"


def _read_private_key(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("dkim_key_file", f"cannot read {path}: {exc.strerror}") from None
    match = _PEM_BLOCK.search(data.replace(b"\r\n", b"\n"))
    problem = f"{path} holds no unencrypted RSA private key in PEM (PKCS#1 or PKCS#8)"
    if match is None or b"ENCRYPTED" in data:
        raise ConfigError("dkim_key_file", problem)
    pem = match.group(0) + b"\n"  # the key alone, with the LF line ends dkimpy expects
    try:
        parse_pem_private_key(pem)
    except (UnparsableKeyError, ValueError, IndexError, TypeError):
        raise ConfigError("dkim_key_file", problem) from None
    return pem
