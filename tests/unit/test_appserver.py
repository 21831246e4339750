"""From publish-options and summary to the push for one device."""

from __future__ import annotations

import pytest

from xmpp_push.core.appserver import (
    ContentPolicy,
    PublishPolicy,
    RequestError,
    RequestProblem,
    Summary,
    to_push,
)
from xmpp_push.core.model import Mode, Priority, Service

APNS_TOKEN = "0f" * 32
FCM_TOKEN = "cXyz123:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx"
POLICY = PublishPolicy()


def test_mongooseim_form_names_the_device() -> None:
    push = to_push(
        "n1",
        Summary(message_count=3, body="New Message!"),
        {"service": "apns", "device_id": APNS_TOKEN, "priority": "normal", "topic": "org.x"},
        POLICY,
        100.0,
    )
    assert push.device.service is Service.APNS
    assert push.device.token == APNS_TOKEN
    assert push.device.topic == "org.x"
    assert push.priority is Priority.NORMAL
    assert push.content.message_count == 3
    assert push.created_at == 100.0


def test_every_optional_field_is_read() -> None:
    push = to_push(
        "n1",
        Summary(body="x"),
        {
            "service": "fcm",
            "device_id": FCM_TOKEN,
            "mode": "dev",
            "silent": "true",
            "sound": "ping.caf",
            "time_to_live": "60",
            "mutable_content": "false",
            "click_action": "OPEN_CHAT",
        },
        POLICY,
        0.0,
    )
    assert push.device.mode is Mode.SANDBOX
    assert push.silent is True
    assert push.sound == "ping.caf"
    assert push.ttl == 60
    assert push.mutable_content is False
    assert push.click_action == "OPEN_CHAT"


def test_body_is_hidden_unless_the_operator_allows_it() -> None:
    summary = Summary(sender="bob@example.org", body="the secret plan")
    options = {"service": "apns", "device_id": APNS_TOKEN}
    hidden = to_push("n1", summary, options, POLICY, 0.0)
    assert hidden.content.body == "New message"
    assert hidden.content.sender is None
    shown = to_push(
        "n1",
        summary,
        options,
        PublishPolicy(content=ContentPolicy(show_body=True, show_sender=True)),
        0.0,
    )
    assert shown.content.body == "the secret plan"
    assert shown.content.sender == "bob@example.org"


def test_a_summary_without_body_wakes_the_app_silently() -> None:
    push = to_push("n1", Summary(), {"service": "apns", "device_id": APNS_TOKEN}, POLICY, 0.0)
    assert push.silent is True
    assert push.content.body is None


def test_priority_falls_back_to_the_hint_then_the_policy() -> None:
    options = {"service": "apns", "device_id": APNS_TOKEN}
    hinted = to_push("n", Summary(body="x", priority_hint=Priority.NORMAL), options, POLICY, 0)
    assert hinted.priority is Priority.NORMAL
    default = to_push(
        "n", Summary(body="x"), options, PublishPolicy(default_priority=Priority.NORMAL), 0
    )
    assert default.priority is Priority.NORMAL


def test_node_is_the_token_with_a_default_service() -> None:
    policy = PublishPolicy(default_service=Service.APNS)
    push = to_push(APNS_TOKEN, Summary(body="x"), {"secret": "s"}, policy, 0.0)
    assert push.device.token == APNS_TOKEN


def test_node_that_is_no_token_is_an_unknown_node() -> None:
    policy = PublishPolicy(default_service=Service.APNS)
    with pytest.raises(RequestError) as caught:
        to_push("n1", Summary(), {}, policy, 0.0)
    assert caught.value.problem is RequestProblem.UNKNOWN_NODE


def test_no_device_and_no_default_service_is_an_unknown_node() -> None:
    with pytest.raises(RequestError) as caught:
        to_push("n1", Summary(), {"secret": "s3cr3t"}, POLICY, 0.0)
    assert caught.value.problem is RequestProblem.UNKNOWN_NODE


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"service": "apns"}, "device_id"),
        ({"device_id": APNS_TOKEN}, "service"),
        ({"service": "mpns", "device_id": APNS_TOKEN}, "unknown service"),
        ({"service": "apns", "device_id": "not-hex!"}, "APNs device token"),
        ({"service": "fcm", "device_id": "a b"}, "FCM registration token"),
        ({"service": "apns", "device_id": APNS_TOKEN, "priority": "urgent"}, "priority"),
        ({"service": "apns", "device_id": APNS_TOKEN, "mode": "staging"}, "mode"),
        ({"service": "apns", "device_id": APNS_TOKEN, "silent": "maybe"}, "silent"),
        ({"service": "apns", "device_id": APNS_TOKEN, "time_to_live": "soon"}, "time_to_live"),
        ({"service": "apns", "device_id": APNS_TOKEN, "time_to_live": "-1"}, "time_to_live"),
    ],
)
def test_bad_publish_options_are_bad_requests_naming_the_field(
    options: dict[str, str], words: str
) -> None:
    with pytest.raises(RequestError) as caught:
        to_push("n1", Summary(body="x"), options, POLICY, 0.0)
    assert caught.value.problem is RequestProblem.BAD_REQUEST
    assert words in caught.value.text
