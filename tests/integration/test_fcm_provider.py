"""FcmProvider against the FCM stand-in, over real TLS on loopback."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from structlog.testing import capture_logs

from tests.standins.fcm import FcmStandIn, ReplySpec, invalid_argument
from tests.standins.tlsca import TestCA
from xmpp_push.core.dispatch import Dispatcher, RetryPolicy
from xmpp_push.core.model import Content, Device, Priority, Push, Service
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory, Outcome
from xmpp_push.providers.fcm import FcmProvider

TOKEN = "cHVzaC10b2tlbi0x:APA91bHunMIBhDk1xyz"


def make_push(token: str = TOKEN, **options: Any) -> Push:
    return Push(Device(Service.FCM, token), **options)


def make_provider(fcm: FcmStandIn, **options: Any) -> FcmProvider:
    settings: dict[str, Any] = {
        "service_account_file": str(fcm.service_account_file),
        "endpoint": fcm.endpoint,
        "ca_file": str(fcm.ca_file),
        "request_timeout": 2.0,
    }
    settings.update(options)
    return FcmProvider(**settings)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def rewritten_service_account(fcm: FcmStandIn, path: Path, **changes: str) -> str:
    info = json.loads(fcm.service_account_file.read_text())
    info.update(changes)
    path.write_text(json.dumps(info))
    return str(path)


def _fresh_private_key() -> str:
    """A key the stand-in has never seen, PEM as in a service-account file."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
async def provider(fcm: FcmStandIn) -> AsyncIterator[FcmProvider]:
    provider = make_provider(fcm)
    yield provider
    await provider.aclose()


async def failure_of(provider: FcmProvider, push: Push) -> DeliveryError:
    with pytest.raises(DeliveryError) as caught:
        await provider.send(push)
    return caught.value


# --- delivery ---------------------------------------------------------------------------


async def test_alert_push_is_delivered_with_high_priority_ttl_and_notification(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    push = make_push(content=Content(message_count=2, sender="Alice", body="hi"), ttl=3600)

    await provider.send(push)

    [request] = fcm.requests
    assert request.status == 200
    assert request.project == "xmpp-push-test"
    assert request.headers["Authorization"].startswith("Bearer ya29.")
    assert request.message == {
        "token": TOKEN,
        "android": {
            "priority": "HIGH",
            "ttl": "3600s",
            "notification": {
                "title": "Alice",
                "body": "hi",
                "sound": "default",
                "notification_count": 2,
            },
        },
        "data": {"message-count": "2", "last-message-sender": "Alice", "last-message-body": "hi"},
    }


async def test_normal_priority_push_is_delivered_as_normal(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    await provider.send(make_push(priority=Priority.NORMAL))

    [request] = fcm.requests
    assert request.status == 200
    assert request.message is not None
    assert request.message["android"] == {
        "priority": "NORMAL",
        "ttl": "86400s",
        "notification": {"body": "New message", "sound": "default"},
    }


async def test_silent_push_is_delivered_data_only(fcm: FcmStandIn, provider: FcmProvider) -> None:
    await provider.send(make_push(content=Content(message_count=1), silent=True))

    [request] = fcm.requests
    assert request.status == 200
    assert request.message == {
        "token": TOKEN,
        "android": {"priority": "HIGH", "ttl": "86400s"},
        "data": {"message-count": "1"},
    }


async def test_a_push_with_a_huge_body_is_shortened_and_accepted(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    await provider.send(make_push(content=Content(sender="Alice", body="ä" * 20_000)))

    [request] = fcm.requests
    assert request.status == 200
    assert int(request.headers["Content-Length"]) <= 4096


# --- the access token -------------------------------------------------------------------


async def test_one_access_token_is_fetched_for_a_burst_of_concurrent_sends(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    fcm.token_delay = 0.1  # so that every send arrives while the first refresh is running

    await asyncio.gather(*(provider.send(make_push(f"{TOKEN}-{n:03d}")) for n in range(100)))

    assert fcm.token_requests == 1
    assert len(fcm.requests) == 100
    assert {request.status for request in fcm.requests} == {200}
    assert len({request.headers["Authorization"] for request in fcm.requests}) == 1


async def test_the_token_refresh_does_not_block_the_event_loop(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    fcm.token_delay = 0.4
    loop = asyncio.get_running_loop()
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    try:
        await provider.send(make_push())
    finally:
        ticking.cancel()

    assert fcm.token_requests == 1
    assert len(ticks) >= 20
    longest_gap = max(later - earlier for earlier, later in itertools.pairwise(ticks))
    assert longest_gap < 0.15


async def test_a_revoked_access_token_is_refreshed_and_the_send_retried_once(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    await provider.send(make_push())
    fcm.expire_access_tokens()

    await provider.send(make_push())

    assert fcm.token_requests == 2
    assert [request.status for request in fcm.requests] == [200, 401, 200]
    assert fcm.requests[1].headers["Authorization"] != fcm.requests[2].headers["Authorization"]


async def test_a_burst_of_401s_makes_one_refresh(fcm: FcmStandIn, provider: FcmProvider) -> None:
    await provider.send(make_push())
    fcm.expire_access_tokens()

    await asyncio.gather(*(provider.send(make_push(f"{TOKEN}-{n:02d}")) for n in range(20)))

    assert fcm.token_requests == 2
    assert sum(request.status == 200 for request in fcm.requests) == 21


async def test_a_401_that_survives_the_refresh_is_misconfiguration(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    fcm.respond(TOKEN, "UNAUTHENTICATED")

    error = await failure_of(provider, make_push())

    assert error.category is ErrorCategory.MISCONFIGURED
    assert error.reason == "UNAUTHENTICATED"
    assert fcm.token_requests == 2
    assert [request.status for request in fcm.requests] == [401, 401]


async def test_a_key_the_token_endpoint_refuses_is_misconfiguration(
    fcm: FcmStandIn, tmp_path: Path
) -> None:
    account = rewritten_service_account(
        fcm, tmp_path / "wrong-key.json", private_key=_fresh_private_key()
    )
    provider = make_provider(fcm, service_account_file=account)

    try:
        error = await failure_of(provider, make_push())
    finally:
        await provider.aclose()

    assert error.category is ErrorCategory.MISCONFIGURED
    assert error.reason == "invalid_grant"
    assert fcm.token_requests == 1
    assert fcm.requests == []


async def test_sends_queued_behind_a_failed_refresh_share_its_failure(
    fcm: FcmStandIn, tmp_path: Path
) -> None:
    account = rewritten_service_account(
        fcm, tmp_path / "wrong-key.json", private_key=_fresh_private_key()
    )
    provider = make_provider(fcm, service_account_file=account)
    fcm.token_delay = 0.1  # so that all of them queue behind the first refresh

    try:
        results = await asyncio.gather(
            *(provider.send(make_push(f"{TOKEN}-{n:02d}")) for n in range(20)),
            return_exceptions=True,
        )
        fcm.token_delay = 0.0
        later = await failure_of(provider, make_push())
    finally:
        await provider.aclose()

    assert all(
        isinstance(result, DeliveryError) and result.category is ErrorCategory.MISCONFIGURED
        for result in results
    )
    assert fcm.token_requests == 2, "one for the burst, one for the send after it"
    assert later.reason == "invalid_grant"


async def test_an_unreachable_token_endpoint_is_transient(fcm: FcmStandIn, tmp_path: Path) -> None:
    token_uri = f"https://127.0.0.1:{closed_port()}/token"
    account = rewritten_service_account(fcm, tmp_path / "no-oauth.json", token_uri=token_uri)
    provider = make_provider(fcm, service_account_file=account)

    try:
        error = await failure_of(provider, make_push())
    finally:
        await provider.aclose()

    assert error.category is ErrorCategory.TRANSIENT
    assert error.reason == "token_endpoint_unreachable"


# --- FCM's errors -----------------------------------------------------------------------

BAD_TTL = invalid_argument(
    "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), "
    "Field 'ttl', Illegal duration format; duration must end with 's'",
    field="message.android.ttl",
    fcm_error=False,
)
BAD_TOKEN_VALUE = invalid_argument(
    "Invalid value at 'message.token' (TYPE_STRING), 5", field="message.token", fcm_error=False
)

# answer, Retry-After it carries, category, reason, HTTP status, retry_after expected
ERROR_ROWS: list[Any] = [
    pytest.param("UNREGISTERED", None, ErrorCategory.TOKEN_DEAD, "UNREGISTERED", 404, None),
    pytest.param(
        "INVALID_ARGUMENT", None, ErrorCategory.TOKEN_REFUSED, "INVALID_ARGUMENT", 400, None
    ),
    pytest.param(
        BAD_TOKEN_VALUE,
        None,
        ErrorCategory.TOKEN_REFUSED,
        "INVALID_ARGUMENT",
        400,
        None,
        id="field-violation-on-token",
    ),
    pytest.param(
        BAD_TTL, None, ErrorCategory.MISCONFIGURED, "INVALID_ARGUMENT", 400, None, id="bad-ttl"
    ),
    pytest.param(
        invalid_argument("Android message is too big", field="message"),
        None,
        ErrorCategory.MISCONFIGURED,
        "INVALID_ARGUMENT",
        400,
        None,
        id="too-big",
    ),
    pytest.param(
        "SENDER_ID_MISMATCH", None, ErrorCategory.TOKEN_REFUSED, "SENDER_ID_MISMATCH", 403, None
    ),
    pytest.param(
        "THIRD_PARTY_AUTH_ERROR",
        None,
        ErrorCategory.MISCONFIGURED,
        "THIRD_PARTY_AUTH_ERROR",
        401,
        None,
    ),
    pytest.param(
        "PERMISSION_DENIED", None, ErrorCategory.MISCONFIGURED, "PERMISSION_DENIED", 403, None
    ),
    pytest.param("NOT_FOUND", None, ErrorCategory.MISCONFIGURED, "NOT_FOUND", 404, None),
    pytest.param("QUOTA_EXCEEDED", None, ErrorCategory.TRANSIENT, "QUOTA_EXCEEDED", 429, 60.0),
    pytest.param("RESOURCE_EXHAUSTED", 5, ErrorCategory.TRANSIENT, "RESOURCE_EXHAUSTED", 429, 5.0),
    pytest.param("UNAVAILABLE", 3, ErrorCategory.TRANSIENT, "UNAVAILABLE", 503, 3.0),
    pytest.param("INTERNAL", None, ErrorCategory.TRANSIENT, "INTERNAL", 500, None),
    pytest.param(
        "UNSPECIFIED_ERROR", None, ErrorCategory.TRANSIENT, "UNSPECIFIED_ERROR", 500, None
    ),
    pytest.param(502, None, ErrorCategory.TRANSIENT, "HTTP 502", 502, None, id="proxy-502"),
    pytest.param(413, None, ErrorCategory.MISCONFIGURED, "HTTP 413", 413, None, id="proxy-413"),
]


@pytest.mark.parametrize(
    ("answer", "retry_after", "category", "reason", "status", "expected_retry_after"),
    ERROR_ROWS,
)
async def test_each_fcm_error_maps_to_its_category(
    fcm: FcmStandIn,
    provider: FcmProvider,
    answer: ReplySpec,
    retry_after: float | str | None,
    category: ErrorCategory,
    reason: str,
    status: int,
    expected_retry_after: object,
) -> None:
    fcm.respond(TOKEN, answer, retry_after=retry_after)

    error = await failure_of(provider, make_push())

    assert (error.category, error.reason, error.status) == (category, reason, status)
    assert error.retry_after == expected_retry_after
    # no refresh-and-retry for anything but our own expired credentials
    assert fcm.token_requests == 1
    assert len(fcm.requests) == 1


async def test_retry_after_may_be_an_http_date(fcm: FcmStandIn, provider: FcmProvider) -> None:
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    fcm.respond(TOKEN, "UNAVAILABLE", retry_after=in_a_minute)

    error = await failure_of(provider, make_push())

    assert error.category is ErrorCategory.TRANSIENT
    assert error.retry_after == pytest.approx(60, abs=2)


async def test_another_project_is_permission_denied(fcm: FcmStandIn) -> None:
    provider = make_provider(fcm, project_id="someone-else")

    try:
        error = await failure_of(provider, make_push())
    finally:
        await provider.aclose()

    assert (error.category, error.reason, error.status) == (
        ErrorCategory.MISCONFIGURED,
        "PERMISSION_DENIED",
        403,
    )
    assert fcm.requests[0].project == "someone-else"


async def test_errors_are_per_token_and_sequences_run_out(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    fcm.respond_sequence(TOKEN, ["UNAVAILABLE", "OK"])

    first = await failure_of(provider, make_push())
    await provider.send(make_push())
    await provider.send(make_push(f"{TOKEN}-other"))

    assert first.category is ErrorCategory.TRANSIENT
    assert [request.status for request in fcm.requests] == [503, 200, 200]


async def test_a_hanging_request_times_out_as_transient(fcm: FcmStandIn) -> None:
    fcm.hang(TOKEN)
    provider = make_provider(fcm, request_timeout=0.3)
    await provider.send(make_push(f"{TOKEN}-warm"))  # keep the token fetch out of the timing

    started = time.monotonic()
    try:
        error = await failure_of(provider, make_push())
    finally:
        await provider.aclose()

    assert (error.category, error.reason) == (ErrorCategory.TRANSIENT, "timeout")
    assert time.monotonic() - started < 1.5
    await fcm.wait_for_requests(2)


async def test_an_unreachable_fcm_endpoint_is_transient(fcm: FcmStandIn) -> None:
    provider = make_provider(fcm, endpoint=f"https://127.0.0.1:{closed_port()}")

    try:
        error = await failure_of(provider, make_push())
    finally:
        await provider.aclose()

    assert (error.category, error.reason) == (ErrorCategory.TRANSIENT, "connection_error")


async def test_a_closed_provider_refuses_to_send(provider: FcmProvider) -> None:
    await provider.aclose()

    error = await failure_of(provider, make_push())

    assert (error.category, error.reason) == (ErrorCategory.TRANSIENT, "provider_closed")


# --- HTTP/2 -----------------------------------------------------------------------------


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        # The stand-in's counters have no event to wait on; polling them is simplest.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_a_send_is_an_http2_post_with_the_v1_pseudo_headers(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    await provider.send(make_push())

    [request] = fcm.requests
    assert request.http_version == "2"
    assert request.pseudo_headers == {
        ":method": "POST",
        ":scheme": "https",
        ":authority": f"127.0.0.1:{fcm.port}",
        ":path": "/v1/projects/xmpp-push-test/messages:send",
    }
    assert request.headers["content-type"] == "application/json; charset=UTF-8"
    assert request.headers["authorization"].startswith("Bearer ya29.standin-")
    assert request.message is not None
    body = json.dumps({"message": request.message}, ensure_ascii=False, separators=(",", ":"))
    assert int(request.headers["content-length"]) == len(body.encode())


async def test_concurrent_sends_share_one_connection_within_its_stream_limit(
    fcm: FcmStandIn,
) -> None:
    provider = make_provider(fcm, connections=1)
    try:
        await asyncio.gather(*(provider.send(make_push(f"{TOKEN}-{n:03d}")) for n in range(300)))
    finally:
        await provider.aclose()

    assert [request.status for request in fcm.requests] == [200] * 300
    assert fcm.connections_opened == 1
    assert {request.connection_id for request in fcm.requests} == {1}
    assert 1 < fcm.peak_concurrent_streams <= fcm.max_concurrent_streams == 100


async def test_by_default_two_connections_carry_the_sends(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    await asyncio.gather(*(provider.send(make_push(f"{TOKEN}-{n:03d}")) for n in range(50)))
    await asyncio.gather(*(provider.send(make_push(f"{TOKEN}-{n:03d}")) for n in range(50)))

    assert fcm.connections_opened == 2
    assert {request.connection_id for request in fcm.requests} == {1, 2}


async def test_the_endpoint_may_end_in_a_slash(fcm: FcmStandIn) -> None:
    provider = make_provider(fcm, endpoint=fcm.endpoint + "/")
    try:
        await provider.send(make_push())
    finally:
        await provider.aclose()

    assert fcm.requests[0].pseudo_headers[":path"] == "/v1/projects/xmpp-push-test/messages:send"


async def test_the_401_refresh_retries_on_the_same_connection(fcm: FcmStandIn) -> None:
    provider = make_provider(fcm, connections=1)
    try:
        await provider.send(make_push())
        fcm.expire_access_tokens()
        await provider.send(make_push())
    finally:
        await provider.aclose()

    assert [request.status for request in fcm.requests] == [200, 401, 200]
    assert fcm.token_requests == 2
    assert {(r.http_version, r.connection_id) for r in fcm.requests} == {("2", 1)}
    assert fcm.requests[1].headers["Authorization"] != fcm.requests[2].headers["Authorization"]


async def test_a_timed_out_send_resets_its_stream_and_keeps_the_connection(
    fcm: FcmStandIn,
) -> None:
    fcm.hang(TOKEN)
    provider = make_provider(fcm, request_timeout=0.3, connections=1)
    try:
        await provider.send(make_push(f"{TOKEN}-warm"))
        error = await failure_of(provider, make_push())
        await provider.send(make_push(f"{TOKEN}-after"))
    finally:
        await provider.aclose()

    assert (error.category, error.reason) == (ErrorCategory.TRANSIENT, "timeout")
    assert [request.status for request in fcm.requests] == [200, None, 200]
    assert fcm.connections_opened == 1
    await eventually(lambda: fcm.resets_received == 1)


async def test_a_goaway_fails_unprocessed_sends_as_transient_then_recovers(
    fcm: FcmStandIn,
) -> None:
    provider = make_provider(fcm, connections=1)
    try:
        await provider.send(make_push(f"{TOKEN}-warm"))  # token and connection ready
        fcm.goaway_after(1)

        results = await asyncio.gather(
            *(provider.send(make_push(f"{TOKEN}-{n}")) for n in range(3)), return_exceptions=True
        )
        fcm.goaway_after(None)
        await provider.send(make_push(f"{TOKEN}-later"))
    finally:
        await provider.aclose()

    assert results.count(None) == 1
    errors = [result for result in results if result is not None]
    assert all(
        isinstance(error, DeliveryError)
        and (error.category, error.reason) == (ErrorCategory.TRANSIENT, "goaway")
        for error in errors
    ), errors
    # The dropped sends never reached FCM's logic: nothing recorded for them.
    assert [request.status for request in fcm.requests] == [200, 200, 200]
    assert fcm.connections_opened == 2


async def test_a_connection_lost_mid_flight_is_transient_then_recovers(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    fcm.hang(TOKEN)
    in_flight = asyncio.create_task(provider.send(make_push()))
    await fcm.wait_for_requests(1)

    await fcm.drop_connections()
    [lost] = await asyncio.gather(in_flight, return_exceptions=True)
    fcm.reset(TOKEN)
    await provider.send(make_push())

    assert isinstance(lost, DeliveryError)
    assert (lost.category, lost.reason) == (ErrorCategory.TRANSIENT, "connection_lost")
    assert fcm.connections_opened == 2
    assert fcm.requests[-1].status == 200


async def test_a_send_waiting_for_a_full_socket_fails_at_once_when_the_connection_dies(
    fcm: FcmStandIn, tmp_path: Path
) -> None:
    provider = FcmProvider(
        service_account_file=str(fcm.service_account_file),
        endpoint=fcm.endpoint,
        ca_file=str(fcm.ca_file),
        request_timeout=10.0,
        connections=1,
    )
    await provider.send(make_push())
    [connection] = [c for c in provider._pool._slots if c is not None]
    connection.pause_writing()  # what asyncio does when the socket's buffer is full
    waiting = asyncio.create_task(provider.send(make_push()))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await fcm.drop_connections()
    [lost] = await asyncio.gather(waiting, return_exceptions=True)
    await provider.aclose()

    assert isinstance(lost, DeliveryError)
    assert (lost.category, lost.reason) == (ErrorCategory.TRANSIENT, "connection_lost")
    assert time.monotonic() - started < 2.0, "not after its 10 s deadline"


async def test_sends_lost_to_goaways_are_retried_and_delivered_never_dropped(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    dispatcher = Dispatcher({Service.FCM: provider}, RetryPolicy(initial_delay=0.01))
    await provider.send(make_push(f"{TOKEN}-warm"))
    fcm.goaway_after(1)  # every connection: one answer, then GOAWAY

    now = time.time()
    results = await asyncio.gather(
        *(dispatcher.deliver(make_push(f"{TOKEN}-{n}", created_at=now)) for n in range(4))
    )

    assert [result.outcome for result in results] == [Outcome.DELIVERED] * 4
    assert fcm.connections_opened >= 4


async def test_an_untrusted_fcm_certificate_is_misconfiguration(
    fcm: FcmStandIn, tmp_path: Path
) -> None:
    async with FcmStandIn(tmp_path / "other-ca") as elsewhere:
        # Token from `fcm` (its CA trusted), sends to a server whose CA is not.
        provider = make_provider(fcm, endpoint=elsewhere.endpoint)
        try:
            error = await failure_of(provider, make_push())
        finally:
            await provider.aclose()

    assert (error.category, error.reason) == (ErrorCategory.MISCONFIGURED, "tls_certificate")
    assert elsewhere.requests == []


async def test_an_endpoint_without_http2_is_misconfiguration(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    http1_only = ca.issue("http1").server_context(alpn=["http/1.1"])
    server = await asyncio.get_running_loop().create_server(
        asyncio.Protocol, "127.0.0.1", 0, ssl=http1_only
    )
    async with server, FcmStandIn(tmp_path / "fcm", ca=ca) as fcm:
        port = server.sockets[0].getsockname()[1]
        provider = make_provider(fcm, endpoint=f"https://127.0.0.1:{port}")
        try:
            error = await failure_of(provider, make_push())
        finally:
            await provider.aclose()

    assert (error.category, error.reason) == (ErrorCategory.MISCONFIGURED, "no_http2")


async def test_the_standin_still_answers_http1_clients(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    await provider.send(make_push())  # for an access token
    authorization = fcm.requests[0].headers["Authorization"]
    url = f"{fcm.endpoint}/v1/projects/{fcm.project_id}/messages:send"

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url,
            json={"message": {"token": TOKEN}},
            headers={"Authorization": authorization},
            ssl=_trusting(fcm),
        ) as response,
    ):
        body = await response.json()

    assert response.status == 200
    assert body["name"].startswith("projects/xmpp-push-test/messages/")
    assert (fcm.requests[-1].http_version, fcm.requests[-1].connection_id) == ("1.1", 0)


# --- logs -------------------------------------------------------------------------------


async def test_logs_show_neither_the_full_token_nor_the_access_token(
    fcm: FcmStandIn, provider: FcmProvider
) -> None:
    fcm.respond(TOKEN, "UNREGISTERED")

    with capture_logs() as logs:
        await failure_of(provider, make_push())

    [failure] = [entry for entry in logs if entry["event"] == "fcm.send_failed"]
    assert failure["token"] == "cHVz…1xyz"
    assert failure["category"] == "token_dead"
    access_token = fcm.requests[0].headers["Authorization"].removeprefix("Bearer ")
    everything = repr(logs)
    assert TOKEN not in everything
    assert access_token not in everything


# --- the stand-in is as strict as FCM ---------------------------------------------------


async def test_standin_refuses_what_fcm_refuses(fcm: FcmStandIn, provider: FcmProvider) -> None:
    await provider.send(make_push())  # for an access token
    authorization = fcm.requests[0].headers["Authorization"]
    url = f"{fcm.endpoint}/v1/projects/{fcm.project_id}/messages:send"
    bad_messages: list[dict[str, object]] = [
        {"token": TOKEN, "data": {"count": 1}},
        {"token": TOKEN, "data": {"google.sent_time": "1"}},
        {"token": TOKEN, "android": {"priority": "URGENT"}},
        {"token": TOKEN, "android": {"ttl": "86400"}},
        {"token": TOKEN, "topic": "news"},
        {"token": TOKEN, "data": {"blob": "x" * 5000}},
        {"token": "not a token!"},
    ]

    async with aiohttp.ClientSession() as session:
        for message in bad_messages:
            async with session.post(
                url,
                json={"message": message},
                headers={"Authorization": authorization},
                ssl=_trusting(fcm),
            ) as response:
                body = await response.json()
            assert response.status == 400, message
            assert body["error"]["status"] == "INVALID_ARGUMENT", message


def _trusting(fcm: FcmStandIn) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(fcm.ca_file))


async def test_standin_command_line_prints_where_it_listens(tmp_path: Path) -> None:
    repository = Path(__file__).resolve().parents[2]  # noqa: ASYNC240 (no I/O: path arithmetic)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.standins.fcm",
        "--port",
        "0",
        "--dir",
        str(tmp_path / "cli"),
        stdout=asyncio.subprocess.PIPE,
        cwd=repository,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        ready = json.loads(line)
        assert ready["project_id"] == "xmpp-push-test"
        assert ready["service_account_file"] == str(tmp_path / "cli" / "service-account.json")
        assert ready["port"] > 0
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) == 0
