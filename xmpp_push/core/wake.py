"""Direct mode: wake a user's devices when the server plugin says a message waits.

The server plugin (plugins/, docs/plugin-protocol.md) reports a push-worthy stanza for
a user who has no session (`offline`), whose armed session is waiting for resumption
(`hibernated`), or whose armed session has not acknowledged it in time (`undecided`).
This module decides the rest, with no XML:

* which registrations: every one of the user when offline; only those enabled from the
  reported session otherwise (a device whose session is live and acknowledging is never
  reported, so never woken);
* how: priority and silence from the registration (operator, then client), then
  `[policy]`; groupchat per `policy.groupchat`; a call invitation as a VoIP push when
  the registration has a PushKit token;
* how often: the first notification for a device goes out at once, more within
  `coalesce_window` become one push at the end of the window, badged with the count of
  the whole burst;
* what the outcome means for the registration (DESIGN.md §4): a dead token deletes it,
  a refused one is quarantined, anything else is recorded and the registration kept.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import structlog

from xmpp_push.core.appserver import ContentPolicy
from xmpp_push.core.dispatch import Dispatcher
from xmpp_push.core.model import Content, Device, Priority, Push, Service, redact_token
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory, Outcome, Result
from xmpp_push.core.ports import Forwarder
from xmpp_push.core.registrations import Registration, RegistrationStore, Target, push_for

__all__ = [
    "VOIP_TTL",
    "Groupchat",
    "SessionState",
    "WakeEvent",
    "WakePolicy",
    "Waker",
    "wanted_registrations",
]

log = structlog.get_logger(__name__)

VOIP_TTL: Final = 60
"""Seconds a call push may wait in APNs: a call nobody answered a minute ago is over."""

SUCCESS_FLUSH_DELAY: Final = 1.0
"""Seconds successes wait to be written together: one write per push was two thirds
of a wake's CPU on SQLite; operators read `last_success_at` to the second anyway."""


class SessionState(StrEnum):
    OFFLINE = "offline"
    HIBERNATED = "hibernated"
    UNDECIDED = "undecided"


class Groupchat(StrEnum):
    """`policy.groupchat`: what a groupchat message without a mention does."""

    MENTIONS = "mentions"
    """Wake the app silently; only a mention alerts."""
    ALL = "all"
    """Alert like any message."""
    NONE = "none"
    """No push at all."""


@dataclass(frozen=True, slots=True)
class WakeEvent:
    """One `<notify/>` of the server plugin, as the adapter read it."""

    owner: str
    """Bare JID of the recipient."""
    state: SessionState
    resource: str | None = None
    """The reported session (hibernated, undecided); None when offline."""
    count: int = 1
    """Push-worthy stanzas this event stands for."""
    sender: str | None = None
    message_type: str = "normal"
    encrypted: bool = False
    call: bool = False
    mention: bool = False
    body: str | None = None

    @property
    def groupchat(self) -> bool:
        return self.message_type == "groupchat"


@dataclass(frozen=True, slots=True)
class WakePolicy:
    content: ContentPolicy = dataclasses.field(default_factory=ContentPolicy)
    default_priority: Priority = Priority.HIGH
    default_ttl: int = 86400
    coalesce_window: float = 2.0
    groupchat: Groupchat = Groupchat.MENTIONS
    quarantine: float = 86400.0
    """Seconds a registration whose token was refused is skipped (operators can
    release it: `xmpp-push registrations release`)."""


def wanted_registrations(
    registrations: Sequence[Registration], event: WakeEvent
) -> list[Registration]:
    """The registrations `event` should wake."""
    if event.state is SessionState.OFFLINE:
        return list(registrations)
    return [r for r in registrations if r.resource == event.resource]


@dataclass(slots=True)
class _Burst:
    """Notifications for one registration whose push window is still open."""

    registration: Registration
    event: WakeEvent | None
    """The latest one since the last push: its content goes in the trailing push. None
    while nothing is pending, so that the thousands of windows a busy server keeps
    open hold no message body they will never send."""
    count: int
    """Messages of the whole burst: the badge."""
    pending: int = 0
    """Messages that arrived after the last push of this burst."""
    alert: bool = False
    """Whether any pending one asks for a visible notification."""


class Waker:
    """Turns plugin events into pushes for the stored registrations."""

    def __init__(
        self,
        store: RegistrationStore,
        dispatcher: Dispatcher,
        forwarder: Forwarder,
        policy: WakePolicy,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._dispatcher = dispatcher
        self._forwarder = forwarder
        self._policy = policy
        self._clock = clock
        self._bursts: dict[int, _Burst] = {}
        self._window_ends: collections.deque[tuple[float, int]] = collections.deque()
        """(loop time, registration id) of each open window's end, in order: every window
        is `coalesce_window` long, so they end in the order they opened."""
        self._window_timer: asyncio.TimerHandle | None = None
        self._trailing: set[asyncio.Task[None]] = set()
        self._successes: dict[int, float] = {}
        self._flush: asyncio.Task[None] | None = None

    @property
    def open_windows(self) -> int:
        return len(self._bursts)

    async def wake(self, event: WakeEvent) -> int:
        """Push to the registrations `event` concerns; returns how many pushes went out
        now (coalesced ones go out when their window ends)."""
        alert = self._alert(event)
        if alert is None:
            log.info("wake_skipped", owner=event.owner, reason="groupchat without mention")
            return 0
        registrations = wanted_registrations(await self._store.for_owner(event.owner), event)
        if not registrations:
            log.info(
                "wake_no_registration",
                owner=event.owner,
                state=event.state.value,
                resource=event.resource,
            )
            return 0
        now_pushes: list[Coroutine[Any, Any, None]] = []
        for registration in registrations:
            if event.call or self._policy.coalesce_window <= 0:
                now_pushes.append(self._push(registration, event, event.count, alert))
            else:
                push = self._offer(registration, event, alert)
                if push is not None:
                    now_pushes.append(push)
        log.info(
            "wake",
            owner=event.owner,
            state=event.state.value,
            resource=event.resource,
            count=event.count,
            registrations=len(registrations),
            now=len(now_pushes),
        )
        if len(now_pushes) == 1:
            await now_pushes[0]  # the usual case: no task and gathering future for one push
        else:
            await asyncio.gather(*now_pushes)
        return len(now_pushes)

    def _alert(self, event: WakeEvent) -> bool | None:
        """True: a visible notification; False: wake the app silently; None: no push."""
        if event.call or event.mention or not event.groupchat:
            return True
        match self._policy.groupchat:
            case Groupchat.ALL:
                return True
            case Groupchat.MENTIONS:
                return False
            case Groupchat.NONE:
                return None

    # -- coalescing -------------------------------------------------------------------

    def _offer(
        self, registration: Registration, event: WakeEvent, alert: bool
    ) -> Coroutine[Any, Any, None] | None:
        """The push to send now, or None when `event` joins an open window."""
        burst = self._bursts.get(registration.id)
        if burst is None:
            burst = _Burst(registration=registration, event=None, count=event.count)
            self._bursts[registration.id] = burst
            self._schedule_window_end(registration.id)
            return self._push(registration, event, event.count, alert)
        burst.registration = registration
        burst.event = event
        burst.count += event.count
        burst.pending += event.count
        burst.alert = burst.alert or alert
        return None

    def _schedule_window_end(self, registration_id: int) -> None:
        # One timer for all windows, not one each: thousands of open windows made every
        # timer operation of the process (each a heap push with Python comparisons)
        # dearer, and each window paid for a TimerHandle of its own.
        loop = asyncio.get_running_loop()
        due = loop.time() + self._policy.coalesce_window
        self._window_ends.append((due, registration_id))
        if self._window_timer is None:
            self._window_timer = loop.call_at(due, self._windows_due)

    def _windows_due(self) -> None:
        # The timer that runs this stays set while windows end, so that a window opened
        # by `_window_ended` schedules no second timer; whatever happens, exactly one is
        # left for the next end.
        loop = asyncio.get_running_loop()
        ends = self._window_ends
        # asyncio may run a timer up to its clock's resolution early: a millisecond of
        # slack keeps this from rescheduling itself for the same instant.
        horizon = loop.time() + 0.001
        try:
            while ends and ends[0][0] <= horizon:
                _, registration_id = ends.popleft()
                self._window_ended(registration_id)  # may open a new window: a later end
        finally:
            self._window_timer = loop.call_at(ends[0][0], self._windows_due) if ends else None

    def _window_ended(self, registration_id: int) -> None:
        burst = self._bursts.get(registration_id)
        if burst is None:
            return
        event = burst.event
        if burst.pending == 0 or event is None:
            del self._bursts[registration_id]
            return
        # One push for what arrived during the window, then a new window: a burst that
        # goes on makes one push per window, never one per message.
        burst.pending = 0
        burst.event = None
        alert, burst.alert = burst.alert, False
        self._schedule_window_end(registration_id)
        self._spawn(self._push(burst.registration, event, burst.count, alert))

    def _spawn(self, push: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(push)
        self._trailing.add(task)
        task.add_done_callback(self._trailing.discard)

    async def close(self) -> None:
        """Send what the open windows hold now instead of at their end, and wait for
        those pushes (called at shutdown, before the dispatcher drains)."""
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None
        self._window_ends.clear()
        for registration_id, burst in list(self._bursts.items()):
            if burst.pending and burst.event is not None:
                self._spawn(self._push(burst.registration, burst.event, burst.count, burst.alert))
            del self._bursts[registration_id]
        if self._trailing:
            await asyncio.gather(*self._trailing, return_exceptions=True)
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        await self._write_successes()

    # -- successes, written in batches --------------------------------------------------

    def _succeeded(self, registration_id: int, now: float) -> None:
        self._successes[registration_id] = now
        if self._flush is None:
            self._flush = asyncio.create_task(self._write_successes_soon())

    async def _write_successes_soon(self) -> None:
        await asyncio.sleep(SUCCESS_FLUSH_DELAY)
        self._flush = None
        await self._write_successes()

    async def _write_successes(self) -> None:
        batch, self._successes = self._successes, {}
        if not batch:
            return
        try:
            await self._store.record_successes(batch)
        except Exception:
            log.exception("record_successes_failed", registrations=len(batch))

    def _failed(self, registration_id: int) -> None:
        # A failure recorded now comes after any success still waiting to be written.
        self._successes.pop(registration_id, None)

    # -- one push ---------------------------------------------------------------------

    def _content(self, event: WakeEvent, count: int) -> Content:
        policy = self._policy.content
        shown = policy.show_body and event.body and not event.encrypted
        return Content(
            message_count=count,
            sender=event.sender if policy.show_sender and event.sender else None,
            body=event.body if shown else policy.body_placeholder,
        )

    async def _push(
        self, registration: Registration, event: WakeEvent, count: int, alert: bool
    ) -> None:
        try:
            await self._deliver(registration, event, count, alert)
        except Exception:
            log.exception("wake_push_failed", registration_id=registration.id)

    async def _deliver(
        self, registration: Registration, event: WakeEvent, count: int, alert: bool
    ) -> None:
        now = self._clock()
        if registration.quarantined(now):
            log.info("wake_quarantined", registration_id=registration.id)
            return
        content = self._content(event, count)
        if registration.target is Target.FORWARD:
            await self._forward(registration, content, now)
            return
        push = self._build(registration, event, content, alert, now)
        if push is None:
            log.warning("wake_unusable_registration", registration_id=registration.id)
            return
        result = await self._dispatcher.deliver(push)
        await self._record(registration, push, result, now)

    def _build(
        self,
        registration: Registration,
        event: WakeEvent,
        content: Content,
        alert: bool,
        now: float,
    ) -> Push | None:
        push = push_for(
            registration,
            content,
            default_priority=self._policy.default_priority,
            default_silent=False,
            ttl=self._policy.default_ttl,
            now=now,
        )
        if push is None:
            return None
        if event.call:
            if registration.voip_token and push.device.service is Service.APNS:
                voip_device = Device(
                    service=Service.APNS,
                    token=registration.voip_token,
                    topic=registration.topic,
                    mode=registration.mode,
                )
                return dataclasses.replace(
                    push,
                    device=voip_device,
                    voip=True,
                    priority=Priority.HIGH,
                    silent=False,
                    ttl=min(push.ttl, VOIP_TTL),
                )
            return dataclasses.replace(push, priority=Priority.HIGH, silent=False)
        if not alert:
            return dataclasses.replace(push, silent=True)
        return push

    async def _record(
        self, registration: Registration, push: Push, result: Result, now: float
    ) -> None:
        store = self._store
        reason = str(result.error) if result.error else result.outcome.value
        match result.outcome:
            case Outcome.DELIVERED:
                self._succeeded(registration.id, now)
            case Outcome.QUEUED:
                pass  # retries go on; their end is logged by the dispatcher
            case Outcome.TOKEN_DEAD:
                # DESIGN.md §3: a token the push network declares dead removes its rows.
                self._failed(registration.id)
                if push.voip:
                    await store.delete(registration.id)
                else:
                    await store.delete_token(registration.target, push.device.token)
                log.info(
                    "registration_deleted",
                    registration_id=registration.id,
                    owner=registration.owner,
                    token=redact_token(push.device.token),
                    reason=reason,
                )
            case Outcome.TOKEN_REFUSED:
                self._failed(registration.id)
                await store.record_failure(
                    registration.id, now, reason, quarantine_until=now + self._policy.quarantine
                )
            case Outcome.TRY_LATER:
                self._failed(registration.id)
                await store.record_failure(registration.id, now, reason)

    async def _forward(self, registration: Registration, content: Content, now: float) -> None:
        try:
            await self._forwarder.forward(
                registration.push_jid, registration.node, content, registration.options
            )
        except DeliveryError as error:
            self._failed(registration.id)
            if error.category is ErrorCategory.TOKEN_DEAD:
                # The app server does not know the node any more: the same as a dead token.
                await self._store.delete(registration.id)
                log.info(
                    "registration_deleted",
                    registration_id=registration.id,
                    owner=registration.owner,
                    push_jid=registration.push_jid,
                    reason=str(error),
                )
            else:
                await self._store.record_failure(registration.id, now, str(error))
                log.info("forward_failed", registration_id=registration.id, error=str(error))
            return
        self._succeeded(registration.id, now)
