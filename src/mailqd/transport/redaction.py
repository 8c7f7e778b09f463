"""Server text made safe to store and show: secrets redacted, control characters escaped.

A relay's reply text ends up in `last_error`, the attempt rows, the logs and
`mailqctl show`. A relay (or a man-in-the-middle on a plaintext connection)
chooses that text: it may echo the credentials it was sent, as the password
or in the base64 forms AUTH PLAIN and AUTH LOGIN carry them, or hold escape
sequences that drive the operator's terminal. `ReplyCleaner` is applied to
every reply text and error message the SMTP transport hands out, so nothing
downstream has to know.
"""

from __future__ import annotations

import base64

from mailqd.printable import printable

__all__ = ["REDACTED", "ReplyCleaner", "escape_controls"]

REDACTED = "***"


class ReplyCleaner:
    """Redacts one set of credentials and escapes control characters, in that order."""

    __slots__ = ("_secrets",)

    def __init__(self, username: str | None, password: str | None) -> None:
        self._secrets = _secret_forms(username, password)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return escape_controls(text)


def escape_controls(text: str) -> str:
    """`text` with its control characters shown as `\\xNN`/`\\uNNNN` (`mailqd.printable`).

    Line breaks stay: they join the lines of a multi-line reply. The rule
    (which characters, which form) is the one `mailqctl` shows job data with.
    """
    return printable(text, multiline=True)


def _secret_forms(username: str | None, password: str | None) -> tuple[str, ...]:
    """The password as typed and as AUTH sends it, longest first (so no part is left over).

    AUTH PLAIN sends base64("\\0user\\0password"); AUTH LOGIN sends
    base64("user") and base64("password") one after the other. The user
    name alone is not a secret and is left as it is.
    """
    if not password:
        return ()
    user = (username or "").encode("utf-8")
    secret = password.encode("utf-8")
    forms = {
        password,
        _b64(secret),
        _b64(secret).rstrip("="),
        _b64(b"\0" + user + b"\0" + secret),
        _b64(user + b"\0" + user + b"\0" + secret),
    }
    return tuple(sorted(forms, key=len, reverse=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
