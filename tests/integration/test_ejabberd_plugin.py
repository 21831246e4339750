"""What only plugins/ejabberd/mod_xmpp_push.erl in a real ejabberd 23.01 does, seen
from the component. What both plugins do is in test_plugin_contract.py, which runs
against this ejabberd's twin too.

A `PluginPeer` (tests/pluginpeer.py) stands in for xmpp-push: it configures and arms
and records every `<notify/>` exactly as it came over the wire
(docs/plugin-protocol.md). One ejabberd serves the whole module
(`ejabberd_plugin_server`: its own push modules off, `ack_timeout` far away, a short
resumption timeout, and a check at the end that the module never failed inside it).

Isolation on the shared server: session tests use alice and address her *full* JID,
so that sessions left behind by earlier tests never receive another test's messages;
unarmed sessions are never cut with a message for them (a timed-out session would send
its unacknowledged messages to offline storage, and the plugin would rightly report
them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.pluginpeer import (
    EJABBERD_RESUME_TIMEOUT,
    PluginPeer,
    armed,
    connected_peer,
    ejabberd_plugin_server,
    logged_in,
)
from tests.servers.ejabberd import Ejabberd
from xmpp_push.devtools.client import XmppClientError

pytestmark = pytest.mark.ejabberd

RESUME_TIMEOUT = EJABBERD_RESUME_TIMEOUT


@pytest.fixture(scope="module")
def ejabberd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ejabberd]:
    with ejabberd_plugin_server(tmp_path_factory.mktemp("ejabberd-plugin")) as server:
        yield server


@pytest.fixture
async def peer(ejabberd: Ejabberd) -> AsyncIterator[PluginPeer]:
    """The component, connected, having sent `configure` with `knobs()`."""
    async with connected_peer(ejabberd) as p:
        yield p


# --- hibernation keepalive: the shared server's short resumption timeout ---------------


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
