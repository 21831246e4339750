"""Firebase Cloud Messaging, HTTP v1: one POST per push, authorised by a service account.

The POSTs go over HTTP/2 (`_h2client`, the client APNs uses too): a few long-lived TLS
connections each carrying many requests at once, instead of aiohttp's HTTP/1.1 with
one connection per request in flight, which cost twice the CPU per push and a TLS
connection's memory per concurrent send (docs/fcm.md).

The OAuth2 access token comes from google-auth, but only its `refresh()`: that call is
blocking (requests), so it runs in a worker thread, once for all concurrent sends, behind
a lock. `before_request()` / `AuthorizedSession` are not used because they start a
background call to iamcredentials.googleapis.com (PROTOCOLS.md §8); the Authorization
header is set here.

Every FCM answer goes through one translation table (`_classify`) into an
`ErrorCategory`; nothing after this module looks at an FCM string.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import ssl
import time
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import requests
import structlog
from google.auth import exceptions as google_auth_errors
from google.auth.transport.requests import Request as GoogleAuthRequest
from google.oauth2 import service_account

from xmpp_push.core.model import DEFAULT_BODY, ELLIPSIS, MAX_TTL, Priority, Push, Service
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory
from xmpp_push.providers._h2client import Origin, Pool, RequestFailed, Response, tls_context
from xmpp_push.providers._http import parse_retry_after

__all__ = [
    "DEFAULT_ENDPOINT",
    "FCM_SCOPE",
    "MAX_MESSAGE_BYTES",
    "FcmProvider",
    "build_message",
    "encode_message",
]

FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_ENDPOINT: Final = "https://fcm.googleapis.com"
MAX_MESSAGE_BYTES: Final = 4096
"""FCM's limit; measured here on the whole request body, which is stricter than FCM."""
_INT32_MAX: Final = 2**31 - 1  # notification_count is an int32

_CONTENT_TYPE: Final = (b"content-type", b"application/json; charset=UTF-8")

_FCM_ERROR_TYPE: Final = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE: Final = "type.googleapis.com/google.rpc.BadRequest"
_BAD_TOKEN_TEXT: Final = "not a valid FCM registration token"

log = structlog.get_logger("xmpp_push.providers.fcm")


# --------------------------------------------------------------------------------------
# The message


def build_message(push: Push) -> dict[str, object]:
    """The v1 `messages:send` body for `push`, at most MAX_MESSAGE_BYTES once encoded.

    A long body (then, if need be, a long sender) is shortened with an ellipsis; the
    token is never touched, so a message that cannot fit even then is returned as it is
    and FCM will refuse it.
    """
    sender = push.content.sender or None
    body = push.content.body or None
    message = _assemble(push, sender, body)
    if _encoded_size(message) <= MAX_MESSAGE_BYTES:
        return message
    if body is not None:
        body, message = _shorten(body, lambda text: _assemble(push, sender, text))
        if _encoded_size(message) <= MAX_MESSAGE_BYTES:
            return message
    if sender is not None:
        _, message = _shorten(sender, lambda text: _assemble(push, text, body))
    return message


def _remaining(push: Push, now: float) -> Push:
    """FCM's `ttl` is relative: a push retried an hour after it was made may only be
    kept for what is left of its life (APNs' `apns-expiration` is absolute already)."""
    if push.created_at <= 0 or push.ttl == 0:
        return push
    left = max(0, int(push.expires_at - now))
    return dataclasses.replace(push, ttl=left, created_at=now) if left < push.ttl else push


def encode_message(message: Mapping[str, object]) -> bytes:
    """The bytes sent: compact UTF-8 JSON, the encoding `build_message` measures."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def _assemble(push: Push, sender: str | None, body: str | None) -> dict[str, object]:
    count = push.content.message_count
    if count is not None:
        count = max(0, min(count, _INT32_MAX))
    android: dict[str, object] = {
        "priority": "HIGH" if push.priority is Priority.HIGH else "NORMAL",
        "ttl": f"{max(0, min(push.ttl, MAX_TTL))}s",
    }
    if not push.silent:
        notification: dict[str, object] = {}
        if sender is not None:
            notification["title"] = sender
        notification["body"] = body or DEFAULT_BODY
        notification["sound"] = push.sound or "default"
        if push.click_action:
            notification["click_action"] = push.click_action
        if count is not None:
            notification["notification_count"] = count
        android["notification"] = notification
    # The app reads these itself (silent pushes carry nothing else); FCM wants strings.
    data: dict[str, str] = {}
    if count is not None:
        data["message-count"] = str(count)
    if sender is not None:
        data["last-message-sender"] = sender
    if body is not None:
        data["last-message-body"] = body
    message: dict[str, object] = {"token": push.device.token, "android": android}
    if data:
        message["data"] = data
    return {"message": message}


def _encoded_size(message: Mapping[str, object]) -> int:
    return len(encode_message(message))


def _shorten(
    text: str, assemble: Callable[[str], dict[str, object]]
) -> tuple[str, dict[str, object]]:
    """The longest prefix of `text` (plus an ellipsis) whose message fits.

    Binary search, because JSON escaping makes the byte cost of a character depend on
    the character; slicing a str never splits a UTF-8 sequence.
    """
    # Nothing longer than the limit in characters can fit, so search only below it.
    low, high = 0, min(len(text), MAX_MESSAGE_BYTES)
    best_text = ELLIPSIS
    best: dict[str, object] = assemble(best_text)
    while low <= high:
        middle = (low + high) // 2
        candidate_text = _cut(text, middle) + ELLIPSIS
        candidate: dict[str, object] = assemble(candidate_text)
        if _encoded_size(candidate) <= MAX_MESSAGE_BYTES:
            best_text, best = candidate_text, candidate
            low = middle + 1
        else:
            high = middle - 1
    return best_text, best


def _cut(text: str, length: int) -> str:
    """`text[:length]` without a dangling joiner, variation selector or combining mark."""
    cut = text[:length]
    while cut and (unicodedata.combining(cut[-1]) or cut[-1] in "\u200d\ufe0e\ufe0f"):
        cut = cut[:-1]
    return cut.rstrip()


# --------------------------------------------------------------------------------------
# FCM's answers -> ErrorCategory (PROTOCOLS.md §7, DESIGN.md §4)

# FcmError errorCode -> category. INVALID_ARGUMENT is decided in _classify, because it
# is the device's fault only when it names the token.
_CATEGORY_BY_ERROR_CODE: Final[Mapping[str, ErrorCategory]] = {
    "UNREGISTERED": ErrorCategory.TOKEN_DEAD,
    "SENDER_ID_MISMATCH": ErrorCategory.TOKEN_REFUSED,
    "THIRD_PARTY_AUTH_ERROR": ErrorCategory.MISCONFIGURED,
    "QUOTA_EXCEEDED": ErrorCategory.TRANSIENT,
    "UNAVAILABLE": ErrorCategory.TRANSIENT,
    "INTERNAL": ErrorCategory.TRANSIENT,
    "UNSPECIFIED_ERROR": ErrorCategory.TRANSIENT,
}


@dataclasses.dataclass(frozen=True, slots=True)
class _FcmError:
    """What an error body says, parsed once and defensively (it may not be Google's)."""

    status: str | None = None  # google.rpc code name: NOT_FOUND, UNAUTHENTICATED, ...
    message: str = ""
    error_code: str | None = None  # FcmError detail
    violated_fields: tuple[str, ...] = ()

    @property
    def names_token(self) -> bool:
        return _BAD_TOKEN_TEXT in self.message or "message.token" in self.violated_fields

    @property
    def is_expired_credentials(self) -> bool:
        """Our access token was refused (a 401 without FcmError; THIRD_PARTY_AUTH_ERROR
        is a 401 too, but about the APNs key in the Firebase console)."""
        return self.status == "UNAUTHENTICATED" and self.error_code is None


_NO_ERROR: Final = _FcmError()


def _parse_error(body: bytes) -> _FcmError:
    try:
        document = json.loads(body)
    except ValueError:
        return _FcmError()
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return _FcmError()
    error_code: str | None = None
    fields: list[str] = []
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == _FCM_ERROR_TYPE and isinstance(detail.get("errorCode"), str):
            error_code = detail["errorCode"]
        elif detail.get("@type") == _BAD_REQUEST_TYPE:
            violations = detail.get("fieldViolations")
            for violation in violations if isinstance(violations, list) else ():
                if isinstance(violation, dict) and isinstance(violation.get("field"), str):
                    fields.append(violation["field"])
    status, message = error.get("status"), error.get("message")
    return _FcmError(
        status=status if isinstance(status, str) else None,
        message=message if isinstance(message, str) else "",
        error_code=error_code,
        violated_fields=tuple(fields),
    )


def _classify(http_status: int, error: _FcmError, retry_after: str | bytes | None) -> DeliveryError:
    """The one table from FCM's answer to our category."""
    code = error.error_code
    if code == "INVALID_ARGUMENT" or (code is None and error.status == "INVALID_ARGUMENT"):
        category = ErrorCategory.TOKEN_REFUSED if error.names_token else ErrorCategory.MISCONFIGURED
    elif code is not None and code in _CATEGORY_BY_ERROR_CODE:
        category = _CATEGORY_BY_ERROR_CODE[code]
    elif http_status in {408, 429} or http_status >= 500:
        category = ErrorCategory.TRANSIENT
    else:
        # 400, 401 (after our one retry), 403 PERMISSION_DENIED, 404 without errorCode
        # (wrong project or endpoint), 413, ...: our request or credentials, not the device.
        category = ErrorCategory.MISCONFIGURED
    return DeliveryError(
        category,
        code or error.status or f"HTTP {http_status}",
        status=http_status,
        retry_after=parse_retry_after(retry_after) if category is ErrorCategory.TRANSIENT else None,
    )


def _refresh_failure(error: google_auth_errors.GoogleAuthError) -> DeliveryError:
    """The token endpoint's answer, as a category."""
    if isinstance(error, google_auth_errors.TransportError):
        return DeliveryError(ErrorCategory.TRANSIENT, "token_endpoint_unreachable")
    response = error.args[1] if len(error.args) > 1 else None
    oauth_error = response.get("error") if isinstance(response, dict) else None
    if getattr(error, "retryable", False):  # google-auth's word for 5xx / server_error
        return DeliveryError(ErrorCategory.TRANSIENT, str(oauth_error or "token_endpoint_error"))
    # invalid_grant (wrong key, deleted account, clock far off), invalid_scope, ...
    return DeliveryError(ErrorCategory.MISCONFIGURED, str(oauth_error or "token_refresh_failed"))


def _transport_failure(failure: RequestFailed) -> DeliveryError:
    """No answer from FCM, as a category: transient, unless no retry can help."""
    if failure.reason != "connect_failed":
        # lost, GOAWAY, stream reset, ...: FCM never answered, the token is not at fault.
        return DeliveryError(ErrorCategory.TRANSIENT, failure.reason)
    cause = failure.cause
    if isinstance(cause, ssl.SSLCertVerificationError):
        # Nothing a retry fixes: the server's certificate is not one we trust.
        return DeliveryError(ErrorCategory.MISCONFIGURED, "tls_certificate")
    if isinstance(cause, RequestFailed) and cause.reason == "no_h2":
        # `endpoint` names a server (a proxy?) that does not speak HTTP/2, as Google does.
        return DeliveryError(ErrorCategory.MISCONFIGURED, "no_http2")
    return DeliveryError(ErrorCategory.TRANSIENT, "connection_error")


# --------------------------------------------------------------------------------------
# The provider


def _load_credentials(service_account_file: str) -> service_account.Credentials:
    # google-auth ships py.typed but leaves this constructor unannotated.
    credentials: service_account.Credentials = (
        service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            service_account_file, scopes=[FCM_SCOPE]
        )
    )
    return credentials


class _TokenEndpointTransport:
    """google-auth's requests transport, with our CA, no environment, and a deadline."""

    def __init__(self, ca_file: str | None, timeout: float) -> None:
        self._session = requests.Session()
        # Otherwise REQUESTS_CA_BUNDLE (and proxy variables) override `verify`.
        self._session.trust_env = False
        self._session.verify = ca_file or True
        self._request = GoogleAuthRequest(self._session)
        self._timeout = timeout

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        # google-auth calls without a timeout and would wait 120 s.
        return self._request(
            url,
            method=method,
            body=body,
            headers=headers,
            timeout=timeout if timeout is not None else self._timeout,
            **kwargs,
        )

    def close(self) -> None:
        self._session.close()


class FcmProvider:
    """Sends pushes through FCM HTTP v1; implements `xmpp_push.core.ports.Provider`."""

    name: str = "fcm"

    def __init__(
        self,
        *,
        service_account_file: str,
        project_id: str | None = None,
        endpoint: str | None = None,
        ca_file: str | None = None,
        request_timeout: float = 10.0,
        connections: int = 2,
        idle_ping_interval: float = 300.0,
    ) -> None:
        # Five minutes, not APNs's one: Google's front ends have answered frequent PINGs
        # on idle connections with GOAWAY ENHANCE_YOUR_CALM "too_many_pings" (gRPC's
        # default policy allows one per 5 min without data). A connection the network
        # dropped meanwhile costs one timed-out send, which is retried.
        if request_timeout <= 0:
            raise ValueError("[fcm] request_timeout must be positive")
        if connections < 1:
            raise ValueError("[fcm] connections must be at least 1")
        if idle_ping_interval <= 0:
            raise ValueError("[fcm] idle_ping_interval must be positive")
        try:
            self._credentials = _load_credentials(service_account_file)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"[fcm] service_account_file {service_account_file!r} is not usable: {exc}"
            ) from exc
        project = project_id or self._credentials.project_id
        if not project:
            raise ValueError("[fcm] project_id is not set and the service-account file names none")
        self.project_id: str = project
        origin, base_path = _split_endpoint(endpoint or DEFAULT_ENDPOINT)
        self._timeout = request_timeout
        self._pool = Pool(
            origin=origin,
            # Made here, at start-up, because loading CA files reads the disk.
            ssl_context=tls_context(ca_file),
            size=connections,
            connect_timeout=request_timeout,
            ping_interval=idle_ping_interval,
            ping_timeout=request_timeout,
            varying_headers=(b"content-length",),
            event_prefix="fcm.",
        )
        path = f"{base_path}/v1/projects/{project}/messages:send"
        self._request_head = (*self._pool.post_headers, (b":path", path.encode()))
        """Every send's pseudo-header fields; the rest follow them."""
        self._authorization = (b"authorization", b"")
        self._authorization_token = ""
        """The access token `_authorization` carries, encoded once per token (hourly)."""
        self._token_transport = _TokenEndpointTransport(ca_file, request_timeout)
        self._refresh_lock = asyncio.Lock()
        self._refreshes_finished = 0
        self._last_refresh_failure: DeliveryError | None = None
        self._closed = False

    async def send(self, push: Push) -> None:
        try:
            status, answer, retry_after = await self._exchange(push)
        except DeliveryError as unanswered:  # timeout, token endpoint, connection, ...
            _log_failure(push, unanswered, detail="")
            raise
        if status == 200:
            return
        error = _classify(status, answer, retry_after)
        _log_failure(push, error, detail=answer.message)
        raise error

    async def aclose(self) -> None:
        self._closed = True
        await self._pool.aclose()
        self._token_transport.close()

    async def _exchange(self, push: Push) -> tuple[int, _FcmError, bytes | None]:
        """FCM's answer: status, parsed error body, Retry-After."""
        if self._closed:
            raise DeliveryError(ErrorCategory.TRANSIENT, "provider_closed")
        if push.device.service is not Service.FCM:
            raise DeliveryError(ErrorCategory.MISCONFIGURED, "not_an_fcm_device")
        body = encode_message(build_message(_remaining(push, time.time())))
        access_token = await self._access_token()
        response = await self._post(body, access_token)
        if response.status == 200:
            return 200, _NO_ERROR, None
        answer = _parse_error(response.body)
        if response.status == 401 and answer.is_expired_credentials:
            # Revoked or expired early: the one retry the Provider contract allows.
            log.info("fcm.access_token_refused", provider=self.name)
            access_token = await self._access_token(refused=access_token)
            response = await self._post(body, access_token)
            answer = _NO_ERROR if response.status == 200 else _parse_error(response.body)
        return response.status, answer, response.header(b"retry-after")

    async def _access_token(self, *, refused: str | None = None) -> str:
        """A valid access token, other than `refused` (one FCM just refused).

        Checked again under the lock so that a burst of sends, or of 401s, makes one
        refresh rather than one each; and a burst that queued behind a refresh that
        failed shares that failure instead of trying again one after the other (with
        the token endpoint down, that would be one timeout per queued send).
        """
        token = self._usable_token(refused)
        if token is not None:
            return token
        refreshes_seen = self._refreshes_finished
        async with self._refresh_lock:
            token = self._usable_token(refused)
            if token is not None:
                return token
            failure = self._last_refresh_failure
            if failure is not None and self._refreshes_finished != refreshes_seen:
                raise dataclasses.replace(failure)  # a copy: each send its own traceback
            self._last_refresh_failure = None  # stays so if this send is cancelled
            try:
                await self._refresh()
            except DeliveryError as error:
                self._last_refresh_failure = error
                raise
            finally:
                self._refreshes_finished += 1
            return str(self._credentials.token)

    def _usable_token(self, refused: str | None) -> str | None:
        credentials = self._credentials
        if credentials.valid and credentials.token != refused:
            return str(credentials.token)
        return None

    async def _refresh(self) -> None:
        started = time.monotonic()
        try:
            # refresh() blocks on requests for a full HTTPS round trip (and sleeps
            # between its own retries): in a thread, the loop keeps serving. If this
            # send is cancelled meanwhile, the thread finishes on its own; a refresh
            # started after it merely overlaps, which is harmless.
            await asyncio.to_thread(self._credentials.refresh, self._token_transport)
        except google_auth_errors.GoogleAuthError as exc:
            error = _refresh_failure(exc)
            log.log(
                _level(error.category),
                "fcm.access_token_refresh_failed",
                provider=self.name,
                category=str(error.category),
                reason=error.reason,
                detail=str(exc.args[0])[:200] if exc.args else "",
            )
            raise error from exc
        log.info(
            "fcm.access_token_refreshed",
            provider=self.name,
            expires_at=self._credentials.expiry.isoformat() if self._credentials.expiry else None,
            took_ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def _post(self, body: bytes, access_token: str) -> Response:
        if access_token != self._authorization_token:
            self._authorization = (b"authorization", b"Bearer " + access_token.encode())
            self._authorization_token = access_token
        headers = [
            *self._request_head,
            self._authorization,
            _CONTENT_TYPE,
            (b"content-length", b"%d" % len(body)),
        ]
        try:
            async with asyncio.timeout(self._timeout) as deadline:
                return await self._pool.pick().request(headers, body)
        except TimeoutError:
            if deadline.expired():
                raise DeliveryError(ErrorCategory.TRANSIENT, "timeout") from None
            raise
        except RequestFailed as failure:
            raise _transport_failure(failure) from failure


def _split_endpoint(url: str) -> tuple[Origin, str]:
    """The origin to connect to and the path the API's paths go under."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"[fcm] endpoint takes no query: {url!r}")
    origin = Origin.parse(f"{parts.scheme}://{parts.netloc}", label="[fcm] endpoint")
    return origin, parts.path.rstrip("/")


def _level(category: ErrorCategory) -> int:
    if category is ErrorCategory.MISCONFIGURED:
        return logging.ERROR  # an operator must act
    if category is ErrorCategory.TRANSIENT:
        return logging.WARNING
    return logging.INFO  # a dead or refused token is the device's business, not ours


def _log_failure(push: Push, error: DeliveryError, *, detail: str) -> None:
    log.log(
        _level(error.category),
        "fcm.send_failed",
        provider="fcm",
        token=push.device.redacted_token,
        category=str(error.category),
        reason=error.reason,
        status=error.status,
        retry_after=error.retry_after,
        # FCM's own text ("Android message is too big", ...); it never quotes the token.
        detail=detail[:200],
    )
