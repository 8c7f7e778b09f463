"""Secrets kept in the database, encrypted at rest with Fernet (`secrets_key_file`).

The key file holds one or more Fernet keys (`mailqctl secrets generate-key
PATH` writes one), one per line; blank lines and `#` comments are ignored.
The first key encrypts, every key decrypts: to rotate, put a new key first
and keep the old one below it until no queued job still needs it.

An encrypted value is stored as the JSON object `{"$fernet": "<token>"}`, so
a JSON column keeps holding JSON, and a plain value (a row written with
plain SQL) is told apart and used as it is. A token is authenticated: the
wrong key or a damaged token is an error, never garbage.

Used for template variables: the client seals a job's `variables` before
writing them, the worker opens them when it renders the template.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from mailqd.errors import ConfigError, SecretsError, ValidationError
from mailqd.models import NewJob

__all__ = [
    "SEALED_KEY",
    "SecretBox",
    "generate_key_file",
    "is_sealed",
    "load_secret_box",
    "seal_variables",
    "unseal_variables",
]

SEALED_KEY = "$fernet"
"""The one key of the JSON object that holds an encrypted value."""


class SecretBox:
    """Encrypts and decrypts JSON values with the keys of one key file."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("a SecretBox needs at least one key")
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    def __repr__(self) -> str:
        return "SecretBox(<keys hidden>)"

    def seal(self, value: Any) -> dict[str, str]:
        """`value` (JSON-serialisable) as `{"$fernet": token}`."""
        plain = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return {SEALED_KEY: self._fernet.encrypt(plain).decode("ascii")}

    def open(self, sealed: Mapping[str, Any]) -> Any:
        """The value inside `{"$fernet": token}`; `SecretsError` for a wrong key or bad token."""
        token = sealed.get(SEALED_KEY)
        if not isinstance(token, str):
            raise SecretsError(f"the {SEALED_KEY} value must be a Fernet token string")
        try:
            plain = self._fernet.decrypt(token.encode("ascii", "replace"))
        except InvalidToken:
            raise SecretsError(
                "cannot decrypt: the token was made with another key (check "
                "secrets_key_file) or is damaged"
            ) from None
        return json.loads(plain)


def is_sealed(value: Any) -> bool:
    """Whether a stored value is an encrypted one (`{"$fernet": ...}` and nothing else)."""
    return isinstance(value, dict) and len(value) == 1 and SEALED_KEY in value


def load_secret_box(path: str | Path | None) -> SecretBox | None:
    """The box for a key file, None when no file is configured; `ConfigError` for a bad file.

    Read once at start-up (daemon, worker, client), so a missing or
    malformed key fails there, naming the key, not on the first message.
    """
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise ConfigError("secrets_key_file", f"cannot read {path}: {reason}") from None
    keys = [
        line.strip().encode("ascii")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not keys:
        raise ConfigError("secrets_key_file", f"{path} holds no key")
    try:
        return SecretBox(keys)
    except ValueError:
        raise ConfigError(
            "secrets_key_file",
            f"{path} does not hold Fernet keys (write one with `mailqctl secrets generate-key`)",
        ) from None


def generate_key_file(path: str | Path) -> None:
    """Write a new Fernet key to `path`, readable by its owner only; never overwrites."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(Fernet.generate_key() + b"\n")


def seal_variables(job: NewJob, box: SecretBox | None) -> NewJob:
    """The job with its template variables encrypted, when there are both a box and variables."""
    if box is None or not job.variables:
        return job
    try:
        sealed = box.seal(job.variables)
    except (TypeError, ValueError) as exc:
        raise ValidationError("variables", f"must be JSON-serialisable: {exc}") from None
    return dataclasses.replace(job, variables=sealed)


def unseal_variables(variables: Any, box: SecretBox | None) -> Any:
    """Stored variables as the template sees them: decrypted if sealed, else as they are."""
    if not is_sealed(variables):
        return variables
    if box is None:
        raise SecretsError("the variables are encrypted, but no secrets_key_file is configured")
    return box.open(variables)
