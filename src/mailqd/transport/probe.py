"""What an SMTP relay offers, and whether it lets mailqd in, found without sending mail.

`probe(settings)` opens one session exactly as `SmtpTransport` does before
a message (`SmtpTransport.set_up`: connect, EHLO, STARTTLS per the URL's
policy and EHLO again, AUTH when the URL names a user), reads what the
server offered in its last EHLO, and says QUIT. No MAIL command is sent.
A failure is classified as it would be for a delivery, so the operator
reads the same reason (`RELAY_REASONS`) the circuit breaker would count.
It backs `mailqd --check-config --probe`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import aiosmtplib

from mailqd.errors import DeliveryError, RelayUnavailableError
from mailqd.transport.settings import SmtpSettings
from mailqd.transport.smtp import SmtpTransport

__all__ = ["ProbeReport", "probe"]


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """One relay's answer to the probe. Text fields never hold the password."""

    url: str
    """The relay's URL with its password as `***`."""
    greeted: bool = False
    """An EHLO was answered, so the fields below say what the server offered."""
    encryption: str | None = None
    """`STARTTLS` or `implicit TLS` once the session is encrypted; None in the clear."""
    starttls: bool = False
    """The server offered STARTTLS (in its EHLO before TLS)."""
    auth_mechanisms: tuple[str, ...] = ()
    pipelining: bool = False
    size: int | None = None
    """SIZE's limit in bytes; 0 when offered without one; None when not offered."""
    smtputf8: bool = False
    eightbitmime: bool = False
    logged_in: bool | None = None
    """Whether AUTH succeeded; None when not tried (no user, or the session failed before)."""
    reason: str | None = None
    """Why the relay failed (one of `RELAY_REASONS`); None when it did not."""
    error: str | None = None
    """What failed, in words (the server's reply cleaned of secrets)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def offers(self) -> str:
        """What the server offered, e.g. `STARTTLS, AUTH PLAIN LOGIN, SIZE 10240000`."""
        parts = ["STARTTLS"] if self.starttls else []
        if self.auth_mechanisms:
            parts.append("AUTH " + " ".join(self.auth_mechanisms))
        if self.pipelining:
            parts.append("PIPELINING")
        if self.size is not None:
            parts.append(f"SIZE {self.size}" if self.size else "SIZE (no limit)")
        if self.eightbitmime:
            parts.append("8BITMIME")
        if self.smtputf8:
            parts.append("SMTPUTF8")
        return ", ".join(parts) if parts else "nothing beyond plain SMTP"


async def probe(settings: SmtpSettings) -> ProbeReport:
    """Set one session up as a delivery would, report what the relay offers, and QUIT."""
    transport = SmtpTransport(settings)
    failure: DeliveryError | None = None
    try:
        await transport.set_up()
    except DeliveryError as exc:
        failure = exc
    client = transport.client
    try:
        return _report(settings, client, failure)
    finally:
        await _quit(client, settings)


def _report(
    settings: SmtpSettings, client: aiosmtplib.SMTP, failure: DeliveryError | None
) -> ProbeReport:
    offered = client.esmtp_extensions
    encrypted = client.is_connected and client.get_transport_info("sslcontext") is not None
    encryption = None
    if encrypted:
        encryption = "implicit TLS" if settings.implicit_tls else "STARTTLS"
    size = offered.get("size")
    reason = failure.reason if isinstance(failure, RelayUnavailableError) else None
    if failure is not None and reason is None:
        reason = "unavailable"
    logged_in = None  # no user, or the session failed before AUTH
    if settings.username is not None and reason in (None, "auth"):
        logged_in = failure is None
    return ProbeReport(
        url=settings.redacted_url(),
        greeted=bool(offered),
        encryption=encryption,
        starttls=encryption == "STARTTLS" or "starttls" in offered,
        auth_mechanisms=tuple(method.upper() for method in client.server_auth_methods),
        pipelining="pipelining" in offered,
        size=None if size is None else int(size) if size.strip().isdigit() else 0,
        smtputf8="smtputf8" in offered,
        eightbitmime="8bitmime" in offered,
        logged_in=logged_in,
        reason=reason,
        error=None if failure is None else str(failure),
    )


async def _quit(client: aiosmtplib.SMTP, settings: SmtpSettings) -> None:
    """Say QUIT if still connected (best effort: the probe's verdict is made already), and close."""
    try:
        if client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
                await client.quit(timeout=settings.timeouts.command)
    finally:
        client.close()
