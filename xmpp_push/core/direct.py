"""Direct mode: a client's XEP-0357 `<enable/>` and `<disable/>`, decided and stored.

The server delegates `urn:xmpp:push:0` to the component (XEP-0355), so the component
answers the enable itself and keeps the registration (DESIGN.md §2 B, §3). The XMPP
adapter (xmpp_push.xmpp.delegation) parses the stanza into the commands below; this
module decides what to store, with no XML and no slixmpp.

Rules:

* `node` is required (as MongooseIM has it): a registration is addressed by it.
* An enable naming one of our own JIDs (the component's JID or an alias) must carry
  the MongooseIM publish-options form: `service` (apns | fcm) and `device_id`, with
  optional `mode`, `priority`, `topic`, `silent`, `mutable_content`, `time_to_live`,
  `sound`, `click_action`, `voip_device_id`, `secret`. The same rules as app-server
  mode (`publish_options`), so anything stored here can be delivered.
* An enable naming any other JID is a FORWARD registration: notifications for it go
  to that app server as a standard publish, with the client's form verbatim.
* Calls for one owner take effect in the order they were made, so an enable and a
  disable that arrive together cannot swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from xmpp_push.core.model import Device, InvalidDevice, Service, redact_token
from xmpp_push.core.publish_options import (
    RequestError,
    RequestProblem,
    read_device,
    read_flag,
    read_priority,
    read_ttl,
)
from xmpp_push.core.registrations import (
    EnableOutcome,
    Registration,
    RegistrationRequest,
    RegistrationStore,
    Target,
)

__all__ = ["DirectMode", "DisableCommand", "EnableCommand", "registration_request"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class EnableCommand:
    """One `<enable/>`, as the adapter read it (JIDs already normalized)."""

    owner: str
    """Bare JID of the user who sent it."""
    resource: str | None
    """Resource of the session that sent it."""
    jid: str
    """The enable's `jid`: this component (or an alias), or another app server."""
    node: str | None
    options: Mapping[str, str] = field(default_factory=dict)
    """The publish-options form's fields, FORM_TYPE left out."""


@dataclass(frozen=True, slots=True)
class DisableCommand:
    """One `<disable/>`; no node means every node of the owner for that push JID."""

    owner: str
    jid: str
    node: str | None = None


def _bad(text: str) -> RequestError:
    return RequestError(RequestProblem.BAD_REQUEST, text)


def registration_request(command: EnableCommand, own_jids: frozenset[str]) -> RegistrationRequest:
    """What an enable asks to store, or `RequestError` BAD_REQUEST naming the field.
    `own_jids` and the command's JIDs are normalized (lower-case domains)."""
    if not command.jid:
        raise _bad("jid is missing")
    if not command.node:
        raise _bad("node is missing")
    secret = command.options.get("secret") or None
    if command.jid not in own_jids:
        return RegistrationRequest(
            owner=command.owner,
            push_jid=command.jid,
            node=command.node,
            target=Target.FORWARD,
            resource=command.resource,
            secret=secret,
            options=dict(command.options),
        )
    options = command.options
    device = read_device(options)
    if device.voip_token is not None:
        _check_voip_token(device)
    # Read now what every push will read later: a bad value is the client's to fix
    # at enable time, not a delivery failure on the first message.
    read_flag(options, "mutable_content")
    read_ttl(options)
    return RegistrationRequest(
        owner=command.owner,
        push_jid=command.jid,
        node=command.node,
        target=Target(device.service.value),
        token=device.token,
        topic=device.topic,
        mode=device.mode,
        priority=read_priority(options),
        silent=read_flag(options, "silent"),
        voip_token=device.voip_token,
        resource=command.resource,
        secret=secret,
        options=dict(options),
    )


def _check_voip_token(device: Device) -> None:
    assert device.voip_token is not None
    if device.service is not Service.APNS:
        raise _bad("publish-options: voip_device_id is for apns only")
    try:
        Device(service=Service.APNS, token=device.voip_token)
    except InvalidDevice:
        raise _bad(
            "publish-options: voip_device_id is not an APNs VoIP token (hex digits expected)"
        ) from None


def _token(registration: Registration) -> str | None:
    return None if registration.token is None else redact_token(registration.token)


class DirectMode:
    """Takes enables and disables and keeps the registrations in `store`."""

    def __init__(
        self,
        store: RegistrationStore,
        *,
        own_jids: frozenset[str],
        max_per_owner: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_per_owner < 1:
            raise ValueError("max_per_owner must be at least 1")
        self._store = store
        self.own_jids = frozenset(jid.lower() for jid in own_jids)
        """The component's JID and its aliases: enables naming them are ours to deliver."""
        self._max_per_owner = max_per_owner
        self._clock = clock
        self._owner_locks: dict[str, _OwnerLock] = {}

    async def enable(self, command: EnableCommand) -> EnableOutcome:
        """Store the registration, or raise `RequestError` (then nothing is stored)."""
        request = registration_request(command, self.own_jids)
        async with self._one_at_a_time(request.owner):
            outcome = await self._store.enable(
                request, max_per_owner=self._max_per_owner, now=self._clock()
            )
        registration = outcome.registration
        for old in outcome.replaced:
            log.info(
                "registration_replaced",
                owner=old.owner,
                push_jid=old.push_jid,
                node=old.node,
                target=old.target.value,
                token=_token(old),
                by_node=registration.node,
                reason="the same device token was enabled under another node",
            )
        for old in outcome.evicted:
            log.info(
                "registration_evicted",
                owner=old.owner,
                push_jid=old.push_jid,
                node=old.node,
                target=old.target.value,
                token=_token(old),
                reason=f"more than {self._max_per_owner} registrations for this user",
            )
        log.info(
            "push_enabled",
            owner=registration.owner,
            resource=registration.resource,
            push_jid=registration.push_jid,
            node=registration.node,
            target=registration.target.value,
            token=_token(registration),
            registration_id=registration.id,
        )
        return outcome

    async def disable(self, command: DisableCommand) -> Sequence[Registration]:
        """Remove one node, or every node of the owner for `command.jid`; returns what
        went (nothing is not an error: disabling is idempotent)."""
        if not command.jid:
            raise _bad("jid is missing")
        if command.node == "":
            raise _bad("node is empty (leave it out to disable every node)")
        async with self._one_at_a_time(command.owner):
            removed = await self._store.disable(command.owner, command.jid, command.node)
        log.info(
            "push_disabled",
            owner=command.owner,
            push_jid=command.jid,
            node=command.node,
            removed=[row.node for row in removed],
        )
        return removed

    async def registrations(self, owner: str) -> Sequence[Registration]:
        """The owner's registrations as stored now."""
        return await self._store.for_owner(owner)

    @contextlib.asynccontextmanager
    async def _one_at_a_time(self, owner: str) -> AsyncIterator[None]:
        # asyncio.Lock wakes its waiters first come, first served: calls for one owner
        # run in the order they reached it.
        entry = self._owner_locks.get(owner)
        if entry is None:
            entry = self._owner_locks[owner] = _OwnerLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._owner_locks[owner]


class _OwnerLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
