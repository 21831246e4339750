"""What every `RegistrationStore` promises (xmpp_push.core.registrations), checked on
SQLite, PostgreSQL, MariaDB and the in-memory store alike."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from tests.storage.conftest import SQL_BACKENDS
from xmpp_push.core.model import Mode, Priority
from xmpp_push.core.registrations import (
    Registration,
    RegistrationRequest,
    RegistrationStore,
    Target,
)
from xmpp_push.storage import SqlStore

OWNER = "alice@example.org"
PUSH_JID = "push.example.org"
NOW = 1_700_000_000.0
TOKEN = "fcm-token-" + "x" * 140
OTHER_TOKEN = "fcm-token-" + "y" * 140
MAX = 10


@pytest.fixture(scope="module", params=[*SQL_BACKENDS, "memory"])
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "memory" and importlib.util.find_spec("xmpp_push.storage.memory") is None:
        pytest.skip("xmpp_push.storage.memory is not written yet")
    return str(request.param)


def enable_request(
    node: str = "node-1",
    *,
    owner: str = OWNER,
    push_jid: str = PUSH_JID,
    target: Target = Target.FCM,
    token: str | None = TOKEN,
    **fields: Any,
) -> RegistrationRequest:
    return RegistrationRequest(
        owner=owner, push_jid=push_jid, node=node, target=target, token=token, **fields
    )


async def enable(
    store: RegistrationStore,
    request: RegistrationRequest,
    *,
    now: float = NOW,
    max_per_owner: int = MAX,
) -> Registration:
    return (await store.enable(request, max_per_owner=max_per_owner, now=now)).registration


def ids(registrations: Sequence[Registration]) -> list[int]:
    return [registration.id for registration in registrations]


# --------------------------------------------------------------------------- enable


async def test_enable_stores_every_field_of_the_request(store: RegistrationStore) -> None:
    request = enable_request(
        target=Target.APNS,
        token="ab" * 32,
        topic="org.example.chat",
        mode=Mode.SANDBOX,
        priority=Priority.NORMAL,
        silent=True,
        voip_token="cd" * 32,
        resource="phone-1",
        secret="s3cret",
        options={"device_id": "ab" * 32, "service": "apns", "sound": "ping.caf"},
    )

    outcome = await store.enable(request, max_per_owner=MAX, now=NOW)

    stored = outcome.registration
    assert (stored.owner, stored.push_jid, stored.node) == (OWNER, PUSH_JID, "node-1")
    assert (stored.target, stored.token, stored.topic, stored.mode) == (
        Target.APNS,
        "ab" * 32,
        "org.example.chat",
        Mode.SANDBOX,
    )
    assert (stored.client_priority, stored.client_silent) == (Priority.NORMAL, True)
    assert (stored.operator_priority, stored.operator_silent) == (None, None)
    assert (stored.voip_token, stored.resource, stored.secret) == ("cd" * 32, "phone-1", "s3cret")
    assert dict(stored.options) == {"device_id": "ab" * 32, "service": "apns", "sound": "ping.caf"}
    assert (stored.created_at, stored.updated_at) == (NOW, NOW)
    assert (stored.last_success_at, stored.last_error_at, stored.last_error) == (None, None, None)
    assert (stored.failure_count, stored.quarantined_until) == (0, None)
    assert list(outcome.replaced) == []
    assert list(outcome.evicted) == []
    assert await store.get(stored.id) == stored


async def test_enable_of_a_forward_target_stores_no_token(store: RegistrationStore) -> None:
    stored = await enable(
        store,
        enable_request(
            push_jid="push.remote.example", target=Target.FORWARD, token=None, options={}
        ),
    )

    assert (stored.target, stored.token, dict(stored.options)) == (Target.FORWARD, None, {})
    assert stored.device() is None


async def test_re_enable_updates_the_row_in_place(store: RegistrationStore) -> None:
    first = await enable(store, enable_request(priority=Priority.HIGH, resource="a"), now=NOW)

    second = await enable(
        store,
        enable_request(token=OTHER_TOKEN, priority=Priority.NORMAL, resource="b", silent=False),
        now=NOW + 60,
    )

    assert (second.id, second.created_at, second.updated_at) == (first.id, NOW, NOW + 60)
    assert (second.token, second.client_priority, second.resource, second.client_silent) == (
        OTHER_TOKEN,
        Priority.NORMAL,
        "b",
        False,
    )
    assert await store.count() == 1


async def test_re_enable_keeps_the_operator_overrides(store: RegistrationStore) -> None:
    first = await enable(store, enable_request(priority=Priority.HIGH, silent=False))
    await store.set_operator_priority(first.id, Priority.NORMAL)
    await store.set_operator_silent(first.id, True)

    again = await enable(store, enable_request(priority=Priority.HIGH, silent=False), now=NOW + 1)

    assert (again.operator_priority, again.operator_silent) == (Priority.NORMAL, True)
    assert (again.priority(Priority.HIGH), again.silent(False)) == (Priority.NORMAL, True)


async def test_re_enable_with_a_new_token_clears_failures_and_quarantine(
    store: RegistrationStore,
) -> None:
    first = await enable(store, enable_request())
    await store.record_failure(first.id, NOW + 1, "BadDeviceToken", quarantine_until=NOW + 3600)

    again = await enable(store, enable_request(token=OTHER_TOKEN), now=NOW + 2)

    assert (again.failure_count, again.quarantined_until) == (0, None)


async def test_re_enable_with_the_same_token_keeps_failures_and_quarantine(
    store: RegistrationStore,
) -> None:
    first = await enable(store, enable_request())
    await store.record_failure(first.id, NOW + 1, "BadDeviceToken", quarantine_until=NOW + 3600)

    again = await enable(store, enable_request(), now=NOW + 2)

    assert (again.failure_count, again.quarantined_until) == (1, NOW + 3600)


async def test_the_same_token_under_another_node_replaces_the_old_row(
    store: RegistrationStore,
) -> None:
    old = await enable(store, enable_request("old-node"))

    outcome = await store.enable(enable_request("new-node"), max_per_owner=MAX, now=NOW + 1)

    assert list(outcome.replaced) == [old]
    assert [r.node for r in await store.for_owner(OWNER)] == ["new-node"]


async def test_the_same_token_under_another_push_jid_replaces_the_old_row(
    store: RegistrationStore,
) -> None:
    old = await enable(store, enable_request(push_jid="push-alias.example.org"))

    outcome = await store.enable(enable_request(), max_per_owner=MAX, now=NOW + 1)

    assert ids(outcome.replaced) == [old.id]
    assert await store.get(old.id) is None


async def test_the_same_token_of_another_owner_is_left_alone(store: RegistrationStore) -> None:
    bobs = await enable(store, enable_request(owner="bob@example.org"))

    outcome = await store.enable(enable_request(), max_per_owner=MAX, now=NOW + 1)

    assert list(outcome.replaced) == []
    assert await store.get(bobs.id) == bobs


async def test_the_same_token_text_for_another_target_is_left_alone(
    store: RegistrationStore,
) -> None:
    apns = await enable(store, enable_request("apns-node", target=Target.APNS, token="ab" * 32))

    outcome = await store.enable(
        enable_request("fcm-node", target=Target.FCM, token="ab" * 32), max_per_owner=MAX, now=NOW
    )

    assert list(outcome.replaced) == []
    assert await store.get(apns.id) == apns


async def test_forward_registrations_without_token_do_not_replace_each_other(
    store: RegistrationStore,
) -> None:
    await enable(store, enable_request("a", target=Target.FORWARD, token=None))
    outcome = await store.enable(
        enable_request("b", target=Target.FORWARD, token=None), max_per_owner=MAX, now=NOW
    )

    assert list(outcome.replaced) == []
    assert await store.count() == 2


async def test_enable_evicts_the_least_recently_updated_beyond_the_maximum(
    store: RegistrationStore,
) -> None:
    oldest = await enable(store, enable_request("a", token="t-a"), now=NOW + 1)
    await enable(store, enable_request("b", token="t-b"), now=NOW + 2)
    await enable(store, enable_request("c", token="t-c"), now=NOW + 3)
    # Refreshed last, so "a" is now the most recent and "b" the least.
    await enable(store, enable_request("a", token="t-a"), now=NOW + 4)

    outcome = await store.enable(enable_request("d", token="t-d"), max_per_owner=3, now=NOW + 5)

    assert [r.node for r in outcome.evicted] == ["b"]
    assert [r.node for r in await store.for_owner(OWNER)] == ["a", "c", "d"]
    assert (await store.for_owner(OWNER))[0].id == oldest.id


async def test_enable_evicts_as_many_rows_as_needed_oldest_first(
    store: RegistrationStore,
) -> None:
    for number, node in enumerate("abcd"):
        await enable(store, enable_request(node, token=f"t-{node}"), now=NOW + number)

    outcome = await store.enable(enable_request("e", token="t-e"), max_per_owner=2, now=NOW + 9)

    assert [r.node for r in outcome.evicted] == ["a", "b", "c"]
    assert [r.node for r in await store.for_owner(OWNER)] == ["d", "e"]


async def test_the_registration_being_enabled_is_never_evicted(store: RegistrationStore) -> None:
    await enable(store, enable_request("a", token="t-a"), now=NOW + 10)

    # Older `now` than the row it pushes out: still the one that stays.
    outcome = await store.enable(enable_request("b", token="t-b"), max_per_owner=1, now=NOW)

    assert [r.node for r in outcome.evicted] == ["a"]
    assert [r.node for r in await store.for_owner(OWNER)] == ["b"]


async def test_eviction_counts_only_the_owners_own_rows(store: RegistrationStore) -> None:
    await enable(store, enable_request("a", owner="bob@example.org", token="t-bob"))
    await enable(store, enable_request("a", token="t-a"))

    outcome = await store.enable(enable_request("b", token="t-b"), max_per_owner=2, now=NOW + 1)

    assert list(outcome.evicted) == []
    assert await store.count() == 3


# --------------------------------------------------------------------------- disable


async def test_disable_one_node_removes_only_that_registration(store: RegistrationStore) -> None:
    one = await enable(store, enable_request("a", token="t-a"))
    two = await enable(store, enable_request("b", token="t-b"))

    removed = await store.disable(OWNER, PUSH_JID, "a")

    assert list(removed) == [one]
    assert list(await store.for_owner(OWNER)) == [two]


async def test_disable_of_an_unknown_node_removes_nothing(store: RegistrationStore) -> None:
    await enable(store, enable_request("a"))

    assert list(await store.disable(OWNER, PUSH_JID, "never-enabled")) == []
    assert list(await store.disable(OWNER, "other.example.org", "a")) == []
    assert await store.count() == 1


async def test_disable_without_node_removes_the_owners_rows_for_that_push_jid_only(
    store: RegistrationStore,
) -> None:
    a = await enable(store, enable_request("a", token="t-a"))
    b = await enable(store, enable_request("b", token="t-b"))
    elsewhere = await enable(store, enable_request("c", push_jid="push.other.org", token="t-c"))
    bobs = await enable(store, enable_request("a", owner="bob@example.org", token="t-bob"))

    removed = await store.disable(OWNER, PUSH_JID, None)

    assert ids(removed) == [a.id, b.id]
    assert ids(await store.list()) == [elsewhere.id, bobs.id]


# --------------------------------------------------------------------------- reads


async def test_for_owner_returns_only_that_owners_rows_in_id_order(
    store: RegistrationStore,
) -> None:
    a = await enable(store, enable_request("a", token="t-a"))
    await enable(store, enable_request("a", owner="bob@example.org", token="t-bob"))
    b = await enable(store, enable_request("b", token="t-b"))

    assert list(await store.for_owner(OWNER)) == [a, b]
    assert list(await store.for_owner("nobody@example.org")) == []


async def test_get_of_an_unknown_id_is_none(store: RegistrationStore) -> None:
    assert await store.get(987_654_321) is None


async def test_list_gives_everything_or_one_owner_in_id_order(store: RegistrationStore) -> None:
    a = await enable(store, enable_request("a", token="t-a"))
    bob = await enable(store, enable_request("a", owner="bob@example.org", token="t-bob"))
    b = await enable(store, enable_request("b", token="t-b"))

    assert list(await store.list()) == [a, bob, b]
    assert list(await store.list(OWNER)) == [a, b]
    assert list(await store.list("bob@example.org")) == [bob]


async def test_count_counts_every_registration(store: RegistrationStore) -> None:
    assert await store.count() == 0
    await enable(store, enable_request("a", token="t-a"))
    await enable(store, enable_request("a", owner="bob@example.org", token="t-bob"))

    assert await store.count() == 2


async def test_jids_nodes_and_tokens_are_kept_exactly(store: RegistrationStore) -> None:
    # Non-BMP characters (4 bytes in UTF-8), a node and a token too long for any
    # ordinary index, and JIDs that differ only in case: each must come back as sent,
    # and none may stand for another.
    owner = "Ärger-😀@例え.example"
    long_node = "n" * 2000
    long_token = "T" * 4000
    upper = await enable(store, enable_request(long_node, owner=owner, token=long_token))
    lower = await enable(store, enable_request(long_node, owner=owner.lower(), token=long_token))

    assert upper.id != lower.id
    assert [(r.owner, r.node, r.token) for r in await store.for_owner(owner)] == [
        (owner, long_node, long_token)
    ]
    assert ids(await store.for_owner(owner.lower())) == [lower.id]
    assert ids(await store.for_owner(owner + " ")) == []
    assert list(await store.disable(owner, PUSH_JID, long_node.upper())) == []


async def test_times_come_back_to_the_microsecond(store: RegistrationStore) -> None:
    created = 1_700_000_000.123456
    stored = await enable(store, enable_request(), now=created)
    await store.record_success(stored.id, 1_700_000_001.000001)
    await store.record_failure(stored.id, 1_700_000_002.5, "x", quarantine_until=4_102_444_800.25)

    again = await store.get(stored.id)

    assert again is not None
    assert (again.created_at, again.updated_at) == (created, created)
    assert again.last_success_at == 1_700_000_001.000001
    assert (again.last_error_at, again.quarantined_until) == (1_700_000_002.5, 4_102_444_800.25)


# --------------------------------------------------------------------------- removal


async def test_delete_removes_and_returns_the_registration(store: RegistrationStore) -> None:
    stored = await enable(store, enable_request())

    assert await store.delete(stored.id) == stored
    assert await store.get(stored.id) is None
    assert await store.delete(stored.id) is None


async def test_delete_token_removes_every_row_holding_it(store: RegistrationStore) -> None:
    await enable(store, enable_request("a"))
    await enable(store, enable_request("a", owner="bob@example.org"))
    kept = await enable(store, enable_request("b", token=OTHER_TOKEN))
    other_target = await enable(store, enable_request("c", target=Target.APNS, token=TOKEN))

    assert await store.delete_token(Target.FCM, TOKEN) == 2

    assert ids(await store.list()) == [kept.id, other_target.id]
    assert await store.delete_token(Target.FCM, TOKEN) == 0


# --------------------------------------------------------------------------- operator


async def test_operator_priority_overrides_the_client_until_set_back(
    store: RegistrationStore,
) -> None:
    stored = await enable(store, enable_request(priority=Priority.HIGH))

    overridden = await store.set_operator_priority(stored.id, Priority.NORMAL)
    assert overridden is not None
    assert (overridden.operator_priority, overridden.client_priority) == (
        Priority.NORMAL,
        Priority.HIGH,
    )
    assert await store.get(stored.id) == overridden

    handed_back = await store.set_operator_priority(stored.id, None)
    assert handed_back is not None
    assert handed_back.operator_priority is None
    assert handed_back.priority(Priority.NORMAL) is Priority.HIGH


async def test_operator_silence_overrides_the_client_until_set_back(
    store: RegistrationStore,
) -> None:
    stored = await enable(store, enable_request(silent=False))

    silenced = await store.set_operator_silent(stored.id, True)
    assert silenced is not None
    assert (silenced.operator_silent, silenced.silent(False)) == (True, True)

    handed_back = await store.set_operator_silent(stored.id, None)
    assert handed_back is not None
    assert (handed_back.operator_silent, handed_back.silent(True)) == (None, False)


async def test_operator_settings_on_an_unknown_id_give_none(store: RegistrationStore) -> None:
    assert await store.set_operator_priority(987_654_321, Priority.HIGH) is None
    assert await store.set_operator_silent(987_654_321, True) is None
    assert await store.release_quarantine(987_654_321) is None


# --------------------------------------------------------------------------- delivery record


async def test_record_failure_counts_and_keeps_the_reason(store: RegistrationStore) -> None:
    stored = await enable(store, enable_request())

    await store.record_failure(stored.id, NOW + 1, "timeout")
    await store.record_failure(stored.id, NOW + 2, "503 Service Unavailable")

    failed = await store.get(stored.id)
    assert failed is not None
    assert (failed.failure_count, failed.last_error, failed.last_error_at) == (
        2,
        "503 Service Unavailable",
        NOW + 2,
    )
    assert failed.quarantined_until is None


async def test_record_failure_can_quarantine(store: RegistrationStore) -> None:
    stored = await enable(store, enable_request())

    await store.record_failure(stored.id, NOW + 1, "BadDeviceToken", quarantine_until=NOW + 86400)
    # A later failure that does not quarantine leaves the quarantine in place.
    await store.record_failure(stored.id, NOW + 2, "timeout")

    quarantined = await store.get(stored.id)
    assert quarantined is not None
    assert quarantined.quarantined_until == NOW + 86400
    assert quarantined.quarantined(NOW + 3)


async def test_record_success_sets_the_time_and_clears_failures_and_quarantine(
    store: RegistrationStore,
) -> None:
    stored = await enable(store, enable_request())
    await store.record_failure(stored.id, NOW + 1, "BadDeviceToken", quarantine_until=NOW + 86400)

    await store.record_success(stored.id, NOW + 2)

    healthy = await store.get(stored.id)
    assert healthy is not None
    assert (healthy.last_success_at, healthy.failure_count, healthy.quarantined_until) == (
        NOW + 2,
        0,
        None,
    )
    # The last error stays: it is history an operator may want to see.
    assert (healthy.last_error, healthy.last_error_at) == ("BadDeviceToken", NOW + 1)


async def test_record_success_of_a_healthy_registration_moves_the_time(
    store: RegistrationStore,
) -> None:
    stored = await enable(store, enable_request())

    await store.record_success(stored.id, NOW + 1)
    await store.record_success(stored.id, NOW + 2)

    healthy = await store.get(stored.id)
    assert healthy is not None
    assert (healthy.last_success_at, healthy.failure_count) == (NOW + 2, 0)


async def test_record_successes_writes_a_batch_healthy_and_recovering_alike(
    store: RegistrationStore,
) -> None:
    healthy = await enable(store, enable_request("node-1", token="t" * 20))
    failing = await enable(store, enable_request("node-2", token="u" * 20))
    await store.record_failure(failing.id, NOW + 1, "BadDeviceToken", quarantine_until=NOW + 9)

    await store.record_successes({healthy.id: NOW + 2, failing.id: NOW + 3, 987_654_321: NOW})

    first, second = await store.get(healthy.id), await store.get(failing.id)
    assert first is not None
    assert second is not None
    assert (first.last_success_at, first.failure_count) == (NOW + 2, 0)
    assert (second.last_success_at, second.failure_count, second.quarantined_until) == (
        NOW + 3,
        0,
        None,
    )


async def test_release_quarantine_lifts_it(store: RegistrationStore) -> None:
    stored = await enable(store, enable_request())
    await store.record_failure(stored.id, NOW + 1, "BadDeviceToken", quarantine_until=NOW + 86400)

    released = await store.release_quarantine(stored.id)

    assert released is not None
    assert released.quarantined_until is None
    assert not released.quarantined(NOW + 2)
    assert await store.get(stored.id) == released


async def test_recording_for_an_unknown_registration_does_nothing(
    store: RegistrationStore,
) -> None:
    await store.record_success(987_654_321, NOW)
    await store.record_failure(987_654_321, NOW, "gone", quarantine_until=NOW + 1)

    assert await store.count() == 0


# --------------------------------------------------------------------------- concurrency


async def test_concurrent_enables_of_one_key_in_one_store_end_in_one_row(
    store: RegistrationStore,
) -> None:
    outcomes = await asyncio.gather(
        *(
            store.enable(enable_request(resource=f"r{n}"), max_per_owner=MAX, now=NOW + n)
            for n in range(8)
        )
    )

    assert len({outcome.registration.id for outcome in outcomes}) == 1
    assert await store.count() == 1


async def test_concurrent_enables_of_one_key_from_two_processes_end_in_one_row(
    make_store: Callable[[], Awaitable[SqlStore]],
) -> None:
    first, second = await make_store(), await make_store()

    outcomes = await asyncio.gather(
        *(
            (first if n % 2 else second).enable(
                enable_request(resource=f"r{n}"), max_per_owner=MAX, now=NOW + n
            )
            for n in range(12)
        )
    )

    assert len({outcome.registration.id for outcome in outcomes}) == 1
    assert await first.count() == 1
    assert len(await second.for_owner(OWNER)) == 1


async def test_concurrent_enables_of_one_owner_from_two_processes_keep_the_maximum(
    make_store: Callable[[], Awaitable[SqlStore]],
) -> None:
    first, second = await make_store(), await make_store()

    await asyncio.gather(
        *(
            (first if n % 2 else second).enable(
                enable_request(f"node-{n}", token=f"t-{n}"), max_per_owner=3, now=NOW + n
            )
            for n in range(12)
        )
    )

    assert len(await first.list(OWNER)) == 3


# --------------------------------------------------------------------------- against the model


def _without_id(registration: Registration) -> dict[str, Any]:
    fields = dataclasses.asdict(registration) | {"options": dict(registration.options)}
    del fields["id"]
    return fields


async def test_a_random_workload_leaves_what_the_memory_store_leaves(
    backend: str, store: RegistrationStore
) -> None:
    if backend == "memory":
        pytest.skip("the memory store is the model here")
    from xmpp_push.storage.memory import MemoryStore

    model = MemoryStore()
    rng = random.Random(357)
    owners = ["a@example.org", "b@example.org"]
    nodes = ["n1", "n2", "n3", "n4"]
    tokens = ["t1", "t2", "t3"]
    now = NOW

    def same(got: Sequence[Registration], expected: Sequence[Registration]) -> None:
        assert [_without_id(r) for r in got] == [_without_id(r) for r in expected]

    for _ in range(120):
        now += rng.choice([0.0, 0.5, 1.0])
        choice = rng.random()
        owner = rng.choice(owners)
        if choice < 0.55:
            request = enable_request(
                rng.choice(nodes),
                owner=owner,
                target=rng.choice([Target.FCM, Target.APNS]),
                token=rng.choice(tokens),
                priority=rng.choice([None, Priority.HIGH]),
            )
            limit = rng.choice([2, 3, 5])
            got = await store.enable(request, max_per_owner=limit, now=now)
            expected = await model.enable(request, max_per_owner=limit, now=now)
            same([got.registration], [expected.registration])
            same(got.replaced, expected.replaced)
            same(got.evicted, expected.evicted)
        elif choice < 0.65:
            node = rng.choice([None, *nodes])
            same(
                await store.disable(owner, PUSH_JID, node),
                await model.disable(owner, PUSH_JID, node),
            )
        elif choice < 0.75:
            token = rng.choice(tokens)
            assert await store.delete_token(Target.FCM, token) == await model.delete_token(
                Target.FCM, token
            )
        else:
            # A delivery outcome, addressed by position since the ids differ.
            mine, theirs = await store.for_owner(owner), await model.for_owner(owner)
            if not mine:
                continue
            index = rng.randrange(len(mine))
            kind = rng.choice(["success", "failure", "quarantine"])
            for target_store, rows in ((store, mine), (model, theirs)):
                registration_id = rows[index].id
                if kind == "success":
                    await target_store.record_success(registration_id, now)
                elif kind == "failure":
                    await target_store.record_failure(registration_id, now, "timeout")
                else:
                    await target_store.record_failure(
                        registration_id, now, "BadDeviceToken", quarantine_until=now + 60
                    )

    same(await store.list(), await model.list())
