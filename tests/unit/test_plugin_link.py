"""The component's side of the plugin protocol (docs/plugin-protocol.md), over a real
socket from tests/fakeserver.py: configure on connect, notify answered and acted on,
arm before the delegated result, disarm when a session's last registration goes, and
forward publishes. The real plugins are tested in tests/integration/."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from xml.etree import ElementTree as ET

import pytest
from structlog.testing import capture_logs

from tests.fakeserver import FakeXmppServer
from tests.unit.test_delegation import (
    enable_xml,
    expected,
    form,
    prosody_wrapped,
    shape,
)
from xmpp_push.core.direct import DirectMode
from xmpp_push.core.dispatch import Dispatcher, RetryPolicy
from xmpp_push.core.model import Content, Push, Service
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory
from xmpp_push.core.wake import SessionState, WakePolicy, Waker
from xmpp_push.storage.memory import MemoryStore
from xmpp_push.xmpp.component import ComponentSettings, PushComponent
from xmpp_push.xmpp.delegation import install_direct_mode
from xmpp_push.xmpp.errors import StanzaError
from xmpp_push.xmpp.forward import XmppForwarder, publish_payload
from xmpp_push.xmpp.plugin_link import (
    NS_PLUGIN,
    PluginKnobs,
    PluginLink,
    install_plugin_link,
    parse_notify,
)
from xmpp_push.xmpp.publish import PublishRequest

SECRET = "s3cret"
ME = "push.localhost"
TOKEN = "ab" * 32
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
C = "{jabber:component:accept}"


class RecordingProvider:
    name = "recording"

    def __init__(self) -> None:
        self.pushes: list[Push] = []

    async def send(self, push: Push) -> None:
        self.pushes.append(push)

    async def aclose(self) -> None:
        pass


async def no_publishes(_request: PublishRequest) -> StanzaError | None:
    raise AssertionError("no publish expected here")


@dataclass
class Rig:
    server: FakeXmppServer
    component: PushComponent
    store: MemoryStore
    provider: RecordingProvider
    link: PluginLink

    async def next(self) -> ET.Element:
        return await self.server.next_stanza()

    async def answer(self, request: ET.Element, payload: str = "") -> None:
        self.server.send(
            f"<iq type='result' id='{request.get('id')}' from='{request.get('to')}'"
            f" to='{ME}'>{payload}</iq>"
        )


PLUGIN_ANSWER = (
    f"<plugin xmlns='{NS_PLUGIN}' version='1' name='mod_xmpp_push' server='Prosody 0.12.3'/>"
)


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with FakeXmppServer(SECRET, plugin_requests=True) as server:
        component = PushComponent(
            ComponentSettings(
                jid=ME, secret=SECRET, port=server.port, allowed_domains=frozenset({"localhost"})
            ),
            no_publishes,
        )
        store = MemoryStore()
        provider = RecordingProvider()
        dispatcher = Dispatcher({Service.APNS: provider, Service.FCM: provider}, RetryPolicy())
        waker = Waker(store, dispatcher, XmppForwarder(component, timeout=1.0), WakePolicy())
        link = install_plugin_link(
            component, waker, PluginKnobs(undecided_delay=2.0, include_body=True)
        )
        install_direct_mode(
            component, DirectMode(store, own_jids=frozenset({ME}), max_per_owner=5), link
        )
        component.start()
        await asyncio.wait_for(component.connected_event.wait(), 5)
        yield Rig(server, component, store, provider, link)
        await component.close()


async def configured(rig: Rig, payload: str = PLUGIN_ANSWER) -> ET.Element:
    request = await rig.next()
    await rig.answer(request, payload)
    await asyncio.wait_for(rig.link.configured.wait(), 5)
    return request


def notify_iq(attributes: str, body: str = "", *, sender: str = "localhost") -> str:
    return (
        f"<iq type='set' id='n1' from='{sender}' to='{ME}'>"
        f"<notify xmlns='{NS_PLUGIN}' {attributes}>{body}</notify></iq>"
    )


async def test_configure_goes_to_each_server_on_connect_with_the_policy(rig: Rig) -> None:
    with capture_logs() as logs:
        request = await configured(rig)
    assert shape(request) == expected(
        f"<iq type='set' id='{request.get('id')}' from='{ME}' to='localhost'>"
        f"<configure xmlns='{NS_PLUGIN}' undecided-delay='2000' hibernation-keepalive='259200'"
        " include-body='true' include-sender='true'/></iq>"
    )
    assert rig.link.plugins["localhost"]["server"] == "Prosody 0.12.3"
    assert any(entry["event"] == "plugin_detected" for entry in logs)


async def test_a_delegating_server_without_the_plugin_gets_a_warning(rig: Rig) -> None:
    request = await rig.next()
    with capture_logs() as logs:
        rig.server.send(
            f"<iq type='error' id='{request.get('id')}' from='localhost' to='{ME}'>"
            f"<error type='cancel'><service-unavailable xmlns='{NS_STANZAS}'/></error></iq>"
        )
        await asyncio.wait_for(rig.link.configured.wait(), 5)
        rig.server.send(
            f"<message from='localhost' to='{ME}'><delegation xmlns='urn:xmpp:delegation:2'>"
            "<delegated namespace='urn:xmpp:push:0'/></delegation></message>"
        )
        await asyncio.sleep(0.1)
    warnings = [entry for entry in logs if entry["event"] == "direct_mode_without_plugin"]
    assert len(warnings) == 1
    assert warnings[0]["server"] == "localhost"


async def test_the_plugin_may_ask_for_the_configuration(rig: Rig) -> None:
    await configured(rig)
    rig.server.send(
        f"<iq type='get' id='g1' from='localhost' to='{ME}'><configure xmlns='{NS_PLUGIN}'/></iq>"
    )
    answer = await rig.next()
    assert answer.get("type") == "result"
    assert answer.get("id") == "g1"
    knobs = answer.find(f"{{{NS_PLUGIN}}}configure")
    assert knobs is not None
    assert knobs.get("undecided-delay") == "2000"


async def test_an_enable_arms_the_session_before_the_client_hears_result(rig: Rig) -> None:
    await configured(rig)
    form_xml = form({"service": "apns", "device_id": TOKEN})
    rig.server.send(prosody_wrapped(enable_xml(body=form_xml)))
    arm = await rig.next()
    delegated_result = await rig.next()
    armed = arm.find(f"{{{NS_PLUGIN}}}arm")
    assert armed is not None
    assert armed.get("jid") == "alice@localhost/probe"
    assert delegated_result.find("{urn:xmpp:delegation:2}delegation") is not None


async def test_disabling_the_last_registration_of_a_session_disarms_it(rig: Rig) -> None:
    await configured(rig)
    form_xml = form({"service": "apns", "device_id": TOKEN})
    rig.server.send(prosody_wrapped(enable_xml(node="n1", body=form_xml)))
    await rig.next()  # arm
    await rig.next()  # result
    rig.server.send(
        prosody_wrapped("<disable xmlns='urn:xmpp:push:0' jid='push.localhost'/>", outer_id="d1")
    )
    disarm = await rig.next()
    element = disarm.find(f"{{{NS_PLUGIN}}}disarm")
    assert element is not None
    assert element.get("jid") == "alice@localhost/probe"


async def test_a_notify_is_answered_at_once_and_wakes_the_registration(rig: Rig) -> None:
    await configured(rig)
    form_xml = form({"service": "apns", "device_id": TOKEN})
    rig.server.send(prosody_wrapped(enable_xml(body=form_xml)))
    await rig.next()
    await rig.next()
    rig.server.send(
        notify_iq(
            "user='alice@localhost' state='undecided' resource='probe' count='3'"
            " sender='bob@localhost/pc' type='chat'",
            "<body>dinner?</body>",
        )
    )
    answer = await rig.next()
    assert shape(answer) == expected(f"<iq type='result' id='n1' to='localhost' from='{ME}'/>")
    for _ in range(50):
        if rig.provider.pushes:
            break
        await asyncio.sleep(0.02)
    (push,) = rig.provider.pushes
    assert push.device.token == TOKEN
    assert push.content.message_count == 3


@pytest.mark.parametrize(
    ("attributes", "text"),
    [
        ("state='offline'", "user is missing"),
        ("user='alice@localhost/phone' state='offline'", "bare JID"),
        ("user='alice@elsewhere' state='offline'", "not an account of localhost"),
        ("user='alice@localhost' state='asleep'", "state must be"),
        ("user='alice@localhost' state='hibernated'", "resource is required"),
        ("user='alice@localhost' state='offline' count='0'", "count must be"),
        ("user='alice@localhost' state='offline' call='maybe'", "call must be"),
    ],
)
async def test_a_malformed_notify_is_a_bad_request(rig: Rig, attributes: str, text: str) -> None:
    await configured(rig)
    rig.server.send(notify_iq(attributes))
    answer = await rig.next()
    error = answer.find(f"{C}error")
    assert answer.get("type") == "error"
    assert error is not None
    assert error.get("type") == "modify"
    assert error.find(f"{{{NS_STANZAS}}}bad-request") is not None
    assert text in (error.findtext(f"{{{NS_STANZAS}}}text") or "")


async def test_a_notify_from_a_foreign_server_is_forbidden(rig: Rig) -> None:
    await configured(rig)
    rig.server.send(notify_iq("user='alice@evil' state='offline'", sender="evil"))
    answer = await rig.next()
    error = answer.find(f"{C}error")
    assert error is not None
    assert error.get("type") == "auth"


def test_parse_notify_reads_every_field() -> None:
    notify = ET.fromstring(
        f"<notify xmlns='{NS_PLUGIN}' user='Alice@LocalHost' state='hibernated'"
        " resource='phone' count='4' sender='room@muc.localhost/bob' type='groupchat'"
        " encrypted='true' call='false' mention='1' future='ignored'><body>hi</body></notify>"
    )
    event = parse_notify(notify, "localhost")
    assert event.owner == "alice@localhost"
    assert event.state is SessionState.HIBERNATED
    assert (event.resource, event.count, event.sender) == ("phone", 4, "room@muc.localhost/bob")
    assert event.groupchat
    assert event.encrypted
    assert event.mention
    assert not event.call
    assert event.body == "hi"


def test_publish_payload_is_the_summary_then_the_clients_options() -> None:
    payload = publish_payload(
        "n1", Content(message_count=2, sender="bob@localhost", body="hi"), {"secret": "s3"}
    )
    element = ET.fromstring(payload)
    publish = element.find("{http://jabber.org/protocol/pubsub}publish")
    assert publish is not None
    assert publish.get("node") == "n1"
    summary, options = (
        {
            field.get("var"): field.findtext("{jabber:x:data}value")
            for field in form_element.iter("{jabber:x:data}field")
        }
        for form_element in element.iter("{jabber:x:data}x")
    )
    assert summary == {
        "FORM_TYPE": "urn:xmpp:push:summary",
        "message-count": "2",
        "last-message-sender": "bob@localhost",
        "last-message-body": "hi",
    }
    assert options == {
        "FORM_TYPE": "http://jabber.org/protocol/pubsub#publish-options",
        "secret": "s3",
    }


@pytest.mark.parametrize(
    ("error", "category"),
    [
        ("<error type='cancel'><item-not-found xmlns='{ns}'/></error>", ErrorCategory.TOKEN_DEAD),
        ("<error type='wait'><resource-constraint xmlns='{ns}'/></error>", ErrorCategory.TRANSIENT),
        ("<error type='auth'><forbidden xmlns='{ns}'/></error>", ErrorCategory.MISCONFIGURED),
    ],
)
async def test_forward_reads_the_app_servers_answer(
    rig: Rig, error: str, category: ErrorCategory
) -> None:
    await configured(rig)
    forwarder = XmppForwarder(rig.component, timeout=2.0)
    sent = asyncio.create_task(forwarder.forward("p2.example.net", "n1", Content(), {}))
    publish = await rig.next()
    assert publish.get("to") == "p2.example.net"
    rig.server.send(
        f"<iq type='error' id='{publish.get('id')}' from='p2.example.net' to='{ME}'>"
        f"{error.format(ns=NS_STANZAS)}</iq>"
    )
    with pytest.raises(DeliveryError) as raised:
        await sent
    assert raised.value.category is category


async def test_forward_without_an_answer_is_transient(rig: Rig) -> None:
    await configured(rig)
    forwarder = XmppForwarder(rig.component, timeout=0.2)
    with pytest.raises(DeliveryError) as raised:
        await forwarder.forward("p2.example.net", "n1", Content(), {})
    assert raised.value.category is ErrorCategory.TRANSIENT
