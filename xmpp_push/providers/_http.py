"""HTTP details both push networks share."""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import re
import time
from typing import Final

__all__ = ["parse_retry_after"]

_DELAY_SECONDS: Final = re.compile(r"[0-9]+")
"""RFC 9110 `delay-seconds`: ASCII digits only (no sign, no fraction)."""


def parse_retry_after(value: str | bytes | None, *, now: float | None = None) -> float | None:
    """Seconds to wait, from a `Retry-After` field (RFC 9110 §10.2.3); None without a
    usable value.

    The field is either `delay-seconds` or an HTTP-date in any of its three forms
    (IMF-fixdate, RFC 850, asctime). HTTP-dates are always GMT, so a date without a
    zone (asctime, or `-0000`) is read as UTC, never as local time. A date in the past
    is 0. `now` is the current POSIX time (`time.time()` when None).
    """
    if value is None:
        return None
    text = (value.decode("latin-1") if isinstance(value, bytes) else value).strip()
    if not text:
        return None
    if _DELAY_SECONDS.fullmatch(text):
        seconds = float(text)  # inf for an absurd number of digits
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)
