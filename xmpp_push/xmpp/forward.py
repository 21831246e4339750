"""Forward registrations: a standard XEP-0357 publish to another app server.

A client whose enable named another push service (say `p2.siacs.eu`) keeps working when
the server delegates `urn:xmpp:push:0` to us: we publish to that service exactly as
Prosody's and ejabberd's own push modules would (PROTOCOLS.md §1.2: the summary form,
then the client's publish-options verbatim), and read its answer as they do (§1.3),
except that only `item-not-found` ends the registration: `wait` and a silent app server
keep it, and so does any other error (recorded, visible to operators).
"""

from __future__ import annotations

from collections.abc import Mapping
from xml.etree.ElementTree import Element
from xml.sax.saxutils import escape, quoteattr

from xmpp_push.core.model import Content
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory
from xmpp_push.xmpp.component import PushComponent
from xmpp_push.xmpp.errors import NS_STANZAS
from xmpp_push.xmpp.publish import NS_PUBSUB, NS_PUSH

__all__ = ["XmppForwarder", "publish_payload"]

NS_DATA = "jabber:x:data"
SUMMARY = "urn:xmpp:push:summary"
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"


def _field(var: str, value: str | None) -> str:
    if value is None:
        return f"<field var={quoteattr(var)}/>"
    return f"<field var={quoteattr(var)}><value>{escape(value)}</value></field>"


def publish_payload(node: str, content: Content, options: Mapping[str, str]) -> str:
    """The `<pubsub/>` of the publish: summary form, then the client's options."""
    summary = [_field("FORM_TYPE", SUMMARY)]
    if content.message_count is not None:
        summary.append(_field("message-count", str(content.message_count)))
    if content.sender:
        summary.append(_field("last-message-sender", content.sender))
    if content.body:
        summary.append(_field("last-message-body", content.body))
    publish_options = ""
    if options:
        fields = "".join(_field(var, value) for var, value in options.items() if var != "FORM_TYPE")
        publish_options = (
            f"<publish-options><x xmlns='{NS_DATA}' type='submit'>"
            f"{_field('FORM_TYPE', PUBLISH_OPTIONS)}{fields}</x></publish-options>"
        )
    return (
        f"<pubsub xmlns='{NS_PUBSUB}'><publish node={quoteattr(node)}><item>"
        f"<notification xmlns='{NS_PUSH}'><x xmlns='{NS_DATA}' type='submit'>"
        f"{''.join(summary)}</x></notification></item></publish>{publish_options}</pubsub>"
    )


def _judge(answer: Element) -> DeliveryError | None:
    if answer.get("type") == "result":
        return None
    error = answer.find("{jabber:component:accept}error")
    kind = error.get("type", "cancel") if error is not None else "cancel"
    condition = "undefined-condition"
    if error is not None:
        for child in error:
            if child.tag.startswith(f"{{{NS_STANZAS}}}") and not child.tag.endswith("}text"):
                condition = child.tag.rsplit("}", 1)[-1]
                break
    reason = f"{kind}/{condition}"
    if condition == "item-not-found":
        return DeliveryError(ErrorCategory.TOKEN_DEAD, reason)
    if kind == "wait":
        return DeliveryError(ErrorCategory.TRANSIENT, reason)
    return DeliveryError(ErrorCategory.MISCONFIGURED, reason)


class XmppForwarder:
    """Publishes to remote app servers over the component's link."""

    def __init__(self, component: PushComponent, timeout: float = 10.0) -> None:
        self._component = component
        self._timeout = timeout

    async def forward(
        self, push_jid: str, node: str, content: Content, options: Mapping[str, str]
    ) -> None:
        try:
            answer = await self._component.send_request(
                push_jid, publish_payload(node, content, options), timeout=self._timeout
            )
        except TimeoutError:
            raise DeliveryError(ErrorCategory.TRANSIENT, "no answer") from None
        except ConnectionError:
            raise DeliveryError(ErrorCategory.TRANSIENT, "not connected") from None
        error = _judge(answer)
        if error is not None:
            raise error
