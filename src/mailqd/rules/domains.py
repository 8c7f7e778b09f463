"""The one rule for DNS names: recipient domains, DKIM domains and selectors, rate-limit keys.

A label is letters, digits, hyphens and underscores (underscores for
service names such as DKIM selectors), at most 63 characters, not starting
or ending with a hyphen; a name is at most 253 characters. Internationalised
names are turned into A-labels with IDNA 2008 and the UTS #46 mapping, as
mail servers and email-validator expect; Python's own "idna" codec is IDNA
2003, which turns ß into ss and so would send faß.de's mail to fass.de.
"""

from __future__ import annotations

import re

import idna

__all__ = ["DNS_LABEL", "ascii_dns_name", "is_dns_name", "is_mail_domain"]

DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"{DNS_LABEL}(?:\.{DNS_LABEL})*\Z")
_TOP_LABEL = r"(?=[A-Za-z0-9-]*[A-Za-z])[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MAIL_DOMAIN = re.compile(rf"(?:{DNS_LABEL}\.)*{_TOP_LABEL}\Z")
MAX_NAME_LENGTH = 253


def is_dns_name(name: str) -> bool:
    """An ASCII DNS name by the label rule above (no trailing dot)."""
    return len(name) <= MAX_NAME_LENGTH and _DNS_NAME.match(name) is not None


def is_mail_domain(name: str) -> bool:
    """An ASCII domain mail can be addressed to: a DNS name whose top label holds a
    letter (so not an IP address) and no underscore.

    A single label (`localhost`, the default sender's domain) is accepted, as
    the composer always has: the relay decides where such mail may go.
    """
    return len(name) <= MAX_NAME_LENGTH and _MAIL_DOMAIN.match(name) is not None


def ascii_dns_name(name: str) -> str | None:
    """`name` in A-labels, or None when it cannot be one (IDNA refuses it)."""
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None
