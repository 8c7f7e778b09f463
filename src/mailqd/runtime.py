"""What the daemon builds from its `Settings` once, at start and on SIGHUP: the runtime.

Reading a key file or a password file, parsing the SMTP URL and loading the
DKIM key happen here and nowhere below. The supervisor builds the runtime
before it forks, so every worker inherits the same parts instead of reading
the files again (a key file replaced on disk changes nothing until SIGHUP);
a reload builds a new one, and a reload that fails keeps the old one.

Building fails with a `ConfigError` naming the key (a bad `smtp_url`, an
unreadable `secrets_key_file`, a partial DKIM configuration), which is how
a bad configuration is refused at start and on reload.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

from mailqd.config import Settings
from mailqd.credentials import secrets_of, smtp_password
from mailqd.daemon.retry import BackoffPolicy
from mailqd.rules import Limits
from mailqd.secrets import SecretBox, load_secret_box, unseal_variables
from mailqd.signing import DkimSigner
from mailqd.store.screening import ScreenRules
from mailqd.templating.sandbox import RenderBudget
from mailqd.transport.url import TransportFactory, transport_factory

__all__ = ["Runtime", "screen_rules"]


@dataclass(frozen=True, slots=True)
class Runtime:
    """The settings and every part resolved from them, shared by the supervisor's workers."""

    settings: Settings
    new_transport: TransportFactory | None = field(repr=False)
    """Makes one slot's transport from the parsed `smtp_url`; None when built without one."""
    secrets: SecretBox | None
    signer: DkimSigner | None
    limits: Limits
    backoff: BackoffPolicy
    screening: ScreenRules | None
    render_budget: RenderBudget
    log_secrets: tuple[str, ...] = field(repr=False)
    """Every form of every secret the logs must mask (`mailqd.credentials.secrets_of`)."""

    @classmethod
    def build(cls, settings: Settings, *, transport: bool = True) -> Runtime:
        """Read the files and parse the URL once; `ConfigError` naming the key otherwise.

        `transport=False` skips the SMTP URL and password, for an in-process
        `Worker` given its own transport factory (tests, `mailqctl drain`).
        """
        new_transport = None
        if transport:
            new_transport = transport_factory(settings, smtp_password(settings))
        secrets = load_secret_box(settings.secrets_key_file)
        return cls(
            settings=settings,
            new_transport=new_transport,
            secrets=secrets,
            signer=DkimSigner.from_settings(settings),
            limits=Limits.from_settings(settings),
            backoff=BackoffPolicy.from_settings(settings),
            screening=screen_rules(settings, secrets),
            render_budget=RenderBudget.from_settings(settings),
            log_secrets=secrets_of(settings),
        )

    def transport_factory(self) -> TransportFactory:
        """The slots' transport factory; a runtime built with `transport=False` has none."""
        if self.new_transport is None:
            raise RuntimeError("this runtime was built without a transport")
        return self.new_transport


def screen_rules(settings: Settings, secrets: SecretBox | None = None) -> ScreenRules | None:
    """The claim-time screening the settings ask for; None when every rule is off.

    `secrets` opens sealed template variables for the content hash (the
    box of `secrets_key_file`, loaded by the caller).
    """
    rules = ScreenRules(
        dedup_window=settings.dedup_window,
        recipient_hourly_cap=settings.recipient_hourly_cap,
        domain_rates=settings.domain_rates,
    )
    if not rules.active:
        return None
    if settings.dedup_window <= 0 or secrets is None:
        return rules
    # Sealed variables differ at every enqueue: the hash is over what they say.
    return dataclasses.replace(rules, open_variables=partial(unseal_variables, box=secrets))
