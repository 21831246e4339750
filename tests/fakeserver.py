"""A minimal XEP-0114 server side, for tests of the link itself.

It accepts the component's stream, checks the handshake, and lets a test write raw
stanzas (several in one write, right behind `<handshake/>` if it likes) and read what
the component sends back. Real servers are used everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import cast
from xml.etree import ElementTree as ET
from xml.sax.saxutils import quoteattr

__all__ = ["FakeXmppServer"]

STREAM_ID = "f4k3s7r34m"
_NS_PLUGIN = "urn:xmpp-push:plugin:1"


def _is_plugin_request(element: ET.Element) -> bool:
    return (
        element.tag == "{jabber:component:accept}iq"
        and element.get("type") in {"get", "set"}
        and any(child.tag.startswith(f"{{{_NS_PLUGIN}}}") for child in element)
    )


def _unavailable(request: ET.Element) -> str:
    return (
        f"<iq type='error' id={quoteattr(request.get('id', ''))}"
        f" from={quoteattr(request.get('to', ''))} to={quoteattr(request.get('from', ''))}>"
        "<error type='cancel'><service-unavailable"
        " xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>"
    )


class FakeXmppServer:
    def __init__(
        self, secret: str, *, greeting_extra: str = "", plugin_requests: bool = False
    ) -> None:
        self.secret = secret
        self.greeting_extra = greeting_extra
        """Raw XML sent in the same write as `<handshake/>`."""
        self.plugin_requests = plugin_requests
        """False: answer the component's server-plugin requests (docs/plugin-protocol.md)
        `service-unavailable` on our own, as a server without the plugin does; True: hand
        them to the test like every other stanza."""
        self.received: asyncio.Queue[ET.Element] = asyncio.Queue()
        self.handshakes = 0
        self.connected = asyncio.Event()
        """Set at each accepted handshake, cleared when the link is cut."""
        self._server: asyncio.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._sessions: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    def drop(self) -> None:
        """Cut the current component connection, as a server restart would."""
        self.connected.clear()
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None

    def send(self, xml: str) -> None:
        assert self._writer is not None, "no component connected"
        self._writer.write(xml.encode())

    async def wait_connected(self, timeout: float = 20.0) -> None:
        await asyncio.wait_for(self.connected.wait(), timeout)

    async def next_stanza(self, timeout: float = 5.0) -> ET.Element:
        return await asyncio.wait_for(self.received.get(), timeout)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._sessions.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(("start", "end"))
        depth = 0
        authenticated = False
        expected = hashlib.sha1((STREAM_ID + self.secret).encode()).hexdigest()
        while data := await reader.read(65536):
            parser.feed(data)
            for pair in parser.read_events():
                # Only start/end events were asked for: each carries an element.
                event, element = cast(tuple[str, ET.Element], pair)
                if event == "start":
                    depth += 1
                    if depth == 1:
                        writer.write(
                            b"<?xml version='1.0'?><stream:stream "
                            b"xmlns='jabber:component:accept' "
                            b"xmlns:stream='http://etherx.jabber.org/streams' "
                            + f"id='{STREAM_ID}' from='push.localhost'>".encode()
                        )
                    continue
                depth -= 1
                if depth == 0:
                    # The component closed its stream: close ours, as a server does.
                    writer.write(b"</stream:stream>")
                    await writer.drain()
                    return
                if depth != 1:
                    continue
                if not authenticated:
                    if element.text != expected:
                        writer.write(
                            b"<stream:error><not-authorized "
                            b"xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
                            b"</stream:stream>"
                        )
                        await writer.drain()
                        return
                    authenticated = True
                    self.handshakes += 1
                    self._writer = writer
                    self.connected.set()
                    writer.write(b"<handshake/>" + self.greeting_extra.encode())
                    continue
                if not self.plugin_requests and _is_plugin_request(element):
                    writer.write(_unavailable(element).encode())
                    continue
                await self.received.put(element)

    async def __aenter__(self) -> FakeXmppServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self.stop()
