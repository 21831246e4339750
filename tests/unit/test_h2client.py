"""The shared HTTP/2 client's small parts; its connections are exercised against the APNs
and FCM stand-ins (tests/integration/test_apns_provider.py, test_fcm_provider.py)."""

from __future__ import annotations

import ssl

import pytest

from xmpp_push.providers._h2client import Origin, Pool, RequestFailed, Response, tls_context


def test_an_origin_keeps_host_port_and_authority() -> None:
    assert Origin.parse("https://api.push.apple.com", label="APNs endpoint") == Origin(
        host="api.push.apple.com", port=443, authority="api.push.apple.com"
    )
    assert Origin.parse("https://[::1]:8443/", label="x") == Origin(
        host="::1", port=8443, authority="[::1]:8443"
    )


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://fcm.googleapis.com", "must be an https:// URL"),
        ("https://", "must be an https:// URL"),
        ("https://fcm.googleapis.com/v1", "takes no path"),
        ("https://fcm.googleapis.com/?x=1", "takes no path"),
    ],
)
def test_an_origin_that_is_not_one_is_refused_by_its_label(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=f"^FCM endpoint {complaint}"):
        Origin.parse(url, label="FCM endpoint")


def test_a_response_finds_a_header_by_its_lower_case_name() -> None:
    response = Response(
        429, [(b":status", b"429"), (b"retry-after", b"30"), (b"retry-after", b"60")], b""
    )

    assert response.header(b"retry-after") == b"30"
    assert response.header(b"apns-id") is None


def test_request_failed_carries_its_reason_and_cause() -> None:
    refused = ConnectionRefusedError(111, "refused")
    failure = RequestFailed("connect_failed", refused)

    assert (failure.reason, failure.cause, str(failure)) == (
        "connect_failed",
        refused,
        "connect_failed",
    )
    assert RequestFailed("goaway").cause is None


def test_the_tls_context_offers_only_h2_from_tls_1_2() -> None:
    context = tls_context(None)

    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname


def small_pool(origin: Origin, size: int = 1) -> Pool:
    return Pool(
        origin=origin,
        ssl_context=tls_context(None),
        size=size,
        connect_timeout=1.0,
        ping_interval=60.0,
        ping_timeout=1.0,
    )


def test_a_pool_posts_to_its_origin_and_needs_a_connection() -> None:
    origin = Origin.parse("https://fcm.googleapis.com", label="FCM endpoint")

    assert small_pool(origin, size=2).post_headers == (
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"fcm.googleapis.com"),
    )
    with pytest.raises(ValueError, match="at least one connection"):
        small_pool(origin, size=0)


async def test_a_closed_pool_gives_no_connection() -> None:
    pool = small_pool(Origin.parse("https://127.0.0.1:9", label="x"))
    await pool.aclose()

    with pytest.raises(RequestFailed, match="provider_closed"):
        pool.pick()
