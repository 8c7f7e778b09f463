"""Structured logs for every mailqd process, and the masking that keeps them safe to ship.

Logs go to stderr: JSON lines when stderr is not a terminal (systemd, a log
shipper) or when `log_format = "json"`, readable console lines otherwise.
They never hold message bodies or passwords, and e-mail addresses are
masked (`a***@example.com`) so that a log archive is not a mailing list.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

import structlog

from mailqd.config import Settings

__all__ = ["configure_logging", "mask_address", "mask_addresses_in"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Loose on purpose: anything that looks like local@domain inside free text
# (server replies, error messages) is masked, even if it is not a valid address.
_ADDRESS_IN_TEXT = re.compile(r"[^\s<>\"'(),;:@]+@[A-Za-z0-9.\-\[\]]+")


def mask_address(address: str) -> str:
    """`alice@example.com` → `a***@example.com`: enough to tell domains apart, no more.

    A display name is dropped, since it is as personal as the address.
    """
    addr = address.strip()
    if "<" in addr and addr.endswith(">"):
        addr = addr[addr.rindex("<") + 1 : -1]
    local, at, domain = addr.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}" if local else f"***@{domain}"


def mask_addresses_in(text: str) -> str:
    """Mask every address-like token in free text (an SMTP reply, an error message)."""
    return _ADDRESS_IN_TEXT.sub(lambda match: mask_address(match.group(0)), text)


def configure_logging(settings: Settings, stream: TextIO | None = None) -> None:
    """Set up structlog (and stdlib logging, for libraries) once per process."""
    stream = sys.stderr if stream is None else stream
    level = _LEVELS[settings.log_level]
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not stream.isatty()
    )
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else _keep_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(stream=stream, level=max(level, logging.WARNING), force=True)


def _keep_exc_info(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """The console renderer formats tracebacks itself."""
    return event
