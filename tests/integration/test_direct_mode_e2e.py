"""Direct mode end to end: a real Prosody or ejabberd delegates `urn:xmpp:push:0`
(XEP-0355) to the component, which answers clients' `<enable/>`/`<disable/>` and keeps
the registrations.

The component runs in-process with `install_direct_mode` over a MemoryStore; a real
client logs in and sends its enable without `to`, as phone apps do. What the client
gets back is asserted as each server really delivers it (docs/direct-mode.md):

* both servers pass the component's inner answer through to the client unchanged,
  errors included (type, condition and text);
* an error on the wrapper itself (a server not in `allowed_domains`) reaches a Prosody
  client as `cancel`/`service-unavailable`, and an ejabberd client not at all: ejabberd
  routes it with the wrapper's id, which the client never asked.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from xml.etree.ElementTree import Element, SubElement

import pytest
from structlog.testing import capture_logs

from tests.servers import COMPONENT_JID, DOMAIN, USERS
from xmpp_push.core.direct import DirectMode
from xmpp_push.core.model import Priority
from xmpp_push.core.registrations import Target
from xmpp_push.devtools.client import XmppClient, XmppStanzaError
from xmpp_push.devtools.prosody import ProsodyOptions
from xmpp_push.storage.memory import MemoryStore
from xmpp_push.xmpp.component import ComponentSettings, PushComponent
from xmpp_push.xmpp.delegation import DelegationHandler, install_direct_mode
from xmpp_push.xmpp.errors import StanzaError
from xmpp_push.xmpp.publish import PublishRequest

ALICE = f"alice@{DOMAIN}"
TOKEN = "ab" * 32
OTHER_TOKEN = "cd" * 32
NS_PUSH = "urn:xmpp:push:0"
DELEGATION_VERSION = {"prosody": "urn:xmpp:delegation:2", "ejabberd": "urn:xmpp:delegation:1"}


@dataclass
class Direct:
    kind: str
    server: Any
    component: PushComponent
    handler: DelegationHandler
    store: MemoryStore

    async def login(self, user: str = "alice") -> XmppClient:
        return await XmppClient.connect(
            f"{user}@{DOMAIN}", USERS[user], "127.0.0.1", self.server.c2s_port
        )


async def no_publishes(_request: PublishRequest) -> StanzaError | None:
    return StanzaError("cancel", "feature-not-implemented", "not in these tests")


@contextlib.asynccontextmanager
async def running(
    kind: str, server: Any, *, allowed_domains: frozenset[str] = frozenset({DOMAIN})
) -> AsyncIterator[Direct]:
    """The component with direct mode wired, connected to `server`."""
    store = MemoryStore()
    component = PushComponent(
        ComponentSettings(
            jid=COMPONENT_JID,
            secret=server.options.component_secret,
            port=server.component_port,
            allowed_domains=allowed_domains,
            reconnect_max_delay=0.5,
        ),
        no_publishes,
    )
    direct_mode = DirectMode(store, own_jids=frozenset({COMPONENT_JID}), max_per_owner=10)
    handler = install_direct_mode(component, direct_mode)
    component.start()
    try:
        await asyncio.wait_for(component.connected_event.wait(), 15)
        yield Direct(kind, server, component, handler, store)
    finally:
        await component.close()


@pytest.fixture(params=["prosody", "ejabberd"])
def delegating_server(request: pytest.FixtureRequest) -> tuple[str, Any]:
    if request.param == "prosody":
        make_prosody: Callable[..., Any] = request.getfixturevalue("make_prosody")
        server = make_prosody(
            ProsodyOptions(domain=DOMAIN, component_jid=COMPONENT_JID, delegation=True)
        )
    else:
        server = request.getfixturevalue("ejabberd_delegation_server")
    return request.param, server


@pytest.fixture
async def direct(delegating_server: tuple[str, Any]) -> AsyncIterator[Direct]:
    kind, server = delegating_server
    async with running(kind, server) as rig:
        # ejabberd delegates only once both disco#info queries are answered; the
        # advertisement follows, so this also proves the component answered them.
        granted = await rig.handler.wait_until_granted(DOMAIN, 15)
        assert granted == DELEGATION_VERSION[kind]
        yield rig


def apns(token: str = TOKEN, **more: str) -> dict[str, str]:
    return {"service": "apns", "device_id": token, **more}


async def raw_iq(client: XmppClient, kind: str, payload: Element, to: str | None = None) -> Element:
    """An IQ the test client has no method for (a `get`, a `to` of our choosing)."""
    session = client._session
    iq = session.make_iq_get(ito=to) if kind == "get" else session.make_iq_set(ito=to)
    iq.xml.append(payload)
    return await client._request(iq, 10.0)


# ---------------------------------------------------------------- accepted


async def test_enable_reaches_the_component_and_the_client_gets_result(direct: Direct) -> None:
    async with await direct.login() as alice:
        reply = await alice.enable_push(COMPONENT_JID, "n1", apns(priority="normal"))
        resource = alice.jid.partition("/")[2]
    assert (reply.get("type"), reply.get("from"), reply.get("to")) == (
        "result",
        ALICE,
        f"{ALICE}/{resource}",
    )
    [row] = await direct.store.list()
    assert (row.owner, row.resource, row.push_jid, row.node) == (
        ALICE,
        resource,
        COMPONENT_JID,
        "n1",
    )
    assert (row.target, row.token, row.client_priority) == (Target.APNS, TOKEN, Priority.NORMAL)


async def test_ejabberd_logs_the_delegation_once_disco_is_answered(
    ejabberd_delegation_server: Any,
) -> None:
    async with running("ejabberd", ejabberd_delegation_server) as rig:
        await rig.handler.wait_until_granted(DOMAIN, 15)
    assert (
        "Namespace 'urn:xmpp:push:0' is delegated to external component 'push.localhost'"
        in ejabberd_delegation_server.log_text()
    )


async def test_disable_with_a_node_removes_that_registration(direct: Direct) -> None:
    async with await direct.login() as alice:
        await alice.enable_push(COMPONENT_JID, "n1", apns(TOKEN))
        await alice.enable_push(COMPONENT_JID, "n2", apns(OTHER_TOKEN))
        reply = await alice.disable_push(COMPONENT_JID, "n1")
    assert reply.get("type") == "result"
    assert [row.node for row in await direct.store.list()] == ["n2"]


async def test_disable_without_a_node_removes_every_registration_for_the_push_jid(
    direct: Direct,
) -> None:
    async with await direct.login() as alice:
        await alice.enable_push(COMPONENT_JID, "n1", apns(TOKEN))
        await alice.enable_push(COMPONENT_JID, "n2", apns(OTHER_TOKEN))
        await alice.enable_push("push.example.net", "n3", {"secret": "x"})
        reply = await alice.disable_push(COMPONENT_JID)
    assert reply.get("type") == "result"
    assert [(row.push_jid, row.node) for row in await direct.store.list()] == [
        ("push.example.net", "n3")
    ]


async def test_an_enable_naming_another_jid_is_stored_as_forward(direct: Direct) -> None:
    options = {"secret": "s3cr3t", "endpoint": "https://push.example.net/x"}
    async with await direct.login() as alice:
        reply = await alice.enable_push("push.example.net", "n7", options)
    assert reply.get("type") == "result"
    [row] = await direct.store.list()
    assert (row.owner, row.push_jid, row.node, row.target, row.token) == (
        ALICE,
        "push.example.net",
        "n7",
        Target.FORWARD,
        None,
    )
    assert dict(row.options) == options


# ---------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("node", "fields", "text"),
    [
        pytest.param("", apns(), "node is missing", id="no-node"),
        pytest.param(
            "n1", {"service": "apns"}, "publish-options: device_id is missing", id="no-device_id"
        ),
        pytest.param(
            "n1", {"device_id": TOKEN}, "publish-options: service is missing", id="no-service"
        ),
        pytest.param(
            "n1",
            {"service": "pigeon", "device_id": TOKEN},
            "publish-options: unknown service 'pigeon' (expected apns or fcm)",
            id="bad-service",
        ),
        pytest.param(
            "n1",
            apns("not-a-token"),
            "publish-options: device_id is not an APNs device token (hex digits expected)",
            id="bad-token",
        ),
        pytest.param(
            "n1",
            apns(priority="urgent"),
            "publish-options: unknown priority 'urgent' (expected high or normal)",
            id="bad-priority",
        ),
        pytest.param(
            "n1",
            apns(silent="maybe"),
            "publish-options: silent must be true or false",
            id="bad-silent",
        ),
    ],
)
async def test_a_bad_enable_reaches_the_client_as_our_bad_request_and_nothing_is_stored(
    direct: Direct, node: str, fields: Mapping[str, str], text: str
) -> None:
    async with await direct.login() as alice:
        with pytest.raises(XmppStanzaError) as caught:
            await alice.enable_push(COMPONENT_JID, node, fields)
    error = caught.value
    assert (error.error_type, error.condition, error.text) == ("modify", "bad-request", text)
    assert error.stanza.get("from") == ALICE
    assert await direct.store.count() == 0


async def test_an_iq_get_reaches_the_client_as_not_allowed(direct: Direct) -> None:
    enable = Element(f"{{{NS_PUSH}}}enable", {"jid": COMPONENT_JID, "node": "n1"})
    async with await direct.login() as alice:
        with pytest.raises(XmppStanzaError) as caught:
            await raw_iq(alice, "get", enable)
    assert (caught.value.error_type, caught.value.condition) == ("cancel", "not-allowed")
    assert await direct.store.count() == 0


async def test_an_enable_sent_to_another_users_account_is_not_allowed(direct: Direct) -> None:
    # Both servers forward IQs to any local bare JID to the delegate (the `:bare:` route).
    disable = Element(f"{{{NS_PUSH}}}disable", {"jid": COMPONENT_JID})
    async with await direct.login("bob") as bob:
        await bob.enable_push(COMPONENT_JID, "n1", apns())
    async with await direct.login() as alice:
        with pytest.raises(XmppStanzaError) as caught:
            await raw_iq(alice, "set", disable, to=f"bob@{DOMAIN}")
    assert (caught.value.error_type, caught.value.condition) == ("cancel", "not-allowed")
    assert [row.owner for row in await direct.store.list()] == [f"bob@{DOMAIN}"]


async def test_another_push_element_is_not_implemented(direct: Direct) -> None:
    payload = Element(f"{{{NS_PUSH}}}frobnicate")
    SubElement(payload, "{urn:example}anything")
    async with await direct.login() as alice:
        with pytest.raises(XmppStanzaError) as caught:
            await raw_iq(alice, "set", payload)
    assert (caught.value.error_type, caught.value.condition) == (
        "cancel",
        "feature-not-implemented",
    )


async def test_a_server_not_in_allowed_domains_is_refused_and_its_client_told_so_or_not(
    delegating_server: tuple[str, Any],
) -> None:
    kind, server = delegating_server
    with capture_logs() as logs:
        async with running(kind, server, allowed_domains=frozenset({"other.example"})) as rig:
            # The server delegated (disco answered) but the component ignores it.
            await until(lambda: any(e["event"] == "delegation_ignored" for e in logs))
            await refused_enable(kind, rig)
            assert rig.handler.granted == {}
            assert await rig.store.count() == 0


async def refused_enable(kind: str, rig: Direct) -> None:
    async with await rig.login() as alice:
        if kind == "prosody":
            with pytest.raises(XmppStanzaError) as caught:
                await alice.enable_push(COMPONENT_JID, "n1", apns())
            assert (caught.value.error_type, caught.value.condition) == (
                "cancel",
                "service-unavailable",
            )
        else:
            # ejabberd routes the wrapper's error with the wrapper's id: no answer.
            with pytest.raises(TimeoutError):
                await alice.enable_push(COMPONENT_JID, "n1", apns(), timeout=3)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_after_the_component_left_enables_are_answered_service_unavailable(
    delegating_server: tuple[str, Any],
) -> None:
    kind, server = delegating_server
    async with running(kind, server) as rig:
        await rig.handler.wait_until_granted(DOMAIN, 15)
    async with await XmppClient.connect(
        ALICE, USERS["alice"], "127.0.0.1", server.c2s_port
    ) as alice:
        with pytest.raises(XmppStanzaError) as caught:
            await alice.enable_push(COMPONENT_JID, "n1", apns())
    assert (caught.value.error_type, caught.value.condition) == ("cancel", "service-unavailable")
    if kind == "ejabberd":
        # The delegation went with the component, and mod_push's handler with it.
        assert caught.value.text == "No module is handling this query"
