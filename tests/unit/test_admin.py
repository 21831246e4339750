"""Operator commands over a store: precedence of operator settings, send-test."""

from __future__ import annotations

import pytest

from tests.unit.test_dispatch import ScriptedProvider
from xmpp_push.admin import (
    describe,
    parse_priority_setting,
    parse_silent_setting,
    registration_json,
    registrations_table,
    send_test,
)
from xmpp_push.core.model import Priority, Service
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory
from xmpp_push.core.ports import Provider
from xmpp_push.core.registrations import RegistrationRequest, Target
from xmpp_push.storage.memory import MemoryStore

TOKEN = "e1" * 32


async def stored(
    store: MemoryStore, priority: Priority | None = Priority.HIGH, node: str = "n1"
) -> int:
    outcome = await store.enable(
        RegistrationRequest(
            owner="alice@example.org",
            push_jid="push.example.org",
            node=node,
            target=Target.APNS,
            token=TOKEN,
            priority=priority,
            resource="phone",
            options={"service": "apns", "device_id": TOKEN},
        ),
        max_per_owner=10,
        now=1_700_000_000.0,
    )
    return outcome.registration.id


def providers(provider: ScriptedProvider) -> dict[Service, Provider]:
    return {Service.APNS: provider, Service.FCM: provider}


async def test_operator_priority_wins_over_the_client_and_survives_re_enable() -> None:
    store = MemoryStore()
    registration_id = await stored(store, Priority.HIGH)
    await store.set_operator_priority(registration_id, parse_priority_setting("normal"))
    assert await stored(store, Priority.HIGH) == registration_id  # the client re-enables
    provider = ScriptedProvider(None)
    result = await send_test(
        store, providers(provider), registration_id, default_priority=Priority.HIGH, ttl=60
    )
    assert result.delivered
    await store.set_operator_priority(registration_id, parse_priority_setting("default"))
    await send_test(
        store, providers(provider), registration_id, default_priority=Priority.NORMAL, ttl=60
    )
    # Operator's normal, then the client's high again (the policy default is normal).
    assert [push.priority for push in provider.sent] == [Priority.NORMAL, Priority.HIGH]


async def test_operator_silence_is_applied_and_can_be_handed_back() -> None:
    store = MemoryStore()
    registration_id = await stored(store)
    provider = ScriptedProvider(None, None)
    await store.set_operator_silent(registration_id, parse_silent_setting("on"))
    await send_test(
        store, providers(provider), registration_id, default_priority=Priority.HIGH, ttl=60
    )
    assert provider.sent[-1].silent is True
    await store.set_operator_silent(registration_id, parse_silent_setting("default"))
    await send_test(
        store, providers(provider), registration_id, default_priority=Priority.HIGH, ttl=60
    )
    assert provider.sent[-1].silent is False


async def test_send_test_records_success_and_failure() -> None:
    store = MemoryStore()
    registration_id = await stored(store)
    unavailable = DeliveryError(ErrorCategory.TRANSIENT, "ServiceUnavailable", 503)
    provider = ScriptedProvider(unavailable, None)
    failed = await send_test(
        store, providers(provider), registration_id, default_priority=Priority.HIGH, ttl=60
    )
    assert not failed.delivered
    assert "ServiceUnavailable" in failed.summary
    after_failure = await store.get(registration_id)
    assert after_failure is not None
    assert after_failure.failure_count == 1
    assert after_failure.last_error is not None
    ok = await send_test(
        store, providers(provider), registration_id, default_priority=Priority.HIGH, ttl=60
    )
    assert ok.delivered
    after_success = await store.get(registration_id)
    assert after_success is not None
    assert after_success.last_success_at is not None
    assert after_success.failure_count == 0


async def test_send_test_to_a_dead_token_removes_its_registrations() -> None:
    store = MemoryStore()
    registration_id = await stored(store)
    provider = ScriptedProvider(DeliveryError(ErrorCategory.TOKEN_DEAD, "Unregistered", 410))
    result = await send_test(
        store, providers(provider), registration_id, default_priority=Priority.HIGH, ttl=60
    )
    assert not result.delivered
    assert "1 registration(s) deleted" in result.summary
    assert await store.get(registration_id) is None


async def test_send_test_for_an_unknown_id() -> None:
    result = await send_test(
        MemoryStore(), providers(ScriptedProvider()), 42, default_priority=Priority.HIGH, ttl=60
    )
    assert not result.delivered
    assert "no registration with id 42" in result.summary


async def test_listing_redacts_tokens_and_shows_where_settings_come_from() -> None:
    store = MemoryStore()
    registration_id = await stored(store)
    await store.set_operator_silent(registration_id, True)
    [registration] = await store.list()
    table = registrations_table([registration])
    assert TOKEN not in table
    assert "high (client)" in table
    assert "on (operator)" in table
    assert registration_json(registration)["token"] != TOKEN
    assert registration_json(registration, reveal_token=True)["token"] == TOKEN
    assert "device_id" not in registration_json(registration)["options"]
    assert TOKEN not in describe(registration)


@pytest.mark.parametrize("text", ["loud", ""])
def test_bad_settings_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r".+"):
        parse_priority_setting(text)
    with pytest.raises(ValueError, match=r".+"):
        parse_silent_setting(text)
