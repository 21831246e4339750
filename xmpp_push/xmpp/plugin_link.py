"""The component's side of the server plugin protocol (docs/plugin-protocol.md).

On every connection the component sends each allowed server its `configure` (the knobs
of `[policy]` the plugin follows) and learns from the answer whether the plugin is
loaded. It arms the session that enabled push before the delegated result goes back,
disarms it when its last registration goes, and turns each `notify` into a `WakeEvent`
for the `Waker`. The plugin gets `result` at once: what happens next is the
component's business, and a plugin never waits on a push network.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from xml.etree.ElementTree import Element
from xml.sax.saxutils import quoteattr

import structlog
from slixmpp import JID
from slixmpp.jid import InvalidJID

from xmpp_push.core.wake import SessionState, WakeEvent, Waker
from xmpp_push.xmpp.component import PushComponent
from xmpp_push.xmpp.errors import FORBIDDEN_SENDER, StanzaError, error_iq, result_iq

__all__ = ["NS_PLUGIN", "PluginKnobs", "PluginLink", "install_plugin_link", "parse_notify"]

log = structlog.get_logger(__name__)

NS_PLUGIN = "urn:xmpp-push:plugin:1"
PROTOCOL_VERSION = "1"
MAX_COUNT = 100_000
MAX_BODY = 4096
"""Characters of body kept: more never fits a notification."""

_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


@dataclass(frozen=True, slots=True)
class PluginKnobs:
    """What the plugin follows, from `[policy]`."""

    undecided_delay: float = 5.0
    hibernation_keepalive: int = 259200
    include_body: bool = False
    include_sender: bool = True

    def element(self) -> str:
        return (
            f"<configure xmlns='{NS_PLUGIN}'"
            f" undecided-delay='{round(self.undecided_delay * 1000)}'"
            f" hibernation-keepalive='{self.hibernation_keepalive}'"
            f" include-body='{'true' if self.include_body else 'false'}'"
            f" include-sender='{'true' if self.include_sender else 'false'}'/>"
        )


def _bad(text: str) -> StanzaError:
    return StanzaError("modify", "bad-request", text)


def _flag(notify: Element, name: str) -> bool:
    text = notify.get(name)
    if text is None:
        return False
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _bad(f"{name} must be true or false")


def parse_notify(notify: Element, server: str) -> WakeEvent:
    """The event a `<notify/>` from `server` reports, or StanzaError bad-request."""
    user = notify.get("user")
    if not user:
        raise _bad("user is missing")
    try:
        owner = JID(user)
    except InvalidJID:
        raise _bad("user is not a JID") from None
    if not owner.user or owner.resource:
        raise _bad("user must be a bare JID")
    if owner.domain != server.lower():
        raise _bad(f"user is not an account of {server}")
    try:
        state = SessionState(notify.get("state", ""))
    except ValueError:
        raise _bad("state must be offline, hibernated or undecided") from None
    resource = notify.get("resource") or None
    if state is not SessionState.OFFLINE and resource is None:
        raise _bad(f"resource is required when state is {state.value}")
    try:
        count = int(notify.get("count", "1"))
    except ValueError:
        raise _bad("count must be a whole number") from None
    if not 1 <= count <= MAX_COUNT:
        raise _bad(f"count must be between 1 and {MAX_COUNT}")
    body_element = notify.find(f"{{{NS_PLUGIN}}}body")
    body = (body_element.text or "")[:MAX_BODY] if body_element is not None else ""
    return WakeEvent(
        owner=owner.bare,
        state=state,
        resource=None if state is SessionState.OFFLINE else resource,
        count=count,
        sender=notify.get("sender") or None,
        message_type=notify.get("type") or "normal",
        encrypted=_flag(notify, "encrypted"),
        call=_flag(notify, "call"),
        mention=_flag(notify, "mention"),
        body=body or None,
    )


class PluginLink:
    """Talks to the server plugins over the component's link."""

    def __init__(self, component: PushComponent, waker: Waker, knobs: PluginKnobs) -> None:
        self._component = component
        self._waker = waker
        self._knobs = knobs
        self._allowed_domains = component.settings.allowed_domains
        self.plugins: dict[str, dict[str, str]] = {}
        """Server domain → what its plugin said of itself, on the current link."""
        self._missing: set[str] = set()
        self._delegating: set[str] = set()
        self._warned: set[str] = set()
        self.configured = asyncio.Event()
        """Set once every allowed server answered `configure` on the current link."""

    # -- configure ------------------------------------------------------------------

    def on_connected(self) -> None:
        self.plugins.clear()
        self._missing.clear()
        self._warned.clear()
        self.configured.clear()
        servers = sorted(self._allowed_domains)
        self._component.start_answer(self._configure_all(servers))

    def on_link_lost(self) -> None:
        self._delegating.clear()

    async def _configure_all(self, servers: list[str]) -> None:
        await asyncio.gather(*(self._configure(server) for server in servers))
        self.configured.set()

    async def _configure(self, server: str) -> None:
        try:
            answer = await self._component.send_request(server, self._knobs.element())
        except (TimeoutError, ConnectionError) as problem:
            log.warning("plugin_not_answering", server=server, reason=str(problem))
            return
        if answer.get("type") == "result":
            plugin = answer.find(f"{{{NS_PLUGIN}}}plugin")
            about = dict(plugin.attrib) if plugin is not None else {}
            self.plugins[server] = about
            log.info(
                "plugin_detected",
                server=server,
                version=about.get("version"),
                name=about.get("name"),
                software=about.get("server"),
            )
            if about.get("version", PROTOCOL_VERSION) != PROTOCOL_VERSION:
                log.warning(
                    "plugin_version_mismatch",
                    server=server,
                    version=about.get("version"),
                    expected=PROTOCOL_VERSION,
                )
            return
        error = answer.find("{jabber:component:accept}error")
        condition = next(iter(error), None) if error is not None else None
        self._missing.add(server)
        log.info(
            "plugin_missing",
            server=server,
            error=condition.tag.rsplit("}", 1)[-1] if condition is not None else None,
        )
        self._warn_if_delegating_without_plugin(server)

    def delegation_granted(self, server: str) -> None:
        """The server delegated `urn:xmpp:push:0` to us: direct mode is in use there."""
        self._delegating.add(server)
        self._warn_if_delegating_without_plugin(server)

    def _warn_if_delegating_without_plugin(self, server: str) -> None:
        if server in self._delegating and server in self._missing and server not in self._warned:
            self._warned.add(server)
            log.warning(
                "direct_mode_without_plugin",
                server=server,
                hint="enables are stored, but nothing wakes these registrations until the "
                "server loads plugins/prosody/mod_xmpp_push.lua or "
                "plugins/ejabberd/mod_xmpp_push.erl (docs/plugin-protocol.md)",
            )

    def on_configure_get(self, xml: Element) -> None:
        if xml.get("type") != "get":
            return
        server = xml.get("from", "")
        me = xml.get("to") or self._component.settings.jid
        iq_id = xml.get("id", "")
        if server.lower() not in self._allowed_domains:
            self._component.send_answer(error_iq(iq_id, server, me, FORBIDDEN_SENDER))
            return
        self._component.send_answer(
            f"<iq type='result' id={quoteattr(iq_id)} to={quoteattr(server)}"
            f" from={quoteattr(me)}>{self._knobs.element()}</iq>"
        )

    # -- arming ---------------------------------------------------------------------

    def arm(self, full_jid: str) -> None:
        """Tell the server to watch this session. Sent at once, before the caller's
        next stanza, so the session is armed when the client hears `result`."""
        self._tell(full_jid, f"<arm xmlns='{NS_PLUGIN}' jid={quoteattr(full_jid)}/>")

    def disarm(self, jid: str) -> None:
        self._tell(jid, f"<disarm xmlns='{NS_PLUGIN}' jid={quoteattr(jid)}/>")

    def _tell(self, jid: str, payload: str) -> None:
        server = JID(jid).domain
        if server in self._missing:
            return  # no plugin to tell; the warning was given
        answer = self._component.send_request(server, payload)
        answer.add_done_callback(lambda done: _log_refusal(done, server, payload))

    # -- notify ---------------------------------------------------------------------

    def on_notify(self, xml: Element) -> None:
        kind = xml.get("type")
        if kind in {"result", "error"}:
            return
        server = xml.get("from", "")
        me = xml.get("to") or self._component.settings.jid
        iq_id = xml.get("id", "")
        if server.lower() not in self._allowed_domains:
            log.warning("notify_refused", server=server, reason="not in allowed_domains")
            self._component.send_answer(error_iq(iq_id, server, me, FORBIDDEN_SENDER))
            return
        notify = xml.find(f"{{{NS_PLUGIN}}}notify")
        assert notify is not None  # the matcher only lets such IQs through
        try:
            if kind != "set":
                raise _bad("notify is an IQ of type set")
            event = parse_notify(notify, server)
        except StanzaError as error:
            log.info("notify_rejected", server=server, error=str(error))
            self._component.send_answer(error_iq(iq_id, server, me, error))
            return
        refusal = self._component.refusal()
        if refusal is not None:
            self._component.send_answer(error_iq(iq_id, server, me, refusal))
            return
        self._component.send_answer(result_iq(iq_id, server, me))
        self._component.start_answer(self._wake(event))

    async def _wake(self, event: WakeEvent) -> None:
        try:
            await self._waker.wake(event)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("wake_failed", owner=event.owner, state=event.state.value)


def _log_refusal(answer: asyncio.Future[Element], server: str, payload: str) -> None:
    if answer.cancelled():
        return
    problem = answer.exception()
    if problem is not None:
        log.info("plugin_request_unanswered", server=server, reason=str(problem))
    elif answer.result().get("type") == "error":
        log.warning("plugin_request_refused", server=server, request=payload)


def install_plugin_link(component: PushComponent, waker: Waker, knobs: PluginKnobs) -> PluginLink:
    """Route the plugins' `notify` and `configure` IQs to a new `PluginLink` and send
    `configure` on every connection."""
    link = PluginLink(component, waker, knobs)
    component.add_handler("xmpp-push plugin notify", "iq", f"{{{NS_PLUGIN}}}notify", link.on_notify)
    component.add_handler(
        "xmpp-push plugin configure", "iq", f"{{{NS_PLUGIN}}}configure", link.on_configure_get
    )
    component.add_event_handler("session_start", lambda _event: link.on_connected())
    component.add_event_handler("disconnected", lambda _reason: link.on_link_lost())
    return link
