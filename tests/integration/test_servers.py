"""The real-server fixtures work: a user enables push, goes offline, gets a message,
and the server publishes to a component exactly once, echoing the publish options.

The component here is bare slixmpp on purpose: these tests are about the servers
and the fixtures, not about xmpp-push's own component.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import secrets
import uuid
from collections.abc import AsyncIterator
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ComponentXMPP, Iq
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.servers import USERS, XmppServer
from xmpp_push.devtools.client import PUBLISH_OPTIONS, XmppClient
from xmpp_push.devtools.prosody import Prosody, ProsodyOptions

NS_COMPONENT = "jabber:component:accept"
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_DATA = "jabber:x:data"
NS_PUSH = "urn:xmpp:push:0"

PUBLISH_WAIT = 10.0
QUIET_PERIOD = 1.0
"""How long to watch for a second publish; both servers publish an offline message
within 40 ms (PROTOCOLS.md §1.4)."""

SERVERS = [
    pytest.param("prosody_server", marks=pytest.mark.prosody, id="prosody"),
    pytest.param("ejabberd_server", marks=pytest.mark.ejabberd, id="ejabberd"),
]


class PublishRecorder(ComponentXMPP):
    """A push component at its barest: keeps every publish, answers `result`."""

    def __init__(self, server: XmppServer) -> None:
        super().__init__(  # type: ignore[no-untyped-call]  # slixmpp leaves it unannotated
            server.options.component_jid,
            server.options.component_secret,
            server.host,
            server.component_port,
        )
        self.publishes: asyncio.Queue[Element] = asyncio.Queue()
        self.ready = asyncio.Event()
        self.register_handler(
            Callback(
                "publish",
                MatchXPath(f"{{{NS_COMPONENT}}}iq/{{{NS_PUBSUB}}}pubsub"),
                self._on_publish,
            )
        )
        self.add_event_handler("session_start", lambda _event: self.ready.set())

    def _on_publish(self, iq: StanzaBase) -> None:
        if not isinstance(iq, Iq) or iq["type"] != "set":
            return
        self.publishes.put_nowait(copy.deepcopy(iq.xml))
        reply = self.make_iq_result(iq["id"], ito=iq["from"], ifrom=iq["to"])
        reply.send()  # type: ignore[no-untyped-call]


@contextlib.asynccontextmanager
async def recording_component(server: XmppServer) -> AsyncIterator[PublishRecorder]:
    component = PublishRecorder(server)
    component.connect()
    try:
        await asyncio.wait_for(component.ready.wait(), 10)
        yield component
    finally:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(component.disconnect(wait=1), 2)
        # As in XmppClient: slixmpp leaves this task behind after a disconnect.
        if component._run_out_filters is not None:
            component._run_out_filters.cancel()


async def login(server: XmppServer, user: str) -> XmppClient:
    return await XmppClient.connect(server.jid(user), USERS[user], server.host, server.c2s_port)


def publish_options(publish: Element) -> dict[str, str]:
    form = publish.find(f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}publish-options/{{{NS_DATA}}}x")
    assert form is not None, "publish without publish-options"
    return {
        field.get("var", ""): field.findtext(f"{{{NS_DATA}}}value", "")
        for field in form.iter(f"{{{NS_DATA}}}field")
    }


@pytest.mark.parametrize("server_fixture", SERVERS)
async def test_offline_message_publishes_once_with_the_publish_options(
    server_fixture: str, request: pytest.FixtureRequest
) -> None:
    server: XmppServer = request.getfixturevalue(server_fixture)
    node = f"test-{uuid.uuid4().hex[:12]}"
    device_id = secrets.token_hex(32)
    fields = {"service": "apns", "device_id": device_id, "priority": "high"}
    component_jid = server.options.component_jid

    async with recording_component(server) as component:
        alice = await login(server, "alice")
        await alice.enable_push(component_jid, node, fields)
        await alice.close()

        bob = await login(server, "bob")
        try:
            await bob.send_message(server.jid("alice"), "are you there?")
            try:
                publish = await asyncio.wait_for(component.publishes.get(), PUBLISH_WAIT)
            except TimeoutError:
                pytest.fail(f"no publish within {PUBLISH_WAIT:g} s\n{server.log_tail(60)}")
            await asyncio.sleep(QUIET_PERIOD)
            assert component.publishes.empty(), "a second publish for one offline message"
        finally:
            await bob.close()

        # Tidy the shared server: alice collects her offline message, drops the node.
        alice = await login(server, "alice")
        try:
            stored = await alice.wait_for_message(5)
            await alice.disable_push(component_jid, node)
        finally:
            await alice.close()

    assert publish.tag == f"{{{NS_COMPONENT}}}iq"
    assert publish.get("type") == "set"
    assert publish.get("from") == server.options.domain  # the bare domain, never the user
    assert publish.get("to") == component_jid
    target = publish.find(f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}publish")
    assert target is not None
    assert target.get("node") == node
    assert target.find(f"{{{NS_PUBSUB}}}item/{{{NS_PUSH}}}notification") is not None
    assert publish_options(publish) == {"FORM_TYPE": PUBLISH_OPTIONS, **fields}
    assert stored.body == "are you there?"


@pytest.mark.parametrize("server_fixture", SERVERS)
async def test_every_fixture_account_can_log_in(
    server_fixture: str, request: pytest.FixtureRequest
) -> None:
    server: XmppServer = request.getfixturevalue(server_fixture)
    for user in USERS:
        client = await login(server, user)
        assert client.jid.startswith(server.jid(user) + "/")
        await client.close()


@pytest.mark.prosody
async def test_restarted_prosody_keeps_its_ports_and_accounts(fresh_prosody: Prosody) -> None:
    ports = (fresh_prosody.c2s_port, fresh_prosody.component_port)
    fresh_prosody.restart(ProsodyOptions(delegation=True, privilege=True))

    assert (fresh_prosody.c2s_port, fresh_prosody.component_port) == ports
    carol = await login(fresh_prosody, "carol")
    await carol.close()
    async with recording_component(fresh_prosody) as component:
        assert component.ready.is_set()
