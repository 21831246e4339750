"""The APNs provider against the APNs stand-in, over real TLS and HTTP/2 on loopback."""

from __future__ import annotations

import asyncio
import email.utils
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from tests.standins.apns import ApnsStandIn
from xmpp_push.core.model import Content, Device, Mode, Priority, Push, Service
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory
from xmpp_push.providers.apns import ApnsProvider

TOPIC = "org.example.chat"

MakeProvider = Callable[..., ApnsProvider]


@pytest.fixture
async def make_provider(apns: ApnsStandIn) -> AsyncIterator[MakeProvider]:
    providers: list[ApnsProvider] = []

    def make(**overrides: Any) -> ApnsProvider:
        options: dict[str, Any] = {
            "key_pem": apns.key_pem,
            "key_id": apns.key_id,
            "team_id": apns.team_id,
            "topic": TOPIC,
            "endpoint": apns.endpoint,
            "ca_file": str(apns.ca_file),
            "request_timeout": 5.0,
        }
        options.update(overrides)
        provider = ApnsProvider(**options)
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider.aclose()


@pytest.fixture
def provider(make_provider: MakeProvider) -> ApnsProvider:
    return make_provider()


def new_token() -> str:
    return secrets.token_hex(32)


def make_push(token: str | None = None, **fields: Any) -> Push:
    device = fields.pop("device", None) or Device(Service.APNS, token or new_token())
    fields.setdefault("created_at", time.time())
    return Push(device=device, **fields)


async def failure(provider: ApnsProvider, push: Push) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        await provider.send(push)
    return caught.value


async def deliver_with_retries(provider: ApnsProvider, push: Push, attempts: int = 3) -> None:
    """What the dispatcher does: TRANSIENT means try again."""
    for _ in range(attempts - 1):
        try:
            await provider.send(push)
        except DeliveryError as error:
            category = error.category
        else:
            return
        assert category is ErrorCategory.TRANSIENT
        await asyncio.sleep(0.05)
    await provider.send(push)


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        # The stand-in's counters have no event to wait on; polling them is simplest.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# -- what goes on the wire --------------------------------------------------------------


async def test_high_priority_alert_arrives_with_headers_and_payload(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    push = make_push(content=Content(message_count=1, sender="juliet@example.org", body="Hi"))

    await provider.send(push)

    [request] = apns.requests
    assert request.status == 200
    assert request.method == "POST"
    assert request.path == f"/3/device/{push.device.token}"
    assert request.headers["apns-topic"] == TOPIC
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-expiration"] == str(int(push.expires_at))
    uuid.UUID(request.headers["apns-id"])
    assert request.payload == {
        "aps": {
            "alert": {"title": "juliet@example.org", "body": "Hi"},
            "badge": 1,
            "sound": "default",
            "mutable-content": 1,
        }
    }


async def test_normal_priority_alert_uses_priority_5(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    await provider.send(make_push(priority=Priority.NORMAL))

    assert apns.requests[0].headers["apns-priority"] == "5"
    assert apns.requests[0].headers["apns-push-type"] == "alert"


async def test_silent_push_is_background_priority_5(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    await provider.send(make_push(silent=True, content=Content(body="not to be shown")))

    [request] = apns.requests
    assert request.status == 200
    assert request.headers["apns-push-type"] == "background"
    assert request.headers["apns-priority"] == "5"
    assert request.payload == {"aps": {"content-available": 1}}


async def test_zero_ttl_sends_expiration_0(apns: ApnsStandIn, provider: ApnsProvider) -> None:
    await provider.send(make_push(ttl=0))

    assert apns.requests[0].headers["apns-expiration"] == "0"


async def test_device_topic_overrides_configured_topic(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    await provider.send(make_push(device=Device(Service.APNS, new_token(), topic="org.other")))

    assert apns.requests[0].headers["apns-topic"] == "org.other"


async def test_configured_endpoint_serves_sandbox_devices_too(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    await provider.send(make_push(device=Device(Service.APNS, new_token(), mode=Mode.SANDBOX)))

    assert apns.requests[0].status == 200


async def test_oversized_body_is_shortened_and_accepted(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    await provider.send(make_push(content=Content(body="ü" * 5000)))

    [request] = apns.requests
    assert request.status == 200
    assert len(request.body) <= 4096


# -- the provider token -----------------------------------------------------------------


async def test_jwt_is_es256_for_the_configured_key_and_team(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    await provider.send(make_push())

    [request] = apns.requests
    assert request.status == 200  # the stand-in checked the signature
    assert request.jwt_header == {"alg": "ES256", "kid": apns.key_id}
    assert request.jwt_claims is not None
    assert request.jwt_claims["iss"] == apns.team_id
    assert abs(request.jwt_claims["iat"] - time.time()) < 60


async def test_one_jwt_is_shared_by_two_connections(
    apns: ApnsStandIn, make_provider: MakeProvider
) -> None:
    provider = make_provider(connections=2)

    await asyncio.gather(*(provider.send(make_push()) for _ in range(6)))
    await provider.send(make_push())

    assert apns.connections_opened == 2
    assert {r.connection_id for r in apns.requests} == {1, 2}
    assert len(apns.jwts_seen) == 1


async def test_jwt_is_reused_after_a_reconnect(apns: ApnsStandIn, provider: ApnsProvider) -> None:
    await provider.send(make_push())
    await apns.drop_connections()

    await deliver_with_retries(provider, make_push())

    assert apns.connections_opened == 2
    assert len(apns.jwts_seen) == 1


async def test_expired_provider_token_is_resigned_and_the_push_delivered(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    await provider.send(make_push())
    apns.expire_provider_tokens()

    await provider.send(make_push())

    assert [(r.status, r.reason) for r in apns.requests[1:]] == [
        (403, "ExpiredProviderToken"),
        (200, None),
    ]
    assert len(apns.jwts_seen) == 2
    assert apns.connections_opened == 1


async def test_many_expired_answers_lead_to_one_new_jwt(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    await provider.send(make_push())
    apns.expire_provider_tokens()

    await asyncio.gather(*(provider.send(make_push()) for _ in range(20)))

    assert len(apns.jwts_seen) == 2


async def test_expired_provider_token_is_retried_only_once(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    token = new_token()
    apns.respond(token, 403, "ExpiredProviderToken")

    error = await failure(provider, make_push(token))

    assert error.category is ErrorCategory.MISCONFIGURED
    assert len([r for r in apns.requests if r.token == token]) == 2


@pytest.mark.parametrize("wrong", ["key_id", "team_id", "key_pem"])
async def test_wrong_credentials_are_misconfiguration(
    apns: ApnsStandIn, make_provider: MakeProvider, wrong: str
) -> None:
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    value = {"key_id": "WRONGKEY01", "team_id": "WRONGTEAM1", "key_pem": other_key}[wrong]
    provider = make_provider(**{wrong: value})

    error = await failure(provider, make_push())

    assert (error.category, error.status, error.reason) == (
        ErrorCategory.MISCONFIGURED,
        403,
        "InvalidProviderToken",
    )


async def test_logs_never_carry_the_token_or_the_jwt(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    push = make_push()
    with capture_logs() as logs:
        await provider.send(push)
        apns.expire_provider_tokens()
        await provider.send(push)

    assert any(entry["event"] == "apns_jwt_expired_resigning" for entry in logs)
    text = repr(logs)
    assert push.device.token not in text
    assert not any(jwt in text for jwt in apns.jwts_seen)


# -- answers to categories --------------------------------------------------------------

ERROR_TABLE = [
    (410, "Unregistered", ErrorCategory.TOKEN_DEAD),
    (410, "ExpiredToken", ErrorCategory.TOKEN_DEAD),
    (400, "BadDeviceToken", ErrorCategory.TOKEN_REFUSED),
    (400, "DeviceTokenNotForTopic", ErrorCategory.TOKEN_REFUSED),
    (400, "IdleTimeout", ErrorCategory.TRANSIENT),
    (400, "BadCollapseId", ErrorCategory.MISCONFIGURED),
    (400, "BadExpirationDate", ErrorCategory.MISCONFIGURED),
    (400, "BadMessageId", ErrorCategory.MISCONFIGURED),
    (400, "BadPriority", ErrorCategory.MISCONFIGURED),
    (400, "BadTopic", ErrorCategory.MISCONFIGURED),
    (400, "DuplicateHeaders", ErrorCategory.MISCONFIGURED),
    (400, "InvalidPushType", ErrorCategory.MISCONFIGURED),
    (400, "MissingDeviceToken", ErrorCategory.MISCONFIGURED),
    (400, "MissingTopic", ErrorCategory.MISCONFIGURED),
    (400, "PayloadEmpty", ErrorCategory.MISCONFIGURED),
    (400, "TopicDisallowed", ErrorCategory.MISCONFIGURED),
    (403, "InvalidProviderToken", ErrorCategory.MISCONFIGURED),
    (403, "MissingProviderToken", ErrorCategory.MISCONFIGURED),
    (403, "UnrelatedKeyIdInToken", ErrorCategory.MISCONFIGURED),
    (403, "BadEnvironmentKeyIdInToken", ErrorCategory.MISCONFIGURED),
    (403, "BadCertificate", ErrorCategory.MISCONFIGURED),
    (403, "BadCertificateEnvironment", ErrorCategory.MISCONFIGURED),
    (403, "Forbidden", ErrorCategory.MISCONFIGURED),
    (404, "BadPath", ErrorCategory.MISCONFIGURED),
    (405, "MethodNotAllowed", ErrorCategory.MISCONFIGURED),
    (413, "PayloadTooLarge", ErrorCategory.MISCONFIGURED),
    (429, "TooManyRequests", ErrorCategory.TRANSIENT),
    (429, "TooManyProviderTokenUpdates", ErrorCategory.TRANSIENT),
    (500, "InternalServerError", ErrorCategory.TRANSIENT),
    (503, "ServiceUnavailable", ErrorCategory.TRANSIENT),
    (503, "Shutdown", ErrorCategory.TRANSIENT),
]


async def test_every_apns_answer_maps_to_its_category(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    # One stand-in for the whole table: each row is one token programmed to answer.
    pushes = [make_push() for _ in ERROR_TABLE]
    for push, (status, reason, _category) in zip(pushes, ERROR_TABLE, strict=True):
        apns.respond(push.device.token, status, reason)

    for push, (status, reason, category) in zip(pushes, ERROR_TABLE, strict=True):
        error = await failure(provider, push)
        assert (error.category, error.status, error.reason) == (category, status, reason)


async def test_retry_after_seconds_are_passed_on(apns: ApnsStandIn, provider: ApnsProvider) -> None:
    token = new_token()
    apns.respond(token, 429, "TooManyRequests", retry_after="30")

    error = await failure(provider, make_push(token))

    assert (error.category, error.retry_after) == (ErrorCategory.TRANSIENT, 30.0)


async def test_retry_after_http_date_is_turned_into_seconds(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    token = new_token()
    apns.respond(
        token, 503, "ServiceUnavailable", retry_after=email.utils.formatdate(time.time() + 120)
    )

    error = await failure(provider, make_push(token))

    assert error.retry_after is not None
    assert 100 < error.retry_after <= 121


async def test_no_retry_after_for_permanent_errors(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    token = new_token()
    apns.respond(token, 410, "Unregistered", retry_after="30")

    assert (await failure(provider, make_push(token))).retry_after is None


async def test_programmed_sequence_then_success(apns: ApnsStandIn, provider: ApnsProvider) -> None:
    token = new_token()
    apns.respond_sequence(
        token, [(503, "ServiceUnavailable"), (503, "ServiceUnavailable"), (200, None)]
    )

    assert (await failure(provider, make_push(token))).category is ErrorCategory.TRANSIENT
    assert (await failure(provider, make_push(token))).category is ErrorCategory.TRANSIENT
    await provider.send(make_push(token))


async def test_idle_timeout_answer_moves_to_a_new_connection(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    token = new_token()
    apns.respond(token, 400, "IdleTimeout", times=1)

    assert (await failure(provider, make_push(token))).category is ErrorCategory.TRANSIENT
    await provider.send(make_push(token))

    assert [r.connection_id for r in apns.requests] == [1, 2]


# -- HTTP/2 flow control and stream limits ----------------------------------------------


async def test_ten_thousand_error_answers_on_one_connection(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    # ~50 bytes of error body each: 500 KB, far beyond the 64 KiB receive window that
    # a client must hand back (aioapns stalls after ~1,200 of these).
    apns.set_default(410, "Unregistered")
    in_flight = asyncio.Semaphore(500)

    async def send_one() -> ErrorCategory | None:
        async with in_flight:
            try:
                await provider.send(make_push())
            except DeliveryError as error:
                return error.category
            return None

    results = await asyncio.gather(*(send_one() for _ in range(10_000)))

    assert results.count(ErrorCategory.TOKEN_DEAD) == 10_000
    assert len(apns.requests) == 10_000
    assert apns.connections_opened == 1


async def test_bodies_wait_for_a_small_stream_window(
    tmp_path: Path, make_provider: MakeProvider
) -> None:
    async with ApnsStandIn(tmp_path / "small", initial_window_size=1000) as small:
        provider = make_provider(
            key_pem=small.key_pem,
            key_id=small.key_id,
            team_id=small.team_id,
            endpoint=small.endpoint,
            ca_file=str(small.ca_file),
        )
        body = "z" * 3500

        await asyncio.gather(
            *(provider.send(make_push(content=Content(body=body))) for _ in range(30))
        )

        assert all(r.payload["aps"]["alert"]["body"] == body for r in small.requests)
        assert small.protocol_errors == 0


async def test_many_bodies_beyond_the_connection_window_are_all_sent(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    body = "w" * 4000  # 200 of these are 12 times the 64 KiB connection window

    await asyncio.gather(
        *(provider.send(make_push(content=Content(body=body))) for _ in range(200))
    )

    assert len(apns.requests) == 200
    assert apns.protocol_errors == 0


async def test_server_stream_limit_is_respected(
    tmp_path: Path, make_provider: MakeProvider
) -> None:
    async with ApnsStandIn(tmp_path / "narrow", max_concurrent_streams=10) as narrow:
        provider = make_provider(
            key_pem=narrow.key_pem,
            key_id=narrow.key_id,
            team_id=narrow.team_id,
            endpoint=narrow.endpoint,
            ca_file=str(narrow.ca_file),
        )

        await asyncio.gather(*(provider.send(make_push()) for _ in range(200)))

        assert len(narrow.requests) == 200
        # h2 on the stand-in would have refused an 11th stream with a protocol error.
        assert narrow.protocol_errors == 0
        assert narrow.peak_concurrent_streams <= 10
        assert narrow.connections_opened == 1


# -- deadlines and cancellation ---------------------------------------------------------


async def test_unanswered_request_times_out_as_transient(
    apns: ApnsStandIn, make_provider: MakeProvider
) -> None:
    provider = make_provider(request_timeout=0.3)
    token = new_token()
    apns.hang(token)

    started = time.monotonic()
    error = await failure(provider, make_push(token))

    assert (error.category, error.reason) == (ErrorCategory.TRANSIENT, "timeout")
    assert 0.25 <= time.monotonic() - started < 2.0
    await eventually(lambda: apns.resets_received == 1)


async def test_hung_requests_free_their_slots(tmp_path: Path, make_provider: MakeProvider) -> None:
    async with ApnsStandIn(tmp_path / "narrow", max_concurrent_streams=10) as narrow:
        provider = make_provider(
            key_pem=narrow.key_pem,
            key_id=narrow.key_id,
            team_id=narrow.team_id,
            endpoint=narrow.endpoint,
            ca_file=str(narrow.ca_file),
            request_timeout=0.5,
        )
        hanging = new_token()
        narrow.hang(hanging)

        hung = await asyncio.gather(
            *(provider.send(make_push(hanging)) for _ in range(50)), return_exceptions=True
        )
        await asyncio.gather(*(provider.send(make_push()) for _ in range(30)))

        assert all(isinstance(e, DeliveryError) and e.reason == "timeout" for e in hung), hung
        assert narrow.connections_opened == 1
        assert narrow.protocol_errors == 0


async def test_hung_requests_do_not_hold_up_other_pushes(
    apns: ApnsStandIn, make_provider: MakeProvider
) -> None:
    provider = make_provider(request_timeout=1.0)
    hanging = new_token()
    apns.hang(hanging)
    hung = [asyncio.create_task(provider.send(make_push(hanging))) for _ in range(50)]
    await apns.wait_for_requests(50)

    started = time.monotonic()
    await asyncio.gather(*(provider.send(make_push()) for _ in range(20)))

    assert time.monotonic() - started < 0.5
    assert not any(task.done() for task in hung)
    errors = await asyncio.gather(*hung, return_exceptions=True)
    assert all(isinstance(e, DeliveryError) and e.reason == "timeout" for e in errors)
    await eventually(lambda: apns.resets_received == 50)


async def test_cancelled_send_leaves_the_connection_usable(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    hanging = new_token()
    apns.hang(hanging)
    task = asyncio.create_task(provider.send(make_push(hanging)))
    await apns.wait_for_requests(1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await provider.send(make_push())

    assert apns.connections_opened == 1
    assert apns.requests[-1].status == 200
    await eventually(lambda: apns.resets_received == 1)


async def test_idle_connection_is_pinged_not_closed(
    apns: ApnsStandIn, make_provider: MakeProvider
) -> None:
    provider = make_provider(idle_ping_interval=0.1)
    await provider.send(make_push())

    await eventually(lambda: apns.pings_received >= 2)
    await provider.send(make_push())

    assert apns.connections_opened == 1


# -- losing the connection --------------------------------------------------------------


async def test_goaway_fails_unanswered_streams_as_transient_then_recovers(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    apns.goaway_after(1)

    results = await asyncio.gather(
        *(provider.send(make_push()) for _ in range(3)), return_exceptions=True
    )

    assert results.count(None) == 1
    errors = [r for r in results if r is not None]
    assert all(isinstance(e, DeliveryError) and e.reason == "goaway" for e in errors), errors
    assert all(
        isinstance(e, DeliveryError) and e.category is ErrorCategory.TRANSIENT for e in errors
    )
    apns.goaway_after(None)
    await provider.send(make_push())
    assert apns.connections_opened == 2


async def test_server_restart_is_transient_then_recovers(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    hanging = new_token()
    apns.hang(hanging)
    in_flight = asyncio.create_task(provider.send(make_push(hanging)))
    await apns.wait_for_requests(1)
    port = apns.port

    await apns.stop()
    lost = await asyncio.gather(in_flight, return_exceptions=True)
    while_down = await failure(provider, make_push())
    await apns.start(port=port)
    await deliver_with_retries(provider, make_push())

    assert isinstance(lost[0], DeliveryError)
    assert lost[0].category is ErrorCategory.TRANSIENT
    assert (while_down.category, while_down.reason) == (ErrorCategory.TRANSIENT, "connect_failed")
    assert apns.connections_opened == 2


async def test_aclose_abandons_in_flight_and_refuses_new_sends(
    apns: ApnsStandIn, provider: ApnsProvider
) -> None:
    hanging = new_token()
    apns.hang(hanging)
    in_flight = asyncio.create_task(provider.send(make_push(hanging)))
    await apns.wait_for_requests(1)

    await provider.aclose()

    error = (await asyncio.gather(in_flight, return_exceptions=True))[0]
    assert isinstance(error, DeliveryError)
    assert error.category is ErrorCategory.TRANSIENT
    assert (await failure(provider, make_push())).reason == "provider_closed"
    await eventually(lambda: apns.goaways_received == 1)
