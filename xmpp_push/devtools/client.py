"""A small XMPP client that behaves like a phone app, for tests and `xmpp-push demo`.

It logs in over plain TCP on a loopback port (the throw-away servers speak no TLS),
enables and disables XEP-0357 push, sends and receives messages, and logs out
cleanly or drops its connection like a phone losing its network. With stream
management it can also lose its connection and come back (`cut()`, `resume()`), or
freeze like a suspended app whose kernel still acknowledges TCP (`stop_reading()`).

    alice = await XmppClient.connect("alice@localhost", "pw", "127.0.0.1", prosody.c2s_port)
    await alice.enable_push("push.localhost", "n1", {"service": "apns", "device_id": "ab12"})
    await alice.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import struct
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self
from xml.etree.ElementTree import Element, SubElement, fromstring

from slixmpp import JID, ClientXMPP, Iq, Message
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.plugins.xep_0004.stanza import Form
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

__all__ = [
    "NS_PUSH",
    "PUBLISH_OPTIONS",
    "PushDisable",
    "PushEnable",
    "ReceivedMessage",
    "XmppClient",
    "XmppClientError",
    "XmppStanzaError",
]

NS_PUSH = "urn:xmpp:push:0"
NS_PING = "urn:xmpp:ping"
NS_CSI = "urn:xmpp:csi:0"
MessageType = Literal["chat", "normal", "headline", "groupchat"]
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"


class PushEnable(ElementBase):
    """XEP-0357 `<enable jid='push.example.org' node='n1'>` with an optional
    publish-options form, which the user's server echoes in every publish."""

    name = "enable"
    namespace = NS_PUSH
    plugin_attrib = "push_enable"
    interfaces: ClassVar[set[str]] = {"jid", "node"}


class PushDisable(ElementBase):
    """XEP-0357 `<disable jid='push.example.org' [node='n1']/>`; without a node, every
    registration of the account for that push service goes."""

    name = "disable"
    namespace = NS_PUSH
    plugin_attrib = "push_disable"
    interfaces: ClassVar[set[str]] = {"jid", "node"}


register_stanza_plugin(Iq, PushEnable)
register_stanza_plugin(Iq, PushDisable)
register_stanza_plugin(PushEnable, Form)


class XmppClientError(Exception):
    """Login, connection or protocol trouble in the test client."""


class XmppStanzaError(XmppClientError):
    """The server answered an IQ with an error; `condition` is e.g. `item-not-found`."""

    def __init__(self, condition: str, error_type: str, text: str, stanza: Element) -> None:
        super().__init__(f"{error_type}/{condition}" + (f": {text}" if text else ""))
        self.condition = condition
        self.error_type = error_type
        self.text = text
        self.stanza = stanza


@dataclass(frozen=True)
class ReceivedMessage:
    sender: str
    """The full JID the server stamped in `from`."""
    body: str
    """Empty for body-less messages (chat states, receipts)."""
    type: str
    xml: Element


@functools.cache
def _plain_tls_context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class _Session(ClientXMPP):
    """slixmpp's client, set up for the throw-away servers: plain TCP, SCRAM without
    TLS, no DNS."""

    def __init__(self, jid: str, password: str, *, stream_management: bool) -> None:
        # slixmpp builds a verifying TLS context per client by default, loading the
        # system CA bundle (~0.1 s of CPU each); these streams never use TLS.
        super().__init__(jid, password, ssl_context=_plain_tls_context())
        # The servers listen on custom ports without TLS (PROTOCOLS.md §8): no direct
        # TLS attempt, and SCRAM over plaintext must be allowed explicitly.
        self.enable_direct_tls = False
        self.plugin["feature_mechanisms"].unencrypted_scram = True
        self.use_ipv6 = False
        if stream_management:
            self.register_plugin("xep_0198")


class XmppClient:
    """One logged-in account. Make it with `await XmppClient.connect(...)`."""

    def __init__(self, session: _Session, *, stream_management: bool) -> None:
        self._session = session
        self.stream_management = stream_management
        self._messages: asyncio.Queue[ReceivedMessage] = asyncio.Queue()
        session.add_event_handler("message", self._on_message)

    @classmethod
    async def connect(
        cls,
        jid: str,
        password: str,
        host: str,
        port: int,
        *,
        stream_management: bool = False,
        timeout: float = 15.0,
    ) -> XmppClient:
        """Log in, bind a resource, (with `stream_management`) enable resumable XEP-0198,
        and send initial presence, so that messages reach this session and not
        offline storage. Raises XmppClientError on a refused login or connection."""
        session = _Session(jid, password, stream_management=stream_management)
        client = cls(session, stream_management=stream_management)
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def succeed(_event: Any) -> None:
            if not ready.done():
                ready.set_result(None)

        def fail(reason: str) -> Callable[[Any], None]:
            def handler(event: Any) -> None:
                if not ready.done():
                    ready.set_exception(XmppClientError(f"{jid} at {host}:{port}: {reason}"))
                _ = event

            return handler

        if stream_management:
            session.add_event_handler("sm_enabled", succeed)
            session.add_event_handler("sm_failed", fail("the server refused stream management"))
        else:
            session.add_event_handler("session_start", succeed)
        session.add_event_handler("failed_all_auth", fail("authentication failed"))
        session.add_event_handler("connection_failed", fail("connection failed"))
        session.add_event_handler("stream_error", fail("stream error"))
        session.add_event_handler("disconnected", fail("disconnected during login"))
        session.connect(host, port)
        try:
            await asyncio.wait_for(ready, timeout)
            session.send_presence()
            # A ping round trip on the same stream: once it is answered, the server has
            # processed the presence too, so a message sent to this account from now on
            # reaches this session instead of offline storage.
            ping = session.make_iq_get()
            SubElement(ping.xml, f"{{{NS_PING}}}ping")
            await client._request(ping, timeout)
        except BaseException:
            await client._shut_down(wait=0)
            raise
        return client

    @property
    def jid(self) -> str:
        """The full JID the server bound."""
        full: str = self._session.boundjid.full
        return full

    async def enable_push(
        self, jid: str, node: str, fields: Mapping[str, str], *, timeout: float = 10.0
    ) -> Element:
        """Send XEP-0357 `<enable/>` with `fields` as a submitted publish-options form;
        returns the `result` IQ, raises XmppStanzaError with the server's condition."""
        iq = self._session.make_iq_set()
        enable = iq["push_enable"]
        enable["jid"] = jid
        enable["node"] = node
        if fields:
            form = enable["form"]
            form["type"] = "submit"
            # No type on FORM_TYPE: the shape apps send (PROTOCOLS.md §1.1).
            form.add_field(var="FORM_TYPE", value=PUBLISH_OPTIONS)
            for var, value in fields.items():
                form.add_field(var=var, value=value)
        return await self._request(iq, timeout)

    async def disable_push(
        self, jid: str, node: str | None = None, *, timeout: float = 10.0
    ) -> Element:
        """Send XEP-0357 `<disable/>`; without `node`, for every node of that push JID."""
        iq = self._session.make_iq_set()
        disable = iq["push_disable"]
        disable["jid"] = jid
        if node is not None:
            disable["node"] = node
        return await self._request(iq, timeout)

    async def send_message(
        self,
        to: str,
        body: str,
        *,
        message_type: MessageType = "chat",
        payload: Iterable[Element | str] = (),
    ) -> None:
        """Send a message; an empty `body` sends none. `payload`: more children, as
        elements or XML text with their namespace (a chat state, OMEMO, a Jingle
        `<propose/>`)."""
        message = self._session.make_message(mto=JID(to), mbody=body or None, mtype=message_type)
        for child in payload:
            # The caller's own XML (a test's stanza), never data received from a peer.
            message.xml.append(fromstring(child) if isinstance(child, str) else child)  # noqa: S314
        message.send()
        # Hand control to slixmpp's writer so the stanza leaves before we return.
        await asyncio.sleep(0)

    async def wait_for_message(self, timeout: float = 10.0) -> ReceivedMessage:
        """The next message stanza this session received (TimeoutError if none)."""
        return await asyncio.wait_for(self._messages.get(), timeout)

    async def close(self, timeout: float = 5.0) -> None:
        """Log out cleanly: `</stream:stream>`, then wait for the server's. The server
        ends the session at once (no hibernation, even with stream management)."""
        await self._shut_down(wait=timeout)

    async def abort(self) -> None:
        """Drop the TCP connection with a RST, without closing the stream: a phone that
        lost its network. With stream management the server keeps the session
        (Prosody: hibernated, ejabberd: pending)."""
        transport = self._session.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close() sends RST instead of FIN (PROTOCOLS.md §9).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self._shut_down(wait=0)

    async def cut(self, rst: bool = True) -> None:
        """Lose the TCP connection without closing the stream, as a phone does when its
        network goes: with `rst` an RST (SO_LINGER 0), otherwise a FIN (a plain close;
        the kernel still sends an RST if unread data is waiting, e.g. after
        `stop_reading()`). The XEP-0198 state stays, so `resume()` can take the same
        session up again; the server hibernates it (Prosody) or keeps it pending
        (ejabberd)."""
        session = self._session
        transport = session.transport
        if transport is None:
            raise XmppClientError(f"{self.jid}: cut() while not connected")
        if rst:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        lost = session.disconnected
        if rst:
            transport.abort()
        else:
            transport.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(lost), 5)
        # Keepalives and IQ timeouts of the lost connection would fire into nothing.
        for name in list(session.scheduled_events):
            session.cancel_schedule(name)

    async def resume(self, timeout: float = 15.0) -> None:
        """Reconnect after `cut()` and resume the session (XEP-0198 `<resume/>`). What the
        server re-sends comes out of `wait_for_message`. Raises XmppClientError if the
        server answers `<failed/>` (the session expired), TimeoutError if nothing comes
        within `timeout`; the client is closed then."""
        session = self._session
        if session.transport is not None:
            raise XmppClientError(f"{self.jid}: resume() while still connected; cut() first")
        if not self.stream_management or not session.plugin["xep_0198"].sm_id:
            raise XmppClientError(f"{self.jid}: no resumable stream to resume")
        if session.custom_address is None:
            raise XmppClientError(f"{self.jid}: resume() without the address of the first connect")
        host, port = session.custom_address
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def resumed(_event: Any) -> None:
            if not outcome.done():
                outcome.set_result(None)

        def failed(reason: str) -> Callable[[Any], None]:
            def handler(_event: Any) -> None:
                if not outcome.done():
                    outcome.set_exception(XmppClientError(f"{self.jid}: {reason}"))

            return handler

        handlers: list[tuple[str, Callable[[Any], None]]] = [
            ("session_resumed", resumed),
            ("sm_failed", failed("the server refused to resume the session (<failed/>)")),
            ("failed_all_auth", failed("authentication failed")),
            ("connection_failed", failed("connection failed")),
            ("stream_error", failed("stream error")),
        ]
        for event, handler in handlers:
            session.add_event_handler(event, handler)
        try:
            session.connect(host, port)
            await asyncio.wait_for(outcome, timeout)
        except BaseException:
            await self._shut_down(wait=0)
            raise
        finally:
            for event, handler in handlers:
                session.del_event_handler(event, handler)

    async def set_active(self, active: bool) -> None:
        """XEP-0352 client state indication: `<inactive/>` as an app going to the
        background, `<active/>` as it comes back (the server needs mod_csi)."""
        state = "active" if active else "inactive"
        self._session.send_raw(f"<{state} xmlns='{NS_CSI}'/>")
        await asyncio.sleep(0)

    def stop_reading(self) -> None:
        """Stop reading the socket: a frozen app whose kernel still acknowledges TCP, so
        the server's writes succeed but nothing is processed, and no XEP-0198
        acknowledgement goes back. `start_reading()` carries on where it stopped."""
        self._transport("stop_reading").pause_reading()

    def start_reading(self) -> None:
        self._transport("start_reading").resume_reading()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        await self.close()

    def _transport(self, caller: str) -> asyncio.Transport:
        transport = self._session.transport
        if transport is None:
            raise XmppClientError(f"{self.jid}: {caller}() while not connected")
        return transport

    async def _request(self, iq: Any, timeout: float) -> Element:
        try:
            result = await iq.send(timeout=timeout)
        except IqError as error:
            stanza = error.iq
            raise XmppStanzaError(
                stanza["error"]["condition"],
                stanza["error"]["type"],
                stanza["error"]["text"],
                stanza.xml,
            ) from None
        except IqTimeout:
            raise TimeoutError(f"no answer to IQ {iq['id']} within {timeout:g} s") from None
        reply: Element = result.xml
        return reply

    def _on_message(self, message: Message) -> None:
        self._messages.put_nowait(
            ReceivedMessage(
                sender=str(message["from"]),
                body=str(message["body"]),
                type=str(message["type"]),
                xml=message.xml,
            )
        )

    async def _shut_down(self, *, wait: float) -> None:
        session = self._session
        session.cancel_connection_attempt()
        if wait > 0 and session.transport is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(session.disconnect(wait=wait), wait + 1)
        session.abort()
        # slixmpp leaves its outgoing-filter task running after a disconnect; cancel it
        # here, or the event loop reports "Task was destroyed but it is pending!".
        pending = session._run_out_filters
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
        session._run_out_filters = None
        # Timers (keepalives, IQ timeouts) would otherwise fire into a closed stream.
        for name in list(session.scheduled_events):
            session.cancel_schedule(name)
