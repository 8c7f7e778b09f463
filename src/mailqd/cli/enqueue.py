"""`mailqctl enqueue`: queue a message from flags, or from an RFC 5322 file or stdin.

Whatever the source, the message goes through `mailqd.validation.build_job`,
the client library's own checks, with the limits of the loaded settings
(`max_recipients`, `max_subject_length`, `max_body_bytes`): a bad address, a
CR/LF smuggled into a header or an oversized message is refused with the
same one-line error, and nothing is written.
"""

from __future__ import annotations

import email.errors
import mimetypes
import re
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import click

from mailqd.attachments import Attachment
from mailqd.cli.context import Context, json_option, reports_errors
from mailqd.cli.output import Output
from mailqd.errors import ValidationError
from mailqd.rules import MAX_ATTEMPTS_RANGE, PRIORITY_RANGE
from mailqd.secrets import load_secret_box, seal_variables
from mailqd.validation import Limits, build_job

_RELATIVE = re.compile(r"^\+?(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _when(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """A point in time: ISO 8601 (`2030-01-01T09:00:00+01:00`; no offset means UTC),
    or a delay from now (`30s`, `10m`, `2h`, `1d`)."""
    if value is None:
        return None
    text = value.strip()
    relative = _RELATIVE.match(text)
    if relative:
        amount, unit = relative.groups()
        return datetime.now(UTC) + timedelta(seconds=float(amount) * _UNITS[unit])
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither an ISO 8601 time nor a delay like 10m", ctx, param
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _key_value(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
    result: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx, param)
        result[key.strip()] = value
    return result


def _headers(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
    result: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{item!r} is not 'Name: value'", ctx, param)
        result[name.strip()] = value.strip()
    return result


def _attach(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
    """`--attach FILE`: the file as an attachment, its type guessed from the name."""
    return [_read_attachment(Path(value), "--attach") for value in values]


def _attach_inline(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> Any:
    """`--attach-inline FILE=CID`: an inline part the HTML shows as `<img src="cid:CID">`."""
    found = []
    for item in values:
        path, sep, content_id = item.rpartition("=")
        if not sep or not path or not content_id.strip():
            raise click.BadParameter(f"{item!r} is not FILE=CONTENT-ID", ctx, param)
        found.append(
            _read_attachment(Path(path), "--attach-inline", inline=True, content_id=content_id)
        )
    return found


def _read_attachment(
    path: Path, option: str, *, inline: bool = False, content_id: str | None = None
) -> Attachment:
    try:
        return Attachment.from_path(path, inline=inline, content_id=content_id)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=option) from None


def _read_text(path: Path | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint=option) from None
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint=option) from None


@click.command()
@click.argument("message_file", metavar="[FILE]", required=False, type=click.Path(dir_okay=False))
@click.option("--to", multiple=True, help="Recipient (repeat, or comma-separate).")
@click.option("--cc", multiple=True, help="Cc recipient (repeat, or comma-separate).")
@click.option("--bcc", multiple=True, help="Bcc recipient (repeat, or comma-separate).")
@click.option("--from", "from_address", help="Sender (default: the `from` setting).")
@click.option("--reply-to", help="Reply-To address.")
@click.option("--subject", help="Subject line.")
@click.option("--body", help="Plain-text body.")
@click.option(
    "--body-file", type=click.Path(dir_okay=False, path_type=Path), help="Plain-text body file."
)
@click.option(
    "--html-file", type=click.Path(dir_okay=False, path_type=Path), help="HTML body file."
)
@click.option(
    "--attach",
    "attached",
    multiple=True,
    metavar="FILE",
    callback=_attach,
    help="Attach a file (repeat for more).",
)
@click.option(
    "--attach-inline",
    "attached_inline",
    multiple=True,
    metavar="FILE=CID",
    callback=_attach_inline,
    help="Attach an inline image the HTML shows as cid:CID (repeat for more).",
)
@click.option("--template", "template_id", help="Template id, rendered when sent.")
@click.option(
    "--var", "variables", multiple=True, callback=_key_value, help="Template variable KEY=VALUE."
)
@click.option(
    "--header", "headers", multiple=True, callback=_headers, help="Extra header 'Name: value'."
)
@click.option("--priority", type=click.IntRange(*PRIORITY_RANGE), default=0, show_default=True)
@click.option(
    "--send-after",
    metavar="TIME",
    callback=_when,
    help="Not before: ISO 8601 time, or a delay (10m).",
)
@click.option(
    "--expires-at", metavar="TIME", callback=_when, help="Fail instead of sending after this time."
)
@click.option(
    "--max-attempts", type=click.IntRange(*MAX_ATTEMPTS_RANGE), help="Attempts for this job."
)
@click.option("--idempotency-key", help="Queue at most one job for this key.")
@json_option
@click.pass_obj
@reports_errors
def enqueue(
    state: Context,
    message_file: str | None,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    from_address: str | None,
    reply_to: str | None,
    subject: str | None,
    body: str | None,
    body_file: Path | None,
    html_file: Path | None,
    attached: list[Attachment],
    attached_inline: list[Attachment],
    template_id: str | None,
    variables: dict[str, str],
    headers: dict[str, str],
    priority: int,
    send_after: datetime | None,
    expires_at: datetime | None,
    max_attempts: int | None,
    idempotency_key: str | None,
    out: Output,
) -> None:
    """Queue one message and print its job id.

    Give the message with flags, or as an RFC 5322 file (`-` for stdin):
    its To, Cc, Bcc, From, Reply-To and Subject headers, its text/plain
    and text/html parts, and its attachments and inline parts (with their
    names, types and Content-IDs) are used; other headers are ignored;
    flags given as well replace those headers, and --attach adds files to
    the file's own attachments. With --template,
    the job carries the template id and the --var variables, and is
    rendered when it is sent (the variables encrypted when
    `secrets_key_file` is set).

    \b
    Examples:
      $ mailqctl enqueue --to alice@example.com --subject Hi --body 'Hello Alice'
      3f0c7a52-5f5e-4a57-9b0e-2a4c1d2e8b91
      $ mailqctl enqueue --to bob@example.com --template welcome --var name=Bob --send-after 10m
      $ mailqctl enqueue --to carol@example.com --subject Invoice --body 'Attached.' \\
          --attach invoice.pdf --attach terms.pdf
      $ mailqctl enqueue --to dan@example.com --subject News --html-file news.html \\
          --attach-inline logo.png=logo
      $ mailqctl enqueue message.eml
      $ sendmail-style-app | mailqctl enqueue -
    """
    if message_file is not None:
        if body is not None or body_file or html_file or template_id or variables:
            raise click.UsageError(
                "a message FILE brings its own content: drop --body, --body-file, "
                "--html-file, --template and --var"
            )
        content = _parse_message(_read_message(message_file))
    else:
        if body is not None and body_file is not None:
            raise click.UsageError("give --body or --body-file, not both")
        if not to:
            raise click.UsageError("give --to (with --body, --html-file or --template), or a FILE")
        content = _Content(
            body=body if body is not None else _read_text(body_file, "--body-file"),
            html=_read_text(html_file, "--html-file"),
        )
    attachments = [*content.attachments, *attached, *attached_inline]
    job = build_job(
        list(to) or content.to,
        subject if subject is not None else content.subject,
        content.body,
        content.html,
        template_id=template_id,
        variables=variables or None,
        cc=list(cc) or content.cc,
        bcc=list(bcc) or content.bcc,
        reply_to=reply_to if reply_to is not None else content.reply_to,
        from_address=from_address if from_address is not None else content.from_address,
        headers=headers or None,
        priority=priority,
        send_after=send_after,
        expires_at=expires_at,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        limits=Limits.from_settings(state.settings),
        attachments=attachments,
    )
    box = load_secret_box(state.settings.secrets_key_file)
    job_id = state.store.enqueue(seal_variables(job, box))
    out.emit({"id": job_id}, lambda: job_id)


# -- RFC 5322 input ---------------------------------------------------------------


@dataclass(slots=True)
class _Content:
    """What a message file contributes to the job."""

    to: list[str] = field(default_factory=list)
    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    from_address: str | None = None
    reply_to: str | None = None
    subject: str = ""
    body: str | None = None
    html: str | None = None
    attachments: list[Attachment] = field(default_factory=list)


def _read_message(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="FILE") from None


def _parse_message(data: bytes) -> _Content:
    """Take the headers and text parts mailqd keeps; refuse what it cannot send as it is.

    Address headers are taken as written (unfolded, UTF-8 per RFC 6532) and
    left to `build_job`'s parser, the daemon's: the stdlib's lenient one
    would turn `attacker@gmail.co m <victim@example.com>` into other
    recipients than the ones the daemon would find.
    """
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    body, html, attachments = _parts(message)
    subject = _header(message, "Subject")
    return _Content(
        to=_raw_headers(message, "To"),
        cc=_raw_headers(message, "Cc"),
        bcc=_raw_headers(message, "Bcc"),
        from_address=_one(_raw_headers(message, "From"), "From"),
        reply_to=_one(_raw_headers(message, "Reply-To"), "Reply-To"),
        subject=subject or "",
        body=body,
        html=html,
        attachments=attachments,
    )


def _all_headers(message: EmailMessage, name: str) -> list[str]:
    try:
        return [str(value) for value in message.get_all(name, [])]
    except (email.errors.MessageError, ValueError, IndexError, TypeError) as exc:
        raise ValidationError(name.lower(), f"cannot parse the {name} header: {exc}") from None


def _raw_headers(message: EmailMessage, name: str) -> list[str]:
    """Every `name` header's value as the file holds it, unfolded."""
    values = []
    for key, value in message.raw_items():
        if key.lower() != name.lower():
            continue
        raw = _UNFOLD.sub("", str(value)).strip(" \t")
        try:  # the parser keeps 8-bit bytes as surrogate escapes
            values.append(raw.encode("ascii", "surrogateescape").decode("utf-8"))
        except UnicodeError:
            raise ValidationError(name.lower(), f"the {name} header is not UTF-8") from None
    return values


def _header(message: EmailMessage, name: str) -> str | None:
    return _one(_all_headers(message, name), name)


def _one(values: list[str], name: str) -> str | None:
    if len(values) > 1:
        raise ValidationError(name.lower(), f"the message has {len(values)} {name} headers")
    return values[0] if values else None


def _parts(message: EmailMessage) -> tuple[str | None, str | None, list[Attachment]]:
    """The text and html bodies, and every other leaf part as an `Attachment`.

    A text/plain or text/html part is a body unless it is marked as an
    attachment or has a file name (a second one of a kind is an attachment
    too); every other part (images, PDFs, inline parts with a Content-ID)
    keeps its bytes, name, type, disposition and Content-ID.
    """
    found: dict[str, str] = {}
    attachments: list[Attachment] = []
    for part in message.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        disposition = part.get_content_disposition()
        filename = _filename(part)
        if (
            kind in _TEXT_KINDS
            and kind not in found
            and disposition != "attachment"
            and filename is None
        ):
            found[kind] = _decoded_text(part, kind)
            continue
        attachments.append(_attachment(part, kind, disposition, filename, len(attachments)))
    return found.get("text/plain"), found.get("text/html"), attachments


def _decoded_text(part: EmailMessage, kind: str) -> str:
    try:
        content = part.get_content()
    except (LookupError, ValueError) as exc:
        raise ValidationError("message", f"cannot decode the {kind} part: {exc}") from None
    if not isinstance(content, str):
        raise ValidationError("message", f"cannot decode the {kind} part as text")
    return content


def _filename(part: EmailMessage) -> str | None:
    try:
        return part.get_filename()
    except (email.errors.MessageError, ValueError, IndexError, TypeError) as exc:
        raise ValidationError("attachments", f"cannot read a part's file name: {exc}") from None


def _attachment(
    part: EmailMessage, kind: str, disposition: str | None, filename: str | None, index: int
) -> Attachment:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        raise ValidationError("attachments", f"cannot decode the {kind} part")
    content_id = part.get("Content-ID")
    if content_id is not None:
        content_id = str(content_id).strip().removeprefix("<").removesuffix(">") or None
    if filename is None:
        extension = mimetypes.guess_extension(kind, strict=False) or ".bin"
        filename = f"part-{index + 1}{extension}"
    return Attachment(
        filename=filename,
        content=payload,
        content_type=kind,
        inline=disposition == "inline" or (disposition is None and content_id is not None),
        content_id=content_id,
    )


_TEXT_KINDS = ("text/plain", "text/html")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")
