"""A stand-in for Firebase Cloud Messaging HTTP v1 and Google's OAuth2 token endpoint.

It speaks TLS with a certificate from `TestCA`, writes a service-account JSON whose
`token_uri` points at itself, checks the RS256 assertion the way Google does, and answers
`messages:send` with Google's own error shapes. Tests program answers per registration
token (`respond`, `respond_sequence`, `hang`) and read what arrived (`requests`).

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

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.standins.cli import serve_until_signal
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
    project: str
    status: int | None = None
    """What the stand-in answered; None while it is still answering (or hanging)."""


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
    ) -> None:
        self.directory = directory
        self.project_id = project_id
        self.token_lifetime = token_lifetime
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
        self._key: rsa.RSAPrivateKey | None = None
        self._key_id = ""
        self.port = 0
        self.ca_file = directory / "ca.pem"
        self.service_account_file = directory / "service-account.json"

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
        site = web.TCPSite(
            self._runner,
            "127.0.0.1",
            self._requested_port,
            ssl_context=certificate.server_context(),
        )
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        # The file names the port, so it can only be written once the socket is bound.
        self._write_service_account()

    async def close(self) -> None:
        self._closing.set()  # lets hanging handlers finish so shutdown does not wait
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

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
        self.token_requests += 1
        if self.token_delay > 0:
            await asyncio.sleep(self.token_delay)
        form = await request.post()
        grant_type = form.get("grant_type")
        assertion = form.get("assertion")
        if not isinstance(grant_type, str) or grant_type != JWT_BEARER_GRANT:
            shown = grant_type if isinstance(grant_type, str) else ""
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {shown}")
        if not isinstance(assertion, str) or not assertion:
            return _oauth_error("invalid_request", "Missing required parameter: assertion")
        problem = self._check_assertion(assertion)
        if problem is not None:
            return _oauth_error("invalid_grant", problem)
        access_token = f"ya29.standin-{secrets.token_urlsafe(32)}"
        self._access_tokens[access_token] = time.time() + self.token_lifetime
        return _json_response(
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
        document = _parse_json(raw)
        message = document.get("message") if isinstance(document, dict) else None
        token = message.get("token") if isinstance(message, dict) else None
        record = FcmRequest(
            token=token if isinstance(token, str) else None,
            message=message if isinstance(message, dict) else None,
            headers=dict(request.headers),
            project=request.match_info["project"],
        )
        self.requests.append(record)
        self._arrived.set()

        reply = self._refusal(request, record.project, raw, document)
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
            return _json_response(200, {"name": name})
        record.status = reply.status
        return web.Response(
            status=reply.status,
            body=reply.body,
            content_type=reply.content_type,
            charset="UTF-8",
            headers=reply.headers,
        )

    def _refusal(
        self, request: web.Request, project: str, raw: bytes, document: object
    ) -> FcmReply | None:
        """Google's checks in Google's order: credentials, project, message."""
        scheme, _, access_token = request.headers.get("Authorization", "").partition(" ")
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


def _json_response(status: int, document: object) -> web.Response:
    return web.Response(
        status=status, body=_json_bytes(document), content_type="application/json", charset="UTF-8"
    )


def _oauth_error(error: str, description: str) -> web.Response:
    return _json_response(400, {"error": error, "error_description": description})


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
