"""Parsing XEP-0357 publishes exactly as Prosody and ejabberd send them."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_push.core.model import Priority
from xmpp_push.xmpp.errors import StanzaError
from xmpp_push.xmpp.publish import MAX_PUBLISH_TEXT, NS_PUBSUB, parse_publish

DATA = Path(__file__).parent.parent / "data"


def pubsub_of(xml: str) -> ET.Element:
    pubsub = ET.fromstring(xml).find(f"{{{NS_PUBSUB}}}pubsub")
    assert pubsub is not None
    return pubsub


def publish_xml(
    *,
    node: str | None = "n1",
    item: str = "<item><notification xmlns='urn:xmpp:push:0'>{form}</notification></item>",
    form: str = "",
    options: dict[str, str] | None = None,
) -> str:
    node_attr = f" node='{node}'" if node is not None else ""
    options_xml = ""
    if options is not None:
        fields = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in options.items())
        options_xml = (
            "<publish-options><x xmlns='jabber:x:data' type='submit'>"
            "<field var='FORM_TYPE'><value>http://jabber.org/protocol/pubsub#publish-options"
            f"</value></field>{fields}</x></publish-options>"
        )
    return (
        "<iq type='set' id='1' from='localhost' to='push.localhost'>"
        f"<pubsub xmlns='{NS_PUBSUB}'><publish{node_attr}>{item.format(form=form)}</publish>"
        f"{options_xml}</pubsub></iq>"
    )


def test_prosody_capture_parses_form_summary_and_options() -> None:
    request = parse_publish(pubsub_of((DATA / "prosody_publish.xml").read_text()))
    assert request.node == "n1"
    assert request.summary.message_count == 1
    assert request.summary.body == "New Message!"
    assert request.summary.sender is None  # Prosody sends the field empty
    assert dict(request.options) == {"secret": "s3cr3t"}


def test_ejabberd_capture_parses_submit_summary() -> None:
    request = parse_publish(pubsub_of((DATA / "ejabberd_publish.xml").read_text()))
    assert request.summary.body == "New message"
    assert request.summary.message_count is None
    assert dict(request.options) == {"secret": "s3cr3t"}


def test_ejabberd_bare_notification_has_an_empty_summary() -> None:
    request = parse_publish(pubsub_of((DATA / "ejabberd_bare_publish.xml").read_text()))
    assert request.summary.body is None
    assert request.summary.message_count is None


def test_mongooseim_style_options_are_read() -> None:
    xml = publish_xml(options={"service": "apns", "device_id": "ab12", "priority": "high"})
    assert dict(parse_publish(pubsub_of(xml)).options) == {
        "service": "apns",
        "device_id": "ab12",
        "priority": "high",
    }


def test_tigase_priority_marker_becomes_a_hint() -> None:
    xml = publish_xml(form="<priority xmlns='tigase:push:priority:0'>high</priority>")
    assert parse_publish(pubsub_of(xml)).summary.priority_hint is Priority.HIGH


@pytest.mark.parametrize(
    ("xml", "condition", "app_condition"),
    [
        (publish_xml(node=None), "bad-request", "nodeid-required"),
        (publish_xml(node=""), "bad-request", "nodeid-required"),
        (publish_xml(item=""), "bad-request", "item-required"),
        (publish_xml(item="<item><other xmlns='x'/></item>"), "bad-request", "invalid-payload"),
        (
            publish_xml(form="<x xmlns='jabber:x:data' type='cancel'/>"),
            "bad-request",
            "invalid-payload",
        ),
        (
            publish_xml(
                form="<x xmlns='jabber:x:data'><field var='message-count'><value>lots</value>"
                "</field></x>"
            ),
            "bad-request",
            "invalid-payload",
        ),
        (
            publish_xml(form="<x xmlns='jabber:x:data'><field><value>1</value></field></x>"),
            "bad-request",
            "invalid-payload",
        ),
        (
            publish_xml(
                form="<x xmlns='jabber:x:data'><field var='FORM_TYPE'><value>urn:other</value>"
                "</field></x>"
            ),
            "bad-request",
            "invalid-payload",
        ),
    ],
)
def test_malformed_publish_gets_a_modify_error(
    xml: str, condition: str, app_condition: str
) -> None:
    with pytest.raises(StanzaError) as caught:
        parse_publish(pubsub_of(xml))
    assert caught.value.type == "modify"
    assert caught.value.condition == condition
    assert caught.value.app_condition is not None
    assert caught.value.app_condition[1] == app_condition


def test_a_one_megabyte_body_is_refused_as_payload_too_big() -> None:
    body = "x" * 1_000_000
    xml = publish_xml(
        form=f"<x xmlns='jabber:x:data'><field var='last-message-body'><value>{body}</value>"
        "</field></x>"
    )
    with pytest.raises(StanzaError) as caught:
        parse_publish(pubsub_of(xml))
    assert (caught.value.type, caught.value.condition) == ("modify", "not-acceptable")
    assert caught.value.app_condition == (
        "http://jabber.org/protocol/pubsub#errors",
        "payload-too-big",
    )


def test_a_body_just_under_the_limit_is_accepted() -> None:
    body = "x" * (MAX_PUBLISH_TEXT - 10)
    xml = publish_xml(
        form=f"<x xmlns='jabber:x:data'><field var='last-message-body'><value>{body}</value>"
        "</field></x>"
    )
    assert parse_publish(pubsub_of(xml)).summary.body == body


@given(
    st.dictionaries(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=20).filter(
            lambda k: k != "FORM_TYPE"
        ),
        st.text(
            alphabet=st.characters(
                blacklist_categories=("Cs", "Cc"), blacklist_characters="<&>'\""
            ),
            max_size=50,
        ),
        max_size=8,
    )
)
def test_publish_options_round_trip(options: dict[str, str]) -> None:
    request = parse_publish(pubsub_of(publish_xml(options=options)))
    # ElementTree turns a value that is only whitespace into text as-is; nothing is trimmed.
    assert dict(request.options) == options
