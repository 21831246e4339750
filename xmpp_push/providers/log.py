"""The `log` provider: writes what it would send instead of sending it.

The embedded default when no APNs or FCM credentials are configured, so a newcomer
sees every push the component would make without an Apple or Google account.
"""

from __future__ import annotations

import structlog

from xmpp_push.core.model import Push

__all__ = ["LogProvider"]

log = structlog.get_logger("xmpp_push.push")


class LogProvider:
    """Accepts every push and logs it (token redacted)."""

    def __init__(self, stands_in_for: str) -> None:
        self.name = f"log({stands_in_for})"
        self.sent = 0

    async def send(self, push: Push) -> None:
        self.sent += 1
        content = push.content
        log.info(
            "push_logged",
            service=push.device.service.value,
            token=push.device.redacted_token,
            priority=push.priority.value,
            silent=push.silent,
            ttl=push.ttl,
            topic=push.device.topic,
            count=content.message_count,
            sender=content.sender,
            body=content.body,
        )

    async def aclose(self) -> None:
        return None
