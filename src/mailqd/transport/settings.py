"""The typed settings of the SMTP transport, as read from `MAILQD_SMTP_URL`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from urllib.parse import quote

DEFAULT_IDLE_TIMEOUT = 30.0


class StartTLS(enum.StrEnum):
    """How a plain `smtp://` connection is upgraded to TLS."""

    OPPORTUNISTIC = "opportunistic"  # upgrade when the server offers STARTTLS
    REQUIRED = "required"  # refuse to send without it
    OFF = "off"  # never upgrade


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait for each kind of network step.

    `data` bounds the wait for the reply to the end of DATA, the one step
    after which a failure is ambiguous; servers may scan the message before
    answering, so it is often set longer than the others.
    """

    connect: float
    command: float
    data: float


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """Where and how to connect. The password is kept out of `repr`."""

    host: str
    port: int
    implicit_tls: bool = False
    starttls: StartTLS = StartTLS.OPPORTUNISTIC
    tls_verify: bool = True
    pipelining: bool = True  # used when the server offers it (RFC 2920)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(30.0, 30.0, 30.0))
    local_hostname: str | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # seconds a kept-open connection may sit unused

    def redacted_url(self) -> str:
        """The URL these settings came from, with the password shown as `***`."""
        scheme = "smtps" if self.implicit_tls else "smtp"
        userinfo = ""
        if self.username is not None:
            userinfo = quote(self.username, safe="")
            if self.password is not None:
                userinfo += ":***"
            userinfo += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        options = []
        if not self.implicit_tls and self.starttls is not StartTLS.OPPORTUNISTIC:
            options.append(f"starttls={self.starttls.value}")
        if not self.tls_verify:
            options.append("tls_verify=false")
        if not self.pipelining:
            options.append("pipelining=false")
        if self.idle_timeout != DEFAULT_IDLE_TIMEOUT:
            options.append(f"idle_timeout={self.idle_timeout:g}")
        query = "?" + "&".join(options) if options else ""
        return f"{scheme}://{userinfo}{host}:{self.port}{query}"
