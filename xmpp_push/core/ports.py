"""The interfaces the core needs from the outside world."""

from __future__ import annotations

from typing import Protocol

from xmpp_push.core.model import Push

__all__ = ["Provider"]


class Provider(Protocol):
    """Sends one push to one push network.

    `send` returns when the push network accepted the push and raises
    `xmpp_push.core.outcomes.DeliveryError` otherwise (a timeout included: every
    provider bounds every network wait). It never retries on its own, except to
    recover its own credentials once (an expired JWT or OAuth token); retrying is the
    dispatcher's job.
    """

    name: str

    async def send(self, push: Push) -> None: ...

    async def aclose(self) -> None:
        """Finish or abandon in-flight requests and close connections."""
