"""The XEP-0114 link: handshake, disco, publishes, errors, reconnect, shutdown.

Real XML over a real loopback socket to a minimal server side (tests/fakeserver.py);
the same behaviours are checked against real Prosody and ejabberd in tests/integration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from xml.etree import ElementTree as ET

import pytest

from tests.fakeserver import FakeXmppServer
from xmpp_push.xmpp.component import ComponentSettings, PushComponent
from xmpp_push.xmpp.errors import StanzaError
from xmpp_push.xmpp.publish import PublishRequest

SECRET = "s3cret"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
GOOD_OPTIONS = (
    "<publish-options><x xmlns='jabber:x:data' type='submit'>"
    "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
    "<field var='service'><value>apns</value></field>"
    "<field var='device_id'><value>abcd</value></field></x></publish-options>"
)


def publish(iq_id: str, sender: str = "localhost", node: str = "n1") -> str:
    return (
        f"<iq type='set' id='{iq_id}' from='{sender}' to='push.localhost'>"
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
        f"<publish node='{node}'><item><notification xmlns='urn:xmpp:push:0'/></item></publish>"
        f"{GOOD_OPTIONS}</pubsub></iq>"
    )


class Recorder:
    def __init__(self) -> None:
        self.requests: list[PublishRequest] = []
        self.answer: StanzaError | None = None
        self.delay = 0.0

    async def __call__(self, request: PublishRequest) -> StanzaError | None:
        self.requests.append(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answer


def error_of(stanza: ET.Element) -> tuple[str | None, list[str]]:
    error = stanza.find("{jabber:component:accept}error")
    assert error is not None, ET.tostring(stanza)
    return error.get("type"), [child.tag.split("}")[1] for child in error]


@pytest.fixture
async def server() -> AsyncIterator[FakeXmppServer]:
    async with FakeXmppServer(SECRET) as fake:
        yield fake


async def connect(server: FakeXmppServer, recorder: Recorder, **settings: object) -> PushComponent:
    component = PushComponent(
        ComponentSettings(
            jid="push.localhost",
            secret=SECRET,
            port=server.port,
            allowed_domains=frozenset({"localhost"}),
            **settings,  # type: ignore[arg-type]
        ),
        recorder,
    )
    component.start()
    await asyncio.wait_for(component.connected_event.wait(), 5)
    return component


async def test_stanzas_in_the_same_read_as_the_handshake_are_answered(
    server: FakeXmppServer,
) -> None:
    server.greeting_extra = (
        "<iq type='get' id='d1' from='localhost' to='push.localhost'>"
        "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>" + publish("p1")
    )
    recorder = Recorder()
    component = await connect(server, recorder)
    answers = {(await server.next_stanza()).get("id") for _ in range(2)}
    assert answers == {"d1", "p1"}
    assert recorder.requests[0].node == "n1"
    await component.close()


async def test_a_stanza_begun_in_the_stream_headers_read_is_not_lost() -> None:
    # No XEP-0114 server sends more than its header before the handshake; a server
    # that did must still lose nothing when slixmpp's loop hands over mid-stanza.
    component = PushComponent(ComponentSettings(jid="push.localhost", secret=SECRET), Recorder())
    seen: list[str | None] = []
    component.start_stream_handler = lambda _root: None  # type: ignore[method-assign]
    component._spawn_event = lambda xml: seen.append(xml.get("id"))  # type: ignore[method-assign]
    component.init_parser()
    component.data_received(
        b"<stream:stream xmlns='jabber:component:accept' "
        b"xmlns:stream='http://etherx.jabber.org/streams' id='s1'>"
        b"<iq id='a'/><iq id='b'><query xmlns='q'>"
    )
    component.data_received(b"</query></iq><iq id='c'/>")
    assert seen == ["a", "b", "c"]


async def test_disco_info_names_a_push_service_and_echoes_the_node(
    server: FakeXmppServer,
) -> None:
    component = await connect(server, Recorder())
    server.send(
        "<iq type='get' id='d2' from='localhost' to='push.localhost'>"
        "<query xmlns='http://jabber.org/protocol/disco#info' node='urn:xmpp:delegation:2::x'/>"
        "</iq>"
    )
    reply = await server.next_stanza()
    assert reply.get("type") == "result"
    query = reply.find("{http://jabber.org/protocol/disco#info}query")
    assert query is not None
    assert query.get("node") == "urn:xmpp:delegation:2::x"
    identity = query.find("{http://jabber.org/protocol/disco#info}identity")
    assert identity is not None
    assert (identity.get("category"), identity.get("type")) == ("pubsub", "push")
    features = {f.get("var") for f in query.iter("{http://jabber.org/protocol/disco#info}feature")}
    assert "urn:xmpp:push:0" in features
    await component.close()


async def test_publish_is_answered_result(server: FakeXmppServer) -> None:
    component = await connect(server, Recorder())
    server.send(publish("p2"))
    reply = await server.next_stanza()
    assert (reply.get("type"), reply.get("id"), reply.get("to"), reply.get("from")) == (
        "result",
        "p2",
        "localhost",
        "push.localhost",
    )
    await component.close()


async def test_handler_error_becomes_the_reply(server: FakeXmppServer) -> None:
    recorder = Recorder()
    recorder.answer = StanzaError("cancel", "item-not-found", "gone")
    component = await connect(server, recorder)
    server.send(publish("p3"))
    assert error_of(await server.next_stanza()) == ("cancel", ["item-not-found", "text"])
    await component.close()


async def test_publish_from_a_domain_not_allowed_is_forbidden(server: FakeXmppServer) -> None:
    recorder = Recorder()
    component = await connect(server, recorder)
    server.send(publish("p4", sender="evil.example"))
    server.send(publish("p5", sender="alice@localhost"))
    for _ in range(2):
        assert error_of(await server.next_stanza())[:1] == ("auth",)
    assert recorder.requests == []
    await component.close()


async def test_malformed_publish_gets_an_error_and_the_link_stays_up(
    server: FakeXmppServer,
) -> None:
    recorder = Recorder()
    component = await connect(server, recorder)
    server.send(
        "<iq type='set' id='bad' from='localhost' to='push.localhost'>"
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish/></pubsub></iq>"
    )
    assert error_of(await server.next_stanza()) == (
        "modify",
        ["bad-request", "text", "nodeid-required"],
    )
    server.send(publish("good"))
    assert (await server.next_stanza()).get("type") == "result"
    await component.close()


async def test_handler_crash_is_answered_wait(server: FakeXmppServer) -> None:
    async def crash(_request: PublishRequest) -> StanzaError | None:
        raise RuntimeError("boom")

    component = PushComponent(
        ComponentSettings(
            jid="push.localhost",
            secret=SECRET,
            port=server.port,
            allowed_domains=frozenset({"localhost"}),
        ),
        crash,
    )
    component.start()
    await asyncio.wait_for(component.connected_event.wait(), 5)
    server.send(publish("p6"))
    assert error_of(await server.next_stanza())[0] == "wait"
    server.send(publish("p7"))
    assert error_of(await server.next_stanza())[0] == "wait"
    await component.close()


async def test_results_and_errors_are_never_answered(server: FakeXmppServer) -> None:
    component = await connect(server, Recorder())
    server.send(
        "<iq type='result' id='r1' from='localhost' to='push.localhost'>"
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'/></iq>"
    )
    server.send(publish("after"))
    assert (await server.next_stanza()).get("id") == "after"
    await component.close()


async def test_component_reconnects_after_the_server_drops_it(server: FakeXmppServer) -> None:
    component = await connect(server, Recorder(), reconnect_max_delay=0.2)
    server.drop()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(component.connected_event.wait(), 5)
    assert server.handshakes == 2
    server.send(publish("again"))
    assert (await server.next_stanza()).get("type") == "result"
    await component.close()


async def test_without_reconnect_a_lost_link_is_final(server: FakeXmppServer) -> None:
    component = await connect(server, Recorder(), reconnect=False)
    server.drop()
    reason = await asyncio.wait_for(component.lost_for_good, 5)
    assert "reconnect is off" in reason
    await component.close()


async def test_wrong_secret_is_logged_with_a_hint(server: FakeXmppServer) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        component = PushComponent(
            ComponentSettings(
                jid="push.localhost", secret="wrong", port=server.port, reconnect=False
            ),
            Recorder(),
        )
        component.start()
        await asyncio.wait_for(component.lost_for_good, 5)
    errors = [entry for entry in logs if entry["event"] == "stream_error"]
    assert errors
    assert "component.secret" in errors[0]["hint"]
    await component.close()


async def test_in_flight_publishes_are_answered_wait_at_shutdown(
    server: FakeXmppServer,
) -> None:
    recorder = Recorder()
    recorder.delay = 10.0
    component = await connect(server, recorder)
    server.send(publish("slow"))
    await asyncio.sleep(0.1)
    component.stop_accepting()
    server.send(publish("late"))
    late = await server.next_stanza()
    assert late.get("id") == "late"
    assert error_of(late)[0] == "wait"
    await component.finish_answers(timeout=0.1)
    slow = await server.next_stanza()
    assert slow.get("id") == "slow"
    assert error_of(slow)[0] == "wait"
    await component.close()


# -- reading the stream ---------------------------------------------------------------

TRICKY_XML = "a > b, &amp;lt;tag/&amp;gt;, \"/>\" and '&lt;/iq>'"
TRICKY_BODY = "a > b, &lt;tag/&gt;, \"/>\" and '</iq>'"


def tricky_publish(iq_id: str) -> str:
    """A publish whose form holds what a byte scanner could take for markup."""
    return (
        f"<iq type='set' id='{iq_id}' from='localhost' to='push.localhost'>"
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
        "<publish node='n2'><item><notification xmlns='urn:xmpp:push:0'>"
        "<x xmlns='jabber:x:data' type='submit'><field var='last-message-body'>"
        f"<value>{TRICKY_XML}</value>"
        "</field></x></notification></item></publish>"
        f"{GOOD_OPTIONS}</pubsub></iq>"
    )


DISCO = (
    "<iq type='get' id='{id}' from='localhost' to='push.localhost'>"
    "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 100_000])
async def test_stanzas_cut_anywhere_are_each_handled_once_in_order(
    server: FakeXmppServer, piece: int
) -> None:
    recorder = Recorder()
    component = await connect(server, recorder)
    from xmpp_push.xmpp.component import _can_peek

    assert _can_peek(component.parser)  # the fast reader runs, not slixmpp's fallback
    stream = (
        publish("a")
        + " \n"  # whitespace keepalive between stanzas
        + DISCO.format(id="b")
        + tricky_publish("c")
        + "<iq type='set' id='d' from='localhost' to='push.localhost'>"
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'><publish node='n3'/></pubsub></iq>"
        + publish("e", node="n4")
    ).encode()
    for start in range(0, len(stream), piece):
        component.data_received(stream[start : start + piece])
    answers = {}
    for _ in range(5):
        answer = await server.next_stanza()
        answers[answer.get("id")] = answer.get("type")
    # Publishes are answered from tasks, disco and errors at once: the order of the
    # answers is not the order of reading, the order of the requests is.
    assert answers == {"a": "result", "b": "result", "c": "result", "d": "error", "e": "result"}
    assert [r.node for r in recorder.requests] == ["n1", "n2", "n4"]
    assert recorder.requests[1].summary.body == TRICKY_BODY
    assert len(component.xml_root or ()) == 0  # nothing piles up under the stream's root
    await component.close()


async def test_a_stanza_is_handled_when_its_last_byte_arrives(server: FakeXmppServer) -> None:
    recorder = Recorder()
    component = await connect(server, recorder)
    data = publish("late").encode()
    component.data_received(data[:-1])
    await asyncio.sleep(0.05)
    assert recorder.requests == []
    component.data_received(data[-1:])
    assert (await server.next_stanza()).get("id") == "late"
    await component.close()


async def test_end_of_stream_closes_the_link_and_it_comes_back(server: FakeXmppServer) -> None:
    component = await connect(server, Recorder(), reconnect_max_delay=0.2)
    # disco is answered as it is read; a publish's answer would find the link gone.
    component.data_received((DISCO.format(id="last") + "</stream:stream>").encode())
    assert (await server.next_stanza()).get("id") == "last"
    await asyncio.wait_for(server.connected.wait(), 5)
    for _ in range(100):
        if server.handshakes == 2:
            break
        await asyncio.sleep(0.05)
    assert server.handshakes == 2
    await component.close()


async def test_bytes_that_are_not_xml_get_a_stream_error_after_the_good_stanzas(
    server: FakeXmppServer,
) -> None:
    component = await connect(server, Recorder(), reconnect_max_delay=0.2)
    component.data_received((DISCO.format(id="fine") + "<iq id='x'><</iq>").encode())
    assert (await server.next_stanza()).get("id") == "fine"
    error = await server.next_stanza()
    assert error.tag == "{http://etherx.jabber.org/streams}error"
    assert error.find("{urn:ietf:params:xml:ns:xmpp-streams}not-well-formed") is not None
    for _ in range(100):
        if server.handshakes == 2:
            break
        await asyncio.sleep(0.05)
    assert server.handshakes == 2  # a new stream, a new parser
    server.send(publish("again"))
    assert (await server.next_stanza()).get("id") == "again"
    await component.close()
