"""plugins/prosody/mod_xmpp_push.lua in a real Prosody 0.12, seen from the component.

A `PluginPeer` (tests/pluginpeer.py) stands in for xmpp-push: it configures and arms
and records every `<notify/>` exactly as it came over the wire
(docs/plugin-protocol.md). mod_cloud_notify is off: in direct mode the component
handles the clients' `<enable/>`, and what is recorded here is the plugin's doing alone.

One Prosody serves the module, except where a test needs other server options (the
keepalive tests). Isolation on the shared server: session tests address alice's *full*
JID, so that sessions left behind by earlier tests (hibernated, armed, kept for an hour)
never receive another test's messages; offline tests use carol, who never logs in.

Hibernated sessions are the cheapest way to see the plugin judge a stanza: a stanza
queued for an armed hibernated session is reported at once, with no delay to wait out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from xml.etree.ElementTree import Element, SubElement

import pytest

from tests.pluginpeer import (
    NOTIFY_WAIT,
    NS_PLUGIN,
    PluginPeer,
    armed,
    error_of,
    knobs,
    logged_in,
    next_notify,
    running_peer,
)
from tests.servers import COMPONENT_JID, DOMAIN, USERS, require_server
from xmpp_push.devtools import require_binary
from xmpp_push.devtools.client import (
    MessageType,
    XmppClient,
    XmppClientError,
    XmppStanzaError,
)
from xmpp_push.devtools.prosody import Prosody, ProsodyOptions

pytestmark = pytest.mark.prosody

SECRET = "s3cret-plugin"
OTHER_COMPONENT = "other.localhost"
QUIET = 0.5
"""How long to watch for an unwanted notify where one would come at once (a hibernated
or offline notify takes milliseconds)."""

NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
NS_RECEIPTS = "urn:xmpp:receipts"
NS_OMEMO = "eu.siacs.conversations.axolotl"
NS_JINGLE_MESSAGE = "urn:xmpp:jingle-message:0"
NS_REFERENCE = "urn:xmpp:reference:0"

MakeProsody = Callable[..., Prosody]


BASE_OPTIONS = ProsodyOptions(
    domain=DOMAIN,
    component_jid=COMPONENT_JID,
    component_secret=SECRET,
    xmpp_push_plugin=True,
    cloud_notify=False,
)


def plugin_options(**overrides: Any) -> ProsodyOptions:
    return dataclasses.replace(BASE_OPTIONS, **overrides)


@pytest.fixture(scope="module")
def prosody(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prosody]:
    require_server("prosody", "prosody prosody-modules lua-unbound lua-event lua-sec")
    server = Prosody(
        tmp_path_factory.mktemp("prosody-plugin"),
        plugin_options(
            # admin_shell: `prosodyctl shell module reload`; csi without csi_simple: an
            # inactive client that mod_smacks does not ask for acknowledgements.
            extra_modules=("admin_shell", "csi"),
            extra_components={OTHER_COMPONENT: "other-pw"},
        ),
    )
    try:
        server.start()
        for user, password in USERS.items():
            server.register(user, password)
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def connected_peer(server: Prosody, **overrides: str) -> AsyncIterator[PluginPeer]:
    """The component, connected, having sent `configure` with `knobs(**overrides)`."""
    async with running_peer(COMPONENT_JID, SECRET, server.host, server.component_port) as p:
        answer = await p.configure(DOMAIN, **knobs(**overrides))
        assert answer.get("type") == "result", server.log_tail()
        yield p


@pytest.fixture
async def peer(prosody: Prosody) -> AsyncIterator[PluginPeer]:
    async with connected_peer(prosody) as p:
        yield p


def body_of(notify: Element) -> str | None:
    return notify.findtext(f"{{{NS_PLUGIN}}}body")


# --- configure -------------------------------------------------------------------------


async def test_configure_is_answered_with_the_plugin(prosody: Prosody) -> None:
    async with running_peer(COMPONENT_JID, SECRET, prosody.host, prosody.component_port) as p:
        answer = await p.configure(DOMAIN, **knobs())

    assert answer.get("type") == "result"
    assert answer.get("from") == DOMAIN
    plugin = answer.find(f"{{{NS_PLUGIN}}}plugin")
    assert plugin is not None
    assert (plugin.get("version"), plugin.get("name")) == ("1", "mod_xmpp_push")
    assert (plugin.get("server") or "").startswith("Prosody 0.12.")


async def test_configure_with_an_invalid_knob_is_a_bad_request(peer: PluginPeer) -> None:
    answer = await peer.configure(DOMAIN, **knobs(undecided_delay="soon"))

    assert error_of(answer) == ("modify", "bad-request")


async def test_reloaded_plugin_asks_the_connected_component_for_configure(
    prosody: Prosody,
) -> None:
    """The get path: the component is up when the module is loaded, so the plugin asks,
    and follows the answer (here include-body, seen in the next notify)."""
    async with running_peer(
        COMPONENT_JID,
        SECRET,
        prosody.host,
        prosody.component_port,
        knobs={"undecided-delay": "2000", "include-body": "true"},
    ) as p:
        await p.configure(DOMAIN, **knobs())  # include-body false until the answer
        prosodyctl = require_binary("prosodyctl", "prosody")
        command = [prosodyctl, "--config", str(prosody.config_path), "shell"]
        reload = await asyncio.to_thread(
            subprocess.run,
            [*command, "module", "reload", "xmpp_push", DOMAIN],
            cwd=prosody.run_dir,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert reload.returncode == 0, reload.stdout + reload.stderr
        get = await asyncio.wait_for(p.configure_gets.get(), NOTIFY_WAIT)
        async with logged_in(prosody, "bob") as bob:
            await bob.send_message(prosody.jid("carol"), "configured by answer")
            notify = await next_notify(p, prosody)

    assert (get.get("type"), get.get("from"), get.get("to")) == ("get", DOMAIN, COMPONENT_JID)
    assert body_of(notify) == "configured by answer"


# --- arm, disarm, who may ask ----------------------------------------------------------


async def test_arm_from_a_client_is_forbidden(prosody: Prosody, peer: PluginPeer) -> None:
    async with logged_in(prosody, "alice") as alice, logged_in(prosody, "bob") as bob:
        iq = bob._session.make_iq_set(ito=DOMAIN)
        SubElement(iq.xml, f"{{{NS_PLUGIN}}}arm").set("jid", alice.jid)
        with pytest.raises(XmppStanzaError) as refused:
            await bob._request(iq, 10)

    assert (refused.value.error_type, refused.value.condition) == ("auth", "forbidden")


async def test_arm_from_another_component_is_forbidden(prosody: Prosody) -> None:
    async with (
        running_peer(OTHER_COMPONENT, "other-pw", prosody.host, prosody.component_port) as other,
        logged_in(prosody, "alice") as alice,
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


async def test_message_to_a_user_without_session_is_reported_offline(
    prosody: Prosody, peer: PluginPeer
) -> None:
    async with logged_in(prosody, "bob") as bob:
        await bob.send_message(prosody.jid("carol"), "are you there?")
        notify = await next_notify(peer, prosody)
        await peer.no_notify(QUIET)

    assert notify.attrib == {
        "user": prosody.jid("carol"),
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
    prosody: Prosody, peer: PluginPeer
) -> None:
    await peer.configure(DOMAIN, **knobs(include_body="true", include_sender="false"))
    async with logged_in(prosody, "bob") as bob:
        await bob.send_message(prosody.jid("carol"), "dinner at eight?")
        notify = await next_notify(peer, prosody)

    assert body_of(notify) == "dinner at eight?"
    assert "sender" not in notify.attrib


# --- hibernated ------------------------------------------------------------------------


@pytest.mark.parametrize("rst", [True, False], ids=["rst", "fin"])
async def test_message_to_a_hibernated_armed_session_is_reported_and_resent(
    prosody: Prosody, peer: PluginPeer, rst: bool
) -> None:
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.cut(rst=rst)
        await bob.send_message(alice.jid, "wake up")
        notify = await next_notify(peer, prosody)
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


async def test_armed_session_hibernating_with_unacked_messages_reports_their_count(
    prosody: Prosody, peer: PluginPeer
) -> None:
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        for n in range(3):
            await bob.send_message(alice.jid, f"unread {n}")
        await asyncio.sleep(0.5)  # well within undecided-delay
        await alice.cut()
        notify = await next_notify(peer, prosody)
        await peer.no_notify(QUIET)
        await alice.resume()
        resent = [(await alice.wait_for_message()).body for _ in range(3)]

    assert (notify.get("state"), notify.get("count")) == ("hibernated", "3")
    assert resent == ["unread 0", "unread 1", "unread 2"]


# --- undecided -------------------------------------------------------------------------


async def test_unacknowledged_message_is_reported_undecided_once_after_the_delay(
    prosody: Prosody, peer: PluginPeer
) -> None:
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        await bob.send_message(alice.jid, "still there?")
        sent = time.monotonic()
        notify = await next_notify(peer, prosody)
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
    prosody: Prosody, peer: PluginPeer
) -> None:
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        await bob.send_message(alice.jid, "first")
        await bob.send_message(alice.jid, "second")
        first = await next_notify(peer, prosody)
        await bob.send_message(alice.jid, "third")
        sent = time.monotonic()
        further = await next_notify(peer, prosody)
        waited = time.monotonic() - sent
        alice.start_reading()
        for _ in range(3):
            await alice.wait_for_message()

    assert (first.get("state"), first.get("count")) == ("undecided", "2")
    assert (further.get("state"), further.get("count")) == ("undecided", "1")
    assert waited < 1.0, f"reported after {waited:.2f} s"


async def test_once_acknowledged_an_undecided_session_waits_the_whole_delay_again(
    prosody: Prosody, peer: PluginPeer
) -> None:
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        await bob.send_message(alice.jid, "first")
        await next_notify(peer, prosody)
        alice.start_reading()
        await alice.wait_for_message()
        await asyncio.sleep(0.3)  # the acknowledgement reaches the server
        alice.stop_reading()
        await bob.send_message(alice.jid, "second")
        await bob.send_message(alice.jid, "third")
        sent = time.monotonic()
        again = await next_notify(peer, prosody)
        waited = time.monotonic() - sent
        alice.start_reading()
        for _ in range(2):
            await alice.wait_for_message()

    assert (again.get("state"), again.get("count")) == ("undecided", "2")
    assert waited >= 1.5, f"reported after {waited:.2f} s, not after the delay"


async def test_each_message_is_given_the_whole_delay(prosody: Prosody, peer: PluginPeer) -> None:
    """The delay runs from each message's sending: one sent after an earlier one was
    acknowledged is not reported when the earlier one's delay is over."""
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
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
        notify = await next_notify(peer, prosody)
        waited = time.monotonic() - sent
        alice.start_reading()
        await alice.wait_for_message()

    assert notify.get("count") == "1"
    assert waited >= 1.5, f"reported after {waited:.2f} s, not after the delay"


async def test_session_that_acknowledges_is_never_reported(
    prosody: Prosody, peer: PluginPeer
) -> None:
    await peer.configure(DOMAIN, **knobs(undecided_delay="1000"))
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        for n in range(100):
            await bob.send_message(alice.jid, f"message {n}")
        for _ in range(100):
            await alice.wait_for_message()
        await peer.no_notify(1.0 + 1.0)


async def test_inactive_client_the_server_does_not_ask_is_asked_before_it_is_reported(
    prosody: Prosody, peer: PluginPeer
) -> None:
    """mod_smacks asks an inactive client (CSI, no flushing module) for no
    acknowledgement; the plugin asks itself rather than report a client that is well."""
    await peer.configure(DOMAIN, **knobs(undecided_delay="1000"))
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.set_active(False)
        await bob.send_message(alice.jid, "in the background")
        await alice.wait_for_message()
        await peer.no_notify(1.0 + 1.0 + 1.0)  # the delay, the grace to answer, a margin


async def test_inactive_client_that_does_not_answer_the_plugins_request_is_reported(
    prosody: Prosody, peer: PluginPeer
) -> None:
    await peer.configure(DOMAIN, **knobs(undecided_delay="1000"))
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.set_active(False)
        alice.stop_reading()
        await bob.send_message(alice.jid, "in the background")
        sent = time.monotonic()
        notify = await next_notify(peer, prosody)
        waited = time.monotonic() - sent
        alice.start_reading()
        await alice.wait_for_message()

    assert (notify.get("state"), notify.get("count")) == ("undecided", "1")
    assert 1.5 <= waited <= 3.5, f"undecided after {waited:.2f} s (delay 1 s, grace 1 s)"


# --- unarmed and disarmed sessions -----------------------------------------------------


async def test_unarmed_hibernated_session_is_never_reported(
    prosody: Prosody, peer: PluginPeer
) -> None:
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await alice.cut()
        await bob.send_message(alice.jid, "nobody watches this session")
        await peer.no_notify(QUIET)
        await alice.resume()
        await alice.wait_for_message()


@pytest.mark.parametrize("whom", ["full", "bare"])
async def test_disarmed_session_is_no_longer_reported(
    prosody: Prosody, peer: PluginPeer, whom: str
) -> None:
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        answer = await peer.disarm(alice.jid if whom == "full" else prosody.jid("alice"))
        assert answer.get("type") == "result"
        await alice.cut()
        await bob.send_message(alice.jid, "disarmed")
        await peer.no_notify(QUIET)
        await alice.resume()
        await alice.wait_for_message()


# --- what is push-worthy ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def hibernated_alice(
    prosody: Prosody, peer: PluginPeer
) -> AsyncIterator[tuple[XmppClient, XmppClient]]:
    """(alice, bob): alice's session armed and hibernated, so that every stanza routed
    to it is judged by the plugin at once."""
    async with (
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.cut()
        yield alice, bob


@pytest.mark.parametrize(
    ("message_type", "payload", "body"),
    [
        ("chat", f"<composing xmlns='{NS_CHATSTATES}'/>", ""),
        ("chat", f"<received xmlns='{NS_RECEIPTS}' id='m1'/>", ""),
        ("headline", "", "breaking news"),
    ],
    ids=["chat-state", "receipt", "headline"],
)
async def test_stanza_that_is_not_push_worthy_is_not_reported(
    prosody: Prosody, peer: PluginPeer, message_type: MessageType, payload: str, body: str
) -> None:
    await peer.configure(DOMAIN, **knobs(include_body="true"))
    async with hibernated_alice(prosody, peer) as (alice, bob):
        await bob.send_message(
            alice.jid,
            body,
            message_type=message_type,
            payload=[payload] if payload else [],
        )
        await bob.send_message(alice.jid, "worth it")
        notify = await next_notify(peer, prosody)

    assert body_of(notify) == "worth it"  # the first one was skipped


async def test_omemo_message_is_reported_encrypted_without_its_fallback_body(
    prosody: Prosody, peer: PluginPeer
) -> None:
    await peer.configure(DOMAIN, **knobs(include_body="true"))
    async with hibernated_alice(prosody, peer) as (alice, bob):
        await bob.send_message(
            alice.jid,
            "I sent you an OMEMO encrypted message.",
            payload=[
                f"<encrypted xmlns='{NS_OMEMO}'><header sid='1'><iv>AAAA</iv></header>"
                "<payload>c2VjcmV0</payload></encrypted>"
            ],
        )
        notify = await next_notify(peer, prosody)

    assert (notify.get("encrypted"), notify.get("call")) == ("true", "false")
    assert body_of(notify) is None


async def test_omemo_message_without_body_is_push_worthy(
    prosody: Prosody, peer: PluginPeer
) -> None:
    async with hibernated_alice(prosody, peer) as (alice, bob):
        await bob.send_message(
            alice.jid,
            "",
            payload=[f"<encrypted xmlns='{NS_OMEMO}'><header sid='1'/></encrypted>"],
        )
        notify = await next_notify(peer, prosody)

    assert notify.get("encrypted") == "true"


async def test_jingle_call_proposal_is_reported_as_call(prosody: Prosody, peer: PluginPeer) -> None:
    async with hibernated_alice(prosody, peer) as (alice, bob):
        await bob.send_message(
            alice.jid,
            "",
            payload=[
                f"<propose xmlns='{NS_JINGLE_MESSAGE}' id='call-1'>"
                "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>"
            ],
        )
        notify = await next_notify(peer, prosody)

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
    prosody: Prosody, peer: PluginPeer, body: str, payload: str, mention: str
) -> None:
    # A groupchat message sent straight to the full JID is judged as one from a MUC.
    async with hibernated_alice(prosody, peer) as (alice, bob):
        await bob.send_message(
            alice.jid,
            body,
            message_type="groupchat",
            payload=[payload.format(alice=prosody.jid("alice"))] if payload else [],
        )
        notify = await next_notify(peer, prosody)

    assert (notify.get("type"), notify.get("mention")) == ("groupchat", mention)


async def test_one_to_one_message_is_never_a_mention(prosody: Prosody, peer: PluginPeer) -> None:
    async with hibernated_alice(prosody, peer) as (alice, bob):
        await bob.send_message(alice.jid, "alice, dinner?")
        notify = await next_notify(peer, prosody)

    assert (notify.get("type"), notify.get("mention")) == ("chat", "false")


# --- hibernation keepalive -------------------------------------------------------------

SMACKS_HIBERNATION = 1
"""Prosody's own resumption timeout (s) in the keepalive tests; mod_smacks ends the
session a second after it (its watchdog checks at timeout + 1)."""


async def test_only_armed_hibernated_sessions_outlive_the_servers_resumption_timeout(
    make_prosody: MakeProsody,
) -> None:
    prosody = make_prosody(plugin_options(smacks_hibernation_time=SMACKS_HIBERNATION))
    async with (
        connected_peer(prosody) as p,
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob", stream_management=True) as unarmed,
    ):
        await armed(p, alice)
        await alice.cut()
        await unarmed.cut()
        await asyncio.sleep(SMACKS_HIBERNATION + 2.0)
        await alice.resume()
        with pytest.raises(XmppClientError):
            await unarmed.resume()


async def test_armed_hibernated_session_ends_when_the_keepalive_is_over(
    make_prosody: MakeProsody,
) -> None:
    """The keepalive replaces the server's timeout, also when shorter: when it is over,
    mod_smacks ends the session as it would have (its own callback runs)."""
    prosody = make_prosody(plugin_options(smacks_hibernation_time=300))
    async with (
        connected_peer(prosody, hibernation_keepalive="1") as p,
        logged_in(prosody, "alice", stream_management=True) as alice,
        logged_in(prosody, "bob") as bob,
    ):
        await armed(p, alice)
        await alice.cut()
        await bob.send_message(alice.jid, "too late")
        notify = await next_notify(p, prosody)
        # mod_smacks hands the unacknowledged message to offline storage when the
        # session ends; it was reported already, and is not reported again.
        await p.no_notify(1 + 2.0)
        with pytest.raises(XmppClientError):
            await alice.resume()

    assert notify.get("state") == "hibernated"
    assert "Destroying session for hibernating too long" in prosody.log_text()
