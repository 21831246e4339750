"""App-server mode on the XMPP side: a parsed publish in, the IQ answer out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from xmpp_push.core.appserver import PublishPolicy, RequestError, to_push
from xmpp_push.core.dispatch import Dispatcher
from xmpp_push.xmpp.component import Reply
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

    def submit(self, request: PublishRequest, reply: Reply) -> None:
        """Answer through `reply` once the dispatcher settled the push (or at once
        for a request problem)."""
        try:
            push = to_push(
                request.node, request.summary, request.options, self._policy, self._clock()
            )
        except RequestError as error:
            kind, condition = REQUEST_REPLIES[error.problem]
            reply(StanzaError(kind, condition, error.text))
            return
        self._dispatcher.submit(push, lambda result: reply(OUTCOME_REPLIES[result.outcome]))

    async def __call__(self, request: PublishRequest) -> StanzaError | None:
        """The same as `submit`, awaited (tests and embedding)."""
        answered: asyncio.Future[StanzaError | None] = asyncio.get_running_loop().create_future()

        def settle(error: StanzaError | None) -> None:
            if not answered.done():
                answered.set_result(error)

        self.submit(request, settle)
        return await answered
