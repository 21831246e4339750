"""The client side of HTTP/2 (RFC 9113) for request/answer traffic, without I/O.

`ClientConnection` turns requests into bytes to send and received bytes into events;
the caller owns the socket, the timers and what a request means. It exists because
APNs needs a narrow slice of HTTP/2 (one POST with a small body per push, a tiny
answer) and the general-purpose `h2` and `hyperframe` spent about a third of the CPU
per push on state machines, validation and frame objects that slice never needs
(docs/apns.md, "Our own HTTP/2 framing").

Supported: the connection preface and SETTINGS exchange, HEADERS and CONTINUATION
(incoming PADDED and PRIORITY flags read and skipped), DATA with padding, flow control
in both directions (bodies go out within the connection and stream windows, the rest
waits for WINDOW_UPDATE; received bytes are given back at once), RST_STREAM, PING and
GOAWAY both ways. Unknown frame types and settings are ignored, as are frames on
streams that are already closed or that we reset.

Deliberately not supported: server push (refused with SETTINGS_ENABLE_PUSH=0, so a
PUSH_PROMISE is a protocol error), priorities (PRIORITY frames and fields are
skipped), trailers and interim answers (their fields reach the caller as another
`Headers` event; HEADERS with `:status` replace the earlier status). Every protocol
violation is a connection error (RFC 9113 §5.4.1 allows treating stream errors so):
a GOAWAY goes out and `ConnectionFailed` is the last event.

The encoder is the caller's: it must not use a dynamic table (HPACK's table size
update to 0 in its first block does that), so the server's SETTINGS_HEADER_TABLE_SIZE
never obliges us to anything. Answers are decoded by our own HPACK decoder (`_hpack`),
whose dynamic table the server fills.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from xmpp_push.providers._hpack import DEFAULT_TABLE_SIZE, Decoder, HpackError

__all__ = [
    "PREFACE",
    "ClientConnection",
    "ConnectionFailed",
    "Data",
    "ErrorCode",
    "Event",
    "GoAway",
    "HeaderEncoder",
    "Headers",
    "Http2Error",
    "PingAcknowledged",
    "SettingsChanged",
    "StreamReset",
]

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


# Frame types and flags (RFC 9113 §6), plain ints: they are compared on every frame.
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_PRIORITY: Final = 0x2
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PUSH_PROMISE: Final = 0x5
_PING: Final = 0x6
_GOAWAY: Final = 0x7
_WINDOW_UPDATE: Final = 0x8
_CONTINUATION: Final = 0x9

_END_STREAM: Final = 0x1
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4
_PADDED: Final = 0x8
_PRIORITY_FLAG: Final = 0x20

_ENABLE_PUSH: Final = 0x2
_MAX_CONCURRENT_STREAMS: Final = 0x3
_INITIAL_WINDOW_SIZE: Final = 0x4
_MAX_FRAME_SIZE: Final = 0x5

_FRAME_HEADER: Final = struct.Struct(">BHBBL")
"""24-bit length (as 8 + 16 bits), type, flags, reserved bit + 31-bit stream id."""
_SETTING: Final = struct.Struct(">HL")
_U32: Final = struct.Struct(">L")
_TWO_U32: Final = struct.Struct(">LL")

_MAX_WINDOW: Final = 2**31 - 1
_MAX_STREAM_ID: Final = 2**31 - 1
_NO_LIMIT: Final = 2**32 - 1
_DEFAULT_WINDOW: Final = 65_535
_MIN_FRAME_SIZE: Final = 16_384
_MAX_FRAME_SIZE_LIMIT: Final = 2**24 - 1
_RECEIVE_FRAME_SIZE: Final = _MIN_FRAME_SIZE
"""Our SETTINGS_MAX_FRAME_SIZE: the default, so we never announce it."""
_DECODER_TABLE_SIZE: Final = DEFAULT_TABLE_SIZE
"""Our SETTINGS_HEADER_TABLE_SIZE: the default, so we never announce it."""
_MAX_HEADER_BLOCK: Final = 64 * 1024
"""A header block (HEADERS plus CONTINUATIONs) longer than this is an attack, not APNs."""


class Http2Error(Exception):
    """A request the connection can no longer take (closed, going away, ids used up)."""


class HeaderEncoder(Protocol):
    """HPACK for our header blocks; must keep its dynamic table at size 0."""

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes: ...


# --------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Headers:
    """A header block of an answer: its head, or trailers / an interim answer."""

    stream_id: int
    headers: Sequence[tuple[bytes, bytes]]
    end_stream: bool


@dataclass(frozen=True, slots=True)
class Data:
    """Part of an answer's body (possibly empty when it only ends the stream)."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    """The server's SETTINGS were applied (and acknowledged)."""

    max_concurrent_streams: int


@dataclass(frozen=True, slots=True)
class PingAcknowledged:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAway:
    """The server stops: streams above `last_stream_id` were dropped unanswered."""

    last_stream_id: int
    error_code: int
    debug: bytes
    dropped: tuple[int, ...]
    """Our streams above `last_stream_id`: never processed, safe to send again."""


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The server broke the protocol; a GOAWAY naming the error is queued, nothing
    more will be read."""

    error_code: ErrorCode
    message: str


Event = (
    Headers | Data | StreamReset | SettingsChanged | PingAcknowledged | GoAway | ConnectionFailed
)


class _ProtocolViolation(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Stream:
    """One of our requests from its HEADERS until the answer ends or a reset."""

    __slots__ = ("answered", "body", "local_open", "receive_window", "send_window", "sent")

    def __init__(self, send_window: int) -> None:
        self.send_window = send_window
        self.receive_window = _DEFAULT_WINDOW
        self.body = b""
        self.sent = 0
        self.local_open = True
        """Until our END_STREAM went out."""
        self.answered = False
        """Whether the answer's header block arrived (DATA before it is a violation)."""


class _HeaderBlock:
    __slots__ = ("data", "end_stream", "stream_id")

    def __init__(self, stream_id: int, end_stream: bool, data: bytes) -> None:
        self.stream_id = stream_id
        self.end_stream = end_stream
        self.data = bytearray(data)


class ClientConnection:
    """One HTTP/2 connection, client side: `send_request` / `receive` / `data_to_send`."""

    def __init__(self, encoder: HeaderEncoder) -> None:
        self._encoder = encoder
        self._decoder = Decoder(_DECODER_TABLE_SIZE)
        self._out = bytearray()
        self._buffer = b""
        self._events: list[Event] = []
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, None] = {}
        """Streams whose body waits for window, oldest first."""
        self._next_stream_id = 1
        self._header_block: _HeaderBlock | None = None
        self._settings_received = False
        self._send_window = _DEFAULT_WINDOW
        self._receive_window = _DEFAULT_WINDOW
        self._initial_send_window = _DEFAULT_WINDOW
        self._max_frame_size = _MIN_FRAME_SIZE
        self.max_concurrent_streams = _NO_LIMIT
        """The server's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited until it says)."""
        self._goaway_last_stream_id: int | None = None
        self.closed = False
        """After our GOAWAY: nothing more is read or sent."""

    # -- what the caller sends --------------------------------------------------------

    def initiate(self) -> None:
        """The client preface and our SETTINGS; the first bytes on the connection."""
        self._out += PREFACE
        self._frame(_SETTINGS, 0, 0, _SETTING.pack(_ENABLE_PUSH, 0))

    def send_request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        """Open a stream with `headers`, send `body` as far as the windows allow."""
        if self.closed or self._goaway_last_stream_id is not None:
            raise Http2Error("the connection takes no new streams")
        stream_id = self._next_stream_id
        if stream_id > _MAX_STREAM_ID:
            raise Http2Error("stream ids exhausted")
        self._next_stream_id = stream_id + 2
        stream = _Stream(self._initial_send_window)
        self._streams[stream_id] = stream
        block = self._encoder.encode(headers)
        max_size = self._max_frame_size
        end_stream = _END_STREAM if not body else 0
        if len(block) <= max_size:
            self._frame(_HEADERS, _END_HEADERS | end_stream, stream_id, block)
        else:
            # Nothing can come between these frames: they go into the buffer together.
            self._frame(_HEADERS, end_stream, stream_id, block[:max_size])
            for start in range(max_size, len(block), max_size):
                last = start + max_size >= len(block)
                flags = _END_HEADERS if last else 0
                self._frame(_CONTINUATION, flags, stream_id, block[start : start + max_size])
        if body:
            stream.body = body
            self._pump(stream_id, stream)
        else:
            stream.local_open = False
        return stream_id

    def reset_stream(self, stream_id: int, error_code: ErrorCode = ErrorCode.CANCEL) -> None:
        """RST_STREAM for one of our open streams; its late frames are then ignored."""
        if self.closed or self._streams.pop(stream_id, None) is None:
            return
        self._blocked.pop(stream_id, None)
        self._frame(_RST_STREAM, 0, stream_id, _U32.pack(error_code))

    def ping(self, opaque: bytes) -> None:
        self._frame(_PING, 0, 0, opaque)

    def close(self, error_code: ErrorCode = ErrorCode.NO_ERROR, debug: bytes = b"") -> None:
        """GOAWAY: we are done with this connection."""
        if self.closed:
            return
        # last_stream_id 0: the server opens no streams (push is off).
        self._frame(_GOAWAY, 0, 0, _TWO_U32.pack(0, error_code) + debug)
        self.closed = True
        self._streams.clear()
        self._blocked.clear()

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _frame(self, frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)
        self._out += _FRAME_HEADER.pack(length >> 16, length & 0xFFFF, frame_type, flags, stream_id)
        self._out += payload

    def _pump(self, stream_id: int, stream: _Stream) -> None:
        """Send as much of the stream's body as the flow-control windows allow."""
        body = stream.body
        sent = stream.sent
        total = len(body)
        while sent < total:
            size = min(self._send_window, stream.send_window, self._max_frame_size, total - sent)
            if size <= 0:
                stream.sent = sent
                self._blocked[stream_id] = None
                return
            end = sent + size
            self._frame(_DATA, _END_STREAM if end == total else 0, stream_id, body[sent:end])
            self._send_window -= size
            stream.send_window -= size
            sent = end
        stream.sent = sent
        stream.body = b""
        stream.local_open = False
        self._blocked.pop(stream_id, None)

    def _pump_blocked(self) -> None:
        for stream_id in list(self._blocked):
            if self._send_window <= 0:
                return
            stream = self._streams.get(stream_id)
            if stream is None:
                self._blocked.pop(stream_id, None)
            else:
                self._pump(stream_id, stream)

    # -- what the server sends --------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """The events in `data`; an incomplete frame at its end waits for the rest."""
        if self.closed:
            return []
        if self._buffer:
            data = self._buffer + data
        events: list[Event] = []
        self._events = events
        end = len(data)
        pos = 0
        try:
            while end - pos >= 9:
                high, low, frame_type, flags, stream_id = _FRAME_HEADER.unpack_from(data, pos)
                length = high << 16 | low
                if length > _RECEIVE_FRAME_SIZE:
                    raise _ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "frame too large")
                start = pos + 9
                if end - start < length:
                    break
                pos = start + length
                self._on_frame(frame_type, flags, stream_id & _MAX_STREAM_ID, data[start:pos])
        except _ProtocolViolation as violation:
            self.close(violation.code, violation.message.encode())
            events.append(ConnectionFailed(violation.code, violation.message))
            self._buffer = b""
            return events
        self._buffer = data[pos:]
        return events

    def _on_frame(self, frame_type: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._header_block is not None and frame_type != _CONTINUATION:
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "header block interrupted")
        if not self._settings_received and frame_type != _SETTINGS:
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "preface: SETTINGS expected")
        if frame_type == _HEADERS:
            self._on_headers(flags, stream_id, payload)
        elif frame_type == _DATA:
            self._on_data(flags, stream_id, payload)
        elif frame_type == _SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif frame_type == _WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif frame_type == _RST_STREAM:
            self._on_rst_stream(stream_id, payload)
        elif frame_type == _PING:
            self._on_ping(flags, stream_id, payload)
        elif frame_type == _GOAWAY:
            self._on_goaway(stream_id, payload)
        elif frame_type == _CONTINUATION:
            self._on_continuation(flags, stream_id, payload)
        elif frame_type == _PRIORITY:
            if stream_id == 0 or len(payload) != 5:
                raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "malformed PRIORITY")
        elif frame_type == _PUSH_PROMISE:
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE with push disabled")
        # Any other type is an extension we do not know: ignored (RFC 9113 §4.1).

    def _stream(self, stream_id: int) -> _Stream | None:
        """Our open stream `stream_id`, None if closed; a violation if never opened."""
        stream = self._streams.get(stream_id)
        if stream is None and (
            stream_id == 0 or stream_id % 2 == 0 or stream_id >= self._next_stream_id
        ):
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, f"frame on idle stream {stream_id}")
        return stream

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        start = 0
        stop = len(payload)
        if flags & _PADDED:
            if not payload:
                raise _ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "HEADERS without pad length")
            start = 1
            stop -= payload[0]
        if flags & _PRIORITY_FLAG:
            start += 5
        if start > stop:
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "HEADERS padding too long")
        fragment = payload[start:stop] if start or stop != len(payload) else payload
        end_stream = bool(flags & _END_STREAM)
        if flags & _END_HEADERS:
            self._on_header_block(stream_id, fragment, end_stream)
        else:
            self._stream(stream_id)  # fail early on an idle stream
            self._header_block = _HeaderBlock(stream_id, end_stream, fragment)

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        block = self._header_block
        if block is None or block.stream_id != stream_id:
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        block.data += payload
        if len(block.data) > _MAX_HEADER_BLOCK:
            raise _ProtocolViolation(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if flags & _END_HEADERS:
            self._header_block = None
            self._on_header_block(stream_id, bytes(block.data), block.end_stream)

    def _on_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        stream = self._stream(stream_id)
        # Decoded even for a stream we reset: the block may change the dynamic table.
        try:
            headers = self._decoder.decode(block)
        except HpackError as exc:
            raise _ProtocolViolation(ErrorCode.COMPRESSION_ERROR, repr(exc)) from None
        if stream is None:
            return
        stream.answered = True
        self._events.append(Headers(stream_id, headers, end_stream))
        if end_stream:
            self._remote_end(stream_id, stream)

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        length = len(payload)
        # Flow control counts the whole payload, padding included, closed stream or not.
        if length > self._receive_window:
            raise _ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        self._receive_window -= length
        if self._receive_window <= _DEFAULT_WINDOW // 2:
            # Everything received is consumed at once: give it all back, in one frame
            # per half window rather than one per DATA frame.
            self._frame(_WINDOW_UPDATE, 0, 0, _U32.pack(_DEFAULT_WINDOW - self._receive_window))
            self._receive_window = _DEFAULT_WINDOW
        stream = self._stream(stream_id)
        if stream is None:
            return
        if not stream.answered:
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "DATA before HEADERS")
        if length > stream.receive_window:
            raise _ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "stream window exceeded")
        data = payload
        if flags & _PADDED:
            if not length or payload[0] >= length:
                raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "DATA padding too long")
            data = payload[1 : length - payload[0]]
        if flags & _END_STREAM:
            self._events.append(Data(stream_id, data, True))
            self._remote_end(stream_id, stream)
            return
        stream.receive_window -= length
        if stream.receive_window <= _DEFAULT_WINDOW // 2:
            increment = _DEFAULT_WINDOW - stream.receive_window
            self._frame(_WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))
            stream.receive_window = _DEFAULT_WINDOW
        self._events.append(Data(stream_id, data, False))

    def _remote_end(self, stream_id: int, stream: _Stream) -> None:
        del self._streams[stream_id]
        if stream.local_open:
            # Answered before the whole request went out (e.g. 413): RFC 9113 §8.1
            # lets us stop sending; close our half with a reset that says no error.
            self._blocked.pop(stream_id, None)
            self._frame(_RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.NO_ERROR))

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & _ACK:
            if not self._settings_received:
                raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "preface: SETTINGS expected")
            if payload:
                raise _ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "malformed SETTINGS")
        window_grew = False
        for offset in range(0, len(payload), 6):
            setting, value = _SETTING.unpack_from(payload, offset)
            if setting == _MAX_CONCURRENT_STREAMS:
                self.max_concurrent_streams = value
            elif setting == _INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise _ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "window too large")
                # Applies to the open streams too (RFC 9113 §6.9.2), possibly below 0.
                delta = value - self._initial_send_window
                self._initial_send_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > _MAX_WINDOW:
                        raise _ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
                window_grew = window_grew or delta > 0
            elif setting == _MAX_FRAME_SIZE:
                if not _MIN_FRAME_SIZE <= value <= _MAX_FRAME_SIZE_LIMIT:
                    raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self._max_frame_size = value
            elif setting == _ENABLE_PUSH and value != 0:
                # A server has nothing to be pushed (RFC 9113 §6.5.2).
                raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "ENABLE_PUSH from a server")
            # HEADER_TABLE_SIZE bounds our encoder's table, which is always empty;
            # MAX_HEADER_LIST_SIZE is advisory and our requests are small.
        self._settings_received = True
        self._frame(_SETTINGS, _ACK, 0, b"")
        self._events.append(SettingsChanged(self.max_concurrent_streams))
        if window_grew and self._blocked:
            self._pump_blocked()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & _MAX_WINDOW
        if stream_id == 0:
            if increment == 0:
                raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > _MAX_WINDOW:
                raise _ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
        else:
            stream = self._stream(stream_id)
            if stream is None:
                return
            if increment == 0:
                raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            stream.send_window += increment
            if stream.send_window > _MAX_WINDOW:
                raise _ProtocolViolation(ErrorCode.FLOW_CONTROL_ERROR, "window overflow")
        if self._blocked:
            self._pump_blocked()

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ProtocolViolation(ErrorCode.FRAME_SIZE_ERROR, "malformed RST_STREAM")
        if self._stream(stream_id) is None:
            return
        del self._streams[stream_id]
        self._blocked.pop(stream_id, None)
        self._events.append(StreamReset(stream_id, _U32.unpack(payload)[0]))

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) != 8:
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "malformed PING")
        if flags & _ACK:
            self._events.append(PingAcknowledged(payload))
        else:
            self._frame(_PING, _ACK, 0, payload)

    def _on_goaway(self, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) < 8:
            raise _ProtocolViolation(ErrorCode.PROTOCOL_ERROR, "malformed GOAWAY")
        last_stream_id, error_code = _TWO_U32.unpack_from(payload)
        last_stream_id &= _MAX_STREAM_ID
        if self._goaway_last_stream_id is not None:
            # A later GOAWAY may only lower the limit (RFC 9113 §6.8).
            last_stream_id = min(last_stream_id, self._goaway_last_stream_id)
        self._goaway_last_stream_id = last_stream_id
        dropped = tuple(sid for sid in self._streams if sid > last_stream_id)
        for sid in dropped:
            del self._streams[sid]
            self._blocked.pop(sid, None)
        self._events.append(GoAway(last_stream_id, error_code, payload[8:], dropped))
