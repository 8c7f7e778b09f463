"""Sending through relays: the route of each recipient, failover, and a result per recipient.

`RoutedTransport` is the transport a delivery slot holds. For each message
it groups the envelope recipients by route (`mailqd.routes.RelayPlan`;
with one route there is nothing to group), and sends each group through
the first relay of its route that `RelayGate.admit` lets it try, keeping
one connection per relay (each relay's own transport). It fails over to
the next relay on a relay failure only (`RelayUnavailableError`: the
relay could not be reached or refused the session); a reply about the
message or a recipient, temporary or permanent, is the group's result
and is never retried elsewhere. Every relay failure and the first
success after one are reported to the gate, which keeps the shared
circuit breaker (`mailqd.breaker`).

The message is the same bytes for every group: one job, one Message-ID.
With one group, its result or error is the message's. With several, the
result says what became of each recipient (`SendResult.recipients`);
when no group was accepted the error is the "least final" one: a relay
failure if any group could not reach a relay, else a temporary failure
if any, else permanent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from mailqd.errors import (
    DeliveryError,
    PermanentDeliveryError,
    RelayUnavailableError,
    TransientDeliveryError,
)
from mailqd.message import OutgoingMessage
from mailqd.models import RecipientResult, RecipientStatus
from mailqd.routes import RelayPlan, RouteSpec
from mailqd.transport.base import SendResult, Transport

__all__ = ["RelayGate", "RoutedTransport", "recipient_results"]


class RelayGate(Protocol):
    """The relays' health as the routed transport needs it (the daemon's `RelayBoard`)."""

    async def admit(self, relay: str) -> bool:
        """Whether to try `relay` now: it is up, or this send may probe it."""
        ...

    async def failed(self, relay: str, error: RelayUnavailableError) -> None: ...

    async def succeeded(self, relay: str) -> None: ...

    def retry_after(self, relays: Sequence[str]) -> float:
        """Seconds until one of `relays` may be tried again (its next probe)."""
        ...

    def is_clean(self, relay: str) -> bool:
        """Up with no failure counted and no rate limit: nothing to ask or report."""
        ...


class RoutedTransport:
    """One delivery slot's sends, by route and failover; one transport (connection) per relay."""

    def __init__(
        self,
        plan: RelayPlan,
        factories: Mapping[str, Callable[[], Transport]],
        gate: RelayGate,
        *,
        connection_caps: Mapping[str, asyncio.Semaphore] | None = None,
    ) -> None:
        self._plan = plan
        self._factories = factories
        self._gate = gate
        self._caps = connection_caps or {}
        self._transports: dict[str, Transport] = {}
        self._current: Transport | None = None
        self._part_accepted = False
        only = plan.default_route.relays
        self._only = only[0] if plan.single and len(only) == 1 and not self._caps else None
        """The one relay of a one-relay plan: sends go straight to it while it is clean."""

    @property
    def content_sent(self) -> bool | None:
        """Whether this send handed its content to a relay: a part was accepted, or the
        relay transport in use says so; None when that transport cannot say."""
        if self._part_accepted:
            return True
        if self._current is None:
            return False
        said = getattr(self._current, "content_sent", None)
        return said if isinstance(said, bool) else None

    def __repr__(self) -> str:
        return f"RoutedTransport({', '.join(self._plan.relays)})"

    async def send(self, message: OutgoingMessage) -> SendResult:
        if not message.recipients:
            raise PermanentDeliveryError("the message has no envelope recipients")
        self._current, self._part_accepted = None, False
        if self._only is not None and self._gate.is_clean(self._only):
            return await self._send_only(self._only, message)
        if self._plan.single:
            return await self._send_route(self._plan.default_route, message)
        groups = self._plan.split(message.recipients, message.sender)
        if len(groups) == 1:
            return await self._send_route(groups[0][0], message)
        return await self._send_split(groups, message)

    async def close(self) -> None:
        transports, self._transports = list(self._transports.values()), {}
        for transport in transports:
            with contextlib.suppress(Exception):
                await transport.close()

    # -- one route ------------------------------------------------------------------

    async def _send_route(self, route: RouteSpec, message: OutgoingMessage) -> SendResult:
        """Through the first relay of `route` that is admitted and reachable."""
        last: RelayUnavailableError | None = None
        tried = False
        for relay in route.relays:
            if not await self._gate.admit(relay):
                continue
            tried = True
            try:
                result = await self._send_via(relay, message)
            except RelayUnavailableError as exc:
                exc.relay = relay
                await self._gate.failed(relay, exc)
                last = exc
                continue
            await self._gate.succeeded(relay)
            return dataclasses.replace(result, relay=relay)
        raise self._route_down(route, last if tried else None)

    async def _send_only(self, relay: str, message: OutgoingMessage) -> SendResult:
        """The common case, at the cost of a plain send: one relay, up, nothing to count."""
        try:
            result = await self._send_via(relay, message)
        except RelayUnavailableError as exc:
            exc.relay = relay
            await self._gate.failed(relay, exc)
            exc.retry_after = self._gate.retry_after((relay,))
            raise
        return dataclasses.replace(result, relay=relay) if result.refused else result

    async def _send_via(self, relay: str, message: OutgoingMessage) -> SendResult:
        cap = self._caps.get(relay)
        transport = self._transports.get(relay)
        if transport is None:
            transport = self._transports[relay] = self._factories[relay]()
        self._current = transport
        if cap is None:
            result = await transport.send(message)
        else:
            async with cap:
                result = await transport.send(message)
        self._part_accepted = True
        return result

    def _route_down(
        self, route: RouteSpec, last: RelayUnavailableError | None
    ) -> RelayUnavailableError:
        names = ", ".join(route.relays)
        if last is None:
            text = f"every relay of the route is down ({names}); waiting for its next probe"
            error = RelayUnavailableError(text, "down", relay=route.relays[0])
        elif len(route.relays) == 1:
            error = last
        else:
            error = RelayUnavailableError(
                f"every relay of the route failed ({names}); last: {last}",
                last.reason,
                last.smtp_code,
                last.smtp_text,
                relay=last.relay,
            )
        error.retry_after = self._gate.retry_after(route.relays)
        return error

    # -- several routes ---------------------------------------------------------------

    async def _send_split(
        self, groups: list[tuple[RouteSpec, list[str]]], message: OutgoingMessage
    ) -> SendResult:
        """Each route's recipients through that route, one after the other; merged results."""
        recipients: list[RecipientResult] = []
        accepted: SendResult | None = None
        errors: list[DeliveryError] = []
        for route, addresses in groups:
            part = dataclasses.replace(message, recipients=tuple(addresses))
            try:
                result = await self._send_route(route, part)
            except DeliveryError as exc:
                errors.append(exc)
                status = (
                    RecipientStatus.REFUSED
                    if isinstance(exc, PermanentDeliveryError)
                    else RecipientStatus.PENDING
                )
                relay = exc.relay if isinstance(exc, RelayUnavailableError) else None
                recipients += [
                    RecipientResult(a, status, exc.smtp_code, exc.smtp_text or str(exc), relay)
                    for a in addresses
                ]
                continue
            accepted = accepted or result
            recipients += recipient_results(result, addresses)
        if accepted is None:
            raise _least_final(errors)
        refused = {
            r.address: (r.smtp_code or 0, r.smtp_text or "")
            for r in recipients
            if r.status is not RecipientStatus.ACCEPTED
        }
        pending = [e for e in errors if not isinstance(e, PermanentDeliveryError)]
        return dataclasses.replace(
            accepted,
            refused=refused,
            recipients=tuple(recipients),
            pending_error=_least_final(pending) if pending else None,
        )


def recipient_results(result: SendResult, addresses: Sequence[str]) -> list[RecipientResult]:
    """Each address's result: refused ones as the server said, the others accepted."""
    out = []
    for address in addresses:
        refusal = result.refused.get(address)
        if refusal is None:
            out.append(
                RecipientResult(
                    address,
                    RecipientStatus.ACCEPTED,
                    result.smtp_code,
                    result.smtp_text,
                    result.relay,
                )
            )
            continue
        code, text = refusal
        status = RecipientStatus.REFUSED if 500 <= code < 600 else RecipientStatus.PENDING
        out.append(RecipientResult(address, status, code, text, result.relay))
    return out


def _least_final(errors: Sequence[DeliveryError]) -> DeliveryError:
    """Of the groups' errors, the one that leaves the most to try again."""
    for kind in (RelayUnavailableError, TransientDeliveryError):
        for error in errors:
            if isinstance(error, kind):
                return error
    return errors[0]
