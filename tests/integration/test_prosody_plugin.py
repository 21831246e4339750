"""What only plugins/prosody/mod_xmpp_push.lua in a real Prosody 0.12 does, seen from
the component. What both plugins do is in test_plugin_contract.py, which runs against
this Prosody's twin too.

A `PluginPeer` (tests/pluginpeer.py) stands in for xmpp-push: it configures and arms
and records every `<notify/>` exactly as it came over the wire
(docs/plugin-protocol.md). mod_cloud_notify is off: in direct mode the component
handles the clients' `<enable/>`, and what is recorded here is the plugin's doing alone.

One Prosody serves the module, except where a test needs other server options (the
keepalive tests). Isolation on the shared server: session tests address alice's *full*
JID, so that sessions left behind by earlier tests (hibernated, armed, kept for an hour)
never receive another test's messages. Unlike ejabberd's, Prosody's resumption timeout
(`smacks_hibernation_time`, 300 s) outlasts what an unarmed session cut here needs
before it is resumed, so here, and only here, unarmed hibernated sessions are tested.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from tests.pluginpeer import (
    PluginPeer,
    armed,
    connected_peer,
    knobs,
    logged_in,
    next_notify,
    prosody_plugin_options,
    prosody_plugin_server,
)
from tests.servers import DOMAIN
from xmpp_push.devtools.client import XmppClientError
from xmpp_push.devtools.prosody import Prosody

pytestmark = pytest.mark.prosody

QUIET = 0.5
"""How long to watch for an unwanted notify where one would come at once (a hibernated
or offline notify takes milliseconds)."""

MakeProsody = Callable[..., Prosody]


@pytest.fixture(scope="module")
def prosody(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prosody]:
    with prosody_plugin_server(tmp_path_factory.mktemp("prosody-plugin")) as server:
        yield server


@pytest.fixture
async def peer(prosody: Prosody) -> AsyncIterator[PluginPeer]:
    async with connected_peer(prosody) as p:
        yield p


# --- mod_smacks asks an inactive client for nothing ------------------------------------


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


# --- unarmed and disarmed hibernated sessions -----------------------------------------
# Cut unarmed: on ejabberd, whose resumption timeout is seconds, a session left so by a
# failing test would send its messages offline into later tests (the contract suite
# tests unarmed and disarmed sessions connected instead).


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
async def test_disarmed_hibernated_session_is_no_longer_reported(
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


# --- what is push-worthy: OMEMO with no `<payload/>` ------------------------------------

NS_OMEMO = "eu.siacs.conversations.axolotl"


# --- hibernation keepalive -------------------------------------------------------------

SMACKS_HIBERNATION = 1
"""Prosody's own resumption timeout (s) in the keepalive tests; mod_smacks ends the
session a second after it (its watchdog checks at timeout + 1)."""


async def test_only_armed_hibernated_sessions_outlive_the_servers_resumption_timeout(
    make_prosody: MakeProsody,
) -> None:
    prosody = make_prosody(prosody_plugin_options(smacks_hibernation_time=SMACKS_HIBERNATION))
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
    prosody = make_prosody(prosody_plugin_options(smacks_hibernation_time=300))
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
