"""An HTTP/2 client over TLS for push APIs: pooled connections, many requests on each.

APNs and FCM HTTP v1 ask the same of HTTP/2: POST one small body, read one small
answer, thousands of times a second to one origin. This module does that on our own
framing (`_http2.ClientConnection`, sans I/O) and leaves what a request means to the
provider: `Pool.pick()` gives a connection, `Connection.request(headers, body)` gives a
`Response` (status, header fields, body) or raises `RequestFailed`.

What it guarantees (the defects of aioapns it was written against are in docs/apns.md):

* every received DATA frame is acknowledged, so the receive window never runs dry;
* a request cancelled by its caller (its deadline, say) resets its stream and frees
  its slot; the connection stays usable;
* the peer's MAX_CONCURRENT_STREAMS is respected (requests queue for a slot, capped at
  `stream_cap`), bodies are only sent within the flow-control windows;
* requests started in the same loop iteration go out in one write;
* connections are opened on first use, kept open with PINGs while idle and replaced
  after loss or GOAWAY; on GOAWAY the streams the server accepted still get their
  answers, those above its last stream id fail with reason `goaway` (never processed,
  safe to send again);
* every transport failure is one exception, `RequestFailed`, with a short reason
  (`connect_failed`, `connection_lost`, `goaway`, `stream_reset:<code>`, ...); each
  provider maps it into its `DeliveryError`.

The caller bounds each request's wait (`asyncio.timeout`); the connection only bounds
its own opening (`connect_timeout`) and its PINGs (`ping_timeout`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import structlog

from xmpp_push.providers._hpack import LiteralEncoder
from xmpp_push.providers._http2 import (
    ClientConnection,
    ConnectionFailed,
    Data,
    ErrorCode,
    Event,
    GoAway,
    Headers,
    Http2Error,
    PingAcknowledged,
    SettingsChanged,
    StreamReset,
)

__all__ = [
    "Connection",
    "Origin",
    "Pool",
    "RequestFailed",
    "Response",
    "tls_context",
]

_log = structlog.get_logger(__name__)

DEFAULT_STREAM_CAP: Final = 1000
"""Streams per connection when the server announces no lower limit (APNs' own)."""
# An answer larger than this is not a push API's answer; keep only the start.
_MAX_RESPONSE_BODY: Final = 64 * 1024
_CLOSE_GRACE: Final = 1.0
"""Seconds `aclose` waits for TLS close_notify before dropping a connection."""


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """TLS 1.2+ offering only `h2`; `ca_file` instead of the system's CAs when given.

    Made at start-up (loading CA files reads the disk), shared by every connection.
    """
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the connections go: `https://host[:port]`."""

    host: str
    port: int
    authority: str

    @classmethod
    def parse(cls, url: str, *, label: str) -> Origin:
        """The origin of `url`, which must have no path; errors name it `label`."""
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{label} must be an https:// URL, not {url!r}")
        if parts.path not in {"", "/"} or parts.query:
            raise ValueError(f"{label} takes no path: {url!r}")
        port = parts.port or 443
        return cls(host=parts.hostname, port=port, authority=parts.netloc)


@dataclass(frozen=True, slots=True)
class Response:
    """An answer: its status, its header fields (names lower-case) and its body (the
    first 64 KiB)."""

    status: int
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """The first field called `name` (lower-case), None without one."""
        for field, value in self.headers:
            if field == name:
                return value
        return None


class RequestFailed(Exception):
    """No answer: the connection could not be opened, was lost or went away, or the
    server reset the stream. Always worth trying again later."""

    def __init__(self, reason: str, cause: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause
        """For `connect_failed`: what failed (OSError, ssl.SSLCertVerificationError,
        TimeoutError, `RequestFailed("no_h2")` when the server did not pick HTTP/2)."""


class _Stream:
    """One request in flight; dropped from the connection as soon as it ends."""

    __slots__ = ("future", "headers", "received", "status")

    def __init__(self, future: asyncio.Future[Response]) -> None:
        self.future = future
        self.status: int | None = None
        self.headers: Sequence[tuple[bytes, bytes]] = ()
        self.received = bytearray()


class _State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    RETIRING = "retiring"
    """No new streams; closed once the streams in flight are answered."""
    CLOSED = "closed"


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Nobody may be waiting on a connection's readiness when it fails; mark the
    # exception as seen so asyncio does not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class Connection(asyncio.Protocol):
    """One TLS connection speaking HTTP/2 to one origin, multiplexing many requests."""

    def __init__(
        self,
        *,
        origin: Origin,
        ssl_context: ssl.SSLContext,
        connect_timeout: float,
        ping_interval: float,
        ping_timeout: float,
        on_closed: Callable[[Connection], None],
        number: int,
        stream_cap: int = DEFAULT_STREAM_CAP,
        varying_headers: Iterable[bytes] = (),
        event_prefix: str = "http2_",
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._origin = origin
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._on_closed = on_closed
        self._stream_cap = stream_cap
        # Stream ids are 31-bit and odd for a client; retire a connection well before
        # the end.
        self._last_stream_id = 2**31 - 2 * stream_cap - 1
        self._prefix = event_prefix
        self._log = _log.bind(host=origin.host, port=origin.port, connection=number)
        self._h2 = ClientConnection(LiteralEncoder(varying_headers))
        self._transport: asyncio.Transport | None = None
        self.state = _State.CONNECTING
        self._settings_seen: asyncio.Future[None] = self._loop.create_future()
        self._settings_seen.add_done_callback(_retrieve)
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._ready.add_done_callback(_retrieve)
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._streams: dict[int, _Stream] = {}
        self._active = 0
        """Streams open plus slots handed to waiters that have not opened theirs yet."""
        self._stream_limit = 1
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._writable = asyncio.Event()
        self._writable.set()
        self._flush_handle: asyncio.Handle | None = None
        self._last_received = self._loop.time()
        self._ping_ack: asyncio.Future[None] | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        self._connect_task: asyncio.Task[None] = self._loop.create_task(self._connect())

    @property
    def closed(self) -> bool:
        return self.state is _State.CLOSED

    @property
    def load(self) -> int:
        return self._active + len(self._slot_waiters)

    # -- life cycle -------------------------------------------------------------------

    async def _connect(self) -> None:
        origin = self._origin
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._loop.create_connection(
                    lambda: self,
                    origin.host,
                    origin.port,
                    ssl=self._ssl_context,
                    server_hostname=origin.host,
                )
                # The server's SETTINGS carry MAX_CONCURRENT_STREAMS: opening streams
                # before knowing it could exceed it.
                await asyncio.shield(self._settings_seen)
        except Exception as exc:  # refused, DNS, TLS, no h2, timeout: all the same to callers
            self._log.warning(self._prefix + "connect_failed", error=repr(exc))
            self._terminate("connect_failed", cause=exc)
            return
        if self.state is not _State.CONNECTING:
            return
        self.state = _State.OPEN
        self._ready.set_result(None)
        self._log.info(self._prefix + "connected")
        self._keepalive_task = self._loop.create_task(self._keepalive())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            # Both push APIs negotiate h2; a server that does not is not theirs.
            if not self._settings_seen.done():
                self._settings_seen.set_exception(RequestFailed("no_h2"))
            transport.close()
            return
        self._h2.initiate()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not _State.CLOSED:
            self._log.info(self._prefix + "connection_lost", error=repr(exc) if exc else None)
        self._terminate("connection_lost")
        if not self._lost.done():
            self._lost.set_result(None)

    def eof_received(self) -> bool:
        return False  # close our side too: HTTP/2 has no half-closed connection

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _terminate(self, reason: str, cause: BaseException | None = None) -> None:
        """Fail everything still waiting on this connection, once."""
        if self.state is _State.CLOSED:
            return
        self.state = _State.CLOSED
        for stream in self._streams.values():
            if not stream.future.done():
                stream.future.set_exception(RequestFailed(reason, cause))
        self._streams.clear()
        self._fail_waiters(reason, cause)
        self._writable.set()  # a request waiting for the socket to drain fails now
        for future in (self._settings_seen, self._ready):
            if not future.done():
                future.set_exception(RequestFailed(reason, cause))
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._keepalive_task is not None and self._keepalive_task is not asyncio.current_task():
            self._keepalive_task.cancel()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        elif self._transport is None and not self._lost.done():
            self._lost.set_result(None)
        self._on_closed(self)

    def _fail_waiters(self, reason: str, cause: BaseException | None = None) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(RequestFailed(reason, cause))

    def retire(self, why: str) -> None:
        """Stop taking requests, let those in flight finish, then close."""
        if self.state is not _State.OPEN:
            return
        self._log.info(self._prefix + "connection_retiring", why=why)
        self.state = _State.RETIRING
        self._fail_waiters("connection_retired")
        self._on_closed(self)
        self._close_if_drained()

    def _close_if_drained(self) -> None:
        if self.state is _State.RETIRING and not self._streams:
            self._h2.close()
            self._flush()
            self._terminate("closed")

    async def aclose(self) -> None:
        if self.state is not _State.CLOSED and self._transport is not None:
            self._h2.close()
            self._flush()
        self._terminate("provider_closed")
        self._connect_task.cancel()
        tasks = [t for t in (self._connect_task, self._keepalive_task) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._transport is not None:
            try:
                # A clean TLS shutdown needs the peer's close_notify; do not wait long.
                async with asyncio.timeout(_CLOSE_GRACE):
                    await asyncio.shield(self._lost)
            except TimeoutError:
                self._transport.abort()

    async def _keepalive(self) -> None:
        """PING an idle connection so a dead one is noticed before a request needs it."""
        while self.state in {_State.OPEN, _State.RETIRING}:
            await asyncio.sleep(self._ping_interval)
            if self._loop.time() - self._last_received < self._ping_interval:
                continue
            ack: asyncio.Future[None] = self._loop.create_future()
            self._ping_ack = ack
            self._h2.ping(os.urandom(8))
            self._flush()
            try:
                async with asyncio.timeout(self._ping_timeout):
                    await ack
            except TimeoutError:
                self._log.warning(self._prefix + "ping_unanswered", timeout=self._ping_timeout)
                self._terminate("ping_timeout")
                return

    # -- requests ---------------------------------------------------------------------

    async def request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> Response:
        """Send one request and wait for its answer; the caller bounds the wait.

        `headers` are the request's fields in order, pseudo-header fields first, names
        lower-case. Raises `RequestFailed` when no answer can come.
        """
        if not self._ready.done():
            # Shielded: a caller giving up must not cancel the connection attempt
            # others wait on.
            await asyncio.shield(self._ready)
        self._ready.result()
        await self._acquire_slot()
        try:
            if not self._writable.is_set():
                await self._writable.wait()
            if self.state is not _State.OPEN:
                raise RequestFailed("connection_lost")
            # The body goes out as far as the flow-control windows allow; the
            # engine sends the rest as the server opens them.
            stream_id = self._h2.send_request(headers, body)
        except Http2Error as exc:
            self._release_slot()
            raise RequestFailed("protocol_error", exc) from exc
        except BaseException:
            self._release_slot()
            raise
        stream = _Stream(self._loop.create_future())
        self._streams[stream_id] = stream
        self._schedule_flush()
        if stream_id >= self._last_stream_id:
            self.retire("stream_ids_exhausted")
        try:
            return await stream.future
        except asyncio.CancelledError:
            # Deadline or caller gave up: tell the server and free the slot now.
            self._abandon(stream_id)
            raise

    async def _acquire_slot(self) -> None:
        if self.state is not _State.OPEN:
            raise RequestFailed("connection_lost")
        if self._active < self._stream_limit and not self._slot_waiters:
            self._active += 1
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # The slot was handed to us just as we were cancelled: pass it on.
                self._release_slot()
            else:
                with contextlib.suppress(ValueError):
                    self._slot_waiters.remove(waiter)
            raise

    def _release_slot(self) -> None:
        self._active -= 1
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        while self._slot_waiters and self._active < self._stream_limit:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                self._active += 1  # reserved for the waiter, released if it gives up
                waiter.set_result(None)

    def _abandon(self, stream_id: int) -> None:
        if stream_id not in self._streams:
            return
        if self.state is not _State.CLOSED:
            self._h2.reset_stream(stream_id, ErrorCode.CANCEL)
            self._schedule_flush()
        self._drop(stream_id)

    def _drop(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is None:
            return
        self._release_slot()
        if self.state is _State.RETIRING:
            self._close_if_drained()

    # -- bytes in and out -------------------------------------------------------------

    def _schedule_flush(self) -> None:
        # Requests started in the same loop iteration share one TLS record and write.
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.state is _State.CLOSED:
            return  # bytes still buffered by TLS after we gave up on the connection
        self._last_received = self._loop.time()
        for event in self._h2.receive(data):
            self._handle(event)
            if self.closed:
                return
        self._flush()

    def _handle(self, event: Event) -> None:
        # Most frequent first: every answer is one or two of the first two.
        if isinstance(event, Headers):
            self._on_headers(event)
        elif isinstance(event, Data):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                if len(stream.received) < _MAX_RESPONSE_BODY:
                    stream.received += event.data
                if event.end_stream:
                    self._on_stream_ended(event.stream_id, stream)
        elif isinstance(event, StreamReset):
            self._on_stream_reset(event)
        elif isinstance(event, SettingsChanged):
            self._on_settings(event)
        elif isinstance(event, GoAway):
            self._on_goaway(event)
        elif isinstance(event, PingAcknowledged):
            if self._ping_ack is not None and not self._ping_ack.done():
                self._ping_ack.set_result(None)
        elif isinstance(event, ConnectionFailed):
            self._log.warning(self._prefix + "protocol_error", error=event.message)
            self._flush()  # the engine queued a GOAWAY explaining the error
            self._terminate("protocol_error")

    def _on_headers(self, event: Headers) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        # Trailers carry no `:status` and are ignored; an interim (1xx) answer is
        # replaced by the final one.
        for name, value in event.headers:
            if name == b":status":
                stream.headers = event.headers
                # A non-numeric status leaves it None: the request fails as no_response.
                with contextlib.suppress(ValueError):
                    stream.status = int(value)
                break
        if event.end_stream:
            self._on_stream_ended(event.stream_id, stream)

    def _on_stream_ended(self, stream_id: int, stream: _Stream) -> None:
        # Had the body not all gone out yet (e.g. 413), the engine reset our half.
        if not stream.future.done():
            if stream.status is None:
                stream.future.set_exception(RequestFailed("no_response"))
            else:
                response = Response(stream.status, stream.headers, bytes(stream.received))
                stream.future.set_result(response)
        self._drop(stream_id)

    def _on_stream_reset(self, event: StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if not stream.future.done():
            code = _error_name(event.error_code)
            stream.future.set_exception(RequestFailed(f"stream_reset:{code}"))
        self._drop(event.stream_id)

    def _on_settings(self, event: SettingsChanged) -> None:
        self._stream_limit = max(0, min(event.max_concurrent_streams, self._stream_cap))
        if not self._settings_seen.done():
            self._settings_seen.set_result(None)
        self._wake_waiters()

    def _on_goaway(self, event: GoAway) -> None:
        # NO_ERROR is a server going away politely (a restart, an idle connection).
        level = self._log.info if event.error_code == ErrorCode.NO_ERROR else self._log.warning
        level(
            self._prefix + "goaway",
            error_code=_error_name(event.error_code),
            last_stream_id=event.last_stream_id,
            debug=event.debug[:200].decode(errors="replace"),
            in_flight=len(self._streams),
        )
        if self.state is _State.CONNECTING:
            self._terminate("goaway")
            return
        # Streams above last_stream_id never reached the server: safe to send again.
        # Those at or below get their answers; the connection closes after the last.
        for stream_id in event.dropped:
            stream = self._streams.get(stream_id)
            if stream is not None and not stream.future.done():
                stream.future.set_exception(RequestFailed("goaway"))
        if self.state is _State.OPEN:
            self.state = _State.RETIRING
            self._fail_waiters("goaway")
            self._on_closed(self)
        for stream_id in event.dropped:
            self._drop(stream_id)
        self._close_if_drained()


def _error_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


class Pool:
    """Up to `size` connections to one origin, opened on demand."""

    def __init__(
        self,
        *,
        origin: Origin,
        ssl_context: ssl.SSLContext,
        size: int,
        connect_timeout: float,
        ping_interval: float,
        ping_timeout: float,
        stream_cap: int = DEFAULT_STREAM_CAP,
        varying_headers: Iterable[bytes] = (),
        event_prefix: str = "http2_",
    ) -> None:
        """`varying_headers`: fields whose value changes with every request (not
        worth remembering encoded); `event_prefix` starts the name of every log event
        (`apns_`, `fcm.`)."""
        if size < 1:
            raise ValueError("a pool needs at least one connection")
        self.origin = origin
        self._ssl_context = ssl_context
        self._slots: list[Connection | None] = [None] * size
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._stream_cap = stream_cap
        self._varying_headers = frozenset(varying_headers)
        self._event_prefix = event_prefix
        self._next = 0
        self._opened = 0
        self._closing: set[Connection] = set()
        self._closed = False
        self.post_headers: Final = (
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", origin.authority.encode()),
        )
        """The pseudo-header fields of a POST to this origin, but `:path`."""

    def pick(self) -> Connection:
        """The least busy usable connection; an empty slot counts as idle."""
        if self._closed:
            raise RequestFailed("provider_closed")
        best_index = -1
        best_load = 0
        size = len(self._slots)
        for offset in range(size):
            index = (self._next + offset) % size
            conn = self._slots[index]
            load = 0 if conn is None else conn.load
            if best_index < 0 or load < best_load:
                best_index, best_load = index, load
        # Start the next search after this slot so equal loads take turns.
        self._next = (best_index + 1) % size
        chosen = self._slots[best_index]
        if chosen is None:
            chosen = self._slots[best_index] = self._open()
        return chosen

    def _open(self) -> Connection:
        self._opened += 1
        return Connection(
            origin=self.origin,
            ssl_context=self._ssl_context,
            connect_timeout=self._connect_timeout,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            on_closed=self._forget,
            number=self._opened,
            stream_cap=self._stream_cap,
            varying_headers=self._varying_headers,
            event_prefix=self._event_prefix,
        )

    def _forget(self, conn: Connection) -> None:
        for index, slot in enumerate(self._slots):
            if slot is conn:
                self._slots[index] = None
        if conn.state is _State.RETIRING:
            # Still answering its last streams; aclose must find it.
            self._closing.add(conn)
        else:
            self._closing.discard(conn)

    async def aclose(self) -> None:
        self._closed = True
        conns = [c for c in self._slots if c is not None] + list(self._closing)
        self._slots = [None] * len(self._slots)
        self._closing.clear()
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
