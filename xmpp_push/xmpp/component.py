"""The XEP-0114 link: connect, answer disco, take publishes, stay up.

Publishes are read straight from the ElementTree under the stanza and answered with
pre-built XML (`xmpp_push.xmpp.errors`): `iq.reply()` copies the whole tree and was
the largest single cost of a publish (PROTOCOLS.md §8). Each publish is answered from
its own task, so a slow push network never holds up the stream. Once the stream is
open, stanzas are cut from slixmpp's parser without its per-element loop
(`PushComponent.data_received`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast, runtime_checkable
from xml.etree.ElementTree import Element, ParseError, XMLPullParser
from xml.sax.saxutils import escape as xml_escape
from xml.sax.saxutils import quoteattr

import structlog
from slixmpp import ComponentXMPP
from slixmpp.xmlstream.xmlstream import NotConnectedError

from xmpp_push.xmpp.errors import (
    FORBIDDEN_SENDER,
    OVERLOADED,
    SHUTTING_DOWN,
    StanzaError,
    error_iq,
    result_iq,
)
from xmpp_push.xmpp.publish import NS_PUBSUB, NS_PUSH, PublishRequest, parse_publish

__all__ = ["ComponentSettings", "PublishHandler", "PushComponent"]

log = structlog.get_logger(__name__)

NS_COMPONENT = "jabber:component:accept"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
_IQ = f"{{{NS_COMPONENT}}}iq"
_ROUTED = frozenset({_IQ, f"{{{NS_COMPONENT}}}message"})

Reply = Callable[[StanzaError | None], None]
"""Answers one publish: the error to answer with, or None for `result`."""


@runtime_checkable
class SubmitsPublishes(Protocol):
    """A publish handler shaped for the hot path: `submit` starts the delivery and
    calls `reply` exactly once, from whatever callback settles it, so a publish needs
    no task of the component's own (xmpp_push.xmpp.appserver.AppServer)."""

    def submit(self, request: PublishRequest, reply: Reply) -> None: ...


PublishHandler = SubmitsPublishes | Callable[[PublishRequest], Awaitable[StanzaError | None]]
"""`SubmitsPublishes`, or a coroutine function returning the error to answer with (or
None for `result`), run as one task per publish."""

StanzaHandler = Callable[[Element], None]
"""Takes the raw element of one incoming stanza (see `PushComponent.add_handler`)."""


def _can_peek(parser: object) -> bool:
    """Whether `parser` is the XMLPullParser `PushComponent.data_received` can read
    without iterating its events: its C parser and its event queue are private
    attributes (CPython 3.11 to 3.14 have both). Without them slixmpp's own loop runs."""
    return isinstance(parser, XMLPullParser) and isinstance(
        getattr(parser, "_events_queue", None), collections.deque
    )


@dataclass(frozen=True, slots=True)
class ComponentSettings:
    jid: str
    secret: str
    host: str = "127.0.0.1"
    port: int = 5347
    allowed_domains: frozenset[str] = frozenset()
    reconnect: bool = True
    reconnect_max_delay: float = 30.0
    max_in_flight: int = 10_000


class Backoff:
    """1 s, 2 s, 4 s, ... up to a ceiling, each with ±25 % jitter so that several
    components restarted together do not hammer the server in step."""

    def __init__(self, ceiling: float, first: float = 1.0) -> None:
        self._ceiling = ceiling
        self._first = first
        self._next = first

    def next_delay(self) -> float:
        delay = min(self._next, self._ceiling)
        self._next = min(self._next * 2, self._ceiling)
        return delay * (0.75 + random.random() / 2)

    def reset(self) -> None:
        self._next = self._first


class PushComponent(ComponentXMPP):
    def __init__(self, settings: ComponentSettings, on_publish: PublishHandler) -> None:
        # ComponentXMPP.__init__ carries no annotations in slixmpp 1.17.
        super().__init__(settings.jid, settings.secret, settings.host, settings.port)  # type: ignore[no-untyped-call]
        self._settings = settings
        self._on_publish = on_publish
        # Decided once: a runtime Protocol check costs microseconds on every publish.
        self._submits = isinstance(on_publish, SubmitsPublishes)
        self._answers: set[asyncio.Task[None]] = set()
        self._unanswered = 0
        """Publishes handed to a `SubmitsPublishes` handler and not answered yet."""
        self._all_answered = asyncio.Event()
        self._all_answered.set()
        self._stopping = False
        self._backoff = Backoff(settings.reconnect_max_delay)
        self._reconnect_task: asyncio.Task[None] | None = None
        self.connected_event = asyncio.Event()
        """Set while the handshake is done and the link is up (tests and health wait on it)."""
        self.lost_for_good: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        """Resolved with a reason when the link is down and will not come back."""
        self._requests: dict[str, asyncio.Future[Element]] = {}
        self._request_ids = itertools.count(1)
        self._routes: dict[tuple[str, str], StanzaHandler] = {}
        self._unreadable = False
        """Set when the server sent bytes that are not XML, until the next connection."""
        self.add_handler("xmpp-push publish", "iq", f"{{{NS_PUBSUB}}}pubsub", self._on_pubsub_iq)
        self.add_handler(
            "xmpp-push disco#info", "iq", f"{{{NS_DISCO_INFO}}}query", self._on_disco_info
        )
        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("stream_error", self._on_stream_error)
        self.add_event_handler("connection_failed", self._on_connection_failed)

    # -- link ---------------------------------------------------------------------

    def init_parser(self) -> None:
        """A new parser for each connection (slixmpp), and reading allowed again."""
        super().init_parser()
        self._unreadable = False

    def data_received(self, data: bytes | str) -> None:
        """Cut the stanzas out of what the server sent, once the stream is open.

        slixmpp's reader walks every start and end event of every element in Python to
        find where a stanza ends: about half of what reading a ~1 KB publish cost. Here
        the parser (slixmpp's own, the C expat parser and tree builder) is fed as
        before, and only the last event is looked at: stanzas are the children of the
        stream's root element, so all of them are complete but the last, and the last
        is complete when the last event is its end. Complete stanzas leave the root
        (nothing piles up) and go to `_spawn_event` in order, as with slixmpp.

        The stream header (until slixmpp's loop has seen every stanza it started to
        its end) and a parser without the private attributes (`_can_peek`) take
        slixmpp's way. After bytes that are not XML, nothing more is read from this
        connection: the parser stays broken, and one stream error was enough."""
        if self._unreadable:
            return
        parser = self.parser
        root = self.xml_root
        if root is None or self.xml_depth != 1 or not _can_peek(parser):
            super().data_received(data)
            return
        pull = cast(Any, parser)
        events: collections.deque[tuple[str, Element]] = pull._events_queue
        failure: ParseError | None = None
        try:
            pull._parser.feed(data)
            # expat 2.6 and later may hold back the end of a tag that came in pieces
            # until more data arrives ("reparse deferral"); with a quiet server that
            # would leave a complete stanza unread. flush() (Python 3.13, and the
            # releases that took the expat 2.6 fixes) reads what it holds back.
            flush = getattr(pull._parser, "flush", None)
            if flush is not None:
                flush()
        except ParseError as error:
            failure = error
        if events:
            event, element = events[-1]
            events.clear()
            stanzas = list(root)
            ended = element is root
            if stanzas and not ended and (event != "end" or element is not stanzas[-1]):
                stanzas.pop()  # its end has not come yet
            if stanzas:
                del root[: len(stanzas)]
                for stanza in stanzas:
                    self._spawn_event(stanza)
            if ended:
                self.disconnect_reason = "End of stream"
                self.abort()
                return
        if failure is not None:
            self._not_well_formed(data, failure)

    def _not_well_formed(self, data: bytes | str, failure: ParseError) -> None:
        """Bytes that are not XML: a `not-well-formed` stream error, then the link
        closes (and reconnects as after any drop). Written by hand: slixmpp 1.17's own
        StreamError comes out as `<stream:stream:error>`, itself not well-formed."""
        # Not the bytes themselves: they may hold a device token or a message body.
        log.error("stream_not_well_formed", error=str(failure), received_bytes=len(data))
        self._unreadable = True
        self._send_xml(
            "<stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            "<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>"
            f"{xml_escape(str(failure))}</text></stream:error>"
        )
        self.disconnect()

    def start(self) -> None:
        log.info(
            "connecting", jid=self._settings.jid, host=self._settings.host, port=self._settings.port
        )
        self.connect()

    def reschedule_connection_attempt(self) -> asyncio.Future[None] | None:
        # slixmpp doubles its delay up to 300 s; an operator expects the configured ceiling.
        if self._current_connection_attempt is None:
            return None
        if not self._settings.reconnect:
            self.cancel_connection_attempt()
            self._give_up("cannot connect and component.reconnect is off")
            return None
        self._connect_loop_wait = self._backoff.next_delay()
        self._current_connection_attempt = asyncio.ensure_future(self._connect_loop())
        return self._current_connection_attempt

    def _on_session_start(self, _event: Any) -> None:
        self._backoff.reset()
        self.connected_event.set()
        log.info("connected", jid=self._settings.jid)

    def _on_connection_failed(self, reason: Any) -> None:
        log.warning("connection_failed", reason=str(reason))

    def _on_stream_error(self, error: Any) -> None:
        condition = error["condition"] if error is not None else "unknown"
        hint = None
        if condition == "not-authorized":
            hint = "the server refused the handshake: check component.secret and component.jid"
        elif condition == "conflict":
            hint = "another process is connected as this component"
        log.error("stream_error", condition=condition, hint=hint)

    def _on_disconnected(self, reason: Any) -> None:
        was_connected = self.connected_event.is_set()
        self.connected_event.clear()
        for waiter in self._requests.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the link to the server was lost"))
        self._requests.clear()
        if self._stopping:
            return
        if was_connected:
            log.warning("disconnected", reason=str(reason) if reason else None)
        if not self._settings.reconnect:
            self._give_up("the server closed the link and component.reconnect is off")
            return
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.create_task(self._reconnect_later())

    async def _reconnect_later(self) -> None:
        delay = self._backoff.next_delay()
        log.info("reconnecting", delay=round(delay, 2))
        await asyncio.sleep(delay)
        if not self._stopping:
            self.connect()

    def _give_up(self, reason: str) -> None:
        log.error("link_lost", reason=reason)
        if not self.lost_for_good.done():
            self.lost_for_good.set_result(reason)

    # -- extension points (direct mode plugs in here) -----------------------------------

    @property
    def settings(self) -> ComponentSettings:
        return self._settings

    def add_handler(
        self,
        name: str,
        stanza: Literal["iq", "message"],
        child: str,
        handler: StanzaHandler,
    ) -> None:
        """Hand each `iq` or `message` with a child element `child` ("{namespace}tag") to
        `handler` as raw ElementTree. The handler answers through `send_answer`."""
        key = (f"{{{NS_COMPONENT}}}{stanza}", child)
        if key in self._routes:
            raise ValueError(f"{name}: {stanza}/{child} already has a handler")
        self._routes[key] = handler

    def _spawn_event(self, xml: Element) -> None:
        # The lean path (PROTOCOLS.md §8): our stanzas go from the parser straight to
        # their handler by one dict lookup, without slixmpp's stanza objects and
        # without running every registered matcher on every stanza. Everything else
        # (the handshake, stream errors, IQs nobody routes) takes slixmpp's way.
        xml = self.incoming_filter(xml)  # type: ignore[no-untyped-call]
        tag = xml.tag
        if tag == _IQ and xml.get("type") in {"result", "error"}:
            waiter = self._requests.pop(xml.get("id", ""), None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(xml)
                return
        if tag in _ROUTED:
            for child in xml:
                handler = self._routes.get((tag, child.tag))
                if handler is not None:
                    self._guarded(handler, xml)
                    return
        super()._spawn_event(xml)

    def _guarded(self, handler: StanzaHandler, xml: Element) -> None:
        """Run a handler; a bug in it must not become slixmpp's default reply
        (`cancel`/`undefined-condition`), which ejabberd takes as "delete this user's
        registration". Answer `wait` instead and log the traceback."""
        try:
            handler(xml)
        except Exception:
            log.exception("handler_failed", stanza=xml.tag)
            if xml.tag == f"{{{NS_COMPONENT}}}iq" and xml.get("type") in {"get", "set"}:
                self._send_xml(
                    error_iq(
                        xml.get("id", ""),
                        xml.get("from", ""),
                        xml.get("to", self._settings.jid),
                        StanzaError("wait", "internal-server-error"),
                    )
                )

    def send_answer(self, data: str) -> None:
        """Send one pre-built stanza; dropped (and logged) while the link is down."""
        self._send_xml(data)

    def send_request(
        self, to: str, payload: str, *, kind: Literal["set", "get"] = "set", timeout: float = 10.0
    ) -> asyncio.Future[Element]:
        """Send `<iq type=kind>payload</iq>` to `to` now (so requests leave in call
        order) and return a future for the answer: the `result` or `error` IQ element.
        It fails with TimeoutError after `timeout` seconds, ConnectionError if the link
        drops first or is down."""
        waiter: asyncio.Future[Element] = asyncio.get_running_loop().create_future()
        if not self.connected_event.is_set():
            waiter.set_exception(ConnectionError("not connected"))
            return waiter
        iq_id = f"xp-{next(self._request_ids)}"
        self._requests[iq_id] = waiter
        timer = asyncio.get_running_loop().call_later(timeout, self._request_timed_out, iq_id)
        waiter.add_done_callback(lambda _: timer.cancel())
        self._send_xml(
            f"<iq type='{kind}' id='{iq_id}' from={quoteattr(self._settings.jid)}"
            f" to={quoteattr(to)}>{payload}</iq>"
        )
        return waiter

    def _request_timed_out(self, iq_id: str) -> None:
        waiter = self._requests.pop(iq_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError(f"no answer to {iq_id}"))

    def refusal(self) -> StanzaError | None:
        """The `wait` error to answer a request with while shutting down or while
        `max_in_flight` answers are pending; None when one more can be taken."""
        if self._stopping:
            return SHUTTING_DOWN
        if len(self._answers) + self._unanswered >= self._settings.max_in_flight:
            return OVERLOADED
        return None

    def start_answer(self, answer: Coroutine[Any, Any, None]) -> None:
        """Run `answer` as one of the component's in-flight answers: it counts against
        `max_in_flight`, and `finish_answers` waits for it, then cancels it."""
        task = asyncio.create_task(answer)
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    # -- stanzas --------------------------------------------------------------------

    def _send_xml(self, data: str) -> None:
        try:
            self.send_raw(data)
        except NotConnectedError:
            # The server bounces or drops IQs to a departed component on its own.
            log.info("reply_dropped", reason="not connected")

    def _on_disco_info(self, xml: Element) -> None:
        kind = xml.get("type")
        if kind in {"result", "error"}:
            return  # never answer an answer
        if kind != "get":
            self._send_xml(
                error_iq(
                    xml.get("id", ""),
                    xml.get("from", ""),
                    xml.get("to", self._settings.jid),
                    StanzaError("cancel", "bad-request", "disco#info is queried with get"),
                )
            )
            return
        query = xml.find(f"{{{NS_DISCO_INFO}}}query")
        node = query.get("node") if query is not None else None
        node_attr = f" node={quoteattr(node)}" if node else ""
        me = xml.get("to", self._settings.jid)
        self._send_xml(
            f"<iq type='result' id={quoteattr(xml.get('id', ''))} "
            f"to={quoteattr(xml.get('from', ''))} from={quoteattr(me)}>"
            f"<query xmlns='{NS_DISCO_INFO}'{node_attr}>"
            "<identity category='pubsub' type='push' name='xmpp-push'/>"
            f"<feature var='{NS_DISCO_INFO}'/><feature var='{NS_PUSH}'/>"
            "</query></iq>"
        )

    def _on_pubsub_iq(self, xml: Element) -> None:
        kind = xml.get("type")
        if kind in {"result", "error"}:
            return  # never answer an answer
        iq_id = xml.get("id", "")
        sender = xml.get("from", "")
        me = xml.get("to") or self._settings.jid
        if kind != "set":
            self._send_xml(
                error_iq(iq_id, sender, me, StanzaError("cancel", "feature-not-implemented"))
            )
            return
        if sender.lower() not in self._settings.allowed_domains:
            log.warning("publish_refused", sender=sender, reason="sender not in allowed_domains")
            self._send_xml(error_iq(iq_id, sender, me, FORBIDDEN_SENDER))
            return
        refusal = self.refusal()
        if refusal is not None:
            self._send_xml(error_iq(iq_id, sender, me, refusal))
            return
        pubsub = xml.find(f"{{{NS_PUBSUB}}}pubsub")
        assert pubsub is not None  # the matcher only lets such IQs through
        try:
            request = parse_publish(pubsub)
        except StanzaError as error:
            log.info("publish_rejected", sender=sender, error=str(error))
            self._send_xml(error_iq(iq_id, sender, me, error))
            return
        handler = self._on_publish
        if self._submits:
            self._unanswered += 1
            self._all_answered.clear()
            cast(SubmitsPublishes, handler).submit(
                request, self._replier(iq_id, sender, me, request.node)
            )
        else:
            coroutine_function = cast(
                Callable[[PublishRequest], Awaitable[StanzaError | None]], handler
            )
            self.start_answer(self._answer(coroutine_function, iq_id, sender, me, request))

    def _replier(self, iq_id: str, sender: str, me: str, node: str | None) -> Reply:
        answered = False

        def reply(error: StanzaError | None) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            self._unanswered -= 1
            if self._unanswered == 0:
                self._all_answered.set()
            self._send_answer_for(iq_id, sender, me, node, error)

        return reply

    async def _answer(
        self,
        handler: Callable[[PublishRequest], Awaitable[StanzaError | None]],
        iq_id: str,
        sender: str,
        me: str,
        request: PublishRequest,
    ) -> None:
        try:
            error = await handler(request)
        except asyncio.CancelledError:
            error = SHUTTING_DOWN
        except Exception:
            log.exception("publish_failed", node=request.node)
            error = StanzaError("wait", "internal-server-error")
        self._send_answer_for(iq_id, sender, me, request.node, error)

    def _send_answer_for(
        self, iq_id: str, sender: str, me: str, node: str | None, error: StanzaError | None
    ) -> None:
        if error is None:
            self._send_xml(result_iq(iq_id, sender, me))
        else:
            self._send_xml(error_iq(iq_id, sender, me, error))
        log.debug(
            "publish_answered",
            node=node,
            reply="result" if error is None else f"{error.type}/{error.condition}",
        )

    # -- shutdown -------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """From now on every publish is answered `wait`: the server keeps the
        registration and sends the next notification after we are back."""
        self._stopping = True
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()

    async def finish_answers(self, timeout: float) -> None:
        """Wait for in-flight answers (publishes, and whatever `start_answer` runs);
        cancel the rest, which answer `wait`. Submitted publishes are answered by the
        dispatcher (its drain answers what it abandons `wait`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = set(self._answers)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()  # _answer turns the cancellation into a `wait` reply
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._unanswered:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_answered.wait(), max(0.0, deadline - loop.time()))
        if self._unanswered:
            log.warning("publishes_unanswered", count=self._unanswered)

    async def close(self) -> None:
        self.stop_accepting()
        self.cancel_connection_attempt()
        if self.transport is not None:
            await self.disconnect(wait=2.0)
