"""Direct mode on the XMPP side: the server delegates `urn:xmpp:push:0` to us (XEP-0355).

Prosody (`urn:xmpp:delegation:2`) and ejabberd (`urn:xmpp:delegation:1`) forward each
client's `<enable/>`/`<disable/>` wrapped in `<delegation><forwarded>`; this module
unwraps it, checks who is asking, runs `DirectMode`, and answers wrapped the same way
(PROTOCOLS.md §2). `install_direct_mode()` plugs it into a `PushComponent`.

Answers, inside the wrapped IQ unless said otherwise:

| request | answer |
|---|---|
| enable / disable accepted | `result` |
| a form or attribute problem, anything unparsable | `modify`/`bad-request`, text naming it |
| `from` not a user of the delegating server, or `to` another user | `cancel`/`not-allowed` |
| an IQ of type `get` | `cancel`/`not-allowed` |
| another element than enable/disable | `cancel`/`feature-not-implemented` |
| shutting down, too busy, store failure | `wait`/`resource-constraint` or `internal-server-error` |
| wrapper from a domain not in `allowed_domains` | wrapper `auth`/`forbidden` |
| wrapper without a usable forwarded IQ | wrapper `modify`/`bad-request` |

Both servers pass our inner answer, errors included, through to the client unchanged;
only an error on the wrapper itself reaches a Prosody client as
`cancel`/`service-unavailable` (and an ejabberd client not at all): docs/direct-mode.md.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Protocol
from xml.etree.ElementTree import Element

import structlog
from slixmpp import JID
from slixmpp.jid import InvalidJID

from xmpp_push.core.direct import DirectMode, DisableCommand, EnableCommand
from xmpp_push.core.publish_options import RequestError
from xmpp_push.core.registrations import Registration
from xmpp_push.xmpp.component import PushComponent
from xmpp_push.xmpp.errors import (
    FORBIDDEN_SENDER,
    REQUEST_REPLIES,
    SHUTTING_DOWN,
    StanzaError,
    error_iq,
)
from xmpp_push.xmpp.push_stanzas import (
    DELEGATION_NAMESPACES,
    NS_PUSH,
    DelegatedIq,
    PushEnable,
    bad_request,
    parse_push_request,
    unwrap,
    wrapped_answer,
)

__all__ = ["DelegationHandler", "SessionArming", "install_direct_mode"]

log = structlog.get_logger(__name__)

GET_NOT_ALLOWED = StanzaError("cancel", "not-allowed", "enable and disable are IQs of type set")
NOT_A_LOCAL_USER = StanzaError(
    "cancel", "not-allowed", "only users of the delegating server may enable push here"
)
NOT_YOUR_ACCOUNT = StanzaError(
    "cancel", "not-allowed", "push can be enabled or disabled only for your own account"
)
INTERNAL_ERROR = StanzaError("wait", "internal-server-error", "the registration could not be saved")


class SessionArming(Protocol):
    """The server plugin's side of enables (xmpp_push.xmpp.plugin_link.PluginLink)."""

    def arm(self, full_jid: str) -> None: ...

    def disarm(self, jid: str) -> None: ...

    def delegation_granted(self, server: str) -> None: ...


class DelegationHandler:
    """Answers delegated XEP-0357 IQs and records which servers granted delegation."""

    def __init__(
        self,
        component: PushComponent,
        direct_mode: DirectMode,
        arming: SessionArming | None = None,
    ) -> None:
        self._component = component
        self._direct_mode = direct_mode
        self._arming = arming
        self._allowed_domains = component.settings.allowed_domains
        self.granted: dict[str, str] = {}
        """Server domain → delegation namespace, for each server that delegated
        `urn:xmpp:push:0` on the current link (cleared when the link drops)."""
        self._grant_events: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(
            asyncio.Event
        )

    async def wait_until_granted(self, server: str, timeout: float) -> str:
        """The delegation namespace once `server` delegated `urn:xmpp:push:0`."""
        await asyncio.wait_for(self._grant_events[server].wait(), timeout)
        return self.granted[server]

    # -- advertisements -----------------------------------------------------------

    def on_advertisement(self, message: Element) -> None:
        """`<message><delegation><delegated namespace='…'/>`: sent once the server
        routes that namespace to us (ejabberd sends one per route)."""
        server = message.get("from", "")
        for delegation in DELEGATION_NAMESPACES:
            wrapper = message.find(f"{{{delegation}}}delegation")
            if wrapper is None:
                continue
            for delegated in wrapper.findall(f"{{{delegation}}}delegated"):
                namespace = delegated.get("namespace")
                if server.lower() not in self._allowed_domains:
                    log.warning(
                        "delegation_ignored",
                        server=server,
                        namespace=namespace,
                        reason="server not in component.allowed_domains",
                    )
                elif namespace != NS_PUSH:
                    log.warning(
                        "delegation_not_handled",
                        server=server,
                        namespace=namespace,
                        hint=f"xmpp-push handles only {NS_PUSH}; remove the others",
                    )
                else:
                    log.info(
                        "delegation_granted",
                        server=server,
                        namespace=namespace,
                        delegation_namespace=delegation,
                    )
                    self.granted[server] = delegation
                    if self._arming is not None:
                        self._arming.delegation_granted(server)
                    self._grant_events[server].set()

    def on_link_lost(self) -> None:
        self.granted.clear()
        for event in self._grant_events.values():
            event.clear()

    # -- delegated IQs --------------------------------------------------------------

    def on_delegated_iq(self, outer: Element) -> None:
        kind = outer.get("type")
        if kind in {"result", "error"}:
            return  # never answer an answer
        outer_id = outer.get("id", "")
        server = outer.get("from", "")
        me = outer.get("to") or self._component.settings.jid
        if server.lower() not in self._allowed_domains:
            log.warning("delegation_refused", server=server, reason="not in allowed_domains")
            self._component.send_answer(error_iq(outer_id, server, me, FORBIDDEN_SENDER))
            return
        delegation = next(
            ns for ns in DELEGATION_NAMESPACES if outer.find(f"{{{ns}}}delegation") is not None
        )
        try:
            if kind != "set":
                raise bad_request("a delegation wrapper is an IQ of type set")
            request = unwrap(outer, delegation, me)
        except StanzaError as error:
            log.info("delegated_iq_rejected", server=server, error=str(error))
            self._component.send_answer(error_iq(outer_id, server, me, error))
            return
        self._take(request)

    def _take(self, request: DelegatedIq) -> None:
        try:
            sender = JID(request.sender)
        except InvalidJID:
            self._refuse(request, request.to or request.server, bad_request("from is not a JID"))
            return
        # The answer comes from where the client sent it (ejabberd checks this).
        answer_from = request.to or sender.bare
        if not sender.user or sender.domain != request.server:
            self._refuse(request, answer_from, NOT_A_LOCAL_USER)
            return
        if request.to is not None and not _addresses_account(request.to, sender):
            self._refuse(request, answer_from, NOT_YOUR_ACCOUNT)
            return
        if request.type == "get":
            self._refuse(request, answer_from, GET_NOT_ALLOWED)
            return
        if request.type != "set":
            self._refuse(request, answer_from, bad_request(f"IQ type {request.type!r}"))
            return
        if len(request.payload) != 1:
            self._refuse(request, answer_from, bad_request("expected one <enable/> or <disable/>"))
            return
        try:
            payload = parse_push_request(request.payload[0])
        except StanzaError as error:
            self._refuse(request, answer_from, error)
            return
        if isinstance(payload, PushEnable):
            command: EnableCommand | DisableCommand = EnableCommand(
                owner=sender.bare,
                resource=sender.resource or None,
                jid=payload.jid,
                node=payload.node,
                options=payload.options,
            )
        else:
            command = DisableCommand(owner=sender.bare, jid=payload.jid, node=payload.node)
        refusal = self._component.refusal()
        if refusal is not None:
            self._refuse(request, answer_from, refusal)
            return
        self._component.start_answer(self._answer(request, answer_from, command))

    async def _answer(
        self, request: DelegatedIq, answer_from: str, command: EnableCommand | DisableCommand
    ) -> None:
        error: StanzaError | None = None
        try:
            if isinstance(command, EnableCommand):
                await self._direct_mode.enable(command)
                if self._arming is not None and command.resource:
                    # Before the answer, on the same stream: the session is armed by the
                    # time the client hears `result`.
                    self._arming.arm(f"{command.owner}/{command.resource}")
            else:
                removed = await self._direct_mode.disable(command)
                await self._disarm_unused(command.owner, removed)
        except RequestError as problem:
            kind, condition = REQUEST_REPLIES[problem.problem]
            error = StanzaError(kind, condition, problem.text)
        except asyncio.CancelledError:
            error = SHUTTING_DOWN
        except Exception:
            log.exception("delegated_iq_failed", owner=command.owner, server=request.server)
            error = INTERNAL_ERROR
        if error is not None:
            self._refuse(request, answer_from, error)
            return
        self._component.send_answer(wrapped_answer(request, answer_from, None))

    async def _disarm_unused(self, owner: str, removed: Sequence[Registration]) -> None:
        """Disarm each session whose last registration `removed` took."""
        if self._arming is None or not removed:
            return
        left = {row.resource for row in await self._direct_mode.registrations(owner)}
        for resource in sorted({row.resource for row in removed if row.resource} - left):
            self._arming.disarm(f"{owner}/{resource}")

    def _refuse(self, request: DelegatedIq, answer_from: str, error: StanzaError) -> None:
        log.info(
            "delegated_iq_refused",
            server=request.server,
            sender=request.sender,
            error=str(error),
        )
        self._component.send_answer(wrapped_answer(request, answer_from, error))


def _addresses_account(to: str, sender: JID) -> bool:
    """An IQ to the user's own bare JID or to the server itself, as XEP-0357 has it."""
    try:
        target = JID(to)
    except InvalidJID:
        return False
    return not target.resource and target.bare in {sender.bare, sender.domain}


def install_direct_mode(
    component: PushComponent, direct_mode: DirectMode, arming: SessionArming | None = None
) -> DelegationHandler:
    """Route delegated `urn:xmpp:push:0` IQs (both delegation versions) and the servers'
    delegation advertisements to a new `DelegationHandler` over `direct_mode`; with
    `arming`, tell the server plugin which sessions enabled push."""
    handler = DelegationHandler(component, direct_mode, arming)
    for namespace in DELEGATION_NAMESPACES:
        component.add_handler(
            f"xmpp-push delegated iq ({namespace})",
            "iq",
            f"{{{namespace}}}delegation",
            handler.on_delegated_iq,
        )
        component.add_handler(
            f"xmpp-push delegation advertisement ({namespace})",
            "message",
            f"{{{namespace}}}delegation",
            handler.on_advertisement,
        )
    component.add_event_handler("disconnected", lambda _reason: handler.on_link_lost())
    return handler
