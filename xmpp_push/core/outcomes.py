"""What a delivery attempt can end in.

Providers translate their own status codes and reason strings into one closed set of
categories (one table per provider); everything after the provider decides on the
category alone, never on a provider string.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["DeliveryError", "ErrorCategory", "Outcome", "Result"]


class ErrorCategory(StrEnum):
    TOKEN_DEAD = "token_dead"
    """The push network says the app is gone (APNs 410 Unregistered, FCM UNREGISTERED)."""
    TOKEN_REFUSED = "token_refused"
    """The token is not valid here (APNs BadDeviceToken / DeviceTokenNotForTopic, FCM
    SENDER_ID_MISMATCH / invalid token). Could also be our wrong environment or topic."""
    TRANSIENT = "transient"
    """Timeout, 429, 5xx, connection lost: try again later."""
    MISCONFIGURED = "misconfigured"
    """Our credentials, topic or request are wrong; the device is not at fault."""


@dataclass(frozen=True, slots=True)
class DeliveryError(Exception):
    category: ErrorCategory
    reason: str
    """The provider's own word for it (APNs reason, FCM errorCode, "timeout", ...)."""
    status: int | None = None
    retry_after: float | None = None
    """Seconds the provider asked us to wait, when it said so."""

    def __str__(self) -> str:
        status = f" {self.status}" if self.status is not None else ""
        return f"{self.category}:{status} {self.reason}"


class Outcome(StrEnum):
    DELIVERED = "delivered"
    QUEUED = "queued"
    """Not delivered yet; retries go on in the background within the push's TTL."""
    TOKEN_DEAD = "token_dead"
    TOKEN_REFUSED = "token_refused"
    TRY_LATER = "try_later"
    """Nothing wrong with the device, but we could not deliver: the server should keep
    the registration and try again with its next notification."""


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    error: DeliveryError | None = None
