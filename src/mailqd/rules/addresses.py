"""The one address parser: RFC 5322 address lists, read strictly.

Every place that reads an address goes through `parse_address_list`: the
client and `mailqctl enqueue` before anything is written, the composer
for every row it sends (however the row was written), the claim-time
screening, the log masking and `mailqctl`'s tables. So what the client
accepts is what the daemon sends, and a display name can never smuggle a
recipient in: a display name is a phrase (atoms, quoted strings, encoded
words), and an unquoted `@ < > , : ; [ ] ( ) \\` in it is refused, not
guessed at. The envelope recipients are exactly the addr-specs found.

Groups, comments, quoted local parts, source routes and domain literals
(`victim@[127.0.0.1]`) are refused: no application needs them to queue
mail, and each is a way to make two parsers disagree. A domain's top label
needs a letter (`a@10.0.0.1` is refused); a single label (`mailqd@localhost`,
the default sender) is accepted, on both sides.

The common shapes (`a@example.com`, a comma-separated list of those) are
matched by one regex; every parse is cached, so a list sent to many times
is parsed once.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from email.errors import HeaderParseError
from email.header import decode_header
from functools import lru_cache
from typing import NamedTuple

from mailqd.errors import InvalidAddressError, ValidationError
from mailqd.rules.domains import ascii_dns_name, is_mail_domain
from mailqd.rules.text import check_header_text

__all__ = [
    "MAX_ADDRESS_LENGTH",
    "MAX_DISPLAY_NAME_LENGTH",
    "Address",
    "envelope_addresses",
    "format_address",
    "parse_address_list",
    "parse_single_address",
]

MAX_ADDRESS_LENGTH = 254  # RFC 5321 4.5.3.1.3, the path without its brackets
MAX_LOCAL_PART_OCTETS = 64  # RFC 5321 4.5.3.1.1
MAX_DISPLAY_NAME_LENGTH = 256  # so that `To: "name" <address>` stays far below 998

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_PLAIN_ADDRESS = (
    rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_PLAIN_LIST = re.compile(rf"{_PLAIN_ADDRESS}(?:[ \t]*,[ \t]*{_PLAIN_ADDRESS})*\Z")

# A phrase word: a quoted string, or an atom. Atoms may hold "." (RFC 5322
# obs-phrase: "John Q. Public") and non-ASCII (RFC 6532); never a special.
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_ATOM = r'[^\x00-\x20"(),:;<>@\[\\\]\x7f]+'
_WORD = re.compile(rf"{_QUOTED}|{_ATOM}", re.S)
_PHRASE = re.compile(rf"(?:{_QUOTED}|{_ATOM})(?:[ \t]*(?:{_QUOTED}|{_ATOM}))*\Z", re.S)
_QUOTED_ANYWHERE = re.compile(_QUOTED, re.S)
_UNESCAPE = re.compile(r"\\(.)", re.S)
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=\Z")
_CHUNK = re.compile(rf'{_QUOTED}|[^",]+|.', re.S)
_SPECIALS = '@<>,:;[]()\\"'
# A name written back unquoted must read back the same: strict atoms (no "."),
# single spaces, no encoded-word look-alike.
_PLAIN_NAME = re.compile(r'[^\s"(),.:;<>@\[\\\]\x7f]+(?: [^\s"(),.:;<>@\[\\\]\x7f]+)*\Z')


class Address(NamedTuple):
    """One mailbox of an address list (a tuple: made for every address of every message)."""

    name: str
    """The display name, decoded (quotes and RFC 2047 encoded words undone); "" if none."""
    addr_spec: str
    """`local@domain` as written: what the queue keeps."""
    envelope: str
    """`local@domain` with the domain in A-labels: what RCPT TO and the header get."""

    @property
    def domain(self) -> str:
        return self.envelope.rpartition("@")[2]

    @property
    def envelope_key(self) -> tuple[str, str]:
        """Identity for de-duplication: local parts are case-sensitive, domains are not."""
        local, _, domain = self.envelope.rpartition("@")
        return local, domain.lower()

    def written(self) -> str:
        """The address as the queue stores it: `addr` or `Name <addr>`, quoted as needed."""
        return format_address(self.name, self.addr_spec)


class _Refused(Exception):
    """Why a text is not an address list; the caller names the field."""


def parse_address_list(field: str, value: object) -> tuple[Address, ...]:
    """Every address of a comma-separated list, or `InvalidAddressError` naming `field`.

    `HeaderInjectionError` for CR, LF or NUL anywhere. An empty (or blank)
    text is an empty list; an empty entry (`a@x,,b@y`) is refused.
    """
    if not isinstance(value, str):
        raise InvalidAddressError(field, f"must be text, not {type(value).__name__}")
    check_header_text(field, value)
    try:
        return _parse(value)
    except _Refused as exc:
        raise InvalidAddressError(field, str(exc)) from None


def parse_single_address(field: str, value: object) -> Address:
    addresses = parse_address_list(field, value)
    if len(addresses) != 1:
        raise InvalidAddressError(field, "must hold exactly one address")
    return addresses[0]


def parse_recipients(field: str, value: str | Iterable[str] | None) -> list[Address]:
    """A caller's recipients: one address-list string, or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return list(parse_address_list(field, value))
    items = list(value)
    found: list[Address] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidAddressError(field, f"expected strings, got {type(item).__name__}")
        found.extend(parse_address_list(field, item))
    return found


def envelope_addresses(value: object) -> list[str] | None:
    """The envelope form of each address, or None when the text is not an address list.

    For the places that must not fail on a bad row (screening, logs,
    tables): the composer refuses such a row with the reason.
    """
    if value is None:
        return []
    try:
        return [address.envelope for address in parse_address_list("address", value)]
    except ValidationError:
        return None


def format_address(name: str, addr_spec: str) -> str:
    """`Name <addr>`, quoting the name when it would not read back the same unquoted.

    A non-ASCII name is not RFC 2047-encoded here: the queue keeps what
    the caller wrote, and the composer encodes it.
    """
    if not name:
        return addr_spec
    if _PLAIN_NAME.match(name) and "=?" not in name:
        return f"{name} <{addr_spec}>"
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{addr_spec}>'


# -- the parser ---------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _parse(text: str) -> tuple[Address, ...]:
    text = text.strip(" \t")
    if not text:
        return ()
    if _PLAIN_LIST.match(text):
        if "," not in text:
            if _short_enough(text):
                return (Address("", text, text),)
        else:
            plain = [part.strip(" \t") for part in text.split(",")]
            if all(map(_short_enough, plain)):
                return tuple(Address("", part, part) for part in plain)
    return tuple(_entry(entry) for entry in _entries(text))


def _short_enough(addr_spec: str) -> bool:
    """What `_PLAIN_LIST` leaves to check of an ASCII dot-atom address: its lengths."""
    return len(addr_spec) <= MAX_ADDRESS_LENGTH and addr_spec.index("@") <= MAX_LOCAL_PART_OCTETS


def _entries(text: str) -> list[str]:
    """Split at the commas outside quoted strings."""
    entries: list[str] = []
    current: list[str] = []
    for chunk in _CHUNK.findall(text):
        if chunk == ",":
            entries.append("".join(current))
            current = []
        else:
            current.append(chunk)
    entries.append("".join(current))
    return entries


def _entry(entry: str) -> Address:
    entry = entry.strip(" \t")
    if not entry:
        raise _Refused("holds an empty address (two commas in a row, or a trailing comma?)")
    if not entry.endswith(">"):
        if "<" in entry:
            raise _Refused(f"{entry!r} is not a valid e-mail address: '<' without '>' at the end")
        return _addr_spec(entry)
    start = entry.rfind("<")
    if start < 0:
        raise _Refused(f"{entry!r} is not a valid e-mail address: '>' without '<'")
    address = _addr_spec(entry[start + 1 : -1].strip(" \t"))
    name = _display_name(entry[:start].strip(" \t"))
    return Address(name=name, addr_spec=address.addr_spec, envelope=address.envelope)


def _display_name(phrase: str) -> str:
    """The decoded display name, or `_Refused` when the phrase is not one (RFC 5322 3.2.5)."""
    if not phrase:
        return ""
    if not _PHRASE.match(phrase):
        raise _Refused(_why_not_a_phrase(phrase))
    parts: list[str] = []
    previous_encoded = False
    for word in _WORD.findall(phrase):
        encoded = False
        if word.startswith('"'):
            text = _UNESCAPE.sub(r"\1", word[1:-1])
        elif word.startswith("=?") and _ENCODED_WORD.match(word):
            text, encoded = _decode_word(word), True
        else:
            text = word
        if parts and not (encoded and previous_encoded):  # RFC 2047 6.2
            parts.append(" ")
        parts.append(text)
        previous_encoded = encoded
    name = "".join(parts)
    try:
        check_header_text("display name", name)
    except ValidationError as exc:
        raise _Refused(f"the display name {exc.problem}") from None
    if len(name) > MAX_DISPLAY_NAME_LENGTH:
        raise _Refused(f"a display name is longer than {MAX_DISPLAY_NAME_LENGTH} characters")
    return name


def _why_not_a_phrase(phrase: str) -> str:
    rest = _QUOTED_ANYWHERE.sub("", phrase)
    for char in rest:
        if char in _SPECIALS:
            what = "an unterminated quote" if char == '"' else f"an unquoted {char!r}"
            return (
                f"the display name {phrase!r} holds {what}: a display name is never an"
                ' address; quote it ("Name, Title" <addr>) or leave it out'
            )
    return f"the display name {phrase!r} holds a control character"


def _decode_word(word: str) -> str:
    try:
        [(raw, charset)] = decode_header(word)
        if isinstance(raw, str):
            return raw
        return str(raw.decode(charset or "ascii"))
    except (HeaderParseError, LookupError, UnicodeDecodeError, ValueError):
        raise _Refused(f"the display name holds an undecodable encoded word {word!r}") from None


def _addr_spec(spec: str) -> Address:
    """A checked `local@domain`; the domain also in A-labels for the envelope."""
    if not spec:
        raise _Refused("holds an empty address (<>)")
    if len(spec) > MAX_ADDRESS_LENGTH:
        raise _Refused(f"an address is longer than {MAX_ADDRESS_LENGTH} characters")
    local, at, domain = spec.rpartition("@")
    if not at or not local or not domain:
        raise _Refused(f"{spec!r} is not a valid e-mail address: it needs local@domain")
    if not _valid_local_part(local):
        raise _Refused(f"{spec!r} is not a valid e-mail address: malformed local part")
    if domain.startswith("["):
        raise _Refused(f"{spec!r} is not accepted: domain literals such as [127.0.0.1] are refused")
    ascii_domain = ascii_dns_name(domain) if _visible(domain) else None
    if ascii_domain is None or not is_mail_domain(ascii_domain):
        raise _Refused(f"{spec!r} is not a valid e-mail address: {domain!r} is not a mail domain")
    envelope = f"{local}@{ascii_domain}"
    if len(envelope) > MAX_ADDRESS_LENGTH:
        raise _Refused(f"an address is longer than {MAX_ADDRESS_LENGTH} characters")
    return Address(name="", addr_spec=spec, envelope=envelope)


def _visible(text: str) -> bool:
    """No invisible or blank non-ASCII character (IDNA would drop a zero-width space
    silently, so the text shown would not be the domain mail goes to)."""
    return text.isascii() or all(
        char.isascii() or unicodedata.category(char)[0] in "LMNPS" for char in text
    )


def _valid_local_part(local: str) -> bool:
    """A dot-atom of at most 64 octets, where a visible non-ASCII character (a letter,
    mark, digit, punctuation or symbol) counts as atext (RFC 6531)."""
    if local.isascii():
        return len(local) <= MAX_LOCAL_PART_OCTETS and _DOT_ATOM.match(local) is not None
    if len(local.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART_OCTETS:
        return False
    if not _visible(local):
        return False
    return _DOT_ATOM.match(re.sub(r"[^\x00-\x7f]", "a", local)) is not None
