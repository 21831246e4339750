"""Apple Push Notification service: token-authenticated HTTP/2 on `_h2client`.

Why not aioapns: its 4.0 release never hands received bytes back to the HTTP/2 flow
control window (after ~64 KiB of error bodies on a connection no further error
response arrives), has no per-request deadline (a reset or body-less answer leaves the
send pending forever and leaks the stream slot), raises `InvalidStateError` on
connection loss after a cancelled send, keeps one JWT per connection and closes idle
connections after 10 s (so sparse traffic re-signs per push and risks
TooManyProviderTokenUpdates), ignores 403 ExpiredProviderToken and hard-codes host
and port (PROTOCOLS.md §8). APNs needs little of HTTP/2: POST one small body, read one
small answer. A focused client is shorter than working around those defects; its
HTTP/2 framing is our own (`_http2`), as `h2` cost a third of the CPU per push. The
connections, pool, keepalive and GOAWAY handling are `_h2client`'s, shared with FCM;
what is APNs' (JWT, headers, reasons, which answers end a connection) is here.

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
import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

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
from xmpp_push.providers._h2client import Origin, Pool, RequestFailed, Response, tls_context
from xmpp_push.providers._http import parse_retry_after

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


def _error_from_response(response: Response, reason: str | None) -> DeliveryError:
    reason = reason or f"HTTP {response.status}"
    category = _category(response.status, reason)
    retry_after = None
    if category is ErrorCategory.TRANSIENT:
        retry_after = parse_retry_after(response.header(b"retry-after"))
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
# Requests on the shared HTTP/2 client


_CONNECTION_ENDING_REASONS: Final = frozenset({"IdleTimeout", "Shutdown"})
_VARYING_HEADERS: Final = (b":path", b"apns-id", b"apns-expiration")
"""Fields that differ per request: not worth remembering encoded."""


def _headers(pool: Pool, request: ApnsRequest, jwt: str) -> list[tuple[bytes, bytes]]:
    headers = [
        *pool.post_headers,
        (b":path", request.path.encode()),
        (b"authorization", b"bearer " + jwt.encode()),
    ]
    headers += [(name.encode(), value.encode()) for name, value in request.headers.items()]
    return headers


def _transient(reason: str) -> DeliveryError:
    return DeliveryError(ErrorCategory.TRANSIENT, reason)


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
        self._origins: dict[Mode, Origin]
        if endpoint is not None:
            configured = Origin.parse(endpoint, label="APNs endpoint")
            self._origins = {Mode.PRODUCTION: configured, Mode.SANDBOX: configured}
        else:
            self._origins = {
                Mode.PRODUCTION: Origin.parse(PRODUCTION_ENDPOINT, label="APNs endpoint"),
                Mode.SANDBOX: Origin.parse(SANDBOX_ENDPOINT, label="APNs endpoint"),
            }
        self._ssl_context = tls_context(ca_file)
        self._request_timeout = request_timeout
        self._connections = connections
        self._ping_interval = idle_ping_interval
        self._pools: dict[Origin, Pool] = {}
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
                response, reason = await self._attempt(pool, request, jwt)
                if response.status == 403 and reason == "ExpiredProviderToken":
                    _log.warning(
                        "apns_jwt_expired_resigning", token=redact_token(push.device.token)
                    )
                    jwt = self._token.renew(stale=jwt)
                    response, reason = await self._attempt(pool, request, jwt)
        except TimeoutError:
            if deadline.expired():
                raise DeliveryError(ErrorCategory.TRANSIENT, "timeout") from None
            raise
        except RequestFailed as failure:  # refused, lost, GOAWAY, reset: no answer
            raise _transient(failure.reason) from failure
        if response.status != 200:
            raise _error_from_response(response, reason)

    async def _attempt(
        self, pool: Pool, request: ApnsRequest, jwt: str
    ) -> tuple[Response, str | None]:
        """APNs' answer and the reason it gives (None for 200)."""
        conn = pool.pick()
        response = await conn.request(_headers(pool, request, jwt), request.body)
        if response.status == 200:
            return response, None
        reason = _reason(response.body)
        if reason in _CONNECTION_ENDING_REASONS:
            # APNs is done with this connection; new requests go to a fresh one.
            conn.retire(reason)
        return response, reason

    def _pool(self, mode: Mode) -> Pool:
        origin = self._origins[mode]
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = Pool(
                origin=origin,
                ssl_context=self._ssl_context,
                size=self._connections,
                connect_timeout=self._request_timeout,
                ping_interval=self._ping_interval,
                ping_timeout=self._request_timeout,
                varying_headers=_VARYING_HEADERS,
                event_prefix="apns_",
            )
        return pool

    async def aclose(self) -> None:
        self._closed = True
        pools = list(self._pools.values())
        self._pools.clear()
        await asyncio.gather(*(pool.aclose() for pool in pools))
