"""Malformed publishes get the right XMPP error; the component keeps serving.

Real servers never send most of these shapes, so a minimal server side
(tests/fakeserver.py) writes them raw; everything behind it is the real component
delivering to the APNs stand-in over TLS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from tests.fakeserver import FakeXmppServer
from tests.rig import component_config, running_component
from tests.standins.apns import ApnsStandIn
from xmpp_push.app import Application

SECRET = "malformed-secret"
GOOD_TOKEN = "5a" * 32


def publish(
    iq_id: str,
    *,
    sender: str = "localhost",
    node: str | None = "n1",
    item: str | None = None,
    summary: str = "<field var='last-message-body'><value>Hello</value></field>",
    options: dict[str, str] | None = None,
) -> str:
    if options is None:
        options = {"service": "apns", "device_id": GOOD_TOKEN}
    if item is None:
        item = (
            "<item><notification xmlns='urn:xmpp:push:0'><x xmlns='jabber:x:data' type='submit'>"
            "<field var='FORM_TYPE'><value>urn:xmpp:push:summary</value></field>"
            f"{summary}</x></notification></item>"
        )
    fields = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in options.items())
    node_attr = f" node='{node}'" if node is not None else ""
    return (
        f"<iq type='set' id='{iq_id}' from='{sender}' to='push.localhost'>"
        "<pubsub xmlns='http://jabber.org/protocol/pubsub'>"
        f"<publish{node_attr}>{item}</publish>"
        "<publish-options><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options"
        f"</value></field>{fields}</x></publish-options></pubsub></iq>"
    )


MALFORMED = {
    "no node": (publish("m", node=None), "modify", "bad-request"),
    "no item": (publish("m", item=""), "modify", "bad-request"),
    "garbage form": (
        publish("m", summary="<field var='message-count'><value>many</value></field>"),
        "modify",
        "bad-request",
    ),
    "garbage xml payload": (
        publish("m", item="<item><blob xmlns='urn:example'>?</blob></item>"),
        "modify",
        "bad-request",
    ),
    "unknown service": (
        publish("m", options={"service": "mpns", "device_id": GOOD_TOKEN}),
        "modify",
        "bad-request",
    ),
    "non-hex APNs token": (
        publish("m", options={"service": "apns", "device_id": "zz-not-hex-zz" * 4}),
        "modify",
        "bad-request",
    ),
    "1 MB body": (
        publish(
            "m", summary=f"<field var='last-message-body'><value>{'x' * 1_048_576}</value></field>"
        ),
        "modify",
        "not-acceptable",
    ),
    "no device and no default service": (
        publish("m", options={"secret": "s"}),
        "cancel",
        "item-not-found",
    ),
    "from a domain not allowed": (publish("m", sender="other.example"), "auth", "forbidden"),
    "from a user": (publish("m", sender="mallory@localhost/phone"), "auth", "forbidden"),
}


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[tuple[FakeXmppServer, ApnsStandIn, Application]]:
    async with FakeXmppServer(SECRET) as server, ApnsStandIn(tmp_path / "apns") as apns:
        config = component_config(
            tmp_path, jid="push.localhost", port=server.port, secret=SECRET, apns=apns
        )
        async with running_component(config) as app:
            yield server, apns, app


def error_of(stanza: ET.Element) -> tuple[str | None, str]:
    error = stanza.find("{jabber:component:accept}error")
    assert error is not None, ET.tostring(stanza)
    return error.get("type"), error[0].tag.split("}")[1]


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_publish_gets_its_error_and_the_next_good_one_is_delivered(
    rig: tuple[FakeXmppServer, ApnsStandIn, Application], case: str
) -> None:
    server, apns, app = rig
    stanza, error_type, condition = MALFORMED[case]
    server.send(stanza)
    reply = await server.next_stanza()
    assert reply.get("type") == "error"
    assert error_of(reply) == (error_type, condition)
    assert apns.requests == []

    server.send(publish("good"))
    good = await server.next_stanza()
    assert (good.get("id"), good.get("type")) == ("good", "result")
    assert [request.token for request in apns.requests] == [GOOD_TOKEN]
    assert server.handshakes == 1  # the link never dropped
    assert app.component.connected_event.is_set()
