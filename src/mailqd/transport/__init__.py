"""The only place that speaks SMTP: a small `Transport` interface and its implementations.

`transport_from_settings(settings)` (or `transport_from_url(url)`) picks the implementation:
`smtp://` and `smtps://` (a real server), `maildir:///path` (files, for
development) and `null://` (discard, for benchmarks).
"""

from mailqd.transport.base import SendResult, Transport
from mailqd.transport.local import MaildirTransport, NullTransport
from mailqd.transport.settings import SmtpSettings, StartTLS, Timeouts
from mailqd.transport.smtp import SmtpTransport
from mailqd.transport.url import (
    redact_url,
    tls_verification_off,
    transport_from_settings,
    transport_from_url,
)

__all__ = [
    "MaildirTransport",
    "NullTransport",
    "SendResult",
    "SmtpSettings",
    "SmtpTransport",
    "StartTLS",
    "Timeouts",
    "Transport",
    "redact_url",
    "tls_verification_off",
    "transport_from_settings",
    "transport_from_url",
]
