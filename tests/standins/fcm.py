"""A stand-in for Firebase Cloud Messaging HTTP v1 and Google's OAuth2 token endpoint.

It speaks TLS with a certificate from `TestCA`, writes a service-account JSON whose
`token_uri` points at itself, checks the RS256 assertion the way Google does, and answers
`messages:send` with Google's own error shapes. Tests program answers per registration
token (`respond`, `respond_sequence`, `hang`) and read what arrived (`requests`).

Like Google's front end it speaks HTTP/2 to clients that offer `h2` in ALPN (xmpp-push's
provider) and HTTP/1.1 to the others (google-auth's token requests, aiohttp clients):
one port, one set of answers. HTTP/2 goes through `h2`, with flow control done
properly (every DATA frame acknowledged, answers sent within the client's windows);
HTTP/1.1 through aiohttp. Tests can make the HTTP/2 side misbehave (`goaway_after`,
`drop_connections`, a small `max_concurrent_streams`) and see which connection and
protocol each request came on (`FcmRequest.connection_id`, `.http_version`).

Run alone (for a benchmark or a manual check):

    python -m tests.standins.fcm --port 8444 --dir /tmp/y

prints one JSON line (port, ca_file, service_account_file, project_id) and serves until
SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import re
import secrets
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final
from urllib.parse import parse_qsl

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes
from multidict import CIMultiDict

from tests.standins.cli import serve_until_signal
from tests.standins.h2server import Incoming, ServerConnection
from tests.standins.tlsca import TestCA

__all__ = [
    "CANNED_ERRORS",
    "FCM_SCOPE",
    "FcmReply",
    "FcmRequest",
    "FcmStandIn",
    "ReplySpec",
    "google_error",
    "invalid_argument",
]

FCM_SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth always puts Google's own token URL in `aud`, whatever token_uri says
# (PROTOCOLS.md §8), so the stand-in accepts that as well as its own address.
GOOGLE_TOKEN_URI: Final = "https://oauth2.googleapis.com/token"
MAX_MESSAGE_BYTES: Final = 4096
MAX_TTL_SECONDS: Final = 2_419_200
FCM_ERROR_TYPE: Final = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE: Final = "type.googleapis.com/google.rpc.BadRequest"
BAD_TOKEN_MESSAGE: Final = "The registration token is not a valid FCM registration token"

_SEND_PATH = re.compile(r"/v1/projects/(?P<project>[^/]+)/messages:send")
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_:\-.]{1,4096}")
_DURATION = re.compile(r"(\d{1,12})(\.\d{1,9})?s")
# Google would allow a clock skew of a few minutes on `iat`.
_CLOCK_SKEW_SECONDS = 300
_MAX_ASSERTION_LIFETIME = 3600


# --------------------------------------------------------------------------------------
# Answers


@dataclass(frozen=True, slots=True)
class FcmReply:
    """One canned HTTP answer, encoded once so that serving it costs nothing."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)

    def with_retry_after(self, retry_after: float | str | None) -> FcmReply:
        if retry_after is None:
            return self
        value = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
        return FcmReply(
            self.status, self.body, self.content_type, {**self.headers, "Retry-After": value}
        )


def _json_bytes(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def google_error(
    http_status: int,
    status: str,
    message: str,
    *,
    error_code: str | None = None,
    details: Sequence[Mapping[str, object]] = (),
    headers: Mapping[str, str] | None = None,
) -> FcmReply:
    """An error in the shape every Google JSON API answers with."""
    all_details: list[Mapping[str, object]] = []
    if error_code is not None:
        all_details.append({"@type": FCM_ERROR_TYPE, "errorCode": error_code})
    all_details.extend(details)
    error: dict[str, object] = {"code": http_status, "message": message, "status": status}
    if all_details:
        error["details"] = all_details
    return FcmReply(http_status, _json_bytes({"error": error}), headers=dict(headers or {}))


def invalid_argument(message: str, *, field: str | None = None, fcm_error: bool = True) -> FcmReply:
    """A 400 INVALID_ARGUMENT.

    FCM's own checks carry an FcmError detail; the JSON front end's ("Invalid value at
    ...", "Unknown name ...") carry only a `google.rpc.BadRequest` (`fcm_error=False`).
    """
    details: list[Mapping[str, object]] = []
    if field is not None:
        details.append(
            {
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{"field": field, "description": message}],
            }
        )
    return google_error(
        400,
        "INVALID_ARGUMENT",
        message,
        error_code="INVALID_ARGUMENT" if fcm_error else None,
        details=details,
    )


_UNAUTHENTICATED_TEXT = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_MISSING_CREDENTIALS_TEXT = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, "
    "login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)

# What `respond(token, NAME)` answers. FCM errorCodes come with their FcmError detail;
# the bare google.rpc status names come without one (as Google's front end sends them).
CANNED_ERRORS: Final[Mapping[str, FcmReply]] = {
    "UNREGISTERED": google_error(
        404, "NOT_FOUND", "Requested entity was not found.", error_code="UNREGISTERED"
    ),
    "INVALID_ARGUMENT": invalid_argument(BAD_TOKEN_MESSAGE, field="message.token"),
    "SENDER_ID_MISMATCH": google_error(
        403, "PERMISSION_DENIED", "SenderId mismatch", error_code="SENDER_ID_MISMATCH"
    ),
    "QUOTA_EXCEEDED": google_error(
        429,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute' "
        "of service 'fcm.googleapis.com'.",
        error_code="QUOTA_EXCEEDED",
        headers={"Retry-After": "60"},
    ),
    "UNAVAILABLE": google_error(
        503, "UNAVAILABLE", "The service is currently unavailable.", error_code="UNAVAILABLE"
    ),
    "INTERNAL": google_error(500, "INTERNAL", "Internal error encountered.", error_code="INTERNAL"),
    "UNSPECIFIED_ERROR": google_error(
        500, "UNKNOWN", "Unknown error.", error_code="UNSPECIFIED_ERROR"
    ),
    "THIRD_PARTY_AUTH_ERROR": google_error(
        401,
        "UNAUTHENTICATED",
        "Auth error from APNS or Web Push Service",
        error_code="THIRD_PARTY_AUTH_ERROR",
    ),
    "UNAUTHENTICATED": google_error(401, "UNAUTHENTICATED", _UNAUTHENTICATED_TEXT),
    "PERMISSION_DENIED": google_error(
        403, "PERMISSION_DENIED", "The caller does not have permission"
    ),
    "NOT_FOUND": google_error(404, "NOT_FOUND", "Requested entity was not found."),
    "RESOURCE_EXHAUSTED": google_error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted."),
}

_MISSING_CREDENTIALS = google_error(401, "UNAUTHENTICATED", _MISSING_CREDENTIALS_TEXT)
_SUCCESS_NAMES = frozenset({"OK", "SUCCESS"})

ReplySpec = str | int | FcmReply | None
"""How tests name an answer: a CANNED_ERRORS key, an HTTP status (a bare, non-Google body
as a load balancer would send), an FcmReply, or None / "OK" / 200 for success."""


@dataclass(slots=True)
class FcmRequest:
    """One messages:send call as it arrived."""

    token: str | None
    message: Mapping[str, object] | None
    """The parsed `message` object (None if the body was not a JSON object with one)."""
    headers: Mapping[str, str]
    """Regular header fields; names are case-insensitive (`headers["Authorization"]`)."""
    project: str
    status: int | None = None
    """What the stand-in answered; None while it is still answering (or hanging)."""
    http_version: str = "1.1"
    """"2" or "1.1", as ALPN chose."""
    pseudo_headers: Mapping[str, str] = field(default_factory=dict)
    """HTTP/2 only: `:method`, `:scheme`, `:authority`, `:path` as sent."""
    connection_id: int = 0
    """Which HTTP/2 connection (1, 2, ... in the order they opened); 0 for HTTP/1.1."""


@dataclass(slots=True)
class _Step:
    reply: FcmReply | None  # None: deliver normally
    remaining: int | None  # None: for ever
    hang: bool = False


# --------------------------------------------------------------------------------------
# The stand-in


class FcmStandIn:
    """FCM v1 and its token endpoint on 127.0.0.1 over TLS; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        project_id: str = "xmpp-push-test",
        token_lifetime: int = 3599,
        port: int = 0,
        ca: TestCA | None = None,
        max_concurrent_streams: int = 100,
    ) -> None:
        self.directory = directory
        self.project_id = project_id
        self.token_lifetime = token_lifetime
        self.max_concurrent_streams = max_concurrent_streams
        """Announced to HTTP/2 clients (Google's front end announces 100)."""
        self.client_email = f"xmpp-push@{project_id}.iam.gserviceaccount.com"
        self.token_delay = 0.0
        """Seconds the token endpoint waits before answering (to show a slow refresh)."""
        self.token_requests = 0
        self.requests: list[FcmRequest] = []
        self._requested_port = port
        self._ca = ca
        self._plans: dict[str, deque[_Step]] = {}
        self._access_tokens: dict[str, float] = {}  # token -> expiry (time.time())
        self._sent = 0
        self._arrived = asyncio.Event()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._http2: set[_Http2Connection] = set()
        self._key: rsa.RSAPrivateKey | None = None
        self._key_id = ""
        self.port = 0
        self.ca_file = directory / "ca.pem"
        self.service_account_file = directory / "service-account.json"
        self.goaway_after_requests: int | None = None
        self.connections_opened = 0
        """HTTP/2 connections accepted so far."""
        self.resets_received = 0
        """Streams the client reset (a send it gave up on)."""
        self.peak_concurrent_streams = 0
        """The most HTTP/2 requests in progress on one connection at once."""

    # -- lifecycle ------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.endpoint}/token"

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ca = self._ca or TestCA(self.directory)
        self.ca_file = ca.ca_file
        certificate = ca.issue("fcm-standin")
        app = web.Application()
        app.router.add_post("/token", self._handle_token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._handle_send)
        # A short shutdown: hung handlers are released by close(), nothing else lingers.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        # Our own listener rather than aiohttp's site: each connection goes to HTTP/2 or
        # to aiohttp's HTTP/1.1 handler once ALPN has picked the protocol.
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _AlpnRouter(self),
            "127.0.0.1",
            self._requested_port,
            ssl=certificate.server_context(alpn=["h2", "http/1.1"]),
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        # The file names the port, so it can only be written once the socket is bound.
        self._write_service_account()

    async def close(self) -> None:
        self._closing.set()  # lets hanging handlers finish so shutdown does not wait
        if self._server is not None:
            self._server.close()
            self._server = None
        await self.drop_connections()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def drop_connections(self) -> None:
        """Close every HTTP/2 connection, answered or not, but keep listening (a
        network hiccup, a front end restarting)."""
        connections = list(self._http2)
        for connection in connections:
            connection.close()
        if connections:
            _, pending = await asyncio.wait([c.lost for c in connections], timeout=1.0)
            for connection in connections:
                if connection.lost in pending:
                    connection.abort()

    @property
    def open_connections(self) -> int:
        """HTTP/2 connections open now."""
        return len(self._http2)

    async def __aenter__(self) -> FcmStandIn:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- programming ----------------------------------------------------------------

    def respond(
        self,
        token: str,
        error_code_or_status: ReplySpec,
        *,
        times: int | None = None,
        retry_after: float | str | None = None,
    ) -> None:
        """Answer sends to `token` this way, `times` times (None: until told otherwise)."""
        reply = _reply_for(error_code_or_status)
        if reply is not None:
            reply = reply.with_retry_after(retry_after)
        self._plans[token] = deque([_Step(reply, times)])

    def respond_sequence(self, token: str, replies: Sequence[ReplySpec]) -> None:
        """Answer the next sends to `token` with these, one each, then normally."""
        self._plans[token] = deque(_Step(_reply_for(spec), 1) for spec in replies)

    def hang(self, token: str) -> None:
        """Never answer sends to `token` (until the stand-in closes)."""
        self._plans[token] = deque([_Step(None, None, hang=True)])

    def reset(self, token: str | None = None) -> None:
        """Forget what `respond`/`hang` said, for one token or all."""
        if token is None:
            self._plans.clear()
        else:
            self._plans.pop(token, None)

    def goaway_after(self, n: int | None) -> None:
        """After the `n`th request on an HTTP/2 connection is answered, send GOAWAY
        naming it as the last stream processed and close the connection: requests sent
        after it were never processed (None: stop doing so)."""
        self.goaway_after_requests = n

    def expire_access_tokens(self) -> None:
        """Revoke every access token issued so far: the next send gets 401 UNAUTHENTICATED."""
        self._access_tokens.clear()

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[FcmRequest]:
        """The first `n` send requests, once that many have arrived."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.requests) < n:
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{len(self.requests)} of {n} FCM requests arrived in {timeout} s"
            ) from None
        return self.requests[:n]

    # -- token endpoint -------------------------------------------------------------

    async def _handle_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        fields = {name: value for name, value in form.items() if isinstance(value, str)}
        return _web_response(await self._token(fields))

    async def _token(self, form: Mapping[str, str]) -> FcmReply:
        """The token endpoint's answer to a POSTed form, whichever protocol it came on."""
        self.token_requests += 1
        if self.token_delay > 0:
            await asyncio.sleep(self.token_delay)
        grant_type = form.get("grant_type", "")
        assertion = form.get("assertion", "")
        if grant_type != JWT_BEARER_GRANT:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        if not assertion:
            return _oauth_error("invalid_request", "Missing required parameter: assertion")
        problem = self._check_assertion(assertion)
        if problem is not None:
            return _oauth_error("invalid_grant", problem)
        access_token = f"ya29.standin-{secrets.token_urlsafe(32)}"
        self._access_tokens[access_token] = time.time() + self.token_lifetime
        return _json_reply(
            200,
            {
                "access_token": access_token,
                "expires_in": self.token_lifetime,
                "token_type": "Bearer",
            },
        )

    def _check_assertion(self, assertion: str) -> str | None:
        """Why Google would refuse this assertion, or None if it would not."""
        assert self._key is not None
        try:
            encoded_header, encoded_claims, encoded_signature = assertion.split(".")
            header = json.loads(_b64url_decode(encoded_header))
            claims = json.loads(_b64url_decode(encoded_claims))
            signature = _b64url_decode(encoded_signature)
        except (ValueError, binascii.Error):
            return "Invalid JWT: could not be decoded."
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return "Invalid JWT: could not be decoded."
        if header.get("alg") != "RS256" or header.get("kid", self._key_id) != self._key_id:
            return "Invalid JWT Signature."
        try:
            self._key.public_key().verify(
                signature,
                f"{encoded_header}.{encoded_claims}".encode("ascii"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return "Invalid JWT Signature."
        if claims.get("iss") != self.client_email:
            return "Invalid grant: account not found"
        if claims.get("aud") not in {GOOGLE_TOKEN_URI, self.token_uri}:
            return "Invalid JWT: Failed audience check."
        scope = claims.get("scope")
        if not isinstance(scope, str) or FCM_SCOPE not in scope.split():
            return "Invalid OAuth scope or ID token audience provided."
        issued_at, expires_at = claims.get("iat"), claims.get("exp")
        now = time.time()
        if (
            not isinstance(issued_at, int)
            or not isinstance(expires_at, int)
            or expires_at <= now
            or issued_at > now + _CLOCK_SKEW_SECONDS
            or expires_at - issued_at > _MAX_ASSERTION_LIFETIME
        ):
            return (
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim."
            )
        return None

    # -- messages:send --------------------------------------------------------------

    async def _handle_send(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = CIMultiDict(request.headers)
        reply = await self._messages_send(request.match_info["project"], headers, raw)
        return _web_response(reply)

    async def _messages_send(
        self,
        project: str,
        headers: Mapping[str, str],
        raw: bytes,
        *,
        http_version: str = "1.1",
        pseudo_headers: Mapping[str, str] | None = None,
        connection_id: int = 0,
    ) -> FcmReply:
        """FCM's answer to one send, whichever protocol it came on; `headers` must look
        names up case-insensitively."""
        document = _parse_json(raw)
        message = document.get("message") if isinstance(document, dict) else None
        token = message.get("token") if isinstance(message, dict) else None
        record = FcmRequest(
            token=token if isinstance(token, str) else None,
            message=message if isinstance(message, dict) else None,
            headers=headers,
            project=project,
            http_version=http_version,
            pseudo_headers=dict(pseudo_headers or {}),
            connection_id=connection_id,
        )
        self.requests.append(record)
        self._arrived.set()

        reply = self._refusal(headers, record.project, raw, document)
        if reply is None and record.token is not None:
            step = self._next_step(record.token)
            if step is not None and step.hang:
                await self._closing.wait()
                reply = CANNED_ERRORS["UNAVAILABLE"]
            elif step is not None:
                reply = step.reply
        if reply is None:
            self._sent += 1
            record.status = 200
            name = f"projects/{self.project_id}/messages/0:{self._sent}"
            return _json_reply(200, {"name": name})
        record.status = reply.status
        return reply

    async def _http2_request(
        self,
        connection_id: int,
        pseudo_headers: Mapping[str, str],
        headers: Mapping[str, str],
        raw: bytes,
    ) -> FcmReply:
        """Route one HTTP/2 request as aiohttp routes the HTTP/1.1 ones."""
        method = pseudo_headers.get(":method", "")
        path = pseudo_headers.get(":path", "").partition("?")[0]
        if path == "/token":
            if method != "POST":
                return _METHOD_NOT_ALLOWED
            return await self._token(dict(parse_qsl(raw.decode(errors="replace"))))
        match = _SEND_PATH.fullmatch(path)
        if match is None:
            return _NOT_FOUND
        if method != "POST":
            return _METHOD_NOT_ALLOWED
        return await self._messages_send(
            match["project"],
            headers,
            raw,
            http_version="2",
            pseudo_headers=pseudo_headers,
            connection_id=connection_id,
        )

    def _connection_made(self, connection: _Http2Connection) -> int:
        self.connections_opened += 1
        self._http2.add(connection)
        return self.connections_opened

    def _connection_lost(self, connection: _Http2Connection) -> None:
        self._http2.discard(connection)

    def _refusal(
        self, headers: Mapping[str, str], project: str, raw: bytes, document: object
    ) -> FcmReply | None:
        """Google's checks in Google's order: credentials, project, message."""
        scheme, _, access_token = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not access_token:
            return _MISSING_CREDENTIALS
        expires_at = self._access_tokens.get(access_token.strip())
        if expires_at is None or expires_at <= time.time():
            return CANNED_ERRORS["UNAUTHENTICATED"]
        if project != self.project_id:
            return google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                "(or it may not exist).",
            )
        return _validate(raw, document)

    def _next_step(self, token: str) -> _Step | None:
        plan = self._plans.get(token)
        if not plan:
            return None
        step = plan[0]
        if step.remaining is not None:
            step.remaining -= 1
            if step.remaining <= 0:
                plan.popleft()
                if not plan:
                    del self._plans[token]
        return step

    # -- service account ------------------------------------------------------------

    def _write_service_account(self) -> None:
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._key_id = secrets.token_hex(20)
        private_key = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode("ascii")
        info = {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self._key_id,
            "private_key": private_key,
            "client_email": self.client_email,
            "client_id": str(secrets.randbelow(10**20)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "universe_domain": "googleapis.com",
        }
        self.service_account_file.write_text(json.dumps(info, indent=2))
        self.service_account_file.chmod(0o600)


# --------------------------------------------------------------------------------------
# Connections: HTTP/2 or HTTP/1.1, as ALPN chose


class _AlpnRouter(asyncio.Protocol):
    """Hands a new TLS connection to HTTP/2 or to aiohttp's HTTP/1.1 handler."""

    def __init__(self, server: FcmStandIn) -> None:
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        protocol: asyncio.Protocol
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            protocol = _Http2Connection(self._server)
        elif self._server._runner is not None and self._server._runner.server is not None:
            protocol = self._server._runner.server()
        else:  # closing
            transport.close()
            return
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class _Http2Connection(ServerConnection):
    """One client connection speaking HTTP/2; each request is answered by its own task
    (a hanging answer holds up nothing else)."""

    def __init__(self, server: FcmStandIn) -> None:
        super().__init__()
        self._server = server
        self.connection_id = 0
        self._answering: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.connection_id = self._server._connection_made(self)
        self._start(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: self._server.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: 16384,
            }
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._going_away = True
        for task in self._answering.values():
            task.cancel()
        self._answering.clear()
        self._server._connection_lost(self)
        self._lost()

    def data_received(self, data: bytes) -> None:
        if self._going_away:
            return  # h2 takes no frames after GOAWAY; the transport is closing
        try:
            events = self._h2.receive_data(data)
        except ProtocolError:
            self._flush()  # h2 queued a GOAWAY naming the error
            self.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._request_opened(event.stream_id, list(event.headers))
                self._server.peak_concurrent_streams = max(
                    self._server.peak_concurrent_streams, len(self._open_streams)
                )
            elif isinstance(event, DataReceived):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                incoming = self._incoming.get(event.stream_id)
                if incoming is not None:
                    incoming.body += event.data
            elif isinstance(event, StreamEnded):
                incoming = self._incoming.pop(event.stream_id, None)
                if incoming is not None:
                    self._start_answer(event.stream_id, incoming)
            elif isinstance(event, StreamReset):
                self._server.resets_received += 1
                self._forget(event.stream_id)
                task = self._answering.pop(event.stream_id, None)
                if task is not None:
                    task.cancel()
            elif isinstance(event, WindowUpdated):
                self._pump_all()
            elif isinstance(event, ConnectionTerminated):
                self._going_away = True
                self.close()
                return
        self._flush()

    def _start_answer(self, stream_id: int, incoming: Incoming) -> None:
        self._requests += 1
        goaway_after = self._server.goaway_after_requests
        last = goaway_after is not None and self._requests >= goaway_after
        task = asyncio.get_running_loop().create_task(self._answer(stream_id, incoming, last))
        self._answering[stream_id] = task

    async def _answer(self, stream_id: int, incoming: Incoming, last: bool) -> None:
        # Tasks run in the order the requests ended, so by the time one runs after a
        # GOAWAY, that GOAWAY named a lower stream: this request was never processed.
        if not self._taking_requests():
            return
        pseudo_headers: dict[str, str] = {}
        headers: CIMultiDict[str] = CIMultiDict()
        for raw_name, raw_value in incoming.headers:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            if name.startswith(":"):
                pseudo_headers[name] = value
            else:
                headers.add(name, value)
        try:
            reply = await self._server._http2_request(
                self.connection_id, pseudo_headers, headers, bytes(incoming.body)
            )
        finally:
            self._answering.pop(stream_id, None)
        if not self._taking_requests():  # went away or lost while answering
            return
        self._send(stream_id, reply)
        if last:
            self._going_away = True
            self._h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=stream_id)
            self._flush()
            self.close()
            return
        self._flush()

    def _taking_requests(self) -> bool:
        return not self._going_away

    def _send(self, stream_id: int, reply: FcmReply) -> None:
        headers = [
            (b":status", b"%d" % reply.status),
            (b"content-type", f"{reply.content_type}; charset=UTF-8".encode()),
            (b"content-length", b"%d" % len(reply.body)),
        ]
        headers += [
            (name.lower().encode(), value.encode()) for name, value in reply.headers.items()
        ]
        self._respond(stream_id, headers, reply.body)


# --------------------------------------------------------------------------------------
# Message validation: the subset of the v1 Message schema a push service uses, checked as
# strictly as FCM does, so a provider that passes here sends what Google accepts.

_MESSAGE_FIELDS: Final = frozenset(
    {"name", "data", "notification", "android", "webpush", "apns", "fcm_options"}
    | {"token", "topic", "condition"}
)
_NOTIFICATION_FIELDS: Final = frozenset({"title", "body", "image"})
_ANDROID_FIELDS: Final = frozenset(
    {"collapse_key", "priority", "ttl", "restricted_package_name", "data", "notification"}
    | {"fcm_options", "direct_boot_ok", "bandwidth_constrained_ok", "restricted_satellite_ok"}
)
_ANDROID_NOTIFICATION_STRINGS: Final = frozenset(
    {"title", "body", "icon", "color", "sound", "tag", "click_action", "body_loc_key"}
    | {"title_loc_key", "channel_id", "ticker", "image", "event_time", "visibility"}
    | {"notification_priority", "proxy"}
)
_ANDROID_NOTIFICATION_OTHERS: Final = frozenset(
    {"body_loc_args", "title_loc_args", "sticky", "local_only", "default_sound"}
    | {"default_vibrate_timings", "default_light_settings", "vibrate_timings"}
    | {"light_settings", "bypass_proxy_notification", "notification_count"}
)
_RESERVED_DATA_KEYS: Final = frozenset({"from", "message_type"})


def _validate(raw: bytes, document: object) -> FcmReply | None:
    if not isinstance(document, dict):
        return invalid_argument(
            "Invalid JSON payload received. Expected an object.", field="", fcm_error=False
        )
    problem = _unknown_field(document, {"message", "validate_only"}, "")
    if problem is not None:
        return problem
    message = document.get("message")
    if not isinstance(message, dict):
        return invalid_argument("Message is not set.", field="message")
    problem = _unknown_field(message, _MESSAGE_FIELDS, "message")
    if problem is not None:
        return problem
    for other_target in ("topic", "condition"):
        if other_target in message:
            return invalid_argument(
                f"Invalid value at 'message' (oneof), oneof field 'target' is already set. "
                f"Cannot set '{other_target}'",
                field="message",
                fcm_error=False,
            )
    token = message.get("token")
    if token is None:
        return invalid_argument("Recipient of the message is not set.", field="message")
    if not isinstance(token, str) or not _TOKEN_SHAPE.fullmatch(token):
        return CANNED_ERRORS["INVALID_ARGUMENT"]
    for check in (
        _check_data(message.get("data"), "message.data"),
        _check_notification(message.get("notification")),
        _check_android(message.get("android")),
    ):
        if check is not None:
            return check
    if len(raw) > MAX_MESSAGE_BYTES:
        return invalid_argument("Android message is too big", field="message")
    return None


def _unknown_field(
    obj: dict[str, object], known: frozenset[str] | set[str], path: str
) -> FcmReply | None:
    for name in obj:
        if _snake(name) not in known:
            where = path or "<root>"
            return invalid_argument(
                f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': "
                "Cannot find field.",
                field=path,
                fcm_error=False,
            )
    return None


def _wrong_value(path: str, type_name: str, value: object) -> FcmReply:
    return invalid_argument(
        f"Invalid value at '{path}' ({type_name}), {json.dumps(value)[:64]}",
        field=path,
        fcm_error=False,
    )


def _check_data(data: object, path: str) -> FcmReply | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        return _wrong_value(path, "type.googleapis.com/google.protobuf.Map", data)
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            return _wrong_value(f"{path}[{index}].value", "TYPE_STRING", value)
        lowered = key.lower()
        if lowered in _RESERVED_DATA_KEYS or lowered.startswith(("google", "gcm")):
            return invalid_argument(
                f"Invalid data payload key: {key}", field=f"{path}[{index}].key"
            )
    return None


def _check_strings(obj: dict[str, object], names: frozenset[str], path: str) -> FcmReply | None:
    for name, value in obj.items():
        if _snake(name) in names and not isinstance(value, str):
            return _wrong_value(f"{path}.{name}", "TYPE_STRING", value)
    return None


def _check_notification(notification: object) -> FcmReply | None:
    if notification is None:
        return None
    if not isinstance(notification, dict):
        return _wrong_value(
            "message.notification", "type.googleapis.com/Notification", notification
        )
    return _unknown_field(notification, _NOTIFICATION_FIELDS, "message.notification") or (
        _check_strings(notification, _NOTIFICATION_FIELDS, "message.notification")
    )


def _check_android(android: object) -> FcmReply | None:
    if android is None:
        return None
    path = "message.android"
    if not isinstance(android, dict):
        return _wrong_value(path, "type.googleapis.com/AndroidConfig", android)
    problem = _unknown_field(android, _ANDROID_FIELDS, path)
    if problem is not None:
        return problem
    priority = android.get("priority")
    if priority is not None and priority not in {"HIGH", "NORMAL"}:
        return _wrong_value(
            f"{path}.priority",
            "type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority",
            priority,
        )
    ttl = android.get("ttl")
    if ttl is not None:
        match = _DURATION.fullmatch(ttl) if isinstance(ttl, str) else None
        if match is None:
            return invalid_argument(
                f"Invalid value at '{path}.ttl' (type.googleapis.com/google.protobuf.Duration), "
                "Field 'ttl', Illegal duration format; duration must end with 's'",
                field=f"{path}.ttl",
                fcm_error=False,
            )
        if int(match.group(1)) > MAX_TTL_SECONDS:
            return invalid_argument(
                "The TTL is greater than the maximum allowed (2419200s)", field=f"{path}.ttl"
            )
    problem = _check_data(android.get("data"), f"{path}.data")
    if problem is not None:
        return problem
    notification = android.get("notification")
    if notification is None:
        return None
    npath = f"{path}.notification"
    if not isinstance(notification, dict):
        return _wrong_value(npath, "type.googleapis.com/AndroidNotification", notification)
    known = _ANDROID_NOTIFICATION_STRINGS | _ANDROID_NOTIFICATION_OTHERS
    problem = _unknown_field(notification, known, npath) or _check_strings(
        notification, _ANDROID_NOTIFICATION_STRINGS, npath
    )
    if problem is not None:
        return problem
    for name, value in notification.items():
        # bool is an int in Python, not in protobuf
        if _snake(name) == "notification_count" and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31
        ):
            return _wrong_value(f"{npath}.{name}", "TYPE_INT32", value)
    return None


def _snake(name: str) -> str:
    """Proto3 JSON accepts lowerCamelCase and the original snake_case names alike."""
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


# --------------------------------------------------------------------------------------
# Helpers


def _reply_for(spec: ReplySpec) -> FcmReply | None:
    if spec is None or isinstance(spec, FcmReply):
        return spec
    if isinstance(spec, int):
        if spec == 200:
            return None
        # Not Google's JSON: what a proxy or load balancer in front would send.
        return FcmReply(spec, f"{spec} error from a proxy".encode(), content_type="text/html")
    if spec.upper() in _SUCCESS_NAMES:
        return None
    try:
        return CANNED_ERRORS[spec]
    except KeyError:
        known = ", ".join(sorted(CANNED_ERRORS))
        raise ValueError(f"unknown FCM answer {spec!r} (known: {known})") from None


def _json_reply(status: int, document: object) -> FcmReply:
    return FcmReply(status, _json_bytes(document))


def _oauth_error(error: str, description: str) -> FcmReply:
    return _json_reply(400, {"error": error, "error_description": description})


def _web_response(reply: FcmReply) -> web.Response:
    return web.Response(
        status=reply.status,
        body=reply.body,
        content_type=reply.content_type,
        charset="UTF-8",
        headers=reply.headers,
    )


# What aiohttp answers for a path or method it has no route for.
_NOT_FOUND: Final = FcmReply(404, b"404: Not Found", content_type="text/plain")
_METHOD_NOT_ALLOWED: Final = FcmReply(405, b"405: Method Not Allowed", content_type="text/plain")


def _parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --------------------------------------------------------------------------------------
# Command line


async def _serve(args: argparse.Namespace) -> None:
    fcm = FcmStandIn(
        args.dir, project_id=args.project_id, token_lifetime=args.token_lifetime, port=args.port
    )
    await serve_until_signal(fcm, _describe)


def _describe(fcm: FcmStandIn) -> dict[str, object]:
    return {
        "port": fcm.port,
        "ca_file": str(fcm.ca_file),
        "service_account_file": str(fcm.service_account_file),
        "project_id": fcm.project_id,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="FCM HTTP v1 stand-in for tests")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--dir", type=Path, required=True, help="where CA and key files go")
    parser.add_argument("--project-id", default="xmpp-push-test")
    parser.add_argument("--token-lifetime", type=int, default=3599)
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
