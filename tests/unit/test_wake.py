"""The Waker: which registrations a plugin event wakes, how, and how often."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from xmpp_push.core.appserver import ContentPolicy
from xmpp_push.core.dispatch import Dispatcher, RetryPolicy
from xmpp_push.core.model import Content, Mode, Priority, Push, Service
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory
from xmpp_push.core.registrations import Registration, RegistrationRequest, Target
from xmpp_push.core.wake import (
    SUCCESS_FLUSH_DELAY,
    VOIP_TTL,
    Groupchat,
    SessionState,
    WakeEvent,
    WakePolicy,
    Waker,
    wanted_registrations,
)
from xmpp_push.storage.memory import MemoryStore

ALICE = "alice@localhost"
PHONE = "aa" * 32
TABLET = "bb" * 32
VOIP = "cc" * 32


class RecordingProvider:
    name = "recording"

    def __init__(self) -> None:
        self.pushes: list[Push] = []
        self.fail_with: DeliveryError | None = None

    async def send(self, push: Push) -> None:
        self.pushes.append(push)
        if self.fail_with is not None:
            raise self.fail_with

    async def aclose(self) -> None:
        pass


class RecordingForwarder:
    def __init__(self) -> None:
        self.published: list[tuple[str, str, Content, Mapping[str, str]]] = []
        self.fail_with: DeliveryError | None = None

    async def forward(
        self, push_jid: str, node: str, content: Content, options: Mapping[str, str]
    ) -> None:
        self.published.append((push_jid, node, content, options))
        if self.fail_with is not None:
            raise self.fail_with


class Rig:
    def __init__(self, **policy: object) -> None:
        self.store = MemoryStore()
        self.provider = RecordingProvider()
        self.forwarder = RecordingForwarder()
        dispatcher = Dispatcher(
            {Service.APNS: self.provider, Service.FCM: self.provider},
            RetryPolicy(reply_timeout=1.0, initial_delay=0.01, max_delay=0.01),
        )
        self.waker = Waker(
            self.store,
            dispatcher,
            self.forwarder,
            WakePolicy(**policy),  # type: ignore[arg-type]
        )

    async def register(
        self,
        node: str,
        *,
        resource: str | None,
        token: str = PHONE,
        target: Target = Target.APNS,
        push_jid: str = "push.localhost",
        **more: object,
    ) -> Registration:
        request = RegistrationRequest(
            owner=ALICE,
            push_jid=push_jid,
            node=node,
            target=target,
            token=None if target is Target.FORWARD else token,
            resource=resource,
            **more,  # type: ignore[arg-type]
        )
        outcome = await self.store.enable(request, max_per_owner=10, now=1.0)
        return outcome.registration


def event(state: SessionState = SessionState.OFFLINE, **more: object) -> WakeEvent:
    return WakeEvent(owner=ALICE, state=state, **more)  # type: ignore[arg-type]


def registration(node: str, resource: str | None) -> Registration:
    return Registration(
        id=hash(node) & 0xFFFF,
        owner=ALICE,
        push_jid="push.localhost",
        node=node,
        target=Target.APNS,
        token=PHONE,
        topic=None,
        mode=None,
        client_priority=None,
        operator_priority=None,
        client_silent=None,
        operator_silent=None,
        voip_token=None,
        resource=resource,
        secret=None,
        options={},
        created_at=0.0,
        updated_at=0.0,
    )


def test_offline_wakes_every_registration_of_the_user() -> None:
    rows = [registration("n1", "phone"), registration("n2", "tablet"), registration("n3", None)]
    assert wanted_registrations(rows, event()) == rows


@pytest.mark.parametrize("state", [SessionState.HIBERNATED, SessionState.UNDECIDED])
def test_a_session_state_wakes_only_that_sessions_registrations(state: SessionState) -> None:
    rows = [registration("n1", "phone"), registration("n2", "tablet")]
    assert wanted_registrations(rows, event(state, resource="tablet")) == [rows[1]]


async def test_offline_pushes_once_to_each_device() -> None:
    rig = Rig(coalesce_window=0)
    await rig.register("n1", resource="phone", token=PHONE)
    await rig.register("n2", resource="tablet", token=TABLET)
    assert await rig.waker.wake(event(sender="bob@localhost/pc")) == 2
    assert sorted(push.device.token for push in rig.provider.pushes) == [PHONE, TABLET]
    assert all(push.content.message_count == 1 for push in rig.provider.pushes)


async def test_no_registration_means_no_push() -> None:
    rig = Rig()
    assert await rig.waker.wake(event()) == 0
    assert rig.provider.pushes == []


async def test_a_burst_makes_one_push_now_and_one_with_the_count_at_the_window_end() -> None:
    rig = Rig(coalesce_window=0.2)
    await rig.register("n1", resource="phone")
    for _ in range(20):
        await rig.waker.wake(event(SessionState.HIBERNATED, resource="phone"))
    assert [push.content.message_count for push in rig.provider.pushes] == [1]
    await asyncio.sleep(0.3)
    assert [push.content.message_count for push in rig.provider.pushes] == [1, 20]
    await asyncio.sleep(0.3)
    assert len(rig.provider.pushes) == 2, "a quiet window sends nothing more"
    assert rig.waker.open_windows == 0


async def test_windows_opened_at_different_times_each_end_on_their_own_time() -> None:
    rig = Rig(coalesce_window=0.3)
    await rig.register("n1", resource="phone", token=PHONE)
    await rig.register("n2", resource="tablet", token=TABLET)
    for _ in range(3):
        await rig.waker.wake(event(SessionState.HIBERNATED, resource="phone"))
    await asyncio.sleep(0.15)
    for _ in range(5):
        await rig.waker.wake(event(SessionState.HIBERNATED, resource="tablet"))

    def counts() -> list[tuple[str, int | None]]:
        return [(p.device.token[:2], p.content.message_count) for p in rig.provider.pushes]

    assert counts() == [(PHONE[:2], 1), (TABLET[:2], 1)]
    await asyncio.sleep(0.2)  # 0.35 s: the phone's window has ended, the tablet's not
    assert counts() == [(PHONE[:2], 1), (TABLET[:2], 1), (PHONE[:2], 3)]
    await asyncio.sleep(0.15)  # 0.5 s: the tablet's too
    assert counts() == [(PHONE[:2], 1), (TABLET[:2], 1), (PHONE[:2], 3), (TABLET[:2], 5)]
    await asyncio.sleep(0.35)  # both windows after the trailing pushes end quietly
    assert rig.waker.open_windows == 0
    assert len(rig.provider.pushes) == 4


async def test_a_burst_that_goes_on_keeps_one_window_timer() -> None:
    rig = Rig(coalesce_window=0.05)
    await rig.register("n1", resource="phone")

    def window_timers() -> int:
        scheduled = asyncio.get_running_loop()._scheduled  # type: ignore[attr-defined]
        return sum(
            1
            for handle in scheduled
            if not handle.cancelled()
            and getattr(handle._callback, "__func__", None) is Waker._windows_due
        )

    for _ in range(60):  # a message every 10 ms for 0.6 s: a dozen windows end
        await rig.waker.wake(event(SessionState.HIBERNATED, resource="phone"))
        await asyncio.sleep(0.01)
    assert len(rig.provider.pushes) >= 8
    assert window_timers() == 1
    await rig.waker.close()
    assert window_timers() == 0


async def test_a_message_after_a_quiet_window_starts_a_new_burst() -> None:
    rig = Rig(coalesce_window=0.05)
    await rig.register("n1", resource="phone")
    await rig.waker.wake(event())
    await asyncio.sleep(0.15)
    await rig.waker.wake(event())
    assert [push.content.message_count for push in rig.provider.pushes] == [1, 1]


async def test_close_sends_what_the_open_windows_hold() -> None:
    rig = Rig(coalesce_window=60)
    await rig.register("n1", resource="phone")
    for _ in range(3):
        await rig.waker.wake(event())
    await rig.waker.close()
    assert [push.content.message_count for push in rig.provider.pushes] == [1, 3]


async def test_plain_groupchat_wakes_silently_and_a_mention_alerts() -> None:
    rig = Rig(coalesce_window=0)
    await rig.register("n1", resource="phone")
    await rig.waker.wake(event(message_type="groupchat"))
    await rig.waker.wake(event(message_type="groupchat", mention=True))
    assert [push.silent for push in rig.provider.pushes] == [True, False]


@pytest.mark.parametrize(("groupchat", "pushes"), [(Groupchat.ALL, [False]), (Groupchat.NONE, [])])
async def test_groupchat_policy(groupchat: Groupchat, pushes: list[bool]) -> None:
    rig = Rig(coalesce_window=0, groupchat=groupchat)
    await rig.register("n1", resource="phone")
    await rig.waker.wake(event(message_type="groupchat"))
    assert [push.silent for push in rig.provider.pushes] == pushes


async def test_priority_and_silence_follow_the_registration() -> None:
    rig = Rig(coalesce_window=0)
    row = await rig.register("n1", resource="phone", priority=Priority.NORMAL)
    await rig.waker.wake(event())
    await rig.store.set_operator_silent(row.id, True)
    await rig.waker.wake(event())
    first, second = rig.provider.pushes
    assert (first.priority, first.silent) == (Priority.NORMAL, False)
    assert second.silent


async def test_body_and_sender_are_shown_only_when_the_policy_allows() -> None:
    hidden = Rig(coalesce_window=0)
    await hidden.register("n1", resource=None)
    await hidden.waker.wake(event(sender="bob@localhost", body="dinner?"))
    shown = Rig(
        coalesce_window=0,
        content=ContentPolicy(show_body=True, show_sender=True, body_placeholder="New"),
    )
    await shown.register("n1", resource=None)
    await shown.waker.wake(event(sender="bob@localhost", body="dinner?"))
    await shown.waker.wake(event(sender="bob@localhost", body="ciphertext", encrypted=True))
    assert hidden.provider.pushes[0].content == Content(message_count=1, body="New message")
    assert [push.content for push in shown.provider.pushes] == [
        Content(message_count=1, sender="bob@localhost", body="dinner?"),
        Content(message_count=1, sender="bob@localhost", body="New"),
    ]


async def test_a_call_goes_to_the_voip_token_at_once() -> None:
    rig = Rig(coalesce_window=60)
    await rig.register(
        "n1", resource="phone", voip_token=VOIP, topic="org.example.app", mode=Mode.SANDBOX
    )
    await rig.waker.wake(event())
    await rig.waker.wake(event(call=True))
    assert len(rig.provider.pushes) == 2, "a call is never held back by coalescing"
    call = rig.provider.pushes[1]
    assert call.voip
    assert call.device.token == VOIP
    assert call.device.topic == "org.example.app"
    assert call.ttl == VOIP_TTL
    assert call.priority is Priority.HIGH


async def test_a_call_without_a_voip_token_is_a_high_priority_alert() -> None:
    rig = Rig(coalesce_window=0)
    await rig.register("n1", resource="phone", priority=Priority.NORMAL)
    await rig.waker.wake(event(call=True))
    (push,) = rig.provider.pushes
    assert not push.voip
    assert push.priority is Priority.HIGH
    assert not push.silent


async def test_a_delivery_is_recorded_on_the_registration() -> None:
    rig = Rig(coalesce_window=0)
    row = await rig.register("n1", resource=None)
    await rig.waker.wake(event())
    await asyncio.sleep(SUCCESS_FLUSH_DELAY + 0.2)
    stored = await rig.store.get(row.id)
    assert stored is not None
    assert stored.last_success_at is not None


async def test_a_dead_token_deletes_the_registration() -> None:
    rig = Rig(coalesce_window=0)
    row = await rig.register("n1", resource=None)
    rig.provider.fail_with = DeliveryError(ErrorCategory.TOKEN_DEAD, "Unregistered", 410)
    await rig.waker.wake(event())
    assert await rig.store.get(row.id) is None


async def test_an_outage_keeps_the_registration_and_records_it() -> None:
    rig = Rig(coalesce_window=0)
    row = await rig.register("n1", resource=None)
    rig.provider.fail_with = DeliveryError(ErrorCategory.MISCONFIGURED, "InvalidProviderToken")
    await rig.waker.wake(event())
    stored = await rig.store.get(row.id)
    assert stored is not None
    assert stored.failure_count == 1
    assert stored.last_error is not None
    assert "InvalidProviderToken" in stored.last_error


async def test_a_forward_registration_is_published_with_the_clients_options() -> None:
    rig = Rig(coalesce_window=0)
    await rig.register(
        "n9",
        resource="phone",
        target=Target.FORWARD,
        push_jid="p2.example.net",
        options={"secret": "s3"},
    )
    await rig.waker.wake(event(SessionState.UNDECIDED, resource="phone", count=2))
    ((push_jid, node, content, options),) = rig.forwarder.published
    assert (push_jid, node, dict(options)) == ("p2.example.net", "n9", {"secret": "s3"})
    assert content.message_count == 2


async def test_a_forward_target_that_forgot_the_node_loses_the_registration() -> None:
    rig = Rig(coalesce_window=0)
    row = await rig.register("n9", resource=None, target=Target.FORWARD, push_jid="p2.example.net")
    rig.forwarder.fail_with = DeliveryError(ErrorCategory.TOKEN_DEAD, "cancel/item-not-found")
    await rig.waker.wake(event())
    assert await rig.store.get(row.id) is None


async def test_a_forward_target_that_says_wait_keeps_the_registration() -> None:
    rig = Rig(coalesce_window=0)
    row = await rig.register("n9", resource=None, target=Target.FORWARD, push_jid="p2.example.net")
    rig.forwarder.fail_with = DeliveryError(ErrorCategory.TRANSIENT, "wait/resource-constraint")
    await rig.waker.wake(event())
    stored = await rig.store.get(row.id)
    assert stored is not None
    assert stored.failure_count == 1


async def test_successes_are_written_together_and_close_writes_what_waits() -> None:
    rig = Rig(coalesce_window=0)
    first = await rig.register("n1", resource=None, token=PHONE)
    second = await rig.register("n2", resource=None, token=TABLET)
    batches: list[dict[int, float]] = []
    record = rig.store.record_successes

    async def recording(successes: Mapping[int, float]) -> None:
        batches.append(dict(successes))
        await record(successes)

    rig.store.record_successes = recording  # type: ignore[method-assign]
    await rig.waker.wake(event())
    assert batches == [], "not written at once"
    await rig.waker.close()
    assert [sorted(batch) for batch in batches] == [sorted([first.id, second.id])]


async def test_a_failure_after_a_waiting_success_is_not_undone_by_it() -> None:
    rig = Rig(coalesce_window=0)
    row = await rig.register("n1", resource=None)
    await rig.waker.wake(event())
    rig.provider.fail_with = DeliveryError(ErrorCategory.MISCONFIGURED, "InvalidProviderToken")
    await rig.waker.wake(event())
    await rig.waker.close()
    stored = await rig.store.get(row.id)
    assert stored is not None
    assert stored.failure_count == 1
