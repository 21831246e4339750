"""plugins/ejabberd/mod_xmpp_push.erl in a real ejabberd 23.01, seen from the component.

A `PluginPeer` (tests/pluginpeer.py) stands in for xmpp-push: it configures and arms
and records every `<notify/>` exactly as it came over the wire
(docs/plugin-protocol.md). One ejabberd serves the whole module; its own push
modules are off, its `ack_timeout` is far away (ejabberd would close an unacking
connection at that point), and its resumption timeout is short, so that a session
still resumable after it proves the plugin's hibernation keepalive.

Isolation on the shared server: session tests use alice and address her *full* JID,
so that sessions left behind by earlier tests (hibernated, waiting for resumption)
never receive another test's messages; offline tests use carol, who never logs in;
unarmed sessions are never cut (a timed-out session would send its unacknowledged
messages to offline storage, and the plugin would rightly report them).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.pluginpeer import (
    NOTIFY_WAIT,
    NS_PLUGIN,
    UNDECIDED_DELAY_MS,
    PluginPeer,
    armed,
    error_of,
    knobs,
    logged_in,
    next_notify,
    running_peer,
)
from tests.servers import COMPONENT_JID, DOMAIN, USERS, require_server
from tests.servers.ejabberd import Ejabberd, EjabberdOptions
from xmpp_push.devtools.client import XmppClient, XmppClientError

pytestmark = pytest.mark.ejabberd

SECRET = "s3cret-plugin"
OTHER_COMPONENT = "other.localhost"
"""A component on the same server that is not the plugin's."""
OTHER_SECRET = "s3cret-other"
RESUME_TIMEOUT = 3
"""ejabberd's own resumption timeout (s): an unarmed session is gone after it."""
QUIET = 1.0
"""How long to watch for an unwanted notify where one would come at once (a hibernated
or offline notify takes milliseconds)."""

LOG_ENTRY = re.compile(r"^(?=\d{4}-\d\d-\d\d )", re.MULTILINE)
"""Where an entry of ejabberd's log begins (a stack trace spans several lines)."""

NS_CHATSTATES = "http://jabber.org/protocol/chatstates"
NS_OMEMO = "eu.siacs.conversations.axolotl"
NS_JINGLE_MESSAGE = "urn:xmpp:jingle-message:0"


@pytest.fixture(scope="module")
def ejabberd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ejabberd]:
    require_server("ejabberdctl", "ejabberd")
    server = Ejabberd(
        tmp_path_factory.mktemp("ejabberd-plugin"),
        EjabberdOptions(
            domain=DOMAIN,
            component_jid=COMPONENT_JID,
            component_secret=SECRET,
            xmpp_push_plugin=True,
            push=False,  # mod_push_keepalive would stretch timeouts too
            resume_timeout=RESUME_TIMEOUT,
            ack_timeout=600,
            extra_components={OTHER_COMPONENT: OTHER_SECRET},
            extra_modules="mod_admin_extra: {}",  # ejabberdctl restart_module
        ),
    )
    try:
        server.start()
        for user, password in USERS.items():
            server.register(user, password)
        yield server
        # Whatever the tests saw, the module must never have failed inside ejabberd.
        failures = [
            entry for entry in LOG_ENTRY.split(server.log_text()) if is_plugin_failure(entry)
        ]
        assert not failures, "\n".join(failures)
    finally:
        server.stop()


def is_plugin_failure(entry: str) -> bool:
    """A log entry of the module's own (its caught errors, a hook crash ejabberd caught
    for it) or one whose stack trace runs through it."""
    header = entry.split("\n", 1)[0]
    if "[error]" not in header and "[critical]" not in header:
        return False
    return "mod_xmpp_push" in header or "{mod_xmpp_push," in entry


@pytest.fixture
async def peer(ejabberd: Ejabberd) -> AsyncIterator[PluginPeer]:
    """The component, connected, having sent `configure` with `knobs()`."""
    async with running_peer(COMPONENT_JID, SECRET, ejabberd.host, ejabberd.component_port) as p:
        answer = await p.configure(DOMAIN, **knobs())
        assert answer.get("type") == "result", ejabberd.log_tail()
        yield p


# --- configure, arm --------------------------------------------------------------------


async def test_configure_is_answered_with_the_plugin(ejabberd: Ejabberd) -> None:
    async with running_peer(COMPONENT_JID, SECRET, ejabberd.host, ejabberd.component_port) as p:
        answer = await p.configure(DOMAIN, **knobs())

    assert answer.get("type") == "result"
    assert answer.get("from") == DOMAIN
    plugin = answer.find(f"{{{NS_PLUGIN}}}plugin")
    assert plugin is not None
    assert plugin.get("version") == "1"
    assert plugin.get("name") == "mod_xmpp_push"
    assert (plugin.get("server") or "").startswith("ejabberd 23.01")


async def test_plugin_asks_the_component_for_configure_when_it_starts(
    ejabberd: Ejabberd,
) -> None:
    async with running_peer(
        COMPONENT_JID,
        SECRET,
        ejabberd.host,
        ejabberd.component_port,
        knobs={name.replace("_", "-"): value for name, value in knobs(include_body="true").items()},
    ) as p:
        await asyncio.to_thread(ejabberd.ctl, "restart_module", DOMAIN, "mod_xmpp_push")
        get = await asyncio.wait_for(p.configure_gets.get(), NOTIFY_WAIT)
        async with logged_in(ejabberd, "bob") as bob:
            await bob.send_message(ejabberd.jid("carol"), "configured by the answer")
            notify = await next_notify(p, ejabberd)

    assert (get.get("type"), get.get("from")) == ("get", DOMAIN)
    assert notify.findtext(f"{{{NS_PLUGIN}}}body") == "configured by the answer"


async def test_arm_from_anyone_but_the_component_is_forbidden(
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    async with (
        logged_in(ejabberd, "alice") as alice,
        running_peer(
            OTHER_COMPONENT, OTHER_SECRET, ejabberd.host, ejabberd.component_port
        ) as other,
    ):
        answer = await other.arm(alice.jid)

    assert error_of(answer) == ("auth", "forbidden")


async def test_arm_without_a_jid_is_a_bad_request(peer: PluginPeer) -> None:
    answer = await peer.request(DOMAIN, f"<arm xmlns='{NS_PLUGIN}'/>")

    assert error_of(answer) == ("modify", "bad-request")


# --- offline ---------------------------------------------------------------------------


async def test_message_to_a_user_without_session_is_reported_offline_once(
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    async with logged_in(ejabberd, "bob") as bob:
        await bob.send_message(ejabberd.jid("carol"), "are you there?")
        notify = await next_notify(peer, ejabberd)
        # Stored twice (MAM and offline storage), reported once.
        await peer.no_notify(QUIET)

    assert notify.attrib == {
        "user": ejabberd.jid("carol"),
        "state": "offline",
        "count": "1",
        "sender": bob.jid,
        "type": "chat",
        "encrypted": "false",
        "call": "false",
        "mention": "false",
    }
    assert notify.find(f"{{{NS_PLUGIN}}}body") is None


async def test_offline_notify_carries_the_body_when_configured(
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    await peer.configure(DOMAIN, **knobs(include_body="true", include_sender="false"))
    async with logged_in(ejabberd, "bob") as bob:
        await bob.send_message(ejabberd.jid("carol"), "dinner at eight?")
        notify = await next_notify(peer, ejabberd)

    assert notify.findtext(f"{{{NS_PLUGIN}}}body") == "dinner at eight?"
    assert "sender" not in notify.attrib


# --- hibernated ------------------------------------------------------------------------


@pytest.mark.parametrize("rst", [True, False], ids=["rst", "fin"])
async def test_message_to_a_hibernated_armed_session_is_reported_and_resent(
    ejabberd: Ejabberd, peer: PluginPeer, rst: bool
) -> None:
    async with (
        logged_in(ejabberd, "alice", stream_management=True) as alice,
        logged_in(ejabberd, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.cut(rst=rst)
        await bob.send_message(alice.jid, "wake up")
        notify = await next_notify(peer, ejabberd)
        await peer.no_notify(QUIET)
        await alice.resume()
        resent = await alice.wait_for_message()

    user, resource = alice.jid.split("/", 1)
    assert notify.get("user") == user
    assert notify.get("resource") == resource
    assert notify.get("state") == "hibernated"
    assert notify.get("count") == "1"
    assert notify.get("sender") == bob.jid
    assert resent.body == "wake up"


async def test_resumed_session_stays_armed(ejabberd: Ejabberd, peer: PluginPeer) -> None:
    async with (
        logged_in(ejabberd, "alice", stream_management=True) as alice,
        logged_in(ejabberd, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.cut()
        await alice.resume()
        await alice.cut()  # the resumed session, never armed by itself
        await bob.send_message(alice.jid, "after the resumption")
        notify = await next_notify(peer, ejabberd)
        await alice.resume()
        await alice.wait_for_message()

    assert (notify.get("state"), notify.get("resource")) == ("hibernated", alice.jid.split("/")[1])


async def test_armed_session_hibernating_with_unacked_messages_reports_their_count(
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    async with (
        logged_in(ejabberd, "alice", stream_management=True) as alice,
        logged_in(ejabberd, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        for n in range(3):
            await bob.send_message(alice.jid, f"unread {n}")
        await asyncio.sleep(0.5)  # well within undecided-delay
        await alice.cut()
        notify = await next_notify(peer, ejabberd)
        await peer.no_notify(QUIET)
        await alice.resume()

    assert (notify.get("state"), notify.get("count")) == ("hibernated", "3")


async def test_armed_hibernated_session_outlives_the_servers_resumption_timeout(
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    async with logged_in(ejabberd, "alice", stream_management=True) as alice:
        await armed(peer, alice)
        await alice.cut()
        await asyncio.sleep(RESUME_TIMEOUT + 1.5)
        await alice.resume()


async def test_unarmed_hibernated_session_ends_at_the_servers_resumption_timeout(
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    """The control for the keepalive test above: without arming, the same wait is too
    long. (No message is sent, so the ended session leaves nothing to report.)"""
    async with logged_in(ejabberd, "alice", stream_management=True) as alice:
        await alice.cut()
        await asyncio.sleep(RESUME_TIMEOUT + 1.5)
        with pytest.raises((XmppClientError, TimeoutError)):
            await alice.resume()


# --- undecided -------------------------------------------------------------------------


async def test_unacknowledged_message_is_reported_undecided_once_after_the_delay(
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    async with (
        logged_in(ejabberd, "alice", stream_management=True) as alice,
        logged_in(ejabberd, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        await bob.send_message(alice.jid, "still there?")
        sent = time.monotonic()
        notify = await next_notify(peer, ejabberd)
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
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    async with (
        logged_in(ejabberd, "alice", stream_management=True) as alice,
        logged_in(ejabberd, "bob") as bob,
    ):
        await armed(peer, alice)
        alice.stop_reading()
        await bob.send_message(alice.jid, "first")
        await bob.send_message(alice.jid, "second")
        first = await next_notify(peer, ejabberd)
        await bob.send_message(alice.jid, "third")
        sent = time.monotonic()
        further = await next_notify(peer, ejabberd)
        waited = time.monotonic() - sent
        alice.start_reading()
        for _ in range(3):
            await alice.wait_for_message()

    assert (first.get("state"), first.get("count")) == ("undecided", "2")
    assert (further.get("state"), further.get("count")) == ("undecided", "1")
    assert waited < 1.0, f"reported after {waited:.2f} s"


async def test_session_that_acknowledges_is_never_reported(
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    async with (
        logged_in(ejabberd, "alice", stream_management=True) as alice,
        logged_in(ejabberd, "bob") as bob,
    ):
        await armed(peer, alice)
        for n in range(100):
            await bob.send_message(alice.jid, f"message {n}")
        for _ in range(100):
            await alice.wait_for_message()
        await peer.no_notify(UNDECIDED_DELAY_MS / 1000 + 1.0)


# --- unarmed and disarmed sessions -----------------------------------------------------


async def test_unarmed_session_is_never_reported(ejabberd: Ejabberd, peer: PluginPeer) -> None:
    async with (
        logged_in(ejabberd, "alice", stream_management=True) as alice,
        logged_in(ejabberd, "bob") as bob,
    ):
        alice.stop_reading()
        await bob.send_message(alice.jid, "nobody watches this session")
        await peer.no_notify(UNDECIDED_DELAY_MS / 1000 + 1.5)
        alice.start_reading()
        await alice.wait_for_message()


async def test_disarmed_session_is_no_longer_reported(ejabberd: Ejabberd, peer: PluginPeer) -> None:
    async with (
        logged_in(ejabberd, "alice", stream_management=True) as alice,
        logged_in(ejabberd, "bob") as bob,
    ):
        await armed(peer, alice)
        answer = await peer.disarm(ejabberd.jid("alice"))  # bare: every session
        assert answer.get("type") == "result"
        alice.stop_reading()
        await bob.send_message(alice.jid, "disarmed")
        await peer.no_notify(UNDECIDED_DELAY_MS / 1000 + 1.5)
        alice.start_reading()
        await alice.wait_for_message()


# --- what is push-worthy ---------------------------------------------------------------


@contextlib.asynccontextmanager
async def hibernated_alice(
    ejabberd: Ejabberd, peer: PluginPeer
) -> AsyncIterator[tuple[XmppClient, XmppClient]]:
    """(alice, bob): alice's session armed and hibernated, so that every stanza routed
    to it goes through the plugin's judgement; resumed and closed after."""
    async with (
        logged_in(ejabberd, "alice", stream_management=True) as alice,
        logged_in(ejabberd, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.cut()
        yield alice, bob
        with contextlib.suppress(Exception):
            await alice.resume()


async def test_chat_state_alone_is_not_reported(ejabberd: Ejabberd, peer: PluginPeer) -> None:
    await peer.configure(DOMAIN, **knobs(include_body="true"))
    async with hibernated_alice(ejabberd, peer) as (alice, bob):
        await bob.send_message(alice.jid, "", payload=[f"<composing xmlns='{NS_CHATSTATES}'/>"])
        await bob.send_message(alice.jid, "typed")
        notify = await next_notify(peer, ejabberd)
        await peer.no_notify(QUIET)

    assert notify.findtext(f"{{{NS_PLUGIN}}}body") == "typed"  # not the chat state's


async def test_omemo_message_is_reported_encrypted(ejabberd: Ejabberd, peer: PluginPeer) -> None:
    await peer.configure(DOMAIN, **knobs(include_body="true"))
    async with hibernated_alice(ejabberd, peer) as (alice, bob):
        omemo = (
            f"<encrypted xmlns='{NS_OMEMO}'><header sid='1'><iv>AAAA</iv></header>"
            "<payload>c2VjcmV0</payload></encrypted>"
        )
        await bob.send_message(alice.jid, "I sent you an OMEMO message.", payload=[omemo])
        notify = await next_notify(peer, ejabberd)

    assert notify.get("encrypted") == "true"
    assert notify.get("call") == "false"
    assert notify.find(f"{{{NS_PLUGIN}}}body") is None  # only a fallback text


async def test_jingle_call_proposal_is_reported_as_call(
    ejabberd: Ejabberd, peer: PluginPeer
) -> None:
    async with hibernated_alice(ejabberd, peer) as (alice, bob):
        propose = (
            f"<propose xmlns='{NS_JINGLE_MESSAGE}' id='call-1'>"
            "<description xmlns='urn:xmpp:jingle:apps:rtp:1' media='audio'/></propose>"
        )
        await bob.send_message(alice.jid, "", payload=[propose])
        notify = await next_notify(peer, ejabberd)

    assert notify.get("call") == "true"
    assert notify.get("encrypted") == "false"
    assert notify.get("state") == "hibernated"
