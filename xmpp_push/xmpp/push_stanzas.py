"""XEP-0355 wrappers and XEP-0357 `<enable/>`/`<disable/>`, read and written.

The server wraps each client IQ it delegates to us (PROTOCOLS.md §2)::

    <iq type='set' from='example.org' to='push.example.org' id='outer'>
      <delegation xmlns='urn:xmpp:delegation:2'>          (ejabberd: delegation:1)
        <forwarded xmlns='urn:xmpp:forward:0'>
          <iq xmlns='jabber:client' type='set' id='inner'
              from='alice@example.org/phone' [to='alice@example.org']>
            <enable xmlns='urn:xmpp:push:0' jid='push.example.org' node='n1'>
              <x xmlns='jabber:x:data' type='submit'>…publish-options…</x>
            </enable></iq></forwarded></delegation></iq>

and takes back the client's answer wrapped the same way. Like the publish path, this
reads plain ElementTree and writes strings: the answers reuse `errors.result_iq` and
`errors.error_iq`, so every error the component sends is built in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from xml.etree.ElementTree import Element
from xml.sax.saxutils import quoteattr

from slixmpp import JID
from slixmpp.jid import InvalidJID

from xmpp_push.xmpp.errors import StanzaError, error_iq, result_iq

__all__ = [
    "DELEGATION_NAMESPACES",
    "MAX_FORM_FIELDS",
    "MAX_FORM_TEXT",
    "NS_DELEGATION_1",
    "NS_DELEGATION_2",
    "NS_FORWARD",
    "NS_PUSH",
    "DelegatedIq",
    "PushDisable",
    "PushEnable",
    "bad_request",
    "parse_push_request",
    "read_publish_options",
    "unwrap",
    "wrapped_answer",
]

NS_DELEGATION_1 = "urn:xmpp:delegation:1"
"""ejabberd (processone/xmpp)."""
NS_DELEGATION_2 = "urn:xmpp:delegation:2"
"""Prosody's mod_delegation."""
DELEGATION_NAMESPACES = (NS_DELEGATION_2, NS_DELEGATION_1)
NS_FORWARD = "urn:xmpp:forward:0"
NS_CLIENT = "jabber:client"
NS_PUSH = "urn:xmpp:push:0"
NS_DATA = "jabber:x:data"
PUBLISH_OPTIONS_FORM_TYPE = "http://jabber.org/protocol/pubsub#publish-options"

MAX_FORM_FIELDS = 32
MAX_FORM_TEXT = 8192
"""Characters of field values one enable may carry. The form is stored and copied into
every push; real ones are a few hundred characters."""

# slixmpp renames only the top-level tag into the component namespace; the forwarded
# IQ keeps jabber:client, which XEP-0297 requires of it.
_INNER_IQ_TAG = f"{{{NS_CLIENT}}}iq"


def bad_request(text: str) -> StanzaError:
    return StanzaError("modify", "bad-request", text)


@dataclass(frozen=True, slots=True)
class DelegatedIq:
    """A client's IQ as the server forwarded it, with what the answer needs."""

    delegation: str
    """The wrapper's namespace; the answer uses the same one."""
    outer_id: str
    server: str
    """The delegating server (the wrapper's `from`)."""
    me: str
    """The wrapper's `to`: the component's JID."""
    id: str
    type: str
    sender: str
    """The inner `from`, verbatim: the client's full JID."""
    to: str | None
    """The inner `to`, verbatim: absent (Prosody) or the user's bare JID (ejabberd)."""
    payload: tuple[Element, ...]
    """The inner IQ's child elements."""


def unwrap(outer: Element, delegation: str, me: str) -> DelegatedIq:
    """Read a delegation wrapper (`outer` has already matched `delegation`), or raise the
    `StanzaError` to answer the wrapper itself with: without an inner id and sender
    there is nobody to address a wrapped answer to."""
    wrappers = outer.findall(f"{{{delegation}}}delegation")
    forwarded = wrappers[0].findall(f"{{{NS_FORWARD}}}forwarded") if len(wrappers) == 1 else []
    if len(forwarded) != 1:
        raise bad_request("expected one <delegation/> holding one <forwarded/>")
    inner = [child for child in forwarded[0] if child.tag == _INNER_IQ_TAG]
    if len(inner) != 1:
        raise bad_request("expected one forwarded jabber:client <iq/>")
    iq = inner[0]
    inner_id = iq.get("id")
    sender = iq.get("from")
    if not inner_id or not sender:
        raise bad_request("the forwarded <iq/> has no id or no from")
    kind = iq.get("type", "")
    if kind in {"result", "error"}:
        raise bad_request("the forwarded <iq/> is an answer, not a request")
    return DelegatedIq(
        delegation=delegation,
        outer_id=outer.get("id", ""),
        server=outer.get("from", ""),
        me=outer.get("to") or me,
        id=inner_id,
        type=kind,
        sender=sender,
        to=iq.get("to") or None,
        payload=tuple(iq),
    )


def wrapped_answer(request: DelegatedIq, inner_from: str, error: StanzaError | None) -> str:
    """The wrapper `result` carrying the client's answer, in the form both Prosody and
    ejabberd accept (PROTOCOLS.md §2): same delegation namespace, a jabber:client IQ
    with the same id, `to` = the original inner `from`, `from` = `inner_from`."""
    if error is None:
        inner = result_iq(request.id, request.sender, inner_from)
    else:
        inner = error_iq(request.id, request.sender, inner_from, error)
    # result_iq/error_iq write an IQ of the stream's namespace; a forwarded one is the
    # client's stanza, and Prosody checks that it is jabber:client.
    assert inner.startswith("<iq ")
    inner = f"<iq xmlns='{NS_CLIENT}' " + inner.removeprefix("<iq ")
    return (
        f"<iq type='result' id={quoteattr(request.outer_id)} to={quoteattr(request.server)} "
        f"from={quoteattr(request.me)}><delegation xmlns={quoteattr(request.delegation)}>"
        f"<forwarded xmlns='{NS_FORWARD}'>{inner}</forwarded></delegation></iq>"
    )


# ------------------------------------------------------------------ XEP-0357 payloads


@dataclass(frozen=True, slots=True)
class PushEnable:
    jid: str
    """Normalized; empty when the attribute was missing."""
    node: str | None
    options: Mapping[str, str] = field(default_factory=dict)
    """The publish-options form's fields, FORM_TYPE left out."""


@dataclass(frozen=True, slots=True)
class PushDisable:
    jid: str
    node: str | None


def parse_push_request(payload: Element) -> PushEnable | PushDisable:
    """Read `<enable/>` or `<disable/>` (urn:xmpp:push:0), or raise `StanzaError`:
    `modify`/`bad-request` naming what is wrong, `cancel`/`feature-not-implemented`
    for another element."""
    if payload.tag == f"{{{NS_PUSH}}}enable":
        forms = payload.findall(f"{{{NS_DATA}}}x")
        if len(forms) > 1:
            raise bad_request("expected at most one publish-options form")
        options = read_publish_options(forms[0]) if forms else {}
        return PushEnable(_jid(payload.get("jid")), payload.get("node"), options)
    if payload.tag == f"{{{NS_PUSH}}}disable":
        return PushDisable(_jid(payload.get("jid")), payload.get("node"))
    raise StanzaError(
        "cancel", "feature-not-implemented", "only <enable/> and <disable/> are handled"
    )


def _jid(text: str | None) -> str:
    if not text:
        return ""
    try:
        return str(JID(text).full)
    except InvalidJID:
        raise bad_request(f"jid {text!r} is not a valid JID") from None


def read_publish_options(form: Element) -> dict[str, str]:
    """The fields of a publish-options form, strictly as MongooseIM has it: a `submit`
    form with FORM_TYPE publish-options and exactly one value per field."""
    if form.get("type") != "submit":
        raise bad_request("publish-options: the form must be of type 'submit'")
    values: dict[str, str] = {}
    spent = 0
    for item in form.findall(f"{{{NS_DATA}}}field"):
        var = item.get("var")
        if not var:
            raise bad_request("publish-options: a field has no var")
        texts = [value.text or "" for value in item.findall(f"{{{NS_DATA}}}value")]
        if len(texts) != 1:
            raise bad_request(f"publish-options: field {var!r} must have exactly one value")
        if var in values:
            raise bad_request(f"publish-options: field {var!r} appears twice")
        spent += len(texts[0])
        if len(values) >= MAX_FORM_FIELDS or spent > MAX_FORM_TEXT:
            raise bad_request(
                f"publish-options: more than {MAX_FORM_FIELDS} fields or {MAX_FORM_TEXT} characters"
            )
        values[var] = texts[0]
    form_type = values.pop("FORM_TYPE", None)
    if form_type != PUBLISH_OPTIONS_FORM_TYPE:
        raise bad_request(f"publish-options: FORM_TYPE must be {PUBLISH_OPTIONS_FORM_TYPE}")
    return values
