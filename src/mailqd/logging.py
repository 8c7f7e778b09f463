"""Structured logs for every mailqd process, and the masking that keeps them safe to ship.

Logs go to stderr: JSON lines when stderr is not a terminal (systemd, a log
shipper) or when `log_format = "json"`, readable console lines otherwise.
They never hold message bodies or passwords, and e-mail addresses are
masked (`a***@example.com`) so that a log archive is not a mailing list.
As a last line of defence, every secret the settings hold or point to (URL
passwords, the SMTP password) is replaced by `***` in every line, library
lines and tracebacks included, whatever put it there.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import structlog

from mailqd.config import Settings
from mailqd.credentials import scrub, secrets_of
from mailqd.errors import ValidationError
from mailqd.printable import printable
from mailqd.rules import parse_address_list

__all__ = ["configure_logging", "mask_address", "mask_address_list", "mask_addresses_in"]

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

    A display name is dropped, since it is as personal as the address. Text
    that is not one address (by `mailqd.rules`) has each address-like token
    in it masked instead, or is `***`: nothing is shown unmasked.
    """
    found = _addr_specs(address)
    if found is None or len(found) != 1:
        return mask_addresses_in(address.strip()) if "@" in address else "***"
    return _mask_token(found[0])


def mask_address_list(addresses: str | None) -> list[str]:
    """Each address of an address list, masked, found as the composer finds them.

    A list the composer would refuse is shown as one masked text, not guessed at
    (a comma inside a quoted name does not split it; a smuggled address is masked).
    """
    if not addresses:
        return []
    found = _addr_specs(addresses)
    if found is None:
        return [mask_addresses_in(addresses.strip())]
    return [_mask_token(addr) for addr in found]


def mask_addresses_in(text: str) -> str:
    """Mask every address-like token in free text (an SMTP reply, an error message)."""
    return _ADDRESS_IN_TEXT.sub(lambda match: _mask_token(match.group(0)), text)


def _addr_specs(text: str) -> list[str] | None:
    try:
        return [address.addr_spec for address in parse_address_list("address", text)]
    except ValidationError:
        return None


def _mask_token(addr: str) -> str:
    local, at, domain = addr.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}" if local else f"***@{domain}"


def configure_logging(
    settings: Settings, stream: TextIO | None = None, *, secrets: Iterable[str] | None = None
) -> None:
    """Set up structlog (and stdlib logging, for libraries) once per process.

    `secrets` are the values to mask, when the caller has them already (a
    worker, from the runtime): otherwise they are read from the settings.
    """
    stream = sys.stderr if stream is None else stream
    level = _LEVELS[settings.log_level]
    use_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not stream.isatty()
    )
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else _shown_not_obeyed(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    )
    secrets = tuple(secrets_of(settings) if secrets is None else secrets)
    if secrets:
        renderer = _scrubbing(renderer, secrets)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else _keep_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line (PrintLogger writes the newline separately), so the
        # lines of the supervisor and its workers never interleave in a shared log.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(stream, max(level, logging.WARNING), renderer, use_json)


def _route_stdlib_logging(
    stream: TextIO, level: int, renderer: structlog.typing.Processor, use_json: bool
) -> None:
    """Libraries' warnings (SQLAlchemy, asyncio, aiosmtplib) in the same format, masked too.

    Without this they would be plain text lines among the JSON ones, which a
    log shipper parsing JSON would choke on.
    """
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.processors.add_log_level,
            _add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _mask_foreign_event,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else _keep_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)


def _scrubbing(
    renderer: structlog.typing.Processor, secrets: Sequence[str]
) -> structlog.typing.Processor:
    """The renderer, with every secret replaced by `***` in the line it renders."""

    def render(logger: Any, name: str, event: structlog.typing.EventDict) -> Any:
        line = renderer(logger, name, event)
        return scrub(line, secrets) if isinstance(line, str) else line

    return render


def _shown_not_obeyed(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    """The console renderer, with control characters in the message shown as visible escapes.

    The renderer quotes the other values with `repr`, which escapes them
    already; the message it prints as it is, and a library's message (a
    warning routed from stdlib logging) may quote a server reply or a job.
    """

    def render(logger: Any, name: str, event: structlog.typing.EventDict) -> Any:
        message = event.get("event")
        if isinstance(message, str):
            event = {**event, "event": printable(message)}
        return renderer(logger, name, event)

    return render


def _add_logger_name(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    record = event.get("_record")
    if record is not None:
        event["logger"] = record.name
    return event


def _mask_foreign_event(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A library's message may quote an address (an SMTP reply); mask it like ours."""
    event["event"] = mask_addresses_in(str(event.get("event", "")))
    return event


def _keep_exc_info(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """The console renderer formats tracebacks itself."""
    return event
