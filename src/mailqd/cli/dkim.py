"""`mailqctl dkim-record`: the DNS TXT record receivers need to verify DKIM signatures."""

from __future__ import annotations

import click

from mailqd.cli.context import Context, json_option, reports_errors
from mailqd.cli.output import Output
from mailqd.errors import ConfigError
from mailqd.signing import DkimSigner


@click.command("dkim-record")
@json_option
@click.pass_obj
@reports_errors
def dkim_record(state: Context, out: Output) -> None:
    """Print the DNS TXT record to publish for the configured DKIM key.

    Reads dkim_domain, dkim_selector and dkim_key_file from the
    configuration (never the database) and prints the record as a zone-file
    line: publish it at SELECTOR._domainkey.DOMAIN before turning signing on.
    With --json: {"name", "value"}.

    \b
    Example:
      $ MAILQD_DKIM_DOMAIN=example.com MAILQD_DKIM_SELECTOR=mail2026 \\
        MAILQD_DKIM_KEY_FILE=/etc/mailqd/dkim.pem mailqctl dkim-record
      mail2026._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=MIIBIjANBg..." )
    """
    signer = DkimSigner.from_settings(state.settings)
    if signer is None:
        raise ConfigError(
            "dkim_domain", "DKIM is not configured: set dkim_domain, dkim_selector, dkim_key_file"
        )
    document = {"name": signer.dns_record_name(), "value": signer.dns_record_value()}
    out.emit(document, lambda: click.echo(signer.zone_file_record()))
