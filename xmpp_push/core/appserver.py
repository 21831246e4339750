"""App-server mode: turn a XEP-0357 notification into a push for one device.

The server's own push module (Prosody mod_cloud_notify, ejabberd mod_push, MongooseIM
mod_event_pusher_push) keeps the registration and echoes the client's publish-options
in every publish. This module reads the device from those options (MongooseIM style:
`service`, `device_id`, ...; the rules are in `publish_options`, shared with direct
mode) or, when the operator configured a default service, takes the node as the token
(as fpush does). It knows nothing of XML: the XMPP adapter hands it plain strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xmpp_push.core.model import (
    DEFAULT_BODY,
    Content,
    Device,
    InvalidDevice,
    Priority,
    Push,
    Service,
)
from xmpp_push.core.publish_options import (
    MAX_TTL,
    RequestError,
    RequestProblem,
    build_push,
    read_device,
    read_flag,
    read_priority,
)

__all__ = [
    "MAX_TTL",
    "ContentPolicy",
    "PublishPolicy",
    "RequestError",
    "RequestProblem",
    "Summary",
    "to_push",
]


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
    body_placeholder: str = DEFAULT_BODY


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
    silent = read_flag(options, "silent")
    if silent is None:
        # A summary without a body is a stanza the server found not worth showing
        # (a chat state, a receipt): wake the app quietly instead of showing "New message".
        silent = not summary.body
    return build_push(
        device,
        filter_content(summary, policy.content),
        options,
        priority=read_priority(options) or summary.priority_hint or policy.default_priority,
        silent=silent,
        default_ttl=policy.default_ttl,
        now=now,
    )


def _device(node: str, options: Mapping[str, str], default_service: Service | None) -> Device:
    if options.get("service") is None and options.get("device_id") is None:
        if default_service is None:
            raise RequestError(RequestProblem.UNKNOWN_NODE, "no device for this node")
        try:
            return Device(service=default_service, token=node)
        except InvalidDevice as exc:
            raise RequestError(RequestProblem.UNKNOWN_NODE, "no device for this node") from exc
    return read_device(options)
