"""Parse a XEP-0357 `<publish/>` as Prosody, ejabberd and MongooseIM send it.

Works on the plain ElementTree under a slixmpp stanza: building slixmpp's pubsub and
data-form stanza objects for every publish costs more than the rest of the path
(PROTOCOLS.md §8), and nothing here needs them. The result is plain data for the core.

Accepted shapes (PROTOCOLS.md §1.2): the summary form as `type='form'` (Prosody) or
`type='submit'` (ejabberd, MongooseIM), a bare `<notification/>` (ejabberd, body-less
stanzas), and publish-options as a `submit` form whose fields carry one value each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from xml.etree.ElementTree import Element

from xmpp_push.core.appserver import Summary
from xmpp_push.core.model import Priority
from xmpp_push.xmpp.errors import StanzaError

__all__ = ["MAX_PUBLISH_TEXT", "PublishRequest", "parse_publish"]

NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_PUBSUB_ERRORS = "http://jabber.org/protocol/pubsub#errors"
NS_PUSH = "urn:xmpp:push:0"
NS_DATA = "jabber:x:data"
NS_TIGASE_PRIORITY = "tigase:push:priority:0"
SUMMARY_FORM_TYPE = "urn:xmpp:push:summary"
PUBLISH_OPTIONS_FORM_TYPE = "http://jabber.org/protocol/pubsub#publish-options"

MAX_PUBLISH_TEXT = 65_536
"""Characters of form text one publish may carry. A push payload holds 4 KiB; anything
near this limit is a broken or hostile sender, not a message preview."""

_FORM_TYPES = frozenset({"form", "submit", "result"})


@dataclass(frozen=True, slots=True)
class PublishRequest:
    node: str
    summary: Summary
    options: Mapping[str, str]


def _bad_request(text: str, pubsub_condition: str | None = None) -> StanzaError:
    return StanzaError(
        "modify",
        "bad-request",
        text,
        app_condition=(NS_PUBSUB_ERRORS, pubsub_condition) if pubsub_condition else None,
    )


def parse_publish(pubsub: Element) -> PublishRequest:
    """Read `<pubsub><publish node=…><item><notification>…` or raise `StanzaError`."""
    publishes = pubsub.findall(f"{{{NS_PUBSUB}}}publish")
    if len(publishes) != 1:
        raise _bad_request("expected exactly one <publish/>")
    publish = publishes[0]
    node = publish.get("node", "")
    if not node:
        raise _bad_request("the publish has no node", "nodeid-required")
    items = publish.findall(f"{{{NS_PUBSUB}}}item")
    if len(items) != 1:
        raise _bad_request("expected exactly one <item/>", "item-required")
    notification = items[0].find(f"{{{NS_PUSH}}}notification")
    if notification is None:
        raise _bad_request("the item holds no urn:xmpp:push:0 notification", "invalid-payload")

    budget = _TextBudget()
    summary_fields: dict[str, str] = {}
    form = notification.find(f"{{{NS_DATA}}}x")
    if form is not None:
        summary_fields = _read_form(form, budget, "summary", SUMMARY_FORM_TYPE)
    options: dict[str, str] = {}
    options_element = pubsub.find(f"{{{NS_PUBSUB}}}publish-options")
    if options_element is not None:
        options_form = options_element.find(f"{{{NS_DATA}}}x")
        if options_form is not None:
            options = _read_form(options_form, budget, "publish-options", PUBLISH_OPTIONS_FORM_TYPE)
    return PublishRequest(
        node=node,
        summary=_summary(summary_fields, notification),
        options=options,
    )


class _TextBudget:
    def __init__(self) -> None:
        self.left = MAX_PUBLISH_TEXT

    def spend(self, text: str) -> None:
        self.left -= len(text)
        if self.left < 0:
            raise StanzaError(
                "modify",
                "not-acceptable",
                f"the publish carries more than {MAX_PUBLISH_TEXT} characters of form text",
                app_condition=(NS_PUBSUB_ERRORS, "payload-too-big"),
            )


def _read_form(form: Element, budget: _TextBudget, what: str, form_type: str) -> dict[str, str]:
    if form.get("type", "form") not in _FORM_TYPES:
        raise _bad_request(f"the {what} form has type {form.get('type')!r}", "invalid-payload")
    values: dict[str, str] = {}
    # findall, not iterfind: for a plain tag findall runs in C, iterfind goes through
    # ElementPath in Python (a measurable share of a publish's CPU).
    for field in form.findall(f"{{{NS_DATA}}}field"):
        var = field.get("var")
        if not var:
            raise _bad_request(f"a {what} field has no var", "invalid-payload")
        texts = [value.text or "" for value in field.findall(f"{{{NS_DATA}}}value")]
        if len(texts) > 1:
            raise _bad_request(
                f"the {what} field {var!r} has more than one value", "invalid-payload"
            )
        text = texts[0] if texts else ""
        budget.spend(text)
        values[var] = text
    declared = values.pop("FORM_TYPE", None)
    if declared is not None and declared != form_type:
        raise _bad_request(f"the {what} form has FORM_TYPE {declared!r}", "invalid-payload")
    return values


def _summary(fields: Mapping[str, str], notification: Element) -> Summary:
    count_text = fields.get("message-count", "").strip()
    count: int | None = None
    if count_text:
        try:
            count = int(count_text)
        except ValueError:
            raise _bad_request("message-count is not a number", "invalid-payload") from None
        if count < 0:
            raise _bad_request("message-count is negative", "invalid-payload")
    hint: Priority | None = None
    marker = notification.find(f"{{{NS_TIGASE_PRIORITY}}}priority")
    if marker is not None and marker.text:
        try:
            hint = Priority(marker.text.strip().lower())
        except ValueError:
            hint = None  # an advisory hint; an unknown value is not worth refusing the push
    return Summary(
        message_count=count,
        sender=fields.get("last-message-sender") or None,
        body=fields.get("last-message-body") or None,
        priority_hint=hint,
    )
