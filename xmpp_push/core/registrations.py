"""Direct mode's registrations: one row per device per user per push service.

DESIGN.md §3. The component owns XEP-0357 enable/disable (delegated by the server,
XEP-0355) and keeps what each enable asked for here. An operator may override the
client's priority and silence per registration; the operator's choice wins and
survives re-enables, and `None` hands the choice back to the client.

Times are wall-clock seconds (time.time()), UTC by definition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from xmpp_push.core.model import Content, Device, InvalidDevice, Mode, Priority, Push, Service
from xmpp_push.core.publish_options import build_push

__all__ = [
    "EnableOutcome",
    "Registration",
    "RegistrationRequest",
    "RegistrationStore",
    "Target",
    "push_for",
]


class Target(StrEnum):
    """Where a registration's notifications go."""

    APNS = "apns"
    FCM = "fcm"
    FORWARD = "forward"
    """Another XEP-0357 app server (the enable named its JID): we publish to it."""

    @property
    def service(self) -> Service | None:
        return None if self is Target.FORWARD else Service(self.value)


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    """What one `<enable/>` asks to store (already validated by the adapter)."""

    owner: str
    """Bare JID of the user."""
    push_jid: str
    """The component's JID (or alias) for APNs/FCM; the remote app server for FORWARD."""
    node: str
    target: Target
    token: str | None = None
    """Device token; None for FORWARD."""
    topic: str | None = None
    mode: Mode | None = None
    priority: Priority | None = None
    silent: bool | None = None
    voip_token: str | None = None
    resource: str | None = None
    """Resource of the session that enabled push (SM-based pushes are per session)."""
    secret: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    """The publish-options form exactly as the client sent it (FORM_TYPE left out);
    forwarded verbatim to a FORWARD target."""


@dataclass(frozen=True, slots=True)
class Registration:
    id: int
    owner: str
    push_jid: str
    node: str
    target: Target
    token: str | None
    topic: str | None
    mode: Mode | None
    client_priority: Priority | None
    operator_priority: Priority | None
    client_silent: bool | None
    operator_silent: bool | None
    voip_token: str | None
    resource: str | None
    secret: str | None
    options: Mapping[str, str]
    created_at: float
    updated_at: float
    last_success_at: float | None = None
    last_error_at: float | None = None
    last_error: str | None = None
    failure_count: int = 0
    quarantined_until: float | None = None

    def priority(self, default: Priority) -> Priority:
        """Operator's choice, else the client's, else the policy default."""
        return self.operator_priority or self.client_priority or default

    def silent(self, default: bool) -> bool:
        if self.operator_silent is not None:
            return self.operator_silent
        if self.client_silent is not None:
            return self.client_silent
        return default

    def device(self) -> Device | None:
        """The device to push to; None for FORWARD (or a token no longer valid)."""
        service = self.target.service
        if service is None or self.token is None:
            return None
        try:
            return Device(
                service=service,
                token=self.token,
                topic=self.topic,
                mode=self.mode,
                voip_token=self.voip_token,
            )
        except InvalidDevice:
            return None

    def quarantined(self, now: float) -> bool:
        return self.quarantined_until is not None and self.quarantined_until > now


@dataclass(frozen=True, slots=True)
class EnableOutcome:
    registration: Registration
    replaced: Sequence[Registration] = ()
    """Rows of the same user with the same token under another node: removed, so one
    phone never gets two pushes for one message."""
    evicted: Sequence[Registration] = ()
    """The user's oldest rows, removed to stay within the per-user maximum."""


class RegistrationStore(Protocol):
    """Registrations in a database. Every method is one transaction."""

    async def enable(
        self, request: RegistrationRequest, *, max_per_owner: int, now: float
    ) -> EnableOutcome:
        """Insert or update the row for (owner, push_jid, node); keep id, created_at
        and operator overrides on update; drop same-token rows of the owner under other
        nodes; evict the owner's least recently updated rows beyond `max_per_owner`."""
        ...

    async def disable(self, owner: str, push_jid: str, node: str | None) -> Sequence[Registration]:
        """Remove one node, or all of the owner's rows for push_jid when node is None.
        Returns what was removed."""
        ...

    async def for_owner(self, owner: str) -> Sequence[Registration]: ...

    async def get(self, registration_id: int) -> Registration | None: ...

    async def list(self, owner: str | None = None) -> Sequence[Registration]:
        """All registrations (of one owner), ordered by id."""
        ...

    async def delete(self, registration_id: int) -> Registration | None: ...

    async def delete_token(self, target: Target, token: str) -> int:
        """The push network declared the token dead: remove every row holding it."""
        ...

    async def set_operator_priority(
        self, registration_id: int, priority: Priority | None
    ) -> Registration | None: ...

    async def set_operator_silent(
        self, registration_id: int, silent: bool | None
    ) -> Registration | None: ...

    async def record_success(self, registration_id: int, now: float) -> None:
        """Set last_success_at, reset failure_count and any quarantine."""
        ...

    async def record_successes(self, successes: Mapping[int, float]) -> None:
        """`record_success` for many registrations (id → time) in one transaction; ids
        that no longer exist are skipped."""
        ...

    async def record_failure(
        self,
        registration_id: int,
        now: float,
        reason: str,
        *,
        quarantine_until: float | None = None,
    ) -> None:
        """Set last_error(_at), count the failure, and optionally quarantine."""
        ...

    async def release_quarantine(self, registration_id: int) -> Registration | None: ...

    async def count(self) -> int: ...

    async def close(self) -> None: ...


def push_for(
    registration: Registration,
    content: Content,
    *,
    default_priority: Priority,
    default_silent: bool,
    ttl: int,
    now: float,
) -> Push | None:
    """The push for one registration, with the precedence operators rely on:
    operator setting > client's enable > policy default. None for a FORWARD target."""
    device = registration.device()
    if device is None:
        return None
    return build_push(
        device,
        content,
        registration.options,
        priority=registration.priority(default_priority),
        silent=registration.silent(default_silent),
        default_ttl=ttl,
        now=now,
    )
