"""A stand-in for Apple's APNs provider API: HTTP/2 over TLS on loopback.

It checks requests the way PROTOCOLS.md §6 says Apple does (JWT, path, headers,
payload) and answers like Apple (`{"reason": ...}` bodies, `apns-id` echoed), so the
provider can be tested without ever contacting Apple. Tests program answers per
device token (`respond`, `respond_sequence`, `hang`, `set_default`), make the server
misbehave (`goaway_after`, `drop_connections`, `expire_provider_tokens`, a small
`max_concurrent_streams` or `initial_window_size`) and read what arrived
(`requests`, `connections_opened`, `jwts_seen`, ...).

The server side does its own HTTP/2 flow control properly: it acknowledges every
DATA frame and sends answers only within the client's windows.

From a shell (for benchmarks and manual runs)::

    python -m tests.standins.apns --port 8443 --dir /tmp/apns [--default 410:Unregistered]

prints one JSON line (port, ca_file, key_file, key_id, team_id, endpoint) and serves
until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import re
import secrets
import string
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes

from tests.standins.cli import serve_until_signal
from tests.standins.h2server import Incoming, ServerConnection
from tests.standins.tlsca import ServerCertificate, TestCA

__all__ = ["ApnsRequest", "ApnsStandIn", "Reply", "main"]

PUSH_TYPES: Final = frozenset(
    {
        "alert",
        "background",
        "voip",
        "location",
        "complication",
        "fileprovider",
        "mdm",
        "liveactivity",
        "pushtotalk",
    }
)
MAX_PAYLOAD: Final = 4096
MAX_VOIP_PAYLOAD: Final = 5120
JWT_MAX_AGE: Final = 3600
"""Apple refuses provider tokens older than an hour."""

DEFAULT_REASONS: Final = {
    400: "BadDeviceToken",
    403: "InvalidProviderToken",
    404: "BadPath",
    405: "MethodNotAllowed",
    410: "Unregistered",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}
"""The reason a programmed answer carries when the test names only a status."""

_DEVICE_PATH: Final = "/3/device/"
_HEX_TOKEN: Final = re.compile(r"[0-9a-fA-F]{32,200}")
_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
_MAX_BODY: Final = 1 << 20
"""Bytes kept per request; more is counted against the limit but not stored."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A programmed answer; `status=None` means never answer (the stream hangs)."""

    status: int | None
    reason: str | None = None
    retry_after: str | None = None


@dataclass(slots=True)
class ApnsRequest:
    """One request as the stand-in saw it, and what it answered."""

    connection_id: int
    stream_id: int
    method: str
    path: str
    token: str
    headers: dict[str, str]
    """Regular headers (no pseudo-headers), names lower-case."""
    body: bytes
    payload: Any
    """The parsed JSON body, or None if it was not JSON."""
    jwt: str | None
    jwt_header: dict[str, Any] | None
    jwt_claims: dict[str, Any] | None
    apns_id: str
    status: int | None = None
    """None while the request hangs."""
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class _JwtCheck:
    header: dict[str, Any] | None
    claims: dict[str, Any] | None
    error: str | None
    """The 403 reason if the token can never be valid (bad signature, kid, iss)."""


class _ServerConnection(ServerConnection):
    def __init__(self, server: ApnsStandIn, connection_id: int) -> None:
        super().__init__()
        self._server = server
        self.connection_id = connection_id

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            transport.close()  # APNs speaks nothing but HTTP/2
            return
        self._server._connection_made(self)
        self._start(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: self._server.max_concurrent_streams,
                SettingCodes.INITIAL_WINDOW_SIZE: self._server.initial_window_size,
                SettingCodes.MAX_HEADER_LIST_SIZE: 8192,
            }
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connection_lost(self)
        self._lost()

    def data_received(self, data: bytes) -> None:
        if self._going_away:
            return  # h2 takes no frames after GOAWAY; the transport is closing
        try:
            events = self._h2.receive_data(data)
        except ProtocolError:
            self._server.protocol_errors += 1
            self._flush()  # h2 queued a GOAWAY naming the error
            self.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self._request_opened(event.stream_id, list(event.headers))
                self._server._stream_opened(len(self._open_streams))
            elif isinstance(event, DataReceived):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                incoming = self._incoming.get(event.stream_id)
                if incoming is not None:
                    incoming.size += len(event.data)
                    if len(incoming.body) < _MAX_BODY:
                        incoming.body += event.data
            elif isinstance(event, StreamEnded):
                if not self._request_complete(event.stream_id):
                    return  # went away: h2 takes no further frames
            elif isinstance(event, StreamReset):
                self._server.resets_received += 1
                self._forget(event.stream_id)
            elif isinstance(event, WindowUpdated):
                self._pump_all()
            elif isinstance(event, PingReceived):
                self._server.pings_received += 1  # h2 answers it
            elif isinstance(event, ConnectionTerminated):
                self._server.goaways_received += 1
                self._going_away = True
                self.close()
                return
        self._flush()

    def _request_complete(self, stream_id: int) -> bool:
        """Answer a request; False once the connection is going away."""
        incoming = self._incoming.pop(stream_id, None)
        if incoming is None:
            return True
        self._requests += 1
        answer = self._server._handle(self.connection_id, stream_id, incoming)
        if answer is not None:
            status, headers, body = answer
            self._respond(stream_id, [(b":status", b"%d" % status), *headers], body)
        goaway_after = self._server.goaway_after_requests
        if goaway_after is not None and self._requests >= goaway_after:
            self._go_away(stream_id)
            return False
        return True

    def _go_away(self, last_stream_id: int) -> None:
        self._going_away = True
        self._h2.close_connection(
            ErrorCodes.NO_ERROR, b'{"reason":"Shutdown"}', last_stream_id=last_stream_id
        )
        self._flush()
        self.close()


class ApnsStandIn:
    """APNs on 127.0.0.1 with a test CA; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        max_concurrent_streams: int = 1000,
        initial_window_size: int = 65535,
    ) -> None:
        self.directory = directory
        self.max_concurrent_streams = max_concurrent_streams
        self.initial_window_size = initial_window_size
        alphabet = string.ascii_uppercase + string.digits
        self.key_id = "".join(secrets.choice(alphabet) for _ in range(10))
        self.team_id = "".join(secrets.choice(alphabet) for _ in range(10))
        self._key: ec.EllipticCurvePrivateKey | None = None
        self._public_key: ec.EllipticCurvePublicKey | None = None
        self._key_file: Path | None = None
        self._ca_file: Path | None = None
        self._server_cert: ServerCertificate | None = None
        self._ssl_server: asyncio.Server | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self._connections: set[_ServerConnection] = set()
        self._scripts: dict[str, deque[Reply]] = {}
        self._rules: dict[str, Reply] = {}
        self._default = Reply(200)
        self._jwt_checks: dict[str, _JwtCheck] = {}
        self._expired_jwts: set[str] = set()
        self._request_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.goaway_after_requests: int | None = None

        self.requests: list[ApnsRequest] = []
        self.connections_opened = 0
        self.jwts_seen: set[str] = set()
        self.pings_received = 0
        self.resets_received = 0
        self.goaways_received = 0
        self.protocol_errors = 0
        self.peak_concurrent_streams = 0

    # -- life cycle -------------------------------------------------------------------

    async def __aenter__(self) -> ApnsStandIn:
        if self._ssl_server is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on `host`:`port`; a restart keeps the CA and the signing key."""
        if self._key is None:
            self._make_credentials()
        if self._server_cert is None:
            ca = TestCA(self.directory / "apns-ca")
            self._server_cert = ca.issue("apns")
            self._ca_file = ca.ca_file
        context = self._server_cert.server_context(alpn=["h2"])
        loop = asyncio.get_running_loop()
        self._ssl_server = await loop.create_server(
            self._new_connection, host, port, ssl=context, reuse_address=True
        )
        self._host = host
        self._port = self._ssl_server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and close every connection (like a server going down)."""
        if self._ssl_server is not None:
            self._ssl_server.close()
        await self.drop_connections()
        if self._ssl_server is not None:
            await self._ssl_server.wait_closed()
            self._ssl_server = None

    async def drop_connections(self) -> None:
        """Close every open connection but keep listening (a network hiccup)."""
        connections = list(self._connections)
        for conn in connections:
            conn.close()
        if not connections:
            return
        lost = [conn.lost for conn in connections]
        _done, pending = await asyncio.wait(lost, timeout=1.0)
        if pending:
            for conn in connections:
                conn.abort()

    def _make_credentials(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._public_key = self._key.public_key()
        self._key_file = self.directory / f"AuthKey_{self.key_id}.p8"
        self._key_file.write_bytes(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def _new_connection(self) -> _ServerConnection:
        return _ServerConnection(self, self.connections_opened + 1)

    def _connection_made(self, conn: _ServerConnection) -> None:
        self.connections_opened += 1
        conn.connection_id = self.connections_opened
        self._connections.add(conn)

    def _connection_lost(self, conn: _ServerConnection) -> None:
        self._connections.discard(conn)

    # -- what tests read --------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the APNs stand-in has not been started")
        return self._port

    @property
    def endpoint(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"https://{host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        if self._ca_file is None:
            raise RuntimeError("the APNs stand-in has not been started")
        return self._ca_file

    @property
    def key_file(self) -> Path:
        if self._key_file is None:
            raise RuntimeError("the APNs stand-in has not been started")
        return self._key_file

    @property
    def key_pem(self) -> bytes:
        return self.key_file.read_bytes()

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[ApnsRequest]:
        """The requests so far, once there are at least `n` of them."""
        if len(self.requests) < n:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._request_waiters.append((n, waiter))
            try:
                async with asyncio.timeout(timeout):
                    await waiter
            finally:
                self._request_waiters = [w for w in self._request_waiters if w[1] is not waiter]
        return list(self.requests)

    # -- what tests program -----------------------------------------------------------

    def respond(
        self,
        token: str,
        status: int,
        reason: str | None = None,
        *,
        times: int | None = None,
        retry_after: str | None = None,
    ) -> None:
        """Answer `token` with `status` always (`times=None`) or for its next `times`."""
        reply = Reply(status, reason or DEFAULT_REASONS.get(status), retry_after)
        if times is None:
            self._rules[token] = reply
        else:
            self._scripts.setdefault(token, deque()).extend([reply] * times)

    def respond_sequence(self, token: str, replies: Sequence[tuple[int, str | None]]) -> None:
        """Answer the next requests for `token` in this order, then as before."""
        script = self._scripts.setdefault(token, deque())
        for status, reason in replies:
            script.append(Reply(status, reason or DEFAULT_REASONS.get(status)))

    def hang(self, token: str, *, times: int | None = None) -> None:
        """Never answer requests for `token` (always, or the next `times`)."""
        if times is None:
            self._rules[token] = Reply(None)
        else:
            self._scripts.setdefault(token, deque()).extend([Reply(None)] * times)

    def set_default(
        self, status: int, reason: str | None = None, *, retry_after: str | None = None
    ) -> None:
        """The answer for tokens without their own programme."""
        self._default = Reply(status, reason or DEFAULT_REASONS.get(status), retry_after)

    def forget(self, token: str) -> None:
        """Drop everything programmed for `token`."""
        self._scripts.pop(token, None)
        self._rules.pop(token, None)

    def goaway_after(self, n: int | None) -> None:
        """Send GOAWAY and close a connection once it has carried `n` requests."""
        self.goaway_after_requests = n

    def expire_provider_tokens(self) -> None:
        """Answer 403 ExpiredProviderToken to every JWT seen so far (Apple's clock
        moved past their hour)."""
        self._expired_jwts |= self.jwts_seen

    # -- the APNs behaviour -----------------------------------------------------------

    def _handle(
        self, connection_id: int, stream_id: int, incoming: Incoming
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        pseudo: dict[str, str] = {}
        headers: dict[str, str] = {}
        duplicate = False
        for raw_name, raw_value in incoming.headers:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            target = pseudo if name.startswith(":") else headers
            duplicate = duplicate or name in target
            target[name] = value
        path = pseudo.get(":path", "")
        token = path[len(_DEVICE_PATH) :] if path.startswith(_DEVICE_PATH) else ""
        body = bytes(incoming.body)
        payload: Any = None
        with contextlib.suppress(ValueError):
            payload = json.loads(body)
        jwt: str | None = None
        check = _JwtCheck(None, None, "MissingProviderToken")
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, jwt = authorization.partition(" ")
            if scheme.lower() == "bearer" and jwt:
                self.jwts_seen.add(jwt)
                check = self._check_jwt(jwt)
            else:
                check = _JwtCheck(None, None, "InvalidProviderToken")
        apns_id = headers.get("apns-id") or str(uuid.uuid4())
        record = ApnsRequest(
            connection_id=connection_id,
            stream_id=stream_id,
            method=pseudo.get(":method", ""),
            path=path,
            token=token,
            headers=headers,
            body=body,
            payload=payload,
            jwt=jwt,
            jwt_header=check.header,
            jwt_claims=check.claims,
            apns_id=apns_id,
        )
        reply = self._validate(record, check, incoming.size, duplicate)
        if reply is None:
            reply = self._programmed(token)
        record.status = reply.status
        record.reason = reply.reason
        self._record(record)
        if reply.status is None:
            return None
        answer_headers = [(b"apns-id", apns_id.encode())]
        if reply.retry_after is not None:
            answer_headers.append((b"retry-after", reply.retry_after.encode()))
        if reply.status == 200:
            return reply.status, answer_headers, b""
        error: dict[str, Any] = {"reason": reply.reason or DEFAULT_REASONS.get(reply.status, "")}
        if reply.status == 410:
            error["timestamp"] = int(time.time() * 1000)
        answer_headers.append((b"content-type", b"application/json"))
        return reply.status, answer_headers, json.dumps(error, separators=(",", ":")).encode()

    def _validate(
        self, request: ApnsRequest, jwt: _JwtCheck, size: int, duplicate: bool
    ) -> Reply | None:
        """Apple's checks, roughly in Apple's order; None = the request is fine."""
        headers = request.headers
        if request.method != "POST":
            return Reply(405, "MethodNotAllowed")
        if not request.path.startswith(_DEVICE_PATH):
            return Reply(404, "BadPath")
        if not request.token:
            return Reply(400, "MissingDeviceToken")
        if not _HEX_TOKEN.fullmatch(request.token):
            return Reply(400, "BadDeviceToken")
        if duplicate:
            return Reply(400, "DuplicateHeaders")
        if jwt.error is not None:
            return Reply(403, jwt.error)
        iat = (jwt.claims or {}).get("iat", 0)
        if request.jwt in self._expired_jwts or time.time() - iat > JWT_MAX_AGE:
            return Reply(403, "ExpiredProviderToken")
        if not headers.get("apns-topic"):
            return Reply(400, "MissingTopic")
        push_type = headers.get("apns-push-type")
        if push_type is not None and push_type not in PUSH_TYPES:
            return Reply(400, "InvalidPushType")
        priority = headers.get("apns-priority")
        if priority is not None and priority not in {"1", "5", "10"}:
            return Reply(400, "BadPriority")
        if push_type == "background" and priority == "10":
            return Reply(400, "BadPriority")  # Apple requires 5 for background pushes
        expiration = headers.get("apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return Reply(400, "BadExpirationDate")
        if "apns-id" in headers and not _UUID.fullmatch(headers["apns-id"]):
            return Reply(400, "BadMessageId")
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return Reply(400, "BadCollapseId")
        if size > (MAX_VOIP_PAYLOAD if push_type == "voip" else MAX_PAYLOAD):
            return Reply(413, "PayloadTooLarge")
        if not isinstance(request.payload, dict) or not isinstance(
            request.payload.get("aps"), dict
        ):
            return Reply(400, "PayloadEmpty")
        return None

    def _programmed(self, token: str) -> Reply:
        script = self._scripts.get(token)
        if script:
            return script.popleft()
        return self._rules.get(token, self._default)

    def _check_jwt(self, jwt: str) -> _JwtCheck:
        # Signature checks cost CPU; a client reuses one token for thousands of
        # requests, so each distinct token is verified once.
        check = self._jwt_checks.get(jwt)
        if check is None:
            check = self._jwt_checks[jwt] = self._verify_jwt(jwt)
        return check

    def _verify_jwt(self, jwt: str) -> _JwtCheck:
        invalid = _JwtCheck(None, None, "InvalidProviderToken")
        parts = jwt.split(".")
        if len(parts) != 3:
            return invalid
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, binascii.Error):
            return invalid
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return invalid
        invalid = _JwtCheck(header, claims, "InvalidProviderToken")
        if header.get("alg") != "ES256" or header.get("kid") != self.key_id:
            return invalid
        if claims.get("iss") != self.team_id:
            return invalid
        iat = claims.get("iat")
        if not isinstance(iat, int) or isinstance(iat, bool):
            return invalid
        if len(signature) != 64 or self._public_key is None:
            return invalid
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self._public_key.verify(
                der, f"{parts[0]}.{parts[1]}".encode(), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            return invalid
        return _JwtCheck(header, claims, None)

    def _record(self, request: ApnsRequest) -> None:
        self.requests.append(request)
        if self._request_waiters:
            count = len(self.requests)
            for n, waiter in self._request_waiters:
                if count >= n and not waiter.done():
                    waiter.set_result(None)

    def _stream_opened(self, open_streams: int) -> None:
        self.peak_concurrent_streams = max(self.peak_concurrent_streams, open_streams)


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ------------------------------------------------------------------------------------
# Command line


async def _serve(args: argparse.Namespace) -> None:
    apns = ApnsStandIn(Path(args.dir), max_concurrent_streams=args.max_concurrent_streams)
    if args.default:
        status, _, reason = args.default.partition(":")
        apns.set_default(int(status), reason or None)
    # Started here, on the address asked for; entering a started stand-in keeps it.
    await apns.start(host=args.host, port=args.port)
    await serve_until_signal(apns, _describe)


def _describe(apns: ApnsStandIn) -> dict[str, object]:
    return {
        "port": apns.port,
        "endpoint": apns.endpoint,
        "ca_file": str(apns.ca_file),
        "key_file": str(apns.key_file),
        "key_id": apns.key_id,
        "team_id": apns.team_id,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.standins.apns", description="Serve an APNs stand-in."
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--dir", required=True, help="where the CA and the .p8 key go")
    parser.add_argument("--default", help="answer for every token, e.g. 410:Unregistered")
    parser.add_argument("--max-concurrent-streams", type=int, default=1000)
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
