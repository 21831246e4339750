"""The MongooseIM publish-options form: what a client names about its device.

Both ways in read the same fields (PROTOCOLS.md §3): app-server mode from the
publish-options a server echoes in every publish, direct mode from the form inside
the client's `<enable/>`. The rules live here once, so a registration that direct mode
accepts is one that app-server mode would deliver, and the error texts name the field
the same way on both paths. All values are strings, as data forms carry them.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from xmpp_push.core.model import (
    MAX_TTL,
    Content,
    Device,
    InvalidDevice,
    Mode,
    Priority,
    Push,
    Service,
)

__all__ = [
    "MAX_TTL",
    "RequestError",
    "RequestProblem",
    "read_device",
    "read_flag",
    "read_priority",
    "read_ttl",
]

_PREFIX = "publish-options: "


class RequestProblem(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_NODE = "unknown_node"


class RequestError(ValueError):
    """The request cannot be served as asked; `problem` decides the reply."""

    def __init__(self, problem: RequestProblem, text: str) -> None:
        super().__init__(text)
        self.problem = problem
        self.text = text


def _bad(text: str) -> RequestError:
    return RequestError(RequestProblem.BAD_REQUEST, _PREFIX + text)


def read_device(options: Mapping[str, str]) -> Device:
    """The device named by `service` and `device_id` (with `topic`, `mode`,
    `voip_device_id`); `RequestError` BAD_REQUEST naming the field otherwise."""
    service_text = options.get("service")
    token = options.get("device_id")
    if not service_text:
        raise _bad("service is missing")
    if not token:
        raise _bad("device_id is missing")
    try:
        service = Service(service_text.strip().lower())
    except ValueError:
        raise _bad(f"unknown service {service_text!r} (expected apns or fcm)") from None
    mode: Mode | None = None
    if options.get("mode"):
        try:
            mode = Mode.parse(options["mode"])
        except ValueError as exc:
            raise _bad(str(exc)) from None
    try:
        return Device(
            service=service,
            token=token.strip(),
            topic=options.get("topic") or None,
            mode=mode,
            voip_token=options.get("voip_device_id") or None,
        )
    except InvalidDevice as exc:
        raise _bad(str(exc)) from None


def read_priority(options: Mapping[str, str]) -> Priority | None:
    """`priority`: high or normal; None when absent or empty."""
    text = options.get("priority")
    if not text:
        return None
    try:
        return Priority(text.strip().lower())
    except ValueError:
        raise _bad(f"unknown priority {text!r} (expected high or normal)") from None


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def read_flag(options: Mapping[str, str], key: str) -> bool | None:
    """A boolean field (`silent`, `mutable_content`); None when absent or empty."""
    text = options.get(key)
    if text is None or text == "":
        return None
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _bad(f"{key} must be true or false")


def read_ttl(options: Mapping[str, str]) -> int | None:
    """`time_to_live` in whole seconds, 0 to MAX_TTL; None when absent or empty."""
    text = options.get("time_to_live")
    if not text:
        return None
    try:
        ttl = int(text.strip())
    except ValueError:
        raise _bad("time_to_live must be whole seconds") from None
    if not 0 <= ttl <= MAX_TTL:
        raise _bad(f"time_to_live must be between 0 and {MAX_TTL} seconds")
    return ttl


def build_push(
    device: Device,
    content: Content,
    options: Mapping[str, str],
    *,
    priority: Priority,
    silent: bool,
    default_ttl: int,
    now: float,
) -> Push:
    """The push for `device`, with what the publish-options say about its delivery
    (`time_to_live`, `sound`, `mutable_content`, `click_action`). Both modes build their
    pushes here, with the readers that validate those options at enable time."""
    mutable = read_flag(options, "mutable_content")
    ttl = read_ttl(options)
    return Push(
        device=device,
        content=content,
        priority=priority,
        silent=silent,
        ttl=default_ttl if ttl is None else ttl,
        created_at=now,
        sound=options.get("sound") or None,
        mutable_content=True if mutable is None else mutable,
        click_action=options.get("click_action") or None,
    )
