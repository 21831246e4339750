"""The data the pipeline moves: who to wake and what the notification may show.

Everything here is plain, frozen data. Adapters (the XMPP component, later the HTTP
API) parse untrusted input into these types once, at the edge; nothing inside checks
them again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

__all__ = [
    "DEFAULT_BODY",
    "ELLIPSIS",
    "MAX_TTL",
    "Content",
    "Device",
    "InvalidDevice",
    "Mode",
    "Priority",
    "Push",
    "Service",
]

MAX_TTL: Final = 2_419_200
"""Four weeks, in seconds: the longest either push network keeps a notification (FCM
refuses a longer `android.ttl`)."""

DEFAULT_BODY: Final = "New message"
"""The text of a visible notification that has no body to show."""

ELLIPSIS: Final = "…"
"""Ends a text that was shortened to fit."""


class Service(StrEnum):
    """The push network that reaches a device."""

    APNS = "apns"
    FCM = "fcm"


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"


class Mode(StrEnum):
    """Which environment of the push network issued the token (APNs only)."""

    PRODUCTION = "prod"
    SANDBOX = "sandbox"

    @classmethod
    def parse(cls, text: str) -> Mode:
        """Accept the spellings clients and MongooseIM use (`prod`, `dev`, ...)."""
        lowered = text.strip().lower()
        if lowered in {"prod", "production"}:
            return cls.PRODUCTION
        if lowered in {"dev", "development", "sandbox"}:
            return cls.SANDBOX
        raise ValueError(f"unknown mode {text!r} (expected prod or dev)")


class InvalidDevice(ValueError):
    """A token or field that can never address a device."""


_APNS_TOKEN = re.compile(r"[0-9a-fA-F]{32,200}")
# FCM registration tokens are URL-safe base64 plus ':' (e.g. "cXyz...:APA91b...").
_FCM_TOKEN = re.compile(r"[A-Za-z0-9_:\-.]{16,4096}")


@dataclass(frozen=True, slots=True)
class Device:
    """One addressable app installation."""

    service: Service
    token: str
    topic: str | None = None
    mode: Mode | None = None
    voip_token: str | None = None

    def __post_init__(self) -> None:
        if self.service is Service.APNS:
            if not _APNS_TOKEN.fullmatch(self.token):
                raise InvalidDevice("device_id is not an APNs device token (hex digits expected)")
        elif not _FCM_TOKEN.fullmatch(self.token):
            raise InvalidDevice("device_id is not an FCM registration token")

    @property
    def redacted_token(self) -> str:
        return redact_token(self.token)


def redact_token(token: str) -> str:
    """Enough of a token to tell two apart in logs, never enough to use it."""
    if len(token) <= 12:
        return "…"
    return f"{token[:4]}…{token[-4:]}"


@dataclass(frozen=True, slots=True)
class Content:
    """What the notification may show, already filtered by policy."""

    message_count: int | None = None
    sender: str | None = None
    body: str | None = None


@dataclass(frozen=True, slots=True)
class Push:
    """One notification for one device, ready for a provider."""

    device: Device
    content: Content = field(default_factory=Content)
    priority: Priority = Priority.HIGH
    silent: bool = False
    ttl: int = 86400
    """Seconds the push network may keep it; also bounds our own retries."""
    created_at: float = 0.0
    """Wall-clock seconds (time.time()) when the push was made."""
    sound: str | None = None
    mutable_content: bool = True
    click_action: str | None = None
    voip: bool = False
    """A call invitation for an APNs PushKit token (`device.token` is the VoIP token):
    sent as a VoIP push, which iOS hands to CallKit."""

    @property
    def expires_at(self) -> float:
        return self.created_at + self.ttl
