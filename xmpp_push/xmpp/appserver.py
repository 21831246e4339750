"""App-server mode on the XMPP side: a parsed publish in, the IQ answer out."""

from __future__ import annotations

import time
from collections.abc import Callable

from xmpp_push.core.appserver import PublishPolicy, RequestError, to_push
from xmpp_push.core.dispatch import Dispatcher
from xmpp_push.xmpp.errors import OUTCOME_REPLIES, REQUEST_REPLIES, StanzaError
from xmpp_push.xmpp.publish import PublishRequest

__all__ = ["AppServer"]


class AppServer:
    """Turns each publish into one push and the delivery outcome into the reply."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        policy: PublishPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dispatcher = dispatcher
        self._policy = policy
        self._clock = clock

    async def __call__(self, request: PublishRequest) -> StanzaError | None:
        try:
            push = to_push(
                request.node, request.summary, request.options, self._policy, self._clock()
            )
        except RequestError as error:
            kind, condition = REQUEST_REPLIES[error.problem]
            return StanzaError(kind, condition, error.text)
        result = await self._dispatcher.deliver(push)
        return OUTCOME_REPLIES[result.outcome]
