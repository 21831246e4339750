"""The interfaces the core needs from the outside world."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from xmpp_push.core.model import Content, Push

__all__ = ["Forwarder", "Provider"]


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


class Forwarder(Protocol):
    """Publishes a notification to another XEP-0357 app server (a FORWARD registration:
    the client's enable named that server's JID)."""

    async def forward(
        self, push_jid: str, node: str, content: Content, options: Mapping[str, str]
    ) -> None:
        """Publish `content` to `node` at `push_jid` with the client's publish-options;
        return when the app server answered `result`, raise `DeliveryError` otherwise
        (TOKEN_DEAD for `item-not-found`, TRANSIENT for `wait` or no answer,
        MISCONFIGURED for any other error)."""
        ...
