"""The plugin protocol (docs/plugin-protocol.md) as both server plugins keep it:
plugins/prosody/mod_xmpp_push.lua in a real Prosody 0.12 and
plugins/ejabberd/mod_xmpp_push.erl in a real ejabberd 23.01, seen from the component.

Every test runs once against each: the module-scoped `server` fixture is parametrized
over `KINDS`, and starts one server of each kind for the whole module
(tests/pluginpeer.py says with which options). A `PluginPeer` stands in for xmpp-push:
it configures and arms and records every `<notify/>` exactly as it came over the wire.
Where the servers legitimately differ in a detail, the expectation is parametrized
by `kind` explicitly (`SERVER_SOFTWARE`). What only one server does stays in
test_prosody_plugin.py or test_ejabberd_plugin.py.

Isolation on the shared server (the stricter rules of both files): session tests use
alice and address her *full* JID, so that sessions left behind by earlier tests
(hibernated, armed, kept for an hour) never receive another test's messages; offline
tests use carol, who never logs in; unarmed sessions are never cut (on ejabberd a
session that times out sends its unacknowledged messages to offline storage, and the
plugin would rightly report them).

Hibernated sessions are the cheapest way to see the plugin judge a stanza: a stanza
queued for an armed hibernated session is reported at once, with no delay to wait out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from xml.etree.ElementTree import Element, SubElement

import pytest

from tests.pluginpeer import (
    NOTIFY_WAIT,
    NS_PLUGIN,
    OTHER_COMPONENT,
    OTHER_SECRET,
    UNDECIDED_DELAY_MS,
    PluginPeer,
    armed,
    connected_peer,
    ejabberd_plugin_server,
    error_of,
    hibernated_alice,
    knobs,
    logged_in,
    next_notify,
    prosody_plugin_server,
    reload_plugin,
    running_peer,
)
from tests.servers import COMPONENT_JID, DOMAIN, XmppServer
from xmpp_push.devtools.client import MessageType, XmppStanzaError

KINDS = [
    pytest.param("prosody", marks=pytest.mark.prosody),
    pytest.param("ejabberd", marks=pytest.mark.ejabberd),
]
SERVER_SOFTWARE = {"prosody": "Prosody 0.12.", "ejabberd": "ejabberd 23.01"}
"""How the `server` attribute of `<plugin/>` begins, by kind."""
QUIET = 1.0
"""How long to watch for an unwanted notify where one would come at once (a hibernated
or offline notify takes milliseconds)."""
UNDECIDED_WATCH = UNDECIDED_DELAY_MS / 1000 + 1.5
"""How long to watch for an unwanted undecided notify: the delay and a margin."""

NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
NS_RECEIPTS = "urn:xmpp:receipts"
NS_OMEMO = "eu.siacs.conversations.axolotl"
NS_JINGLE_MESSAGE = "urn:xmpp:jingle-message:0"
NS_REFERENCE = "urn:xmpp:reference:0"


@pytest.fixture(scope="module", params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Which server: "prosody" or "ejabberd"."""
    return str(request.param)


@pytest.fixture(scope="module")
def server(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[XmppServer]:
    start = prosody_plugin_server if kind == "prosody" else ejabberd_plugin_server
    with start(tmp_path_factory.mktemp(f"{kind}-contract")) as running:
        yield running


@pytest.fixture
async def peer(server: XmppServer) -> AsyncIterator[PluginPeer]:
    """The component, connected, having sent `configure` with `knobs()`."""
    async with connected_peer(server) as p:
        yield p


def body_of(notify: Element) -> str | None:
    return notify.findtext(f"{{{NS_PLUGIN}}}body")


# --- configure -------------------------------------------------------------------------


async def test_configure_is_answered_with_the_plugin(kind: str, server: XmppServer) -> None:
    async with running_peer(
        COMPONENT_JID, server.options.component_secret, server.host, server.component_port
    ) as p:
        answer = await p.configure(DOMAIN, **knobs())

    assert answer.get("type") == "result"
    assert answer.get("from") == DOMAIN
    plugin = answer.find(f"{{{NS_PLUGIN}}}plugin")
    assert plugin is not None
    assert (plugin.get("version"), plugin.get("name")) == ("1", "mod_xmpp_push")
    assert (plugin.get("server") or "").startswith(SERVER_SOFTWARE[kind])


async def test_configure_with_an_invalid_knob_is_a_bad_request(peer: PluginPeer) -> None:
    answer = await peer.configure(DOMAIN, **knobs(undecided_delay="soon"))

    assert error_of(answer) == ("modify", "bad-request")


async def test_restarted_plugin_asks_the_connected_component_for_configure(
    server: XmppServer,
) -> None:
    """The get path: the component is up when the plugin starts, so the plugin asks,
    and follows the answer (here include-body, seen in the next notify)."""
    async with running_peer(
        COMPONENT_JID,
        server.options.component_secret,
        server.host,
        server.component_port,
        knobs={name.replace("_", "-"): value for name, value in knobs(include_body="true").items()},
    ) as p:
        await p.configure(DOMAIN, **knobs())  # include-body false until the answer
        await asyncio.to_thread(reload_plugin, server)
        get = await asyncio.wait_for(p.configure_gets.get(), NOTIFY_WAIT)
        async with logged_in(server, "bob") as bob:
            await bob.send_message(server.jid("carol"), "configured by the answer")
            notify = await next_notify(p, server)

    assert (get.get("type"), get.get("from"), get.get("to")) == ("get", DOMAIN, COMPONENT_JID)
    assert body_of(notify) == "configured by the answer"


# --- arm, disarm, who may ask ----------------------------------------------------------


async def test_arm_from_a_client_is_forbidden(server: XmppServer, peer: PluginPeer) -> None:
    async with logged_in(server, "alice") as alice, logged_in(server, "bob") as bob:
        iq = bob._session.make_iq_set(ito=DOMAIN)
        SubElement(iq.xml, f"{{{NS_PLUGIN}}}arm").set("jid", alice.jid)
        with pytest.raises(XmppStanzaError) as refused:
            await bob._request(iq, 10)

    assert (refused.value.error_type, refused.value.condition) == ("auth", "forbidden")


async def test_arm_from_another_component_is_forbidden(
    server: XmppServer, peer: PluginPeer
) -> None:
    async with (
        logged_in(server, "alice") as alice,
        running_peer(OTHER_COMPONENT, OTHER_SECRET, server.host, server.component_port) as other,
    ):
        answer = await other.arm(alice.jid)

    assert error_of(answer) == ("auth", "forbidden")


@pytest.mark.parametrize(
    "request_xml",
    [
        f"<arm xmlns='{NS_PLUGIN}'/>",
        f"<arm xmlns='{NS_PLUGIN}' jid='alice@{DOMAIN}'/>",  # arm needs a full JID
        f"<arm xmlns='{NS_PLUGIN}' jid='alice@elsewhere.example/phone'/>",
        f"<disarm xmlns='{NS_PLUGIN}' jid='@@'/>",
    ],
    ids=["no-jid", "bare-jid", "other-domain", "invalid-jid"],
)
async def test_malformed_arm_or_disarm_is_a_bad_request(peer: PluginPeer, request_xml: str) -> None:
    answer = await peer.request(DOMAIN, request_xml)

    assert error_of(answer) == ("modify", "bad-request")


async def test_arm_of_a_session_that_does_not_exist_is_answered_result(peer: PluginPeer) -> None:
    answer = await peer.arm(f"alice@{DOMAIN}/gone")

    assert answer.get("type") == "result"


# --- offline ---------------------------------------------------------------------------


async def test_message_to_a_user_without_session_is_reported_offline_once(
    server: XmppServer, peer: PluginPeer
) -> None:
    """Once: ejabberd stores the message twice (MAM and offline storage)."""
    async with logged_in(server, "bob") as bob:
        await bob.send_message(server.jid("carol"), "are you there?")
        notify = await next_notify(peer, server)
        await peer.no_notify(QUIET)

    assert notify.attrib == {
        "user": server.jid("carol"),
        "state": "offline",
        "count": "1",
        "sender": bob.jid,
        "type": "chat",
        "encrypted": "false",
        "call": "false",
        "mention": "false",
    }
    assert notify.find(f"{{{NS_PLUGIN}}}body") is None


async def test_offline_notify_follows_include_body_and_include_sender(
    server: XmppServer, peer: PluginPeer
) -> None:
    await peer.configure(DOMAIN, **knobs(include_body="true", include_sender="false"))
    async with logged_in(server, "bob") as bob:
        await bob.send_message(server.jid("carol"), "dinner at eight?")
        notify = await next_notify(peer, server)

    assert body_of(notify) == "dinner at eight?"
    assert "sender" not in notify.attrib


# --- hibernated ------------------------------------------------------------------------


@pytest.mark.parametrize("rst", [True, False], ids=["rst", "fin"])
async def test_message_to_a_hibernated_armed_session_is_reported_and_resent(
    server: XmppServer, peer: PluginPeer, rst: bool
) -> None:
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.cut(rst=rst)
        await bob.send_message(alice.jid, "wake up")
        notify = await next_notify(peer, server)
        await peer.no_notify(QUIET)
        await alice.resume()
        resent = await alice.wait_for_message()

    user, resource = alice.jid.split("/", 1)
    assert notify.attrib == {
        "user": user,
        "resource": resource,
        "state": "hibernated",
        "count": "1",
        "sender": bob.jid,
        "type": "chat",
        "encrypted": "false",
        "call": "false",
        "mention": "false",
    }
    assert resent.body == "wake up"


async def test_resumed_session_stays_armed(server: XmppServer, peer: PluginPeer) -> None:
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.cut()
        await alice.resume()
        await alice.cut()  # the resumed session, never armed by itself
        await bob.send_message(alice.jid, "after the resumption")
        notify = await next_notify(peer, server)
        await alice.resume()
        await alice.wait_for_message()

    assert (notify.get("state"), notify.get("resource")) == ("hibernated", alice.jid.split("/")[1])


async def test_armed_session_hibernating_with_unacked_messages_reports_their_count(
    server: XmppServer, peer: PluginPeer
) -> None:
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        for n in range(3):
            await bob.send_message(alice.jid, f"unread {n}")
        await asyncio.sleep(0.5)  # well within undecided-delay
        await alice.cut()
        notify = await next_notify(peer, server)
        await peer.no_notify(QUIET)
        await alice.resume()
        resent = [(await alice.wait_for_message()).body for _ in range(3)]

    assert (notify.get("state"), notify.get("count")) == ("hibernated", "3")
    assert resent == ["unread 0", "unread 1", "unread 2"]


# --- undecided -------------------------------------------------------------------------


async def test_unacknowledged_message_is_reported_undecided_once_after_the_delay(
    server: XmppServer, peer: PluginPeer
) -> None:
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        await bob.send_message(alice.jid, "still there?")
        sent = time.monotonic()
        notify = await next_notify(peer, server)
        waited = time.monotonic() - sent
        alice.start_reading()
        received = await alice.wait_for_message()  # the connection was kept
        await peer.no_notify(3.0)

    assert 1.5 <= waited <= 4.0, f"undecided after {waited:.2f} s"
    assert notify.get("state") == "undecided"
    assert notify.get("resource") == alice.jid.split("/", 1)[1]
    assert notify.get("count") == "1"
    assert received.body == "still there?"


async def test_further_messages_to_an_undecided_session_are_reported_at_once(
    server: XmppServer, peer: PluginPeer
) -> None:
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        await bob.send_message(alice.jid, "first")
        await bob.send_message(alice.jid, "second")
        first = await next_notify(peer, server)
        await bob.send_message(alice.jid, "third")
        sent = time.monotonic()
        further = await next_notify(peer, server)
        waited = time.monotonic() - sent
        alice.start_reading()
        for _ in range(3):
            await alice.wait_for_message()

    assert (first.get("state"), first.get("count")) == ("undecided", "2")
    assert (further.get("state"), further.get("count")) == ("undecided", "1")
    assert waited < 1.0, f"reported after {waited:.2f} s"


async def test_once_acknowledged_an_undecided_session_waits_the_whole_delay_again(
    server: XmppServer, peer: PluginPeer
) -> None:
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        await bob.send_message(alice.jid, "first")
        await next_notify(peer, server)
        alice.start_reading()
        await alice.wait_for_message()
        await asyncio.sleep(0.3)  # the acknowledgement reaches the server
        alice.stop_reading()
        await bob.send_message(alice.jid, "second")
        await bob.send_message(alice.jid, "third")
        sent = time.monotonic()
        again = await next_notify(peer, server)
        waited = time.monotonic() - sent
        alice.start_reading()
        for _ in range(2):
            await alice.wait_for_message()

    assert (again.get("state"), again.get("count")) == ("undecided", "2")
    assert waited >= 1.5, f"reported after {waited:.2f} s, not after the delay"


async def test_each_message_is_given_the_whole_delay(server: XmppServer, peer: PluginPeer) -> None:
    """The delay runs from each message's sending: one sent after an earlier one was
    acknowledged is not reported when the earlier one's delay is over."""
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        await bob.send_message(alice.jid, "first")
        await asyncio.sleep(1.0)
        alice.start_reading()
        await alice.wait_for_message()
        await asyncio.sleep(0.3)  # the acknowledgement reaches the server
        alice.stop_reading()
        await bob.send_message(alice.jid, "second")
        sent = time.monotonic()  # "first"'s delay ends 0.7 s from here
        notify = await next_notify(peer, server)
        waited = time.monotonic() - sent
        alice.start_reading()
        await alice.wait_for_message()

    assert notify.get("count") == "1"
    assert waited >= 1.5, f"reported after {waited:.2f} s, not after the delay"


async def test_session_that_acknowledges_is_never_reported(
    server: XmppServer, peer: PluginPeer
) -> None:
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        for n in range(100):
            await bob.send_message(alice.jid, f"message {n}")
        for _ in range(100):
            await alice.wait_for_message()
        await peer.no_notify(UNDECIDED_DELAY_MS / 1000 + 1.0)


# --- unarmed and disarmed sessions -----------------------------------------------------


async def test_unarmed_session_is_never_reported(server: XmppServer, peer: PluginPeer) -> None:
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        alice.stop_reading()
        await bob.send_message(alice.jid, "nobody watches this session")
        await peer.no_notify(UNDECIDED_WATCH)
        alice.start_reading()
        await alice.wait_for_message()


@pytest.mark.parametrize("whom", ["full", "bare"])
async def test_disarmed_session_is_no_longer_reported(
    server: XmppServer, peer: PluginPeer, whom: str
) -> None:
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        answer = await peer.disarm(alice.jid if whom == "full" else server.jid("alice"))
        assert answer.get("type") == "result"
        alice.stop_reading()
        await bob.send_message(alice.jid, "disarmed")
        await peer.no_notify(UNDECIDED_WATCH)
        alice.start_reading()
        await alice.wait_for_message()


# --- what is push-worthy ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_type", "payload", "body"),
    [
        ("chat", f"<composing xmlns='{NS_CHATSTATES}'/>", ""),
        ("chat", f"<received xmlns='{NS_RECEIPTS}' id='m1'/>", ""),
        ("headline", "", "breaking news"),
        # OMEMO key transport: an <encrypted/> with no <payload/> carries no message.
        ("chat", f"<encrypted xmlns='{NS_OMEMO}'><header sid='1'/></encrypted>", ""),
    ],
    ids=["chat-state", "receipt", "headline", "omemo-key-transport"],
)
async def test_stanza_that_is_not_push_worthy_is_not_reported(
    server: XmppServer, peer: PluginPeer, message_type: MessageType, payload: str, body: str
) -> None:
    await peer.configure(DOMAIN, **knobs(include_body="true"))
    async with hibernated_alice(server, peer) as (alice, bob):
        await bob.send_message(
            alice.jid,
            body,
            message_type=message_type,
            payload=[payload] if payload else [],
        )
        await bob.send_message(alice.jid, "worth it")
        notify = await next_notify(peer, server)
        await peer.no_notify(QUIET)

    assert body_of(notify) == "worth it"  # the first one was skipped


async def test_omemo_message_is_reported_encrypted_without_its_fallback_body(
    server: XmppServer, peer: PluginPeer
) -> None:
    await peer.configure(DOMAIN, **knobs(include_body="true"))
    async with hibernated_alice(server, peer) as (alice, bob):
        await bob.send_message(
            alice.jid,
            "I sent you an OMEMO encrypted message.",
            payload=[
                f"<encrypted xmlns='{NS_OMEMO}'><header sid='1'><iv>AAAA</iv></header>"
                "<payload>c2VjcmV0</payload></encrypted>"
            ],
        )
        notify = await next_notify(peer, server)

    assert (notify.get("encrypted"), notify.get("call")) == ("true", "false")
    assert body_of(notify) is None


async def test_jingle_call_proposal_is_reported_as_call(
    server: XmppServer, peer: PluginPeer
) -> None:
    async with hibernated_alice(server, peer) as (alice, bob):
        await bob.send_message(
            alice.jid,
            "",
            payload=[
                f"<propose xmlns='{NS_JINGLE_MESSAGE}' id='call-1'>"
                "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>"
            ],
        )
        notify = await next_notify(peer, server)

    assert (notify.get("call"), notify.get("encrypted")) == ("true", "false")
    assert notify.get("state") == "hibernated"


@pytest.mark.parametrize(
    ("body", "payload", "mention"),
    [
        ("Alice, dinner?", "", "true"),
        (
            "Al, dinner?",
            f"<reference xmlns='{NS_REFERENCE}' type='mention' uri='xmpp:{{alice}}'/>",
            "true",
        ),
        ("dinner, everyone?", "", "false"),
    ],
    ids=["local-part-in-body", "xep-0372-reference", "no-mention"],
)
async def test_groupchat_message_reports_whether_it_mentions_the_user(
    server: XmppServer, peer: PluginPeer, body: str, payload: str, mention: str
) -> None:
    # A groupchat message sent straight to the full JID is judged as one from a MUC.
    async with hibernated_alice(server, peer) as (alice, bob):
        await bob.send_message(
            alice.jid,
            body,
            message_type="groupchat",
            payload=[payload.format(alice=server.jid("alice"))] if payload else [],
        )
        notify = await next_notify(peer, server)

    assert (notify.get("type"), notify.get("mention")) == ("groupchat", mention)


async def test_one_to_one_message_is_never_a_mention(server: XmppServer, peer: PluginPeer) -> None:
    async with hibernated_alice(server, peer) as (alice, bob):
        await bob.send_message(alice.jid, "alice, dinner?")
        notify = await next_notify(peer, server)

    assert (notify.get("type"), notify.get("mention")) == ("chat", "false")
