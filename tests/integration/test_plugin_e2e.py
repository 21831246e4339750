"""Direct mode end to end with the server plugins (issue 5, cases 1 to 6).

A real Prosody or ejabberd delegates `urn:xmpp:push:0` to the component and runs the
project's plugin (plugins/); the component runs in-process as `xmpp-push run` builds
it, on SQLite, with the APNs stand-in. Clients are real XMPP clients with XEP-0198.
Each test asserts what reaches the stand-in (or the remote app server), and that the
client gets its messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element

import pytest
from slixmpp import ComponentXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath
from structlog.testing import capture_logs

from tests.rig import component_config, running_component
from tests.servers import COMPONENT_JID, DOMAIN, USERS, require_server, started_with_users
from tests.servers.ejabberd import Ejabberd, EjabberdOptions
from tests.standins.apns import ApnsRequest, ApnsStandIn
from xmpp_push.app import Application
from xmpp_push.devtools.client import XmppClient
from xmpp_push.devtools.prosody import Prosody, ProsodyOptions

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
REMOTE_JID = "remote.localhost"
REMOTE_SECRET = "s3cret-remote"
UNDECIDED_DELAY = 2.0
COALESCE_WINDOW = 2.0
NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_DATA = "jabber:x:data"


def token(n: int) -> str:
    return f"{n:02x}" * 32


@pytest.fixture(scope="module")
def ejabberd_with_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ejabberd]:
    require_server("ejabberdctl", "ejabberd")
    server = Ejabberd(
        tmp_path_factory.mktemp("ejabberd-plugin"),
        EjabberdOptions(
            domain=DOMAIN,
            component_jid=COMPONENT_JID,
            component_secret="s3cret-ep",
            delegation=True,
            xmpp_push_plugin=True,
            ack_timeout=120,
            extra_components={REMOTE_JID: REMOTE_SECRET},
        ),
    )
    with started_with_users(server):
        yield server


@pytest.fixture(params=["prosody", "ejabberd"])
def plugin_server(request: pytest.FixtureRequest) -> Any:
    if request.param == "prosody":
        return request.getfixturevalue("make_prosody")(
            ProsodyOptions(
                domain=DOMAIN,
                component_jid=COMPONENT_JID,
                delegation=True,
                xmpp_push_plugin=True,
                extra_components={REMOTE_JID: REMOTE_SECRET},
            )
        )
    return request.getfixturevalue("ejabberd_with_plugin")


@dataclass
class Rig:
    server: Prosody | Ejabberd
    app: Application
    apns: ApnsStandIn

    async def login(self, user: str = "alice", resource: str | None = None) -> XmppClient:
        jid = f"{user}@{DOMAIN}" + (f"/{resource}" if resource else "")
        return await XmppClient.connect(
            jid, USERS[user], "127.0.0.1", self.server.c2s_port, stream_management=True
        )

    async def enable(self, client: XmppClient, node: str, device: str, **more: str) -> None:
        await client.enable_push(
            COMPONENT_JID, node, {"service": "apns", "device_id": device, **more}
        )

    async def received(self, client: XmppClient, body: str) -> None:
        """Wait until `client` receives a message with `body` (the session ejabberd
        server is shared: offline messages of earlier tests may come first)."""
        while (await client.wait_for_message()).body != body:
            pass

    def pushes(self) -> Counter[str]:
        return Counter(request.token for request in self.apns.requests)

    async def wait_for_pushes(self, n: int, timeout: float = 5.0) -> list[ApnsRequest]:
        return await self.apns.wait_for_requests(n, timeout)

    async def no_more_pushes(self, than: int, within: float) -> None:
        await asyncio.sleep(within)
        assert len(self.apns.requests) == than, [r.token[:4] for r in self.apns.requests]


@pytest.fixture
async def rig(plugin_server: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    async with ApnsStandIn(tmp_path / "apns") as apns:
        config = component_config(
            tmp_path,
            jid=COMPONENT_JID,
            port=plugin_server.component_port,
            secret=plugin_server.options.component_secret,
            apns=apns,
            policy={"undecided_delay": UNDECIDED_DELAY, "coalesce_window": COALESCE_WINDOW},
        )
        async with running_component(config) as app:
            await app.delegation.wait_until_granted(DOMAIN, 15)
            await asyncio.wait_for(app.plugin_link.configured.wait(), 10)
            assert DOMAIN in app.plugin_link.plugins, "the plugin did not answer configure"
            yield Rig(plugin_server, app, apns)


async def test_offline_user_gets_one_push_per_registration(rig: Rig) -> None:
    """Case 1."""
    phone = await rig.login(resource="phone")
    tablet = await rig.login(resource="tablet")
    await rig.enable(phone, "n-phone", token(1))
    await rig.enable(tablet, "n-tablet", token(2))
    await phone.close()
    await tablet.close()
    async with await rig.login("bob") as bob:
        await bob.send_message(ALICE, "are you there?")
        await rig.wait_for_pushes(2)
    await rig.no_more_pushes(than=2, within=1.0)
    assert rig.pushes() == Counter({token(1): 1, token(2): 1})


@pytest.mark.parametrize("rst", [True, False], ids=["rst", "fin"])
async def test_a_cut_connection_wakes_only_that_clients_registration(rig: Rig, rst: bool) -> None:
    """Case 2."""
    phone = await rig.login(resource="phone")
    laptop = await rig.login(resource="laptop")
    try:
        await rig.enable(phone, "n-phone", token(3))
        await rig.enable(laptop, "n-laptop", token(4))
        await phone.cut(rst=rst)
        await asyncio.sleep(0.5)  # the server notices the cut
        async with await rig.login("bob") as bob:
            await bob.send_message(ALICE, "ping")
            (push,) = await rig.wait_for_pushes(1)
        assert push.token == token(3)
        await rig.no_more_pushes(than=1, within=UNDECIDED_DELAY + 1.0)
        await phone.resume()
        await rig.received(phone, "ping")
    finally:
        await phone.close()
        await laptop.close()


async def test_an_undecided_client_is_woken_after_the_delay_and_keeps_its_session(
    rig: Rig,
) -> None:
    """Case 3."""
    phone = await rig.login(resource="phone")
    try:
        await rig.enable(phone, "n-phone", token(5))
        phone.stop_reading()
        async with await rig.login("bob") as bob:
            sent = time.monotonic()
            await bob.send_message(ALICE, "hello?")
            (push,) = await rig.wait_for_pushes(1, timeout=UNDECIDED_DELAY + 5)
            waited = time.monotonic() - sent
        assert push.token == token(5)
        assert UNDECIDED_DELAY - 0.5 <= waited <= UNDECIDED_DELAY + 3.0, waited
        phone.start_reading()
        await rig.received(phone, "hello?")
        await rig.no_more_pushes(than=1, within=3.0)
    finally:
        await phone.close()


async def test_a_client_that_acknowledges_is_never_woken(rig: Rig) -> None:
    """Case 4."""
    phone = await rig.login(resource="phone")
    try:
        await rig.enable(phone, "n-phone", token(6))
        async with await rig.login("bob") as bob:
            for n in range(100):
                await bob.send_message(ALICE, f"message {n}")
            await rig.received(phone, "message 99")
        await rig.no_more_pushes(than=0, within=UNDECIDED_DELAY + 1.5)
    finally:
        await phone.close()


async def test_a_burst_to_a_hibernated_client_is_one_push_with_the_count(rig: Rig) -> None:
    """Case 5."""
    phone = await rig.login(resource="phone")
    try:
        await rig.enable(phone, "n-phone", token(7))
        await phone.cut()
        await asyncio.sleep(0.5)
        async with await rig.login("bob") as bob:
            for n in range(20):
                await bob.send_message(ALICE, f"burst {n}")
            await rig.wait_for_pushes(1)
            await asyncio.sleep(COALESCE_WINDOW + 1.0)
        badges = [request.payload["aps"]["badge"] for request in rig.apns.requests]
        # One push at once (badge 1), then one for the rest of the window with the
        # count of the whole burst: never one per message.
        assert len(badges) <= 2, badges
        assert badges[-1] == 20, badges
        await rig.no_more_pushes(than=len(badges), within=COALESCE_WINDOW)
    finally:
        await phone.close()


class RemoteAppServer(ComponentXMPP):
    """Stands in for another XEP-0357 app server on the same XMPP server."""

    def __init__(self, port: int) -> None:
        super().__init__(REMOTE_JID, REMOTE_SECRET, "127.0.0.1", port)  # type: ignore[no-untyped-call]
        self.publishes: asyncio.Queue[Element] = asyncio.Queue()
        self.connected_event = asyncio.Event()
        self.register_handler(
            Callback(
                "publish",
                MatchXPath(f"{{jabber:component:accept}}iq/{{{NS_PUBSUB}}}pubsub"),
                self._on_publish,
            )
        )
        self.add_event_handler("session_start", lambda _: self.connected_event.set())

    def _on_publish(self, iq: Any) -> None:
        xml: Element = iq.xml
        if xml.get("type") != "set":
            return
        self.publishes.put_nowait(xml)
        self.send_raw(
            f"<iq type='result' id='{xml.get('id')}' from='{REMOTE_JID}' to='{xml.get('from')}'/>"
        )


def form_fields(form: Element | None) -> dict[str, str | None]:
    assert form is not None
    return {
        field.get("var", ""): field.findtext(f"{{{NS_DATA}}}value")
        for field in form.iter(f"{{{NS_DATA}}}field")
    }


async def test_a_forward_registration_gets_a_standard_publish(rig: Rig) -> None:
    """Case 6."""
    remote = RemoteAppServer(rig.server.component_port)
    remote.connect()
    try:
        await asyncio.wait_for(remote.connected_event.wait(), 10)
        phone = await rig.login(resource="phone")
        await phone.enable_push(REMOTE_JID, "fw-node", {"secret": "s3", "app": "org.example"})
        await phone.close()
        async with await rig.login("bob") as bob:
            await bob.send_message(ALICE, "for the other app server")
            publish = await asyncio.wait_for(remote.publishes.get(), 10)
        assert publish.get("from") == COMPONENT_JID
        item = publish.find(f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}publish")
        assert item is not None
        assert item.get("node") == "fw-node"
        summary = item.find(f"{{{NS_PUBSUB}}}item/{{urn:xmpp:push:0}}notification/{{{NS_DATA}}}x")
        assert form_fields(summary)["FORM_TYPE"] == "urn:xmpp:push:summary"
        assert form_fields(summary)["message-count"] == "1"
        options = publish.find(
            f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}publish-options/{{{NS_DATA}}}x"
        )
        assert form_fields(options) == {
            "FORM_TYPE": "http://jabber.org/protocol/pubsub#publish-options",
            "secret": "s3",
            "app": "org.example",
        }
        assert rig.apns.requests == []
        for _ in range(50):
            [row] = [r for r in await rig.app.store.for_owner(ALICE) if r.node == "fw-node"]
            if row.last_success_at is not None:
                break
            await asyncio.sleep(0.05)
        assert row.last_success_at is not None
    finally:
        remote.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(remote.disconnected, 3)


async def test_a_call_invitation_goes_to_the_voip_token(rig: Rig) -> None:
    phone = await rig.login(resource="phone")
    await rig.enable(phone, "n-phone", token(8), voip_device_id=token(9), topic="org.example.chat")
    await phone.close()
    async with await rig.login("bob") as bob:
        bob._session.send_raw(
            f"<message to='{ALICE}' type='chat' id='call-1'>"
            "<propose xmlns='urn:xmpp:jingle-message:0' id='c1'>"
            "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>"
            "</message>"
        )
        (push,) = await rig.wait_for_pushes(1)
    assert push.token == token(9)
    assert push.headers["apns-push-type"] == "voip"
    assert push.headers["apns-topic"] == "org.example.chat.voip"


async def test_without_the_plugin_enables_work_and_the_operator_is_warned(
    make_prosody: Any, tmp_path: Path
) -> None:
    server = make_prosody(
        ProsodyOptions(domain=DOMAIN, component_jid=COMPONENT_JID, delegation=True)
    )
    config = component_config(
        tmp_path,
        jid=COMPONENT_JID,
        port=server.component_port,
        secret=server.options.component_secret,
    )
    with capture_logs() as logs:
        async with running_component(config) as app:
            await app.delegation.wait_until_granted(DOMAIN, 15)
            await asyncio.wait_for(app.plugin_link.configured.wait(), 10)
            client = await XmppClient.connect(ALICE, USERS["alice"], "127.0.0.1", server.c2s_port)
            async with client:
                await client.enable_push(
                    COMPONENT_JID, "n1", {"service": "apns", "device_id": token(1)}
                )
            assert [row.node for row in await app.store.for_owner(ALICE)] == ["n1"]
    assert any(
        entry["event"] == "direct_mode_without_plugin" and entry.get("server") == DOMAIN
        for entry in logs
    )
