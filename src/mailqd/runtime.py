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

from mailqd.breaker import BreakerPolicy
from mailqd.config import Settings, relay_plan
from mailqd.credentials import secrets_of, shared_smtp_password
from mailqd.daemon.retry import BackoffPolicy
from mailqd.routes import RelayPlan
from mailqd.rules import Limits
from mailqd.secrets import SecretBox, load_secret_box, unseal_variables
from mailqd.signing import DkimSigner
from mailqd.store.screening import ScreenRules
from mailqd.templating.sandbox import RenderBudget
from mailqd.transport.url import TransportFactory, relay_factories

__all__ = ["Runtime", "screen_rules"]


@dataclass(frozen=True, slots=True)
class Runtime:
    """The settings and every part resolved from them, shared by the supervisor's workers."""

    settings: Settings
    relays: RelayPlan
    relay_factories: dict[str, TransportFactory] | None = field(repr=False)
    """Each relay's transport factory (its URL parsed, its password resolved); None when
    built without a transport."""
    secrets: SecretBox | None
    signer: DkimSigner | None
    limits: Limits
    backoff: BackoffPolicy
    screening: ScreenRules | None
    render_budget: RenderBudget
    breaker: BreakerPolicy
    log_secrets: tuple[str, ...] = field(repr=False)
    """Every form of every secret the logs must mask (`mailqd.credentials.secrets_of`)."""

    @classmethod
    def build(cls, settings: Settings, *, transport: bool = True) -> Runtime:
        """Read the files and parse the URL once; `ConfigError` naming the key otherwise.

        `transport=False` skips the SMTP URL and password, for an in-process
        `Worker` given its own transport factory (tests, `mailqctl drain`).
        """
        plan = relay_plan(settings)
        factories = None
        if transport:
            password = shared_smtp_password(settings)
            factories = relay_factories(plan, password, settings.smtp_timeout)
        secrets = load_secret_box(settings.secrets_key_file)
        return cls(
            settings=settings,
            relays=plan,
            relay_factories=factories,
            secrets=secrets,
            signer=DkimSigner.from_settings(settings),
            limits=Limits.from_settings(settings),
            backoff=BackoffPolicy.from_settings(settings),
            screening=screen_rules(settings, secrets),
            render_budget=RenderBudget.from_settings(settings),
            breaker=BreakerPolicy.from_settings(settings),
            log_secrets=secrets_of(settings),
        )

    def transport_factories(self) -> dict[str, TransportFactory]:
        """Each relay's transport factory; a runtime built with `transport=False` has none."""
        if self.relay_factories is None:
            raise RuntimeError("this runtime was built without a transport")
        return self.relay_factories


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
