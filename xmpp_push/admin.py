"""Operator commands on direct-mode registrations (`xmpp-push registrations ...`,
`xmpp-push send-test`).

Each command is a small async function over a `RegistrationStore`, so tests can run
them against any store; `cli.py` only parses arguments and prints.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from xmpp_push.core.model import Content, Priority, Service, redact_token
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory
from xmpp_push.core.ports import Provider
from xmpp_push.core.registrations import Registration, RegistrationStore, Target, push_for

__all__ = [
    "SendTestResult",
    "describe",
    "parse_priority_setting",
    "parse_silent_setting",
    "registration_json",
    "registrations_table",
    "send_test",
]


def _when(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="seconds")


def _token(registration: Registration, reveal: bool) -> str | None:
    if registration.token is None:
        return None
    return registration.token if reveal else redact_token(registration.token)


def _setting(operator: object, client: object) -> str:
    if operator is not None:
        return f"{_word(operator)} (operator)"
    if client is not None:
        return f"{_word(client)} (client)"
    return "default"


def _word(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def registration_json(registration: Registration, *, reveal_token: bool = False) -> dict[str, Any]:
    r = registration
    return {
        "id": r.id,
        "owner": r.owner,
        "push_jid": r.push_jid,
        "node": r.node,
        "target": r.target.value,
        "token": _token(r, reveal_token),
        "topic": r.topic,
        "mode": r.mode.value if r.mode else None,
        "client_priority": r.client_priority.value if r.client_priority else None,
        "operator_priority": r.operator_priority.value if r.operator_priority else None,
        "client_silent": r.client_silent,
        "operator_silent": r.operator_silent,
        "voip_token": redact_token(r.voip_token) if r.voip_token else None,
        "resource": r.resource,
        "options": {k: v for k, v in r.options.items() if k not in {"device_id", "secret"}},
        "created_at": _when(r.created_at),
        "updated_at": _when(r.updated_at),
        "last_success_at": _when(r.last_success_at),
        "last_error_at": _when(r.last_error_at),
        "last_error": r.last_error,
        "failure_count": r.failure_count,
        "quarantined_until": _when(r.quarantined_until),
    }


def registrations_table(registrations: Sequence[Registration]) -> str:
    header = (
        "ID",
        "OWNER",
        "NODE",
        "TARGET",
        "TOKEN",
        "PRIORITY",
        "SILENT",
        "LAST OK",
        "LAST ERROR",
    )
    rows = [header]
    for r in registrations:
        rows.append(
            (
                str(r.id),
                r.owner,
                r.node,
                r.target.value if r.target is not Target.FORWARD else f"forward:{r.push_jid}",
                _token(r, False) or "-",
                _setting(r.operator_priority, r.client_priority),
                _setting(r.operator_silent, r.client_silent),
                _when(r.last_success_at) or "-",
                f"{r.last_error} ({r.failure_count})" if r.last_error else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def describe(registration: Registration, *, reveal_token: bool = False) -> str:
    data = registration_json(registration, reveal_token=reveal_token)
    data["priority"] = _setting(registration.operator_priority, registration.client_priority)
    data["silent"] = _setting(registration.operator_silent, registration.client_silent)
    width = max(len(key) for key in data)
    lines = []
    for key, value in data.items():
        shown = json.dumps(value) if isinstance(value, dict) else ("-" if value is None else value)
        lines.append(f"{key.ljust(width)}  {shown}")
    return "\n".join(lines)


def parse_priority_setting(text: str) -> Priority | None:
    """`high` | `normal` | `default` (None: the client's choice again)."""
    lowered = text.lower()
    if lowered == "default":
        return None
    return Priority(lowered)


def parse_silent_setting(text: str) -> bool | None:
    """`on` | `off` | `default`."""
    lowered = text.lower()
    if lowered == "default":
        return None
    if lowered in {"on", "true", "yes"}:
        return True
    if lowered in {"off", "false", "no"}:
        return False
    raise ValueError(f"expected on, off or default, got {text!r}")


@dataclass(frozen=True, slots=True)
class SendTestResult:
    delivered: bool
    summary: str


async def send_test(
    store: RegistrationStore,
    providers: dict[Service, Provider],
    registration_id: int,
    *,
    default_priority: Priority,
    ttl: int,
    clock: Any = time.time,
) -> SendTestResult:
    """Send one test notification through the registration's provider, record the
    outcome on the registration, and say what happened."""
    registration = await store.get(registration_id)
    if registration is None:
        return SendTestResult(False, f"no registration with id {registration_id}")
    now = clock()
    push = push_for(
        registration,
        Content(message_count=1, body="xmpp-push test notification"),
        default_priority=default_priority,
        default_silent=False,
        ttl=ttl,
        now=now,
    )
    if push is None:
        return SendTestResult(
            False,
            f"registration {registration_id} forwards to {registration.push_jid}; "
            "send-test only reaches APNs and FCM",
        )
    provider = providers[push.device.service]
    try:
        await provider.send(push)
    except DeliveryError as error:
        await store.record_failure(registration_id, now, f"{error.category}: {error.reason}")
        if error.category is ErrorCategory.TOKEN_DEAD:
            # DESIGN.md §3: a token the push network declares dead removes its rows.
            removed = await store.delete_token(registration.target, push.device.token)
            return SendTestResult(
                False, f"token dead ({error.reason}): {removed} registration(s) deleted"
            )
        return SendTestResult(False, f"not delivered: {error}")
    await store.record_success(registration_id, now)
    return SendTestResult(
        True,
        f"delivered via {provider.name}: priority {push.priority.value}, "
        f"{'silent' if push.silent else 'alert'}, token {push.device.redacted_token}",
    )
