"""build_message: the FCM v1 body a push turns into."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from xmpp_push.core.model import Content, Device, Priority, Push, Service
from xmpp_push.providers.fcm import MAX_MESSAGE_BYTES, build_message, encode_message

TOKEN = "cHVzaC10b2tlbi0x:APA91bHunMIBhDk1xyz"


def make_push(
    *,
    count: int | None = None,
    sender: str | None = None,
    body: str | None = None,
    **options: Any,
) -> Push:
    content = Content(message_count=count, sender=sender, body=body)
    return Push(Device(Service.FCM, TOKEN), content, **options)


def message_of(push: Push) -> dict[str, object]:
    built = build_message(push)
    assert list(built) == ["message"]
    message = built["message"]
    assert isinstance(message, dict)
    return message


def android_of(push: Push) -> dict[str, object]:
    android = message_of(push)["android"]
    assert isinstance(android, dict)
    return android


def size_of(push: Push) -> int:
    return len(encode_message(build_message(push)))


def test_alert_push_shows_sender_body_and_count() -> None:
    push = make_push(count=3, sender="Alice", body="See you at 8?")

    assert build_message(push) == {
        "message": {
            "token": TOKEN,
            "android": {
                "priority": "HIGH",
                "ttl": "86400s",
                "notification": {
                    "title": "Alice",
                    "body": "See you at 8?",
                    "sound": "default",
                    "notification_count": 3,
                },
            },
            "data": {
                "message-count": "3",
                "last-message-sender": "Alice",
                "last-message-body": "See you at 8?",
            },
        }
    }


def test_normal_priority_is_sent_as_normal() -> None:
    assert android_of(make_push(priority=Priority.NORMAL))["priority"] == "NORMAL"


def test_ttl_is_a_duration_in_seconds() -> None:
    assert android_of(make_push(ttl=3600))["ttl"] == "3600s"
    assert android_of(make_push(ttl=0))["ttl"] == "0s"


def test_ttl_is_capped_at_fcms_maximum_of_28_days() -> None:
    assert android_of(make_push(ttl=10**9))["ttl"] == "2419200s"


def test_without_content_the_notification_says_new_message_and_has_no_title() -> None:
    message = message_of(make_push())

    assert message["android"] == {
        "priority": "HIGH",
        "ttl": "86400s",
        "notification": {"body": "New message", "sound": "default"},
    }
    assert "data" not in message


def test_empty_strings_count_as_absent() -> None:
    message = message_of(make_push(sender="", body=""))

    assert "data" not in message
    android = message["android"]
    assert isinstance(android, dict)
    assert android["notification"] == {"body": "New message", "sound": "default"}


def test_sound_and_click_action_are_passed_on() -> None:
    notification = android_of(make_push(sound="chime.mp3", click_action="OPEN_CHAT"))[
        "notification"
    ]

    assert notification == {
        "body": "New message",
        "sound": "chime.mp3",
        "click_action": "OPEN_CHAT",
    }


def test_silent_push_is_data_only() -> None:
    push = make_push(count=2, sender="Bob", body="hi", silent=True, priority=Priority.NORMAL)

    assert build_message(push) == {
        "message": {
            "token": TOKEN,
            "android": {"priority": "NORMAL", "ttl": "86400s"},
            "data": {
                "message-count": "2",
                "last-message-sender": "Bob",
                "last-message-body": "hi",
            },
        }
    }


def test_silent_push_without_content_carries_no_data() -> None:
    assert message_of(make_push(silent=True)) == {
        "token": TOKEN,
        "android": {"priority": "HIGH", "ttl": "86400s"},
    }


def test_message_count_is_kept_within_int32() -> None:
    android = android_of(make_push(count=2**40))
    notification = android["notification"]
    assert isinstance(notification, dict)

    assert notification["notification_count"] == 2**31 - 1


def test_long_body_is_shortened_to_fit_with_an_ellipsis() -> None:
    body = "word " * 5000
    push = make_push(count=1, sender="Alice", body=body)

    message = message_of(push)

    assert size_of(push) <= MAX_MESSAGE_BYTES
    data = message["data"]
    assert isinstance(data, dict)
    shortened = data["last-message-body"]
    assert shortened.endswith("…")
    assert body.startswith(shortened[:-1])
    assert size_of(push) > MAX_MESSAGE_BYTES - 64, "shortened no more than needed"
    android = message["android"]
    assert isinstance(android, dict)
    notification = android["notification"]
    assert isinstance(notification, dict)
    assert notification["body"] == shortened


def test_shortening_counts_utf8_bytes_not_characters() -> None:
    body = "😀" * 3000  # 4 bytes each in UTF-8
    push = make_push(body=body)

    data = message_of(push)["data"]
    assert isinstance(data, dict)
    shortened = data["last-message-body"]

    assert size_of(push) <= MAX_MESSAGE_BYTES
    assert set(shortened[:-1]) == {"😀"}


def test_shortening_leaves_no_dangling_joiner_or_combining_mark() -> None:
    # family emoji glued with zero-width joiners, and e + combining acute
    body = ("👩\u200d👩\u200d👧" + "e\u0301") * 1000
    push = make_push(body=body)

    data = message_of(push)["data"]
    assert isinstance(data, dict)
    kept = data["last-message-body"][:-1]

    assert kept[-1] not in "\u200d\u0301"


def test_quotes_and_control_characters_are_measured_escaped() -> None:
    push = make_push(body='"\n' * 3000)

    assert size_of(push) <= MAX_MESSAGE_BYTES


def test_a_huge_sender_is_shortened_too() -> None:
    push = make_push(sender="A" * 10000, body="B" * 10000)

    assert size_of(push) <= MAX_MESSAGE_BYTES


def test_encoding_is_compact_utf8_json() -> None:
    assert encode_message({"a": "é", "b": [1]}) == '{"a":"é","b":[1]}'.encode()


@settings(max_examples=60, deadline=None)
@given(
    sender=st.none() | st.text(max_size=3000),
    body=st.none() | st.text(max_size=6000),
    count=st.none() | st.integers(min_value=0, max_value=10**6),
    silent=st.booleans(),
)
def test_every_message_fits_and_carries_only_string_data(
    sender: str | None, body: str | None, count: int | None, silent: bool
) -> None:
    push = make_push(count=count, sender=sender, body=body, silent=silent)

    encoded = encode_message(build_message(push))

    assert len(encoded) <= MAX_MESSAGE_BYTES
    message = json.loads(encoded)["message"]
    assert message["token"] == TOKEN
    assert all(isinstance(value, str) for value in message.get("data", {}).values())
    assert ("notification" in message["android"]) is not silent


def test_a_retried_push_carries_only_what_is_left_of_its_ttl() -> None:
    from xmpp_push.providers.fcm import _remaining

    push = Push(device=Device(Service.FCM, "tok:" + "x" * 40), ttl=3600, created_at=1_000.0)
    assert _remaining(push, 1_000.0).ttl == 3600
    later = _remaining(push, 1_000.0 + 600)
    assert later.ttl == 3000
    assert later.expires_at == push.expires_at
    assert _remaining(push, 1_000.0 + 7200).ttl == 0
