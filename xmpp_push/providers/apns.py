"""Apple Push Notification service: token-authenticated HTTP/2, framed by `_http2`.

Why not aioapns: its 4.0 release never hands received bytes back to the HTTP/2 flow
control window (after ~64 KiB of error bodies on a connection no further error
response arrives), has no per-request deadline (a reset or body-less answer leaves the
send pending forever and leaks the stream slot), raises `InvalidStateError` on
connection loss after a cancelled send, keeps one JWT per connection and closes idle
connections after 10 s (so sparse traffic re-signs per push and risks
TooManyProviderTokenUpdates), ignores 403 ExpiredProviderToken and hard-codes host
and port (PROTOCOLS.md §8). APNs needs little of HTTP/2: POST one small body, read one
small answer. A focused client is shorter than working around those defects; its
HTTP/2 framing is our own (`_http2`), as `h2` cost a third of the CPU per push.

What this client guarantees:

* every received DATA frame is acknowledged, so the receive window never runs dry;
* every request has one deadline (`request_timeout`) covering the wait for a
  connection, for a free stream slot and for the answer; on expiry the stream is reset
  and its slot freed;
* a cancelled `send` resets its stream and leaves the connection usable;
* the peer's MAX_CONCURRENT_STREAMS is respected (requests queue for a slot), bodies
  are only sent within the flow-control window;
* one JWT serves every connection; it is re-signed after `jwt_lifetime` and once more
  when APNs answers 403 ExpiredProviderToken (then the request is sent again, once);
* connections are opened on first use, kept open with PINGs while idle and replaced
  after loss or GOAWAY; on GOAWAY the streams APNs accepted still get their answers;
* every failure is a `DeliveryError` whose category comes from one table
  (`_ERROR_CATEGORIES`); transport failures are TRANSIENT.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import functools
import json
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import structlog
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from xmpp_push.core.model import (
    DEFAULT_BODY,
    ELLIPSIS,
    Mode,
    Priority,
    Push,
    Service,
    redact_token,
)
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory
from xmpp_push.providers._hpack import STATIC_TABLE
from xmpp_push.providers._http import parse_retry_after
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
    "MAX_PAYLOAD_BYTES",
    "ApnsProvider",
    "ApnsRequest",
    "ProviderToken",
    "build_request",
]

_log = structlog.get_logger(__name__)

PRODUCTION_ENDPOINT: Final = "https://api.push.apple.com:443"
SANDBOX_ENDPOINT: Final = "https://api.sandbox.push.apple.com:443"

MAX_PAYLOAD_BYTES: Final = 4096
"""APNs refuses larger alert/background payloads with 413 PayloadTooLarge."""

# Apple documents 20 min as the shortest refresh interval (more often: 429
# TooManyProviderTokenUpdates) and 60 min as the age at which a token is refused.
_JWT_MIN_LIFETIME: Final = 1200.0
_JWT_MAX_LIFETIME: Final = 3600.0

# APNs allows 1000 streams per connection; a server that announces no limit gets the
# same, so one connection cannot pile up unbounded state.
_STREAM_CAP: Final = 1000
# Stream ids are 31-bit and odd for a client; retire a connection well before the end.
_LAST_STREAM_ID: Final = 2**31 - 2 * _STREAM_CAP - 1
# An answer larger than this is not an APNs answer; keep only the start for the reason.
_MAX_RESPONSE_BODY: Final = 64 * 1024
_CLOSE_GRACE: Final = 1.0
"""Seconds `aclose` waits for TLS close_notify before dropping a connection."""


# --------------------------------------------------------------------------------------
# The request: pure data, built without I/O


@dataclass(frozen=True, slots=True)
class ApnsRequest:
    """Everything of one APNs request except the JWT, which belongs to the moment."""

    path: str
    headers: Mapping[str, str]
    """`apns-*` headers; pseudo-headers and `authorization` are added when sending."""
    body: bytes

    @property
    def apns_id(self) -> str:
        return self.headers["apns-id"]


def build_request(push: Push, default_topic: str) -> ApnsRequest:
    """The path, headers and JSON body APNs expects for `push`."""
    device = push.device
    topic = device.topic or default_topic
    if push.voip:
        # PushKit: its own topic suffix and push type; iOS requires the app to report a
        # call for each one, so the payload says who calls (when the sender may be shown).
        push_type, priority, topic = "voip", "10", f"{topic}.voip"
        call = {"from": push.content.sender} if push.content.sender else {}
        body = _json({"aps": {}, "call": call})
    elif push.silent:
        # Apple requires priority 5 for background pushes and drops them otherwise.
        push_type, priority = "background", "5"
        body = _json({"aps": {"content-available": 1}})
    else:
        push_type = "alert"
        priority = "10" if push.priority is Priority.HIGH else "5"
        body = _alert_body(push)
    headers = {
        "apns-topic": topic,
        "apns-push-type": push_type,
        "apns-priority": priority,
        # 0 tells APNs to try once and not store; any other value is an absolute time.
        "apns-expiration": "0" if push.ttl == 0 else str(int(push.expires_at)),
        "apns-id": _uuid4(),
    }
    return ApnsRequest(path=f"/3/device/{device.token}", headers=headers, body=body)


def _uuid4() -> str:
    """A random (version 4) UUID in canonical form: what `str(uuid.uuid4())` gives, for
    a third of its cost (it showed at 3 % of a push)."""
    h = os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


def _alert_body(push: Push) -> bytes:
    content = push.content
    return _encoded_alert(
        content.sender,
        content.body or DEFAULT_BODY,
        content.message_count,
        push.sound or "default",
        push.mutable_content,
        push.click_action,
    )


# Most pushes carry the same few payloads (the placeholder body, badge 1): encoding
# each once saves a JSON encode per push. Bounded: 256 payloads of at most 4 KiB.
@functools.lru_cache(maxsize=256)
def _encoded_alert(
    title: str | None,
    text: str,
    badge: int | None,
    sound: str,
    mutable: bool,
    category: str | None,
) -> bytes:
    encoded = _json(_alert_payload(title, text, badge, sound, mutable, category))
    # Shorten the body first, the title (a JID) only if the body alone cannot make room.
    # Each pass removes at least the excess, so the loop ends after a few rounds.
    while len(encoded) > MAX_PAYLOAD_BYTES and (text or title):
        excess = len(encoded) - MAX_PAYLOAD_BYTES
        if text:
            text = _shorten(text, excess)
        elif title:
            title = _shorten(title, excess) or None
        encoded = _json(_alert_payload(title, text, badge, sound, mutable, category))
    return encoded


def _alert_payload(
    title: str | None,
    text: str,
    badge: int | None,
    sound: str,
    mutable: bool,
    category: str | None,
) -> dict[str, Any]:
    alert: dict[str, Any] = {}
    if title is not None:
        alert["title"] = title
    alert["body"] = text
    aps: dict[str, Any] = {"alert": alert}
    if badge is not None:
        aps["badge"] = badge
    aps["sound"] = sound
    if mutable:
        # Lets the app's Notification Service Extension fetch and decrypt the message.
        aps["mutable-content"] = 1
    if category:
        aps["category"] = category
    return {"aps": aps}


def _shorten(text: str, excess: int) -> str:
    """`text` at least `excess` encoded bytes shorter, cut on a character boundary."""
    raw = text.encode()
    keep = len(raw) - excess - len(ELLIPSIS.encode())
    if keep <= 0:
        return ""
    # errors="ignore" drops a multi-byte character the cut went through.
    return raw[:keep].decode(errors="ignore") + ELLIPSIS


def _json(value: Any) -> bytes:
    # Raw UTF-8 instead of \u escapes: non-ASCII text costs less of the 4 KiB budget.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------
# HPACK for our requests, without the parts that cost and gain nothing here


def _hpack_integer(value: int, prefix_bits: int, first_byte: int) -> bytes:
    """RFC 7541 §5.1: `value` with an N-bit prefix, high bits of the first byte set."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _hpack_string(data: bytes) -> bytes:
    return _hpack_integer(len(data), 7, 0x00) + data  # H=0: raw octets, no Huffman


_STATIC_FIELDS: Final = {field: i for i, field in enumerate(STATIC_TABLE, 1)}
_STATIC_NAMES: Final = {name: i for i, (name, _) in reversed(list(enumerate(STATIC_TABLE, 1)))}
_NEVER_INDEXED: Final = frozenset({b"authorization"})
_VARYING: Final = frozenset({b":path", b"apns-id", b"apns-expiration", b"content-length"})
"""Fields that differ per request: not worth remembering."""


class _LiteralEncoder:
    """HPACK with no compression work: every field a literal with raw strings.

    hpack's encoder Huffman-codes every string and searches and maintains a dynamic
    table; for APNs requests (a fresh path, apns-id and expiration each time, a JWT
    worth sending as a never-indexed literal anyway) that was 27 % of the CPU per
    push (docs/performance.md) to save a few dozen bytes on loopback-fast links.
    The first block sets our dynamic table to size 0, so no later SETTINGS change
    can oblige us to signal anything.
    """

    def __init__(self) -> None:
        self._table_off = False
        self._fields: dict[tuple[bytes, bytes], bytes] = {}
        """Encoded fields that repeat (method, authority, topic, push type...)."""

    def encode(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        out = bytearray()
        if not self._table_off:
            out += _hpack_integer(0, 5, 0x20)  # dynamic table size update: 0
            self._table_off = True
        fields = self._fields
        for field in headers:
            encoded = fields.get(field)
            if encoded is None:
                encoded = _hpack_field(*field)
                if field[0] not in _VARYING:
                    if len(fields) >= 256:  # JWTs rotate: forget the old ones
                        fields.clear()
                    fields[field] = encoded
            out += encoded
        return bytes(out)


def _hpack_field(name: bytes, value: bytes) -> bytes:
    full = _STATIC_FIELDS.get((name, value))
    if full is not None:
        return _hpack_integer(full, 7, 0x80)  # indexed field
    first = 0x10 if name in _NEVER_INDEXED else 0x00
    index = _STATIC_NAMES.get(name)
    if index is not None:
        return _hpack_integer(index, 4, first) + _hpack_string(value)
    return _hpack_integer(0, 4, first) + _hpack_string(name) + _hpack_string(value)


# --------------------------------------------------------------------------------------
# Provider authentication token


class ProviderToken:
    """One ES256 JWT for all connections, re-signed when it gets old.

    APNs refuses a token older than an hour and throttles re-signing more often than
    every 20 minutes, so connections must share it rather than each sign their own.
    """

    def __init__(
        self,
        *,
        key: ec.EllipticCurvePrivateKey,
        key_id: str,
        team_id: str,
        lifetime: float = 3000.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self._team_id = team_id
        self._header = _b64url(_json({"alg": "ES256", "kid": key_id}))
        self.lifetime = min(max(lifetime, _JWT_MIN_LIFETIME), _JWT_MAX_LIFETIME)
        self._clock = clock
        self._wall_clock = wall_clock
        self._token: str | None = None
        self._signed_at = 0.0

    def current(self) -> str:
        if self._token is None or self._clock() - self._signed_at >= self.lifetime:
            return self._sign()
        return self._token

    def renew(self, stale: str) -> str:
        """A fresh token unless another request already replaced `stale`.

        Many in-flight requests see ExpiredProviderToken at once; only the first may
        re-sign, or APNs answers TooManyProviderTokenUpdates.
        """
        if self._token == stale:
            return self._sign()
        return self.current()

    def _sign(self) -> str:
        claims = _b64url(_json({"iss": self._team_id, "iat": int(self._wall_clock())}))
        signing_input = f"{self._header}.{claims}".encode()
        der = self._key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
        # JWS wants the raw 64-byte r||s, not the DER that cryptography produces.
        r, s = decode_dss_signature(der)
        signature = _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        self._token = f"{self._header}.{claims}.{signature}"
        self._signed_at = self._clock()
        _log.info("apns_jwt_signed", team_id=self._team_id)
        return self._token


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _load_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"APNs key is not a readable PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("APNs key must be the EC P-256 key of an AuthKey_*.p8 file")
    return key


# --------------------------------------------------------------------------------------
# Answers to categories: the one table


_ERROR_CATEGORIES: Final[Mapping[tuple[int, str | None], ErrorCategory]] = {
    # (status, reason); reason None = any other reason with that status.
    (410, None): ErrorCategory.TOKEN_DEAD,  # Unregistered, ExpiredToken
    (400, "BadDeviceToken"): ErrorCategory.TOKEN_REFUSED,
    (400, "DeviceTokenNotForTopic"): ErrorCategory.TOKEN_REFUSED,
    (400, "IdleTimeout"): ErrorCategory.TRANSIENT,
    (400, None): ErrorCategory.MISCONFIGURED,  # BadTopic, MissingTopic, BadPriority, ...
    (403, None): ErrorCategory.MISCONFIGURED,  # our key, team, environment
    (404, None): ErrorCategory.MISCONFIGURED,  # BadPath
    (405, None): ErrorCategory.MISCONFIGURED,  # MethodNotAllowed
    (413, None): ErrorCategory.MISCONFIGURED,  # PayloadTooLarge despite shortening
    (429, None): ErrorCategory.TRANSIENT,  # TooManyRequests, TooManyProviderTokenUpdates
}


def _category(status: int, reason: str) -> ErrorCategory:
    for key in ((status, reason), (status, None)):
        found = _ERROR_CATEGORIES.get(key)
        if found is not None:
            return found
    if 500 <= status <= 599:
        return ErrorCategory.TRANSIENT
    # Anything else APNs does not document; retrying would not change our request.
    return ErrorCategory.MISCONFIGURED


def _error_from_response(response: _Response) -> DeliveryError:
    reason = response.reason or f"HTTP {response.status}"
    category = _category(response.status, reason)
    retry_after = None
    if category is ErrorCategory.TRANSIENT:
        retry_after = parse_retry_after(response.retry_after)
    return DeliveryError(category, reason, response.status, retry_after)


def _reason(body: bytes) -> str | None:
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    if isinstance(decoded, dict) and isinstance(decoded.get("reason"), str):
        return str(decoded["reason"])
    return None


# --------------------------------------------------------------------------------------
# HTTP/2 connections


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str
    port: int
    authority: str

    @classmethod
    def parse(cls, url: str) -> _Origin:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"APNs endpoint must be an https:// URL, not {url!r}")
        if parts.path not in {"", "/"} or parts.query:
            raise ValueError(f"APNs endpoint takes no path: {url!r}")
        port = parts.port or 443
        return cls(host=parts.hostname, port=port, authority=parts.netloc)


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    retry_after: bytes | None

    @property
    def reason(self) -> str | None:
        return None if self.status == 200 else _reason(self.body)


_CONNECTION_ENDING_REASONS: Final = frozenset({"IdleTimeout", "Shutdown"})


class _Stream:
    """One request in flight; dropped from the connection as soon as it ends."""

    __slots__ = ("future", "received", "retry_after", "status")

    def __init__(self, future: asyncio.Future[_Response]) -> None:
        self.future = future
        self.status: int | None = None
        self.retry_after: bytes | None = None
        self.received = bytearray()


class _State(enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    RETIRING = "retiring"
    """No new streams; closed once the streams in flight are answered."""
    CLOSED = "closed"


def _transient(reason: str) -> DeliveryError:
    return DeliveryError(ErrorCategory.TRANSIENT, reason)


def _retrieve(future: asyncio.Future[Any]) -> None:
    # Nobody may be waiting on a connection's readiness when it fails; mark the
    # exception as seen so asyncio does not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()


class _Connection(asyncio.Protocol):
    """One TLS connection speaking HTTP/2 to APNs, multiplexing many requests."""

    def __init__(
        self,
        *,
        origin: _Origin,
        ssl_context: ssl.SSLContext,
        connect_timeout: float,
        ping_interval: float,
        ping_timeout: float,
        on_closed: Callable[[_Connection], None],
        number: int,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._origin = origin
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._on_closed = on_closed
        self._log = _log.bind(host=origin.host, port=origin.port, connection=number)
        self._h2 = ClientConnection(_LiteralEncoder())
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
            self._log.warning("apns_connect_failed", error=repr(exc))
            self._terminate("connect_failed")
            return
        if self.state is not _State.CONNECTING:
            return
        self.state = _State.OPEN
        self._ready.set_result(None)
        self._log.info("apns_connected")
        self._keepalive_task = self._loop.create_task(self._keepalive())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            # APNs always negotiates h2; anything else is not APNs.
            if not self._settings_seen.done():
                self._settings_seen.set_exception(_transient("no_h2"))
            transport.close()
            return
        self._h2.initiate()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is not _State.CLOSED:
            self._log.info("apns_connection_lost", error=repr(exc) if exc else None)
        self._terminate("connection_lost")
        if not self._lost.done():
            self._lost.set_result(None)

    def eof_received(self) -> bool:
        return False  # close our side too: HTTP/2 has no half-closed connection

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _terminate(self, reason: str) -> None:
        """Fail everything still waiting on this connection, once."""
        if self.state is _State.CLOSED:
            return
        self.state = _State.CLOSED
        for stream in self._streams.values():
            if not stream.future.done():
                stream.future.set_exception(_transient(reason))
        self._streams.clear()
        self._fail_waiters(reason)
        for future in (self._settings_seen, self._ready):
            if not future.done():
                future.set_exception(_transient(reason))
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

    def _fail_waiters(self, reason: str) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(_transient(reason))

    def retire(self, why: str) -> None:
        """Stop taking requests, let those in flight finish, then close."""
        if self.state is not _State.OPEN:
            return
        self._log.info("apns_connection_retiring", why=why)
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
        """PING an idle connection so a dead one is noticed before a push needs it."""
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
                self._log.warning("apns_ping_unanswered", timeout=self._ping_timeout)
                self._terminate("ping_timeout")
                return

    # -- requests ---------------------------------------------------------------------

    async def request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> _Response:
        """Send one request and wait for its answer; the caller bounds the wait."""
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
                raise _transient("connection_lost")
            # The body goes out as far as the flow-control windows allow; the
            # engine sends the rest as the server opens them.
            stream_id = self._h2.send_request(headers, body)
        except Http2Error as exc:
            self._release_slot()
            raise _transient("protocol_error") from exc
        except BaseException:
            self._release_slot()
            raise
        stream = _Stream(self._loop.create_future())
        self._streams[stream_id] = stream
        self._schedule_flush()
        if stream_id >= _LAST_STREAM_ID:
            self.retire("stream_ids_exhausted")
        try:
            return await stream.future
        except asyncio.CancelledError:
            # Deadline or caller gave up: tell the server and free the slot now.
            self._abandon(stream_id)
            raise

    async def _acquire_slot(self) -> None:
        if self.state is not _State.OPEN:
            raise _transient("connection_lost")
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
            self._log.warning("apns_protocol_error", error=event.message)
            self._flush()  # the engine queued a GOAWAY explaining the error
            self._terminate("protocol_error")

    def _on_headers(self, event: Headers) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        # Trailers carry no `:status`; an interim (1xx) status is replaced by the final.
        for name, value in event.headers:
            if name == b":status":
                # A non-numeric status leaves it None: the request fails as no_response.
                with contextlib.suppress(ValueError):
                    stream.status = int(value)
            elif name == b"retry-after":
                stream.retry_after = bytes(value)
        if event.end_stream:
            self._on_stream_ended(event.stream_id, stream)

    def _on_stream_ended(self, stream_id: int, stream: _Stream) -> None:
        # Had the body not all gone out yet (e.g. 413), the engine reset our half.
        if not stream.future.done():
            if stream.status is None:
                stream.future.set_exception(_transient("no_response"))
            else:
                response = _Response(stream.status, bytes(stream.received), stream.retry_after)
                stream.future.set_result(response)
        self._drop(stream_id)

    def _on_stream_reset(self, event: StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if not stream.future.done():
            code = _error_name(event.error_code)
            stream.future.set_exception(_transient(f"stream_reset:{code}"))
        self._drop(event.stream_id)

    def _on_settings(self, event: SettingsChanged) -> None:
        self._stream_limit = max(0, min(event.max_concurrent_streams, _STREAM_CAP))
        if not self._settings_seen.done():
            self._settings_seen.set_result(None)
        self._wake_waiters()

    def _on_goaway(self, event: GoAway) -> None:
        self._log.warning(
            "apns_goaway",
            error_code=_error_name(event.error_code),
            last_stream_id=event.last_stream_id,
            debug=event.debug[:200].decode(errors="replace"),
            in_flight=len(self._streams),
        )
        if self.state is _State.CONNECTING:
            self._terminate("goaway")
            return
        # Streams above last_stream_id never reached APNs: TRANSIENT, safe to resend.
        # Those at or below get their answers; the connection closes after the last.
        for stream_id in event.dropped:
            stream = self._streams.get(stream_id)
            if stream is not None and not stream.future.done():
                stream.future.set_exception(_transient("goaway"))
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


class _Pool:
    """Up to `size` connections to one origin, opened on demand."""

    def __init__(
        self,
        *,
        origin: _Origin,
        ssl_context: ssl.SSLContext,
        size: int,
        connect_timeout: float,
        ping_interval: float,
        ping_timeout: float,
    ) -> None:
        self._origin = origin
        self._ssl_context = ssl_context
        self._slots: list[_Connection | None] = [None] * size
        self._connect_timeout = connect_timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._next = 0
        self._opened = 0
        self._closing: set[_Connection] = set()
        self._closed = False
        self._origin_headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":authority", origin.authority.encode()),
        ]

    def pick(self) -> _Connection:
        """The least busy usable connection; an empty slot counts as idle."""
        if self._closed:
            raise _transient("provider_closed")
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

    def _open(self) -> _Connection:
        self._opened += 1
        return _Connection(
            origin=self._origin,
            ssl_context=self._ssl_context,
            connect_timeout=self._connect_timeout,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
            on_closed=self._forget,
            number=self._opened,
        )

    def _forget(self, conn: _Connection) -> None:
        for index, slot in enumerate(self._slots):
            if slot is conn:
                self._slots[index] = None
        if conn.state is _State.RETIRING:
            # Still answering its last streams; aclose must find it.
            self._closing.add(conn)
        else:
            self._closing.discard(conn)

    def headers(self, request: ApnsRequest, jwt: str) -> list[tuple[bytes, bytes]]:
        headers = [
            *self._origin_headers,
            (b":path", request.path.encode()),
            (b"authorization", b"bearer " + jwt.encode()),
        ]
        headers += [(name.encode(), value.encode()) for name, value in request.headers.items()]
        return headers

    async def aclose(self) -> None:
        self._closed = True
        conns = [c for c in self._slots if c is not None] + list(self._closing)
        self._slots = [None] * len(self._slots)
        self._closing.clear()
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)


# --------------------------------------------------------------------------------------
# The provider


class ApnsProvider:
    """Sends pushes to APNs with token (JWT) authentication."""

    name: str = "apns"

    def __init__(
        self,
        *,
        key_pem: bytes,
        key_id: str,
        team_id: str,
        topic: str,
        environment: Mode = Mode.PRODUCTION,
        endpoint: str | None = None,
        ca_file: str | None = None,
        request_timeout: float = 10.0,
        connections: int = 1,
        jwt_lifetime: float = 3000.0,
        idle_ping_interval: float = 60.0,
    ) -> None:
        for label, value in (("key_id", key_id), ("team_id", team_id)):
            if len(value) != 10 or not value.isalnum():
                raise ValueError(f"APNs {label} must be 10 letters or digits, got {value!r}")
        if not topic:
            raise ValueError("APNs topic (the app's bundle id) is required")
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if connections < 1:
            raise ValueError("connections must be at least 1")
        if idle_ping_interval <= 0:
            raise ValueError("idle_ping_interval must be positive")
        self._topic = topic
        self._environment = environment
        self._token = ProviderToken(
            key=_load_key(key_pem), key_id=key_id, team_id=team_id, lifetime=jwt_lifetime
        )
        self._origins: dict[Mode, _Origin]
        if endpoint is not None:
            configured = _Origin.parse(endpoint)
            self._origins = {Mode.PRODUCTION: configured, Mode.SANDBOX: configured}
        else:
            self._origins = {
                Mode.PRODUCTION: _Origin.parse(PRODUCTION_ENDPOINT),
                Mode.SANDBOX: _Origin.parse(SANDBOX_ENDPOINT),
            }
        self._ssl_context = ssl.create_default_context(cafile=ca_file)
        self._ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ssl_context.set_alpn_protocols(["h2"])
        self._request_timeout = request_timeout
        self._connections = connections
        self._ping_interval = idle_ping_interval
        self._pools: dict[_Origin, _Pool] = {}
        self._closed = False

    async def send(self, push: Push) -> None:
        if self._closed:
            raise _transient("provider_closed")
        if push.device.service is not Service.APNS:
            raise DeliveryError(ErrorCategory.MISCONFIGURED, "not_an_apns_device")
        request = build_request(push, self._topic)
        pool = self._pool(push.device.mode or self._environment)
        try:
            async with asyncio.timeout(self._request_timeout) as deadline:
                jwt = self._token.current()
                response = await self._attempt(pool, request, jwt)
                if response.status == 403 and response.reason == "ExpiredProviderToken":
                    _log.warning(
                        "apns_jwt_expired_resigning", token=redact_token(push.device.token)
                    )
                    jwt = self._token.renew(stale=jwt)
                    response = await self._attempt(pool, request, jwt)
        except TimeoutError:
            if deadline.expired():
                raise DeliveryError(ErrorCategory.TRANSIENT, "timeout") from None
            raise
        if response.status != 200:
            raise _error_from_response(response)

    async def _attempt(self, pool: _Pool, request: ApnsRequest, jwt: str) -> _Response:
        conn = pool.pick()
        response = await conn.request(pool.headers(request, jwt), request.body)
        if response.reason in _CONNECTION_ENDING_REASONS:
            # APNs is done with this connection; new requests go to a fresh one.
            conn.retire(response.reason or "")
        return response

    def _pool(self, mode: Mode) -> _Pool:
        origin = self._origins[mode]
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = _Pool(
                origin=origin,
                ssl_context=self._ssl_context,
                size=self._connections,
                connect_timeout=self._request_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._request_timeout,
            )
        return pool

    async def aclose(self) -> None:
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(pool.aclose() for pool in pools))
