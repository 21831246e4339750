"""Every answer the component gives to an IQ, in one place.

Two tables decide the reply: one from a delivery `Outcome` (DESIGN.md §4) and one from
a request problem. The error *type* matters more than the condition: ejabberd deletes
a registration at the first non-`wait` error and Prosody after 16 (PROTOCOLS.md §1.3),
so anything that is not the device's fault must be `wait`.
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from xmpp_push.core.appserver import RequestProblem
from xmpp_push.core.outcomes import Outcome

__all__ = [
    "OUTCOME_REPLIES",
    "REQUEST_REPLIES",
    "StanzaError",
    "error_iq",
    "result_iq",
]

NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


@dataclass(frozen=True, slots=True)
class StanzaError(Exception):
    type: str
    """cancel | continue | modify | auth | wait (RFC 6120 §8.3.2)."""
    condition: str
    text: str | None = None
    app_condition: tuple[str, str] | None = None
    """(namespace, element) of an application-specific condition, e.g. pubsub#errors."""

    def __str__(self) -> str:
        return f"{self.type}/{self.condition}: {self.text or ''}"


OUTCOME_REPLIES: dict[Outcome, StanzaError | None] = {
    Outcome.DELIVERED: None,
    Outcome.QUEUED: None,
    Outcome.TOKEN_DEAD: StanzaError(
        "cancel", "item-not-found", "the device token is no longer valid"
    ),
    Outcome.TOKEN_REFUSED: StanzaError(
        "cancel", "item-not-found", "the push service refused the device token"
    ),
    Outcome.TRY_LATER: StanzaError(
        "wait", "resource-constraint", "the push service could not deliver now; try again later"
    ),
}
"""`None` means an IQ result."""

REQUEST_REPLIES: dict[RequestProblem, tuple[str, str]] = {
    RequestProblem.BAD_REQUEST: ("modify", "bad-request"),
    RequestProblem.UNKNOWN_NODE: ("cancel", "item-not-found"),
}

SHUTTING_DOWN = StanzaError("wait", "resource-constraint", "the push component is restarting")
OVERLOADED = StanzaError("wait", "resource-constraint", "too many notifications in flight")
FORBIDDEN_SENDER = StanzaError(
    "auth", "forbidden", "this push component does not take notifications from this sender"
)


def result_iq(iq_id: str, to: str, sender: str) -> str:
    return f"<iq type='result' id={quoteattr(iq_id)} to={quoteattr(to)} from={quoteattr(sender)}/>"


def error_iq(iq_id: str, to: str, sender: str, error: StanzaError) -> str:
    parts = [
        f"<iq type='error' id={quoteattr(iq_id)} to={quoteattr(to)} from={quoteattr(sender)}>",
        f"<error type={quoteattr(error.type)}>",
        f"<{error.condition} xmlns='{NS_STANZAS}'/>",
    ]
    if error.text:
        parts.append(f"<text xmlns='{NS_STANZAS}'>{escape(error.text)}</text>")
    if error.app_condition:
        namespace, element = error.app_condition
        parts.append(f"<{element} xmlns={quoteattr(namespace)}/>")
    parts.append("</error></iq>")
    return "".join(parts)
