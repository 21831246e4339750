"""App-server mode: turn a XEP-0357 notification into a push for one device.

The server's own push module (Prosody mod_cloud_notify, ejabberd mod_push, MongooseIM
mod_event_pusher_push) keeps the registration and echoes the client's publish-options
in every publish. This module reads the device from those options (MongooseIM style:
`service`, `device_id`, ...) or, when the operator configured a default service, takes
the node as the token (as fpush does). It knows nothing of XML: the XMPP adapter hands
it plain strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from xmpp_push.core.model import Content, Device, InvalidDevice, Mode, Priority, Push, Service

__all__ = ["ContentPolicy", "PublishPolicy", "RequestError", "RequestProblem", "Summary", "to_push"]

MAX_TTL = 2_419_200
"""Four weeks: the longest either push network keeps a notification."""


class RequestProblem(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_NODE = "unknown_node"


class RequestError(ValueError):
    """The publish cannot become a push; `problem` decides the reply."""

    def __init__(self, problem: RequestProblem, text: str) -> None:
        super().__init__(text)
        self.problem = problem
        self.text = text


@dataclass(frozen=True, slots=True)
class Summary:
    """The `urn:xmpp:push:summary` form, as far as the server filled it in."""

    message_count: int | None = None
    sender: str | None = None
    body: str | None = None
    priority_hint: Priority | None = None
    """Tigase/Prosody `<priority xmlns='tigase:push:priority:0'/>` inside the notification."""


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    show_body: bool = False
    show_sender: bool = False
    body_placeholder: str = "New message"


@dataclass(frozen=True, slots=True)
class PublishPolicy:
    content: ContentPolicy = ContentPolicy()
    default_priority: Priority = Priority.HIGH
    default_ttl: int = 86400
    default_service: Service | None = None


def filter_content(summary: Summary, policy: ContentPolicy) -> Content:
    """What the phone may see. Bodies and senders go to Apple and Google in clear text,
    so they are shown only when the operator says so; otherwise a placeholder marks a
    message that has a body."""
    body: str | None = None
    if summary.body:
        body = summary.body if policy.show_body else policy.body_placeholder
    sender = summary.sender if policy.show_sender and summary.sender else None
    return Content(message_count=summary.message_count, sender=sender, body=body)


def to_push(
    node: str,
    summary: Summary,
    options: Mapping[str, str],
    policy: PublishPolicy,
    now: float,
) -> Push:
    """Build the push a publish asks for, or raise `RequestError`."""
    device = _device(node, options, policy.default_service)
    silent = _flag(options, "silent")
    if silent is None:
        # A summary without a body is a stanza the server found not worth showing
        # (a chat state, a receipt): wake the app quietly instead of showing "New message".
        silent = not summary.body
    priority = (
        _priority(options.get("priority")) or summary.priority_hint or policy.default_priority
    )
    mutable = _flag(options, "mutable_content")
    return Push(
        device=device,
        content=filter_content(summary, policy.content),
        priority=priority,
        silent=silent,
        ttl=_ttl(options.get("time_to_live"), policy.default_ttl),
        created_at=now,
        sound=options.get("sound") or None,
        mutable_content=True if mutable is None else mutable,
        click_action=options.get("click_action") or None,
    )


def _device(node: str, options: Mapping[str, str], default_service: Service | None) -> Device:
    service_text = options.get("service")
    token = options.get("device_id")
    if service_text is None and token is None:
        if default_service is None:
            raise RequestError(RequestProblem.UNKNOWN_NODE, "no device for this node")
        try:
            return Device(service=default_service, token=node)
        except InvalidDevice as exc:
            raise RequestError(RequestProblem.UNKNOWN_NODE, "no device for this node") from exc
    if not service_text:
        raise RequestError(RequestProblem.BAD_REQUEST, "publish-options: service is missing")
    if not token:
        raise RequestError(RequestProblem.BAD_REQUEST, "publish-options: device_id is missing")
    try:
        service = Service(service_text.strip().lower())
    except ValueError:
        raise RequestError(
            RequestProblem.BAD_REQUEST,
            f"publish-options: unknown service {service_text!r} (expected apns or fcm)",
        ) from None
    mode: Mode | None = None
    if options.get("mode"):
        try:
            mode = Mode.parse(options["mode"])
        except ValueError as exc:
            raise RequestError(RequestProblem.BAD_REQUEST, f"publish-options: {exc}") from None
    try:
        return Device(
            service=service,
            token=token.strip(),
            topic=options.get("topic") or None,
            mode=mode,
            voip_token=options.get("voip_device_id") or None,
        )
    except InvalidDevice as exc:
        raise RequestError(RequestProblem.BAD_REQUEST, f"publish-options: {exc}") from None


def _priority(text: str | None) -> Priority | None:
    if not text:
        return None
    try:
        return Priority(text.strip().lower())
    except ValueError:
        raise RequestError(
            RequestProblem.BAD_REQUEST,
            f"publish-options: unknown priority {text!r} (expected high or normal)",
        ) from None


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def _flag(options: Mapping[str, str], key: str) -> bool | None:
    text = options.get(key)
    if text is None or text == "":
        return None
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise RequestError(RequestProblem.BAD_REQUEST, f"publish-options: {key} must be true or false")


def _ttl(text: str | None, default: int) -> int:
    if not text:
        return default
    try:
        ttl = int(text.strip())
    except ValueError:
        raise RequestError(
            RequestProblem.BAD_REQUEST, "publish-options: time_to_live must be whole seconds"
        ) from None
    if not 0 <= ttl <= MAX_TTL:
        raise RequestError(
            RequestProblem.BAD_REQUEST,
            f"publish-options: time_to_live must be between 0 and {MAX_TTL} seconds",
        )
    return ttl
