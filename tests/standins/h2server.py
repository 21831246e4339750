"""The server side of one HTTP/2 connection, shared by the APNs and FCM stand-ins.

Built on `h2`, strict on what comes in (the stand-ins examine the project's own HTTP/2
client) and fast on what goes out. It keeps what both stand-ins need alike: the
connection's settings from the first frame on, the request being read per stream,
answer bodies sent within the client's flow-control windows, close/abort, and the
streams open at once. What a request means, and when a connection goes away, is each
stand-in's own (`data_received` is theirs).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings

__all__ = ["Incoming", "ServerConnection"]


@dataclass(slots=True)
class Incoming:
    """One request as it arrives: its header fields, its body so far."""

    headers: list[tuple[bytes, bytes]]
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    """Body bytes received, kept counting after the body stops growing (a cap)."""


class ServerConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._h2 = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self._incoming: dict[int, Incoming] = {}
        self._outgoing: dict[int, memoryview] = {}
        """Answer bodies waiting for the client's flow-control window."""
        self._open_streams: set[int] = set()
        """Streams not yet fully answered (for the stand-ins' peak concurrency)."""
        self._requests = 0
        self._going_away = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _start(self, settings: dict[SettingCodes, int]) -> None:
        """Send the preface with `settings` as initial values (not an update), so that
        they hold from the client's first frame on."""
        self._h2.local_settings = Settings(client=False, initial_values=settings)
        self._h2.initiate_connection()
        self._flush()

    def _lost(self) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def eof_received(self) -> bool:
        return False

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _request_opened(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._incoming[stream_id] = Incoming(headers)
        self._open_streams.add(stream_id)

    def _forget(self, stream_id: int) -> None:
        """The client reset the stream: nothing of it is kept."""
        self._incoming.pop(stream_id, None)
        self._outgoing.pop(stream_id, None)
        self._open_streams.discard(stream_id)

    def _respond(self, stream_id: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Send an answer (`headers` start with `:status`); the body goes out as far as
        the windows allow, the rest when they open."""
        try:
            self._h2.send_headers(stream_id, headers, end_stream=not body)
            if body:
                self._outgoing[stream_id] = memoryview(body)
                self._pump(stream_id)
        except H2Error:
            # The client reset the stream in the same read that completed it.
            self._outgoing.pop(stream_id, None)
        if stream_id not in self._outgoing:
            self._open_streams.discard(stream_id)

    def _pump(self, stream_id: int) -> None:
        body = self._outgoing[stream_id]
        while body:
            window = self._h2.local_flow_control_window(stream_id)
            if window <= 0:
                self._outgoing[stream_id] = body
                return
            size = min(window, self._h2.max_outbound_frame_size, len(body))
            self._h2.send_data(stream_id, body[:size].tobytes(), end_stream=size == len(body))
            body = body[size:]
        del self._outgoing[stream_id]
        self._open_streams.discard(stream_id)

    def _pump_all(self) -> None:
        for stream_id in list(self._outgoing):
            try:
                self._pump(stream_id)
            except H2Error:
                self._outgoing.pop(stream_id, None)
                self._open_streams.discard(stream_id)
            if self._h2.outbound_flow_control_window <= 0:
                return
