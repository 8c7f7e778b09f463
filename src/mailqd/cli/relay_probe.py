"""`mailqd --check-config --probe`: one line per relay of the plan, saying what it offers.

Each SMTP relay is probed once, all of them together (`mailqd.transport.probe`:
the set-up of a delivery, then QUIT; no mail is sent); `maildir://` and
`null://` relays have nothing to probe. The relay's URL is printed with its
password as `***`, and every line is scrubbed of the passwords besides. A
relay of the default route that fails (cannot be reached, refuses TLS or
AUTH) fails the check: exit 1, with one line on stderr naming each such
relay and why. A failing relay of another route is reported the same way
but does not fail the check: mail still has a way out.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import click

from mailqd.cli.safe import EXIT_FAILURE
from mailqd.config import Settings, relay_plan
from mailqd.credentials import redact_url, scrub, secrets_of, shared_smtp_password
from mailqd.errors import ConfigError
from mailqd.printable import printable
from mailqd.routes import RelaySpec
from mailqd.transport.probe import ProbeReport, probe
from mailqd.transport.settings import SmtpSettings
from mailqd.transport.url import relay_smtp_settings

__all__ = ["ProbeTarget", "probe_targets", "report_probes"]

MIN_SECRET_LENGTH = 4  # as `secrets_of`: a shorter one would mask ordinary words

REASON_WORDS = {
    "refused": "cannot be reached (connection refused)",
    "timeout": "cannot be reached (timed out)",
    "closed": "cannot be reached (connection failed or closed)",
    "unavailable": "refuses the session",
    "tls": "TLS failed",
    "auth": "refuses AUTH",
}


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One relay of the plan: its SMTP settings, or None for a local (maildir, null) one."""

    name: str
    url: str
    smtp: SmtpSettings | None = field(repr=False)
    default_route: bool


def probe_targets(settings: Settings) -> list[ProbeTarget]:
    """The plan's relays, their URLs parsed and passwords read; `ConfigError` naming the key."""
    plan = relay_plan(settings)
    default = set(plan.default_route.relays)
    shared = shared_smtp_password(settings)
    return [
        ProbeTarget(
            name=spec.name,
            url=redact_url(spec.url),
            smtp=_smtp_settings(spec, settings, shared),
            default_route=spec.name in default,
        )
        for spec in plan.relays.values()
    ]


def report_probes(settings: Settings, targets: list[ProbeTarget]) -> int:
    """Probe every SMTP target, print a line for each (stdout), return the exit code."""
    reports = asyncio.run(_probe_all(targets))
    secrets = _secrets(settings, targets)
    failed = []
    for target, report in zip(targets, reports, strict=True):
        click.echo(printable(scrub(_line(target, report), secrets)))
        if report is not None and not report.ok and target.default_route:
            failed.append(f"relay {target.name} {REASON_WORDS.get(report.reason or '', 'failed')}")
    if not failed:
        return 0
    click.echo(f"mailqd: probe failed, on the default route: {'; '.join(failed)}", err=True)
    return EXIT_FAILURE


def _secrets(settings: Settings, targets: list[ProbeTarget]) -> list[str]:
    """Every password in view, longest first (so that one containing another goes whole)."""
    relays = {t.smtp.password for t in targets if t.smtp is not None and t.smtp.password}
    found = set(secrets_of(settings)) | {p for p in relays if len(p) >= MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)


async def _probe_all(targets: list[ProbeTarget]) -> list[ProbeReport | None]:
    async def one(target: ProbeTarget) -> ProbeReport | None:
        return None if target.smtp is None else await probe(target.smtp)

    return list(await asyncio.gather(*(one(target) for target in targets)))


def _line(target: ProbeTarget, report: ProbeReport | None) -> str:
    """`relay NAME URL: ok|FAILED ...`, what it offers last (the part that may be long)."""
    where = f"relay {target.name} {report.url if report is not None else target.url}"
    if report is None:
        return f"{where}: local, nothing to probe"
    tls = f"TLS by {report.encryption}" if report.encryption else "no TLS"
    login = {None: "", True: ", AUTH ok", False: ", AUTH refused"}[report.logged_in]
    route = "" if target.default_route else " (not on the default route)"
    if report.ok:
        return f"{where}: ok ({tls}{login}); offers {report.offers()}"
    words = REASON_WORDS.get(report.reason or "", "failed")
    seen = f"; offers {report.offers()}" if report.greeted else ""
    return f"{where}: FAILED{route}, {words}: {report.error}{seen}"


def _smtp_settings(
    spec: RelaySpec, settings: Settings, shared_password: str | None
) -> SmtpSettings | None:
    """The relay's SMTP settings as a delivery would use them; None for maildir and null."""
    key = f"relays.{spec.name}" if settings.relays else "smtp_url"
    try:
        return relay_smtp_settings(spec, shared_password, settings.smtp_timeout)
    except ConfigError as exc:
        if key == exc.key:
            raise
        raise ConfigError(key, exc.problem) from None
