"""Direct mode's core: what an `<enable/>` or `<disable/>` stores, refuses and logs.

DirectMode over a MemoryStore, no XML: the commands are what the delegation adapter
hands over (tests/unit/test_delegation.py covers the stanzas).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from xmpp_push.core.direct import DirectMode, DisableCommand, EnableCommand
from xmpp_push.core.model import Mode, Priority
from xmpp_push.core.publish_options import RequestError, RequestProblem
from xmpp_push.core.registrations import (
    EnableOutcome,
    Registration,
    RegistrationRequest,
    Target,
)
from xmpp_push.storage.memory import MemoryStore

ME = "push.example.org"
ALIAS = "push.old.example.org"
ALICE = "alice@example.org"
APNS_TOKEN = "ab" * 32
OTHER_APNS_TOKEN = "cd" * 32
FCM_TOKEN = "fcm-token:APA91b" + "x" * 40


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float = 1.0) -> None:
        self.now += seconds


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def direct(store: MemoryStore, clock: Clock) -> DirectMode:
    return DirectMode(store, own_jids=frozenset({ME, ALIAS}), max_per_owner=3, clock=clock)


def enable(
    node: str | None = "n1",
    options: Mapping[str, str] | None = None,
    *,
    jid: str = ME,
    owner: str = ALICE,
    resource: str | None = "phone",
) -> EnableCommand:
    if options is None:
        options = {"service": "apns", "device_id": APNS_TOKEN}
    return EnableCommand(owner=owner, resource=resource, jid=jid, node=node, options=options)


def apns(token: str = APNS_TOKEN, **more: str) -> dict[str, str]:
    return {"service": "apns", "device_id": token, **more}


# ---------------------------------------------------------------- enable, our own JID


async def test_enable_with_the_mongooseim_form_stores_the_device(
    direct: DirectMode, store: MemoryStore, clock: Clock
) -> None:
    options = apns(
        topic="org.example.chat",
        mode="dev",
        priority="normal",
        silent="true",
        sound="ping.caf",
        voip_device_id="ef" * 32,
        secret="s3cr3t",
    )
    outcome = await direct.enable(enable("n1", options))

    [row] = await store.list()
    assert outcome.registration == row
    assert (row.owner, row.resource, row.push_jid, row.node) == (ALICE, "phone", ME, "n1")
    assert (row.target, row.token, row.topic, row.mode) == (
        Target.APNS,
        APNS_TOKEN,
        "org.example.chat",
        Mode.SANDBOX,
    )
    assert (row.client_priority, row.client_silent) == (Priority.NORMAL, True)
    assert (row.operator_priority, row.operator_silent) == (None, None)
    assert (row.voip_token, row.secret) == ("ef" * 32, "s3cr3t")
    assert row.options == options
    assert row.created_at == row.updated_at == clock.now


async def test_enable_for_fcm_leaves_unset_choices_to_the_policy(
    direct: DirectMode, store: MemoryStore
) -> None:
    await direct.enable(enable("n1", {"service": "FCM", "device_id": FCM_TOKEN}))
    [row] = await store.list()
    assert (row.target, row.token) == (Target.FCM, FCM_TOKEN)
    assert (row.client_priority, row.client_silent, row.mode, row.topic) == (None,) * 4


async def test_an_alias_is_one_of_our_own_jids(direct: DirectMode, store: MemoryStore) -> None:
    await direct.enable(enable("n1", apns(), jid=ALIAS))
    [row] = await store.list()
    assert (row.push_jid, row.target, row.token) == (ALIAS, Target.APNS, APNS_TOKEN)


async def test_own_jids_are_compared_in_lower_case(store: MemoryStore) -> None:
    direct = DirectMode(store, own_jids=frozenset({"Push.Example.org"}), max_per_owner=3)
    await direct.enable(enable("n1", apns(), jid=ME))
    [row] = await store.list()
    assert row.target is Target.APNS


@pytest.mark.parametrize("node", [None, ""])
async def test_a_node_is_required(direct: DirectMode, store: MemoryStore, node: str | None) -> None:
    with pytest.raises(RequestError) as caught:
        await direct.enable(enable(node))
    assert caught.value.problem is RequestProblem.BAD_REQUEST
    assert caught.value.text == "node is missing"
    assert await store.count() == 0


async def test_a_jid_is_required(direct: DirectMode, store: MemoryStore) -> None:
    with pytest.raises(RequestError) as caught:
        await direct.enable(enable(jid=""))
    assert caught.value.text == "jid is missing"
    assert await store.count() == 0


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({}, "service is missing"),
        ({"device_id": APNS_TOKEN}, "service is missing"),
        ({"service": "apns"}, "device_id is missing"),
        ({"service": "apns", "device_id": ""}, "device_id is missing"),
        ({"service": "pigeon", "device_id": APNS_TOKEN}, "unknown service 'pigeon'"),
        ({"service": "apns", "device_id": "not-hex"}, "device_id is not an APNs device token"),
        ({"service": "fcm", "device_id": "short"}, "device_id is not an FCM registration token"),
        (apns(priority="urgent"), "unknown priority 'urgent'"),
        (apns(silent="maybe"), "silent must be true or false"),
        (apns(mutable_content="sometimes"), "mutable_content must be true or false"),
        (apns(mode="staging"), "unknown mode 'staging'"),
        (apns(time_to_live="soon"), "time_to_live must be whole seconds"),
        (apns(time_to_live="99999999"), "time_to_live must be between 0 and"),
        (apns(voip_device_id="zz"), "voip_device_id is not an APNs VoIP token"),
        (
            {"service": "fcm", "device_id": FCM_TOKEN, "voip_device_id": "ab" * 32},
            "voip_device_id is for apns only",
        ),
    ],
)
async def test_a_bad_form_is_a_bad_request_naming_the_field(
    direct: DirectMode, store: MemoryStore, options: dict[str, str], named: str
) -> None:
    with pytest.raises(RequestError) as caught:
        await direct.enable(enable("n1", options))
    assert caught.value.problem is RequestProblem.BAD_REQUEST
    assert caught.value.text.startswith("publish-options: ")
    assert named in caught.value.text
    assert await store.count() == 0


# ---------------------------------------------------------------- enable, another JID


async def test_an_enable_naming_another_jid_is_a_forward_registration(
    direct: DirectMode, store: MemoryStore
) -> None:
    options = {"secret": "abc", "endpoint": "whatever", "device_id": "not-a-token"}
    await direct.enable(enable("n7", options, jid="push.conversations.im"))
    [row] = await store.list()
    assert (row.push_jid, row.node, row.target, row.token) == (
        "push.conversations.im",
        "n7",
        Target.FORWARD,
        None,
    )
    assert row.options == options  # verbatim, not judged: the app server reads them
    assert row.secret == "abc"
    assert row.device() is None


async def test_a_forward_registration_needs_a_node_too(
    direct: DirectMode, store: MemoryStore
) -> None:
    with pytest.raises(RequestError, match="node is missing"):
        await direct.enable(enable(None, {}, jid="push.conversations.im"))
    assert await store.count() == 0


async def test_a_forward_registration_may_carry_no_form(
    direct: DirectMode, store: MemoryStore
) -> None:
    await direct.enable(enable("n1", {}, jid="app.example.net"))
    [row] = await store.list()
    assert (row.target, row.options) == (Target.FORWARD, {})


# ---------------------------------------------------------------- updates and limits


async def test_re_enabling_a_node_updates_it_and_keeps_the_operators_choices(
    direct: DirectMode, store: MemoryStore, clock: Clock
) -> None:
    first = (await direct.enable(enable("n1", apns(priority="high")))).registration
    await store.set_operator_priority(first.id, Priority.NORMAL)
    clock.tick(60)
    again = await direct.enable(enable("n1", apns(OTHER_APNS_TOKEN), resource="tablet"))

    [row] = await store.list()
    assert again.registration == row
    assert (row.id, row.created_at, row.updated_at) == (first.id, first.created_at, clock.now)
    assert (row.token, row.resource, row.client_priority) == (OTHER_APNS_TOKEN, "tablet", None)
    assert row.operator_priority is Priority.NORMAL
    assert not again.replaced
    assert not again.evicted


async def test_the_same_token_under_a_new_node_replaces_the_old_node_and_is_logged(
    direct: DirectMode, store: MemoryStore
) -> None:
    old = (await direct.enable(enable("n1"))).registration
    with capture_logs() as logs:
        outcome = await direct.enable(enable("n2"))
    assert [row.node for row in await store.list()] == ["n2"]
    assert list(outcome.replaced) == [old]
    [entry] = [e for e in logs if e["event"] == "registration_replaced"]
    assert (entry["owner"], entry["node"], entry["by_node"]) == (ALICE, "n1", "n2")
    assert entry["token"] == "abab…abab"
    assert APNS_TOKEN not in repr(logs)


async def test_beyond_the_limit_the_least_recently_enabled_registration_goes(
    direct: DirectMode, store: MemoryStore, clock: Clock
) -> None:
    for index, node in enumerate(["n1", "n2", "n3"]):
        await direct.enable(enable(node, apns(f"{index:064x}")))
        clock.tick()
    await direct.enable(enable("n1", apns(f"{0:064x}")))  # n1 is fresh again
    clock.tick()
    with capture_logs() as logs:
        outcome = await direct.enable(enable("n4", apns(f"{4:064x}")))
    assert sorted(row.node for row in await store.list()) == ["n1", "n3", "n4"]
    assert [row.node for row in outcome.evicted] == ["n2"]
    [entry] = [e for e in logs if e["event"] == "registration_evicted"]
    assert (entry["node"], entry["token"]) == ("n2", "0000…0001")
    assert "more than 3" in entry["reason"]


async def test_the_limit_is_per_user(direct: DirectMode, store: MemoryStore) -> None:
    for index in range(3):
        await direct.enable(enable(f"n{index}", apns(f"{index:064x}")))
    await direct.enable(enable("n1", apns(f"{9:064x}"), owner="bob@example.org"))
    assert await store.count() == 4


async def test_an_enable_is_logged_without_the_token(direct: DirectMode) -> None:
    with capture_logs() as logs:
        await direct.enable(enable("n1"))
    [entry] = [e for e in logs if e["event"] == "push_enabled"]
    assert (entry["owner"], entry["node"], entry["target"], entry["push_jid"]) == (
        ALICE,
        "n1",
        "apns",
        ME,
    )
    assert entry["token"] == "abab…abab"


def test_the_limit_must_allow_one_registration(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="max_per_owner"):
        DirectMode(store, own_jids=frozenset({ME}), max_per_owner=0)


# ---------------------------------------------------------------- disable


async def test_disable_with_a_node_removes_that_node_only(
    direct: DirectMode, store: MemoryStore
) -> None:
    await direct.enable(enable("n1", apns(APNS_TOKEN)))
    await direct.enable(enable("n2", apns(OTHER_APNS_TOKEN)))
    removed = await direct.disable(DisableCommand(ALICE, ME, "n1"))
    assert [row.node for row in removed] == ["n1"]
    assert [row.node for row in await store.list()] == ["n2"]


async def test_disable_without_a_node_removes_every_node_for_that_push_jid(
    direct: DirectMode, store: MemoryStore
) -> None:
    await direct.enable(enable("n1", apns(APNS_TOKEN)))
    await direct.enable(enable("n2", apns(OTHER_APNS_TOKEN)))
    await direct.enable(enable("n3", {}, jid="push.conversations.im"))
    await direct.enable(enable("n1", apns(f"{7:064x}"), owner="bob@example.org"))
    with capture_logs() as logs:
        removed = await direct.disable(DisableCommand(ALICE, ME))
    assert sorted(row.node for row in removed) == ["n1", "n2"]
    remaining = {(row.owner, row.push_jid, row.node) for row in await store.list()}
    assert remaining == {
        (ALICE, "push.conversations.im", "n3"),
        ("bob@example.org", ME, "n1"),
    }
    [entry] = [e for e in logs if e["event"] == "push_disabled"]
    assert sorted(entry["removed"]) == ["n1", "n2"]


async def test_disabling_what_is_not_there_is_not_an_error(direct: DirectMode) -> None:
    assert list(await direct.disable(DisableCommand(ALICE, ME, "nope"))) == []


async def test_disable_with_an_empty_node_is_refused_rather_than_read_as_every_node(
    direct: DirectMode, store: MemoryStore
) -> None:
    await direct.enable(enable("n1"))
    with pytest.raises(RequestError, match="node is empty"):
        await direct.disable(DisableCommand(ALICE, ME, ""))
    with pytest.raises(RequestError, match="jid is missing"):
        await direct.disable(DisableCommand(ALICE, "", "n1"))
    assert await store.count() == 1


# ---------------------------------------------------------------- ordering


class SlowEnables(MemoryStore):
    """Enables take a while, disables are quick: the order they finish in is not the
    order they were asked in, unless DirectMode keeps it."""

    async def enable(
        self, request: RegistrationRequest, *, max_per_owner: int, now: float
    ) -> EnableOutcome:
        await asyncio.sleep(0.05)
        return await super().enable(request, max_per_owner=max_per_owner, now=now)

    async def disable(self, owner: str, push_jid: str, node: str | None) -> Sequence[Registration]:
        return await super().disable(owner, push_jid, node)


async def test_one_users_enable_and_disable_take_effect_in_the_order_sent() -> None:
    store = SlowEnables()
    direct = DirectMode(store, own_jids=frozenset({ME}), max_per_owner=3)
    enabling = asyncio.create_task(direct.enable(enable("n1")))
    disabling = asyncio.create_task(direct.disable(DisableCommand(ALICE, ME, "n1")))
    await asyncio.gather(enabling, disabling)
    assert await store.count() == 0


async def test_different_users_do_not_wait_for_each_other() -> None:
    store = SlowEnables()
    direct = DirectMode(store, own_jids=frozenset({ME}), max_per_owner=3)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.gather(
        *(direct.enable(enable("n1", owner=f"user{i}@example.org")) for i in range(10))
    )
    assert loop.time() - began < 0.4  # ten enables at 0.05 s each, run side by side
    assert await store.count() == 10


# ---------------------------------------------------------------- any form at all

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=80)
_fields = st.dictionaries(
    st.sampled_from(
        [
            "service",
            "device_id",
            "mode",
            "priority",
            "topic",
            "silent",
            "mutable_content",
            "time_to_live",
            "voip_device_id",
            "secret",
            "sound",
        ]
    ),
    st.one_of(_text, st.sampled_from(["apns", "fcm", APNS_TOKEN, FCM_TOKEN, "true", "high"])),
)


@settings(max_examples=300, deadline=None)
@given(options=_fields)
async def test_any_form_is_stored_or_refused_as_a_bad_request_and_never_half_stored(
    options: dict[str, str],
) -> None:
    store = MemoryStore()
    direct = DirectMode(store, own_jids=frozenset({ME}), max_per_owner=3)
    refusal: RequestError | None = None
    try:
        outcome = await direct.enable(enable("n1", options))
    except RequestError as error:
        refusal = error
    if refusal is not None:
        assert refusal.problem is RequestProblem.BAD_REQUEST
        assert await store.count() == 0
    else:
        assert outcome.registration.device() is not None
        assert await store.count() == 1
