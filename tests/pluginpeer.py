"""The component's side of the plugin protocol (docs/plugin-protocol.md), bare.

Tests of the server plugins connect a `PluginPeer` to a real Prosody or ejabberd in
place of xmpp-push, so that what the plugin sends is seen exactly as it went over the
wire, with no decisions of the component in between. It answers every `notify`
`result` (or what `answer_notify` says), answers `configure` gets with `knobs`, and can
send `configure`, `arm` and `disarm` and wait for the answers.

Below it, what the plugin test modules share: the servers they run
(`prosody_plugin_server`, `ejabberd_plugin_server`, with the plugin and a second
component), how to restart the plugin in one (`reload_plugin`), and the steps of a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import re
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element
from xml.sax.saxutils import quoteattr

import pytest
from slixmpp import ComponentXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.servers import (
    COMPONENT_JID,
    DOMAIN,
    USERS,
    XmppServer,
    require_server,
    started_with_users,
)
from tests.servers.ejabberd import Ejabberd, EjabberdOptions
from xmpp_push.devtools import require_binary
from xmpp_push.devtools.client import XmppClient
from xmpp_push.devtools.prosody import Prosody, ProsodyOptions

__all__ = [
    "EJABBERD_RESUME_TIMEOUT",
    "NOTIFY_WAIT",
    "NS_PLUGIN",
    "NS_STANZAS",
    "OTHER_COMPONENT",
    "OTHER_SECRET",
    "PLUGIN_SECRET",
    "UNDECIDED_DELAY_MS",
    "PluginPeer",
    "armed",
    "connected_peer",
    "ejabberd_plugin_server",
    "error_of",
    "hibernated_alice",
    "knobs",
    "logged_in",
    "next_notify",
    "prosody_plugin_options",
    "prosody_plugin_server",
    "reload_plugin",
    "running_peer",
]

NS_PLUGIN = "urn:xmpp-push:plugin:1"
_NS_COMPONENT = "jabber:component:accept"


def _attributes(values: Mapping[str, str]) -> str:
    return "".join(f" {name}={quoteattr(value)}" for name, value in values.items())


class PluginPeer(ComponentXMPP):
    def __init__(
        self,
        jid: str,
        secret: str,
        host: str,
        port: int,
        *,
        knobs: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(jid, secret, host, port)  # type: ignore[no-untyped-call]
        self.knobs: dict[str, str] = dict(knobs or {})
        """Attributes of the `<configure/>` answered to the plugin's get."""
        self.notifies: asyncio.Queue[Element] = asyncio.Queue()
        """Each `<notify/>` element received, in order."""
        self.configure_gets: asyncio.Queue[Element] = asyncio.Queue()
        self.answer_notify: str | None = None
        """None answers `result`; otherwise raw `<error>…</error>` XML to answer with."""
        self.connected_event = asyncio.Event()
        self._waiting: dict[str, asyncio.Future[Element]] = {}
        self._ids = itertools.count(1)
        for name, path, handler in (
            ("notify", f"{{{_NS_COMPONENT}}}iq/{{{NS_PLUGIN}}}notify", self._on_notify),
            ("configure", f"{{{_NS_COMPONENT}}}iq/{{{NS_PLUGIN}}}configure", self._on_configure),
            ("answers", f"{{{_NS_COMPONENT}}}iq", self._on_answer),
        ):
            self.register_handler(Callback(f"peer {name}", MatchXPath(path), handler))
        self.add_event_handler("session_start", lambda _: self.connected_event.set())

    def _on_notify(self, iq: object) -> None:
        xml: Element = iq.xml  # type: ignore[attr-defined]
        if xml.get("type") not in {"set", "get"}:
            return
        notify = xml.find(f"{{{NS_PLUGIN}}}notify")
        assert notify is not None
        self.notifies.put_nowait(notify)
        self._reply(xml, self.answer_notify)

    def _on_configure(self, iq: object) -> None:
        xml: Element = iq.xml  # type: ignore[attr-defined]
        if xml.get("type") != "get":
            return
        self.configure_gets.put_nowait(xml)
        payload = f"<configure xmlns='{NS_PLUGIN}'{_attributes(self.knobs)}/>"
        self._reply(xml, None, payload)

    def _on_answer(self, iq: object) -> None:
        xml: Element = iq.xml  # type: ignore[attr-defined]
        if xml.get("type") not in {"result", "error"}:
            if not any(child.tag.startswith(f"{{{NS_PLUGIN}}}") for child in xml):
                # Not ours to judge (disco and the like): answer so nothing waits.
                self._reply(
                    xml,
                    "<error type='cancel'><service-unavailable "
                    "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>",
                )
            return
        waiter = self._waiting.pop(xml.get("id", ""), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(xml)

    def _reply(self, request: Element, error: str | None, payload: str = "") -> None:
        kind = "result" if error is None else "error"
        self.send_raw(
            f"<iq type='{kind}' id={quoteattr(request.get('id', ''))}"
            f" from={quoteattr(request.get('to', ''))} to={quoteattr(request.get('from', ''))}>"
            f"{payload if error is None else error}</iq>"
        )

    async def request(self, to: str, payload: str, *, timeout: float = 10.0) -> Element:
        """Send `<iq type='set'>payload</iq>` to `to`; the answer (result or error)."""
        iq_id = f"peer-{next(self._ids)}"
        waiter: asyncio.Future[Element] = asyncio.get_running_loop().create_future()
        self._waiting[iq_id] = waiter
        self.send_raw(
            f"<iq type='set' id='{iq_id}' from={quoteattr(str(self.boundjid))}"
            f" to={quoteattr(to)}>{payload}</iq>"
        )
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._waiting.pop(iq_id, None)

    async def configure(self, server: str, **knobs: str) -> Element:
        """Send `<configure/>` with `knobs` (attribute names with `_` for `-`)."""
        values = {name.replace("_", "-"): value for name, value in knobs.items()}
        return await self.request(server, f"<configure xmlns='{NS_PLUGIN}'{_attributes(values)}/>")

    async def arm(self, full_jid: str) -> Element:
        server = full_jid.split("@", 1)[-1].split("/", 1)[0]
        return await self.request(server, f"<arm xmlns='{NS_PLUGIN}' jid={quoteattr(full_jid)}/>")

    async def disarm(self, jid: str) -> Element:
        server = jid.split("@", 1)[-1].split("/", 1)[0]
        return await self.request(server, f"<disarm xmlns='{NS_PLUGIN}' jid={quoteattr(jid)}/>")

    async def next_notify(self, timeout: float = 10.0) -> Element:
        return await asyncio.wait_for(self.notifies.get(), timeout)

    async def no_notify(self, within: float) -> None:
        """Fail if a `<notify/>` arrives within `within` seconds."""
        with contextlib.suppress(TimeoutError):
            notify = await asyncio.wait_for(self.notifies.get(), within)
            raise AssertionError(f"unexpected notify: {notify.attrib}")


@contextlib.asynccontextmanager
async def running_peer(
    jid: str, secret: str, host: str, port: int, *, knobs: Mapping[str, str] | None = None
) -> AsyncIterator[PluginPeer]:
    """A connected `PluginPeer`, disconnected after."""
    peer = PluginPeer(jid, secret, host, port, knobs=knobs)
    peer.connect()
    try:
        await asyncio.wait_for(peer.connected_event.wait(), 15)
        yield peer
    finally:
        peer.disconnect(wait=1)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(peer.disconnected, 3)


# -- helpers shared by the plugin tests (tests/integration/test_*_plugin.py) ------------

NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NOTIFY_WAIT = 10.0
"""Seconds a test waits for a notify it expects."""
UNDECIDED_DELAY_MS = 2000


def knobs(**overrides: str) -> dict[str, str]:
    """A whole `configure` (it states every knob): the tests' defaults and `overrides`.
    The keepalive is far beyond a test module's run: a session a test leaves hibernated
    must not time out (and send its unacknowledged messages offline) during a later test."""
    return {
        "undecided_delay": str(UNDECIDED_DELAY_MS),
        "hibernation_keepalive": "3600",
        "include_body": "false",
        "include_sender": "true",
        **overrides,
    }


@contextlib.asynccontextmanager
async def logged_in(
    server: XmppServer, user: str, *, stream_management: bool = False
) -> AsyncIterator[XmppClient]:
    client = await XmppClient.connect(
        server.jid(user),
        USERS[user],
        server.host,
        server.c2s_port,
        stream_management=stream_management,
    )
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.close(timeout=2)


async def armed(peer: PluginPeer, client: XmppClient) -> XmppClient:
    answer = await peer.arm(client.jid)
    assert answer.get("type") == "result"
    return client


async def next_notify(peer: PluginPeer, server: XmppServer) -> Element:
    try:
        return await peer.next_notify(NOTIFY_WAIT)
    except TimeoutError:
        pytest.fail(f"no notify within {NOTIFY_WAIT:g} s\n{server.log_tail(40)}")


@contextlib.asynccontextmanager
async def hibernated_alice(
    server: XmppServer, peer: PluginPeer
) -> AsyncIterator[tuple[XmppClient, XmppClient]]:
    """(alice, bob): alice's session armed and hibernated, so that every stanza routed
    to it is judged by the plugin at once; resumed and closed after."""
    async with (
        logged_in(server, "alice", stream_management=True) as alice,
        logged_in(server, "bob") as bob,
    ):
        await armed(peer, alice)
        await alice.cut()
        yield alice, bob
        with contextlib.suppress(Exception):
            await alice.resume()


def error_of(answer: Element) -> tuple[str, str]:
    """(type, condition) of an `error` IQ."""
    assert answer.get("type") == "error"
    error = answer.find("{jabber:component:accept}error")
    assert error is not None
    condition = next(child.tag for child in error if child.tag.startswith(f"{{{NS_STANZAS}}}"))
    return error.get("type", ""), condition.split("}", 1)[1]


@contextlib.asynccontextmanager
async def connected_peer(server: XmppServer, **overrides: str) -> AsyncIterator[PluginPeer]:
    """The component, connected, having sent `configure` with `knobs(**overrides)`."""
    async with running_peer(
        COMPONENT_JID, server.options.component_secret, server.host, server.component_port
    ) as peer:
        answer = await peer.configure(DOMAIN, **knobs(**overrides))
        assert answer.get("type") == "result", server.log_tail()
        yield peer


# -- the servers the plugin tests run: the plugin's and one other component -------------

PLUGIN_SECRET = "s3cret-plugin"
OTHER_COMPONENT = "other.localhost"
"""A component on the same server that is not the plugin's."""
OTHER_SECRET = "s3cret-other"
EJABBERD_RESUME_TIMEOUT = 3
"""ejabberd's own resumption timeout (s): an unarmed session is gone after it."""


def prosody_plugin_options(**overrides: Any) -> ProsodyOptions:
    """Prosody with the plugin and mod_cloud_notify off: in direct mode the component
    handles the clients' `<enable/>`, and what is recorded is the plugin's doing alone."""
    return dataclasses.replace(
        ProsodyOptions(
            domain=DOMAIN,
            component_jid=COMPONENT_JID,
            component_secret=PLUGIN_SECRET,
            xmpp_push_plugin=True,
            cloud_notify=False,
        ),
        **overrides,
    )


@contextlib.contextmanager
def prosody_plugin_server(directory: Path) -> Iterator[Prosody]:
    """The Prosody a plugin test module shares, with the accounts in `USERS`."""
    require_server("prosody", "prosody prosody-modules lua-unbound lua-event lua-sec")
    server = Prosody(
        directory,
        prosody_plugin_options(
            # admin_shell: `prosodyctl shell module reload`; csi without csi_simple: an
            # inactive client that mod_smacks does not ask for acknowledgements.
            extra_modules=("admin_shell", "csi"),
            extra_components={OTHER_COMPONENT: OTHER_SECRET},
        ),
    )
    with started_with_users(server):
        yield server


_EJABBERD_LOG_ENTRY = re.compile(r"^(?=\d{4}-\d\d-\d\d )", re.MULTILINE)
"""Where an entry of ejabberd's log begins (a stack trace spans several lines)."""


def is_ejabberd_plugin_failure(entry: str) -> bool:
    """A log entry of the module's own (its caught errors, a hook crash ejabberd caught
    for it) or one whose stack trace runs through it."""
    header = entry.split("\n", 1)[0]
    if "[error]" not in header and "[critical]" not in header:
        return False
    return "mod_xmpp_push" in header or "{mod_xmpp_push," in entry


@contextlib.contextmanager
def ejabberd_plugin_server(directory: Path) -> Iterator[Ejabberd]:
    """The ejabberd a plugin test module shares, with the accounts in `USERS`: its own
    push modules are off, its `ack_timeout` is far away (ejabberd would close an unacking
    connection at that point), and its resumption timeout is short, so that a session
    still resumable after it proves the plugin's hibernation keepalive. On the way out,
    fails if the module ever failed inside ejabberd, whatever the tests saw."""
    require_server("ejabberdctl", "ejabberd")
    server = Ejabberd(
        directory,
        EjabberdOptions(
            domain=DOMAIN,
            component_jid=COMPONENT_JID,
            component_secret=PLUGIN_SECRET,
            xmpp_push_plugin=True,
            push=False,  # mod_push_keepalive would stretch timeouts too
            resume_timeout=EJABBERD_RESUME_TIMEOUT,
            ack_timeout=600,
            extra_components={OTHER_COMPONENT: OTHER_SECRET},
            extra_modules="mod_admin_extra: {}",  # ejabberdctl restart_module
        ),
    )
    with started_with_users(server):
        yield server
        failures = [
            entry
            for entry in _EJABBERD_LOG_ENTRY.split(server.log_text())
            if is_ejabberd_plugin_failure(entry)
        ]
        assert not failures, "\n".join(failures)


def reload_plugin(server: XmppServer) -> None:
    """Stop and start the plugin in the running `server` (Prosody: `prosodyctl shell
    module reload`; ejabberd: `ejabberdctl restart_module`)."""
    if isinstance(server, Ejabberd):
        server.ctl("restart_module", DOMAIN, "mod_xmpp_push")
        return
    assert isinstance(server, Prosody)
    shell = [require_binary("prosodyctl", "prosody"), "--config", str(server.config_path), "shell"]
    reload = subprocess.run(
        [*shell, "module", "reload", "xmpp_push", DOMAIN],
        cwd=server.run_dir,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert reload.returncode == 0, reload.stdout + reload.stderr
