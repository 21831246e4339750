"""Delegated `<enable/>`/`<disable/>` (XEP-0355 wrapping XEP-0357): real XML in, real XML out.

The wrappers are the ones Prosody (`urn:xmpp:delegation:2`, no inner `to`) and ejabberd
(`urn:xmpp:delegation:1`, inner `to` = the user's bare JID) were seen sending
(PROTOCOLS.md §2), over a real socket from tests/fakeserver.py. Replies are compared
element by element, attribute order aside, against the exact stanza expected.
tests/integration/test_direct_mode_e2e.py runs the same against the real servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.fakeserver import FakeXmppServer
from xmpp_push.core.direct import DirectMode
from xmpp_push.core.registrations import EnableOutcome, Registration, RegistrationRequest, Target
from xmpp_push.storage.memory import MemoryStore
from xmpp_push.xmpp.component import ComponentSettings, PushComponent
from xmpp_push.xmpp.delegation import DelegationHandler, install_direct_mode
from xmpp_push.xmpp.errors import StanzaError
from xmpp_push.xmpp.publish import PublishRequest
from xmpp_push.xmpp.push_stanzas import MAX_FORM_FIELDS, read_publish_options

SECRET = "s3cret"
ME = "push.localhost"
TOKEN = "ab" * 32
PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


def form(fields: dict[str, str], form_type: str = "submit", *, form_type_field: bool = True) -> str:
    parts = [f"<x xmlns='jabber:x:data' type='{form_type}'>"]
    if form_type_field:
        parts.append(f"<field var='FORM_TYPE'><value>{PUBLISH_OPTIONS}</value></field>")
    parts.extend(
        f"<field var='{var}'><value>{value}</value></field>" for var, value in fields.items()
    )
    parts.append("</x>")
    return "".join(parts)


GOOD_FORM = form({"service": "apns", "device_id": TOKEN, "priority": "normal"})


def enable_xml(node: str | None = "n1", body: str = GOOD_FORM, jid: str = ME) -> str:
    node_attr = f" node='{node}'" if node is not None else ""
    return f"<enable xmlns='urn:xmpp:push:0' jid='{jid}'{node_attr}>{body}</enable>"


def prosody_wrapped(
    payload: str,
    *,
    outer_id: str = "0ogxMzojjxWB",
    inner_id: str = "895cca49ee4743c3b7012153636fb260",
    sender: str = "alice@localhost/probe",
    inner_type: str = "set",
    server: str = "localhost",
) -> str:
    """As Prosody 0.12 mod_delegation sends it: no inner `to`."""
    return (
        f"<iq type='set' to='{ME}' from='{server}' id='{outer_id}'>"
        "<delegation xmlns='urn:xmpp:delegation:2'><forwarded xmlns='urn:xmpp:forward:0'>"
        f"<iq type='{inner_type}' xmlns='jabber:client' from='{sender}' id='{inner_id}' "
        f"xml:lang='en'>{payload}</iq></forwarded></delegation></iq>"
    )


def ejabberd_wrapped(
    payload: str,
    *,
    outer_id: str = "rr-1795394438384-6613353070725200411-iavLu6pL73i34s47kmXcpZ+TZAs=-1",
    inner_id: str = "6f15bbcea8514a8bbf9a85e66f5fb794",
    sender: str = "alice@localhost/probe",
    to: str = "alice@localhost",
) -> str:
    """As ejabberd 23.01 sends it: inner `to` filled with the user's bare JID."""
    return (
        f"<iq to='{ME}' from='localhost' type='set' id='{outer_id}'>"
        "<delegation xmlns='urn:xmpp:delegation:1'><forwarded xmlns='urn:xmpp:forward:0'>"
        f"<iq xml:lang='en' to='{to}' from='{sender}' type='set' id='{inner_id}' "
        f"xmlns='jabber:client'>{payload}</iq></forwarded></delegation></iq>"
    )


def wrapped_reply(
    inner: str,
    *,
    outer_id: str = "0ogxMzojjxWB",
    delegation: str = "urn:xmpp:delegation:2",
    to: str = "localhost",
) -> str:
    return (
        f"<iq type='result' id='{outer_id}' to='{to}' from='{ME}'>"
        f"<delegation xmlns='{delegation}'><forwarded xmlns='urn:xmpp:forward:0'>"
        f"{inner}</forwarded></delegation></iq>"
    )


def inner_error(
    kind: str,
    condition: str,
    text: str | None,
    *,
    inner_id: str = "895cca49ee4743c3b7012153636fb260",
    answer_from: str = "alice@localhost",
) -> str:
    text_xml = f"<text xmlns='{NS_STANZAS}'>{escape(text)}</text>" if text else ""
    return (
        f"<iq xmlns='jabber:client' type='error' id='{inner_id}' to='alice@localhost/probe' "
        f"from='{answer_from}'><error type='{kind}'><{condition} xmlns='{NS_STANZAS}'/>"
        f"{text_xml}</error></iq>"
    )


Shape = tuple[str, tuple[tuple[str, str], ...], str, tuple["Shape", ...]]


def shape(element: ET.Element) -> Shape:
    """An element as comparable data: tag, attributes in any order, text, children."""
    return (
        element.tag,
        tuple(sorted(element.attrib.items())),
        (element.text or "").strip(),
        tuple(shape(child) for child in element),
    )


def expected(xml: str) -> Shape:
    """`xml` as the fake server parses what the component sends (stream namespace)."""
    stream = ET.fromstring(f"<stream xmlns='jabber:component:accept'>{xml}</stream>")
    return shape(stream[0])


@dataclass
class Rig:
    server: FakeXmppServer
    component: PushComponent
    store: MemoryStore
    handler: DelegationHandler

    async def exchange(self, xml: str) -> ET.Element:
        self.server.send(xml)
        return await self.server.next_stanza()


async def no_publishes(_request: PublishRequest) -> StanzaError | None:
    raise AssertionError("no publish expected here")


async def start_rig(server: FakeXmppServer, store: MemoryStore) -> Rig:
    component = PushComponent(
        ComponentSettings(
            jid=ME, secret=SECRET, port=server.port, allowed_domains=frozenset({"localhost"})
        ),
        no_publishes,
    )
    direct = DirectMode(store, own_jids=frozenset({ME}), max_per_owner=5)
    handler = install_direct_mode(component, direct)
    component.start()
    await asyncio.wait_for(component.connected_event.wait(), 5)
    return Rig(server, component, store, handler)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with FakeXmppServer(SECRET) as server:
        rig = await start_rig(server, MemoryStore())
        yield rig
        await rig.component.close()


# ---------------------------------------------------------------- accepted requests


async def test_prosody_shaped_enable_is_stored_and_answered_in_the_wrapped_form(rig: Rig) -> None:
    reply = await rig.exchange(prosody_wrapped(enable_xml()))
    assert shape(reply) == expected(
        wrapped_reply(
            "<iq xmlns='jabber:client' type='result' id='895cca49ee4743c3b7012153636fb260' "
            "to='alice@localhost/probe' from='alice@localhost'/>"
        )
    )
    [row] = await rig.store.list()
    assert (row.owner, row.resource, row.push_jid, row.node) == (
        "alice@localhost",
        "probe",
        ME,
        "n1",
    )
    assert (row.target, row.token, row.client_priority) == (Target.APNS, TOKEN, "normal")


async def test_ejabberd_shaped_enable_is_answered_from_the_inner_to_with_version_1(
    rig: Rig,
) -> None:
    outer_id = "rr-1795394438384-6613353070725200411-iavLu6pL73i34s47kmXcpZ+TZAs=-1"
    reply = await rig.exchange(ejabberd_wrapped(enable_xml()))
    assert shape(reply) == expected(
        wrapped_reply(
            "<iq xmlns='jabber:client' type='result' id='6f15bbcea8514a8bbf9a85e66f5fb794' "
            "to='alice@localhost/probe' from='alice@localhost'/>",
            outer_id=outer_id,
            delegation="urn:xmpp:delegation:1",
        )
    )
    assert [row.node for row in await rig.store.list()] == ["n1"]


async def test_an_enable_addressed_to_the_server_is_answered_from_the_server(rig: Rig) -> None:
    reply = await rig.exchange(ejabberd_wrapped(enable_xml(), to="localhost"))
    inner = reply.find(".//{jabber:client}iq")
    assert inner is not None
    assert (inner.get("type"), inner.get("from")) == ("result", "localhost")
    assert await rig.store.count() == 1


async def test_an_enable_naming_another_app_server_is_stored_as_forward(rig: Rig) -> None:
    body = form({"secret": "abc", "anything": "goes"})
    reply = await rig.exchange(prosody_wrapped(enable_xml("n9", body, jid="p2.siacs.eu")))
    assert reply.find(".//{jabber:client}iq[@type='result']") is not None
    [row] = await rig.store.list()
    assert (row.push_jid, row.target, row.token, dict(row.options)) == (
        "p2.siacs.eu",
        Target.FORWARD,
        None,
        {"secret": "abc", "anything": "goes"},
    )


async def test_disable_with_and_without_a_node(rig: Rig) -> None:
    other = form({"service": "apns", "device_id": "cd" * 32})
    for index, (node, body) in enumerate([("n1", GOOD_FORM), ("n2", other), ("n3", GOOD_FORM)]):
        await rig.exchange(prosody_wrapped(enable_xml(node, body), inner_id=f"e{index}"))
    # n3 took n1's token: n1 was replaced
    assert [row.node for row in await rig.store.list()] == ["n2", "n3"]

    disable_n2 = f"<disable xmlns='urn:xmpp:push:0' jid='{ME}' node='n2'/>"
    reply = await rig.exchange(prosody_wrapped(disable_n2, inner_id="d1"))
    assert shape(reply) == expected(
        wrapped_reply(
            "<iq xmlns='jabber:client' type='result' id='d1' "
            "to='alice@localhost/probe' from='alice@localhost'/>"
        )
    )
    assert [row.node for row in await rig.store.list()] == ["n3"]

    disable_all = f"<disable xmlns='urn:xmpp:push:0' jid='{ME}'/>"
    reply = await rig.exchange(ejabberd_wrapped(disable_all, inner_id="d2"))
    assert reply.find(".//{jabber:client}iq[@type='result']") is not None
    assert await rig.store.count() == 0


async def test_enable_in_the_same_read_as_the_handshake_is_answered() -> None:
    async with FakeXmppServer(SECRET) as server:
        server.greeting_extra = prosody_wrapped(enable_xml())
        rig = await start_rig(server, MemoryStore())
        reply = await server.next_stanza()
        assert reply.find(".//{jabber:client}iq[@type='result']") is not None
        assert await rig.store.count() == 1
        await rig.component.close()


# ---------------------------------------------------------------- refused requests


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (enable_xml(None), "node is missing"),
        (enable_xml(body=form({"service": "apns"})), "publish-options: device_id is missing"),
        (
            enable_xml(body=form({"service": "pigeon", "device_id": TOKEN})),
            "publish-options: unknown service 'pigeon' (expected apns or fcm)",
        ),
        (
            enable_xml(body=form({"service": "apns", "device_id": "xyz"})),
            "publish-options: device_id is not an APNs device token (hex digits expected)",
        ),
        (enable_xml(body=""), "publish-options: service is missing"),
        (enable_xml(jid=""), "jid is missing"),
        (enable_xml(jid="a b@c"), "jid 'a b@c' is not a valid JID"),
        (
            enable_xml(body=form({"service": "apns"}, "form")),
            "publish-options: the form must be of type 'submit'",
        ),
        (
            enable_xml(body=form({"service": "apns"}, form_type_field=False)),
            f"publish-options: FORM_TYPE must be {PUBLISH_OPTIONS}",
        ),
        (
            enable_xml(
                body="<x xmlns='jabber:x:data' type='submit'><field var='service'>"
                "<value>apns</value><value>fcm</value></field></x>"
            ),
            "publish-options: field 'service' must have exactly one value",
        ),
        (enable_xml(body=GOOD_FORM + GOOD_FORM), "expected at most one publish-options form"),
        (enable_xml() + enable_xml(), "expected one <enable/> or <disable/>"),
        ("", "expected one <enable/> or <disable/>"),
        (f"<disable xmlns='urn:xmpp:push:0' jid='{ME}' node=''/>", "node is empty"),
    ],
)
async def test_a_bad_request_is_answered_bad_request_naming_it_and_nothing_is_stored(
    rig: Rig, payload: str, text: str
) -> None:
    reply = await rig.exchange(prosody_wrapped(payload))
    expected_text = text
    if text == "node is empty":
        expected_text = "node is empty (leave it out to disable every node)"
    assert shape(reply) == expected(
        wrapped_reply(inner_error("modify", "bad-request", expected_text))
    )
    assert await rig.store.count() == 0


@pytest.mark.parametrize(
    "sender",
    ["mallory@evil.example/x", "localhost", "push.localhost", "other.localhost/res"],
)
async def test_an_enable_from_someone_not_a_user_of_the_delegating_server_is_not_allowed(
    rig: Rig, sender: str
) -> None:
    reply = await rig.exchange(prosody_wrapped(enable_xml(), sender=sender))
    inner = reply.find(".//{jabber:client}iq")
    assert inner is not None
    assert inner.get("to") == sender
    error = inner.find("{jabber:client}error")
    assert error is not None
    assert error.get("type") == "cancel"
    assert error.find(f"{{{NS_STANZAS}}}not-allowed") is not None
    assert await rig.store.count() == 0


async def test_an_enable_addressed_to_another_user_is_not_allowed(rig: Rig) -> None:
    reply = await rig.exchange(ejabberd_wrapped(enable_xml(), to="bob@localhost"))
    assert shape(reply) == expected(
        wrapped_reply(
            inner_error(
                "cancel",
                "not-allowed",
                "push can be enabled or disabled only for your own account",
                inner_id="6f15bbcea8514a8bbf9a85e66f5fb794",
                answer_from="bob@localhost",
            ),
            outer_id="rr-1795394438384-6613353070725200411-iavLu6pL73i34s47kmXcpZ+TZAs=-1",
            delegation="urn:xmpp:delegation:1",
        )
    )
    assert await rig.store.count() == 0


async def test_an_iq_get_is_not_allowed(rig: Rig) -> None:
    reply = await rig.exchange(prosody_wrapped(enable_xml(), inner_type="get"))
    assert shape(reply) == expected(
        wrapped_reply(
            inner_error("cancel", "not-allowed", "enable and disable are IQs of type set")
        )
    )
    assert await rig.store.count() == 0


async def test_another_push_element_is_not_implemented(rig: Rig) -> None:
    reply = await rig.exchange(prosody_wrapped("<frobnicate xmlns='urn:xmpp:push:0'/>"))
    assert shape(reply) == expected(
        wrapped_reply(
            inner_error(
                "cancel", "feature-not-implemented", "only <enable/> and <disable/> are handled"
            )
        )
    )


async def test_a_wrapper_from_a_domain_not_allowed_is_forbidden_and_nothing_is_stored(
    rig: Rig,
) -> None:
    reply = await rig.exchange(
        prosody_wrapped(enable_xml(), server="evil.example", sender="alice@evil.example/x")
    )
    assert shape(reply) == expected(
        "<iq type='error' id='0ogxMzojjxWB' to='evil.example' from='push.localhost'>"
        f"<error type='auth'><forbidden xmlns='{NS_STANZAS}'/><text xmlns='{NS_STANZAS}'>"
        "this push component does not take notifications from this sender</text></error></iq>"
    )
    assert await rig.store.count() == 0


@pytest.mark.parametrize(
    "stanza",
    [
        "<iq type='set' to='push.localhost' from='localhost' id='w1'>"
        "<delegation xmlns='urn:xmpp:delegation:2'/></iq>",
        "<iq type='set' to='push.localhost' from='localhost' id='w1'>"
        "<delegation xmlns='urn:xmpp:delegation:2'><forwarded xmlns='urn:xmpp:forward:0'>"
        "<message xmlns='jabber:client' from='alice@localhost/x'/></forwarded></delegation></iq>",
        # No xmlns of its own: the IQ would sit in the forward namespace.
        "<iq type='set' to='push.localhost' from='localhost' id='w1'>"
        "<delegation xmlns='urn:xmpp:delegation:2'><forwarded xmlns='urn:xmpp:forward:0'>"
        "<iq type='set' id='i1' from='alice@localhost/x'/></forwarded></delegation></iq>",
        "<iq type='set' to='push.localhost' from='localhost' id='w1'>"
        "<delegation xmlns='urn:xmpp:delegation:2'><forwarded xmlns='urn:xmpp:forward:0'>"
        "<iq xmlns='jabber:client' type='set' id='i1'/></forwarded></delegation></iq>",
        "<iq type='set' to='push.localhost' from='localhost' id='w1'>"
        "<delegation xmlns='urn:xmpp:delegation:2'><forwarded xmlns='urn:xmpp:forward:0'>"
        "<iq xmlns='jabber:client' type='result' id='i1' from='alice@localhost/x'/>"
        "</forwarded></delegation></iq>",
        "<iq type='get' to='push.localhost' from='localhost' id='w1'>"
        "<delegation xmlns='urn:xmpp:delegation:2'/></iq>",
    ],
    ids=["empty", "not-an-iq", "not-jabber-client", "no-sender", "an-answer", "wrapper-get"],
)
async def test_a_wrapper_without_a_usable_request_gets_a_bad_request_itself(
    rig: Rig, stanza: str
) -> None:
    reply = await rig.exchange(stanza)
    assert (reply.tag, reply.get("type"), reply.get("id"), reply.get("to")) == (
        "{jabber:component:accept}iq",
        "error",
        "w1",
        "localhost",
    )
    error = reply.find("{jabber:component:accept}error")
    assert error is not None
    assert error.get("type") == "modify"
    assert error.find(f"{{{NS_STANZAS}}}bad-request") is not None


async def test_answers_to_the_component_are_not_answered(rig: Rig) -> None:
    rig.server.send(
        "<iq type='error' to='push.localhost' from='localhost' id='x1'>"
        "<delegation xmlns='urn:xmpp:delegation:2'/></iq>"
    )
    # The next thing the component sends is the answer to what follows, not to x1.
    reply = await rig.exchange(prosody_wrapped(enable_xml(), outer_id="after"))
    assert reply.get("id") == "after"


class BrokenStore(MemoryStore):
    async def enable(
        self, request: RegistrationRequest, *, max_per_owner: int, now: float
    ) -> EnableOutcome:
        raise ConnectionError("database is down")

    async def disable(self, owner: str, push_jid: str, node: str | None) -> Sequence[Registration]:
        raise ConnectionError("database is down")


async def test_a_store_failure_is_a_wait_error_and_logged() -> None:
    async with FakeXmppServer(SECRET) as server:
        rig = await start_rig(server, BrokenStore())
        with capture_logs() as logs:
            reply = await rig.exchange(prosody_wrapped(enable_xml()))
        assert shape(reply) == expected(
            wrapped_reply(
                inner_error("wait", "internal-server-error", "the registration could not be saved")
            )
        )
        assert any(entry["event"] == "delegated_iq_failed" for entry in logs)
        await rig.component.close()


async def test_while_shutting_down_requests_are_answered_wait(rig: Rig) -> None:
    rig.component.stop_accepting()
    reply = await rig.exchange(prosody_wrapped(enable_xml()))
    assert shape(reply) == expected(
        wrapped_reply(
            inner_error("wait", "resource-constraint", "the push component is restarting")
        )
    )
    assert await rig.store.count() == 0


# ---------------------------------------------------------------- advertisements and disco


async def test_the_delegation_advertisement_is_logged_with_server_and_version(rig: Rig) -> None:
    with capture_logs() as logs:
        for version in ("2", "1"):
            rig.server.send(
                "<message from='localhost' to='push.localhost'>"
                f"<delegation xmlns='urn:xmpp:delegation:{version}'>"
                "<delegated namespace='urn:xmpp:push:0'/></delegation></message>"
            )
            granted = await rig.handler.wait_until_granted("localhost", 5)
            assert granted == f"urn:xmpp:delegation:{version}"
            rig.handler.on_link_lost()
    grants = [entry for entry in logs if entry["event"] == "delegation_granted"]
    assert [(e["server"], e["namespace"], e["delegation_namespace"]) for e in grants] == [
        ("localhost", "urn:xmpp:push:0", "urn:xmpp:delegation:2"),
        ("localhost", "urn:xmpp:push:0", "urn:xmpp:delegation:1"),
    ]


async def test_a_lost_link_forgets_the_delegation_until_it_is_granted_again(rig: Rig) -> None:
    advertisement = (
        "<message from='localhost' to='push.localhost'><delegation xmlns='urn:xmpp:delegation:2'>"
        "<delegated namespace='urn:xmpp:push:0'/></delegation></message>"
    )
    rig.server.send(advertisement)
    await rig.handler.wait_until_granted("localhost", 5)
    rig.server.drop()
    await rig.server.wait_connected()  # the component reconnected
    assert rig.handler.granted == {}
    rig.server.send(advertisement)
    assert await rig.handler.wait_until_granted("localhost", 5) == "urn:xmpp:delegation:2"


async def test_an_advertisement_from_a_domain_not_allowed_is_ignored(rig: Rig) -> None:
    with capture_logs() as logs:
        rig.server.send(
            "<message from='evil.example' to='push.localhost'>"
            "<delegation xmlns='urn:xmpp:delegation:2'>"
            "<delegated namespace='urn:xmpp:push:0'/></delegation></message>"
        )
        # A disco round trip: once it is answered, the message was handled too.
        await rig.exchange(
            "<iq type='get' id='d0' from='localhost' to='push.localhost'>"
            "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        )
    assert rig.handler.granted == {}
    assert [e["event"] for e in logs if e["event"].startswith("delegation_")] == [
        "delegation_ignored"
    ]


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("route", ["::", ":bare:"])
async def test_the_delegation_disco_queries_are_answered_with_the_push_feature(
    rig: Rig, version: str, route: str
) -> None:
    node = f"urn:xmpp:delegation:{version}{route}urn:xmpp:push:0"
    reply = await rig.exchange(
        f"<iq type='get' to='push.localhost' from='localhost' id='j6P8mJgXCNMQ'>"
        f"<query node='{node}' xmlns='http://jabber.org/protocol/disco#info'/></iq>"
    )
    query = reply.find("{http://jabber.org/protocol/disco#info}query")
    assert query is not None
    assert (reply.get("type"), query.get("node")) == ("result", node)
    features = {f.get("var") for f in query.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert "urn:xmpp:push:0" in features


# ---------------------------------------------------------------- the form reader

_field = st.tuples(
    st.one_of(st.none(), st.sampled_from(["FORM_TYPE", "service", "device_id", "x"])),
    st.lists(st.text(max_size=20), max_size=3),
)


@given(
    form_type=st.sampled_from(["submit", "form", "result", None]),
    fields=st.lists(_field, max_size=MAX_FORM_FIELDS + 2),
)
def test_any_form_is_read_or_refused_as_a_bad_request(
    form_type: str | None, fields: list[tuple[str | None, list[str]]]
) -> None:
    element = ET.Element("{jabber:x:data}x", {"type": form_type} if form_type else {})
    for var, values in fields:
        field = ET.SubElement(element, "{jabber:x:data}field", {"var": var} if var else {})
        for value in values:
            ET.SubElement(field, "{jabber:x:data}value").text = value
    refusal: StanzaError | None = None
    try:
        options = read_publish_options(element)
    except StanzaError as error:
        refusal = error
    if refusal is not None:
        assert (refusal.type, refusal.condition) == ("modify", "bad-request")
        assert refusal.text
    else:
        assert form_type == "submit"
        assert "FORM_TYPE" not in options
        assert len(options) < MAX_FORM_FIELDS
