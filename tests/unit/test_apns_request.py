"""What the APNs provider puts on the wire, checked without a network."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hpack import Decoder
from hypothesis import given, settings
from hypothesis import strategies as st

from xmpp_push.core.model import Content, Device, Mode, Priority, Push, Service
from xmpp_push.providers._hpack import LiteralEncoder, encode_integer
from xmpp_push.providers.apns import (
    MAX_PAYLOAD_BYTES,
    ApnsProvider,
    ProviderToken,
    build_request,
)

TOKEN = "ab" * 32
TOPIC = "org.example.chat"
CREATED = 1_700_000_000.0


def make_push(**fields: Any) -> Push:
    device = fields.pop("device", Device(Service.APNS, TOKEN))
    return Push(device=device, created_at=CREATED, **fields)


def aps(push: Push) -> dict[str, Any]:
    payload = json.loads(build_request(push, TOPIC).body)
    assert set(payload) == {"aps"}
    result: dict[str, Any] = payload["aps"]
    return result


# -- headers and path ------------------------------------------------------------------


def test_high_priority_alert_headers() -> None:
    request = build_request(make_push(priority=Priority.HIGH, ttl=3600), TOPIC)

    assert request.path == f"/3/device/{TOKEN}"
    assert request.headers == {
        "apns-topic": TOPIC,
        "apns-push-type": "alert",
        "apns-priority": "10",
        "apns-expiration": str(int(CREATED) + 3600),
        "apns-id": request.apns_id,
    }


def test_normal_priority_alert_is_power_aware() -> None:
    request = build_request(make_push(priority=Priority.NORMAL), TOPIC)

    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "5"


def test_silent_push_is_background_with_priority_5_and_no_content() -> None:
    push = make_push(silent=True, priority=Priority.HIGH, content=Content(3, "a@b", "secret"))
    request = build_request(push, TOPIC)

    assert request.headers["apns-push-type"] == "background"
    assert request.headers["apns-priority"] == "5"
    assert json.loads(request.body) == {"aps": {"content-available": 1}}


def test_a_call_is_a_voip_push_on_the_voip_topic() -> None:
    push = make_push(
        voip=True,
        priority=Priority.NORMAL,
        content=Content(sender="bob@example.org"),
        ttl=60,
    )
    request = build_request(push, TOPIC)
    assert request.headers["apns-push-type"] == "voip"
    assert request.headers["apns-topic"] == f"{TOPIC}.voip"
    assert request.headers["apns-priority"] == "10"
    assert json.loads(request.body) == {"aps": {}, "call": {"from": "bob@example.org"}}


def test_ttl_zero_asks_apns_not_to_store() -> None:
    request = build_request(make_push(ttl=0), TOPIC)

    assert request.headers["apns-expiration"] == "0"


def test_expiration_is_absolute_unix_time() -> None:
    push = Push(device=Device(Service.APNS, TOKEN), created_at=1000.9, ttl=60)

    assert build_request(push, TOPIC).headers["apns-expiration"] == "1060"


def test_device_topic_wins_over_default() -> None:
    device = Device(Service.APNS, TOKEN, topic="org.other.app")

    assert build_request(make_push(device=device), TOPIC).headers["apns-topic"] == "org.other.app"


def test_each_request_has_its_own_uuid() -> None:
    first = build_request(make_push(), TOPIC).apns_id
    second = build_request(make_push(), TOPIC).apns_id

    assert first != second
    assert str(uuid.UUID(first)) == first


# -- alert payload ---------------------------------------------------------------------


def test_full_alert_payload() -> None:
    push = make_push(
        content=Content(message_count=2, sender="juliet@example.org", body="Hi"),
        sound="ping.caf",
        click_action="MESSAGE",
    )

    assert aps(push) == {
        "alert": {"title": "juliet@example.org", "body": "Hi"},
        "badge": 2,
        "sound": "ping.caf",
        "mutable-content": 1,
        "category": "MESSAGE",
    }


def test_minimal_alert_payload_says_new_message() -> None:
    push = make_push(content=Content(), mutable_content=False)

    assert aps(push) == {"alert": {"body": "New message"}, "sound": "default"}


def test_empty_body_counts_as_no_body() -> None:
    assert aps(make_push(content=Content(body="")))["alert"]["body"] == "New message"


def test_payload_is_compact_utf8() -> None:
    body = build_request(make_push(content=Content(body="héllo ✓")), TOPIC).body

    assert "héllo ✓".encode() in body
    assert b": " not in body


# -- shortening to 4 KiB ----------------------------------------------------------------


def test_long_body_is_shortened_to_fit() -> None:
    text = "x" * 10_000
    request = build_request(make_push(content=Content(sender="a@b", body=text)), TOPIC)

    assert len(request.body) <= MAX_PAYLOAD_BYTES
    alert = json.loads(request.body)["aps"]["alert"]
    assert alert["title"] == "a@b"
    assert alert["body"].endswith("…")
    assert text.startswith(alert["body"][:-1])
    # It uses the room it has rather than cutting far too much.
    assert len(request.body) > MAX_PAYLOAD_BYTES - 8


def test_shortening_never_splits_a_character() -> None:
    text = "🙂" * 3000  # 4 bytes each in UTF-8
    request = build_request(make_push(content=Content(body=text)), TOPIC)

    assert len(request.body) <= MAX_PAYLOAD_BYTES
    body = json.loads(request.body.decode("utf-8"))["aps"]["alert"]["body"]
    assert set(body[:-1]) == {"🙂"}


def test_shortening_accounts_for_json_escapes() -> None:
    text = '"\n\x01' * 3000  # each character grows when escaped
    request = build_request(make_push(content=Content(body=text)), TOPIC)

    assert len(request.body) <= MAX_PAYLOAD_BYTES
    assert text.startswith(json.loads(request.body)["aps"]["alert"]["body"][:-1])


def test_payload_within_limit_is_untouched() -> None:
    text = "y" * 3000
    request = build_request(make_push(content=Content(body=text)), TOPIC)

    assert json.loads(request.body)["aps"]["alert"]["body"] == text


@settings(max_examples=150, deadline=None)
@given(body=st.text(max_size=6000), sender=st.none() | st.text(max_size=3100))
def test_any_content_fits_and_keeps_its_start(body: str, sender: str | None) -> None:
    request = build_request(make_push(content=Content(sender=sender, body=body)), TOPIC)

    assert len(request.body) <= MAX_PAYLOAD_BYTES
    alert = json.loads(request.body)["aps"]["alert"]
    sent = alert["body"]
    original = body or "New message"
    assert sent == original or original.startswith(sent.removesuffix("…"))


# -- provider token (JWT) ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def b64url_json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def verify(token: str, key: ec.EllipticCurvePrivateKey) -> None:
    header, claims, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    assert len(raw) == 64
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    key.public_key().verify(der, f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_token_is_es256_with_kid_iss_iat(key: ec.EllipticCurvePrivateKey) -> None:
    token = ProviderToken(
        key=key, key_id="KEY1234567", team_id="TEAM123456", wall_clock=lambda: 1234.5
    ).current()

    header, claims, _ = token.split(".")
    assert b64url_json(header) == {"alg": "ES256", "kid": "KEY1234567"}
    assert b64url_json(claims) == {"iss": "TEAM123456", "iat": 1234}
    verify(token, key)


def test_token_is_reused_until_its_lifetime_ends(key: ec.EllipticCurvePrivateKey) -> None:
    clock = FakeClock()
    tokens = ProviderToken(
        key=key, key_id="KEY1234567", team_id="TEAM123456", lifetime=1500, clock=clock
    )
    first = tokens.current()
    clock.now = 1499

    assert tokens.current() == first
    clock.now = 1500
    assert tokens.current() != first


@pytest.mark.parametrize(("asked", "used"), [(10, 1200), (3000, 3000), (86400, 3600)])
def test_token_lifetime_is_clamped_to_apple_rules(
    key: ec.EllipticCurvePrivateKey, asked: float, used: float
) -> None:
    tokens = ProviderToken(key=key, key_id="KEY1234567", team_id="TEAM123456", lifetime=asked)

    assert tokens.lifetime == used


def test_renew_signs_once_for_many_stale_reports(key: ec.EllipticCurvePrivateKey) -> None:
    tokens = ProviderToken(key=key, key_id="KEY1234567", team_id="TEAM123456")
    stale = tokens.current()

    fresh = tokens.renew(stale)
    assert fresh != stale
    assert tokens.renew(stale) == fresh  # a second request with the old token
    verify(fresh, key)


# -- configuration is checked at construction --------------------------------------------


def p8(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def provider_options(key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    return {"key_pem": p8(key), "key_id": "KEY1234567", "team_id": "TEAM123456", "topic": TOPIC}


def test_provider_builds_without_an_event_loop(key: ec.EllipticCurvePrivateKey) -> None:
    provider = ApnsProvider(**provider_options(key), environment=Mode.SANDBOX)

    assert provider.name == "apns"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"key_pem": b"not a key"}, "PEM"),
        ({"key_id": "short"}, "key_id"),
        ({"team_id": "TEAM-12345"}, "team_id"),
        ({"topic": ""}, "topic"),
        ({"endpoint": "http://127.0.0.1:8443"}, "https"),
        ({"request_timeout": 0}, "request_timeout"),
        ({"connections": 0}, "connections"),
    ],
)
def test_bad_configuration_is_refused(
    key: ec.EllipticCurvePrivateKey, override: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ApnsProvider(**{**provider_options(key), **override})


def test_non_p256_key_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    with pytest.raises(ValueError, match="P-256"):
        ApnsProvider(**{**provider_options(key), "key_pem": p8(rsa_key)})


# ---------------------------------------------------------------- HPACK without compression


def test_literal_encoder_output_decodes_to_the_same_headers() -> None:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", b"/3/device/" + b"ab" * 32),
        (b":authority", b"api.push.apple.com"),
        (b"authorization", b"bearer " + b"x" * 300),
        (b"apns-topic", b"org.example.chat"),
        (b"apns-push-type", b"alert"),
        (b"content-length", b"1234"),
    ]
    encoder = LiteralEncoder(varying=[b":path", b"content-length"])
    decoder = Decoder()
    first, second = encoder.encode(headers), encoder.encode(headers)
    assert decoder.decode(first, raw=True) == headers
    assert decoder.decode(second, raw=True) == headers
    assert first[0] == 0x20, "the first block turns the dynamic table off"
    assert second[0] != 0x20
    assert b"x" * 300 in second, "strings travel raw, not Huffman-coded"
    # authorization (static name 23) is sent never-indexed (0001xxxx + 4-bit-prefix
    # index: 0x1f 0x08), so no intermediary ever stores the JWT
    jwt = b"bearer " + b"x" * 300
    assert b"\x1f\x08" + encode_integer(len(jwt), 7, 0) + jwt in second


def test_apns_ids_are_random_version_4_uuids_in_canonical_form() -> None:
    ids = {build_request(make_push(), TOPIC).apns_id for _ in range(2000)}
    assert len(ids) == 2000
    for apns_id in ids:
        parsed = uuid.UUID(apns_id)
        assert str(parsed) == apns_id
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
