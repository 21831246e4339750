"""Reading a Retry-After field (RFC 9110 §10.2.3), as APNs and FCM both send it."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmpp_push.providers._http import parse_retry_after

NOW = 784_111_717.0
"""Sun, 06 Nov 1994 08:48:37 GMT: one minute before the dates RFC 9110 uses as examples."""


@pytest.fixture
def local_time_is_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A machine whose local time is UTC-5 (or UTC-4), so that reading a GMT date as
    local time would be off by hours."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_delay_seconds_are_taken_as_they_are() -> None:
    assert parse_retry_after("120", now=NOW) == 120.0


def test_zero_delay_seconds_mean_now() -> None:
    assert parse_retry_after("0", now=NOW) == 0.0


def test_the_raw_header_bytes_are_read_too() -> None:
    assert parse_retry_after(b"30", now=NOW) == 30.0


def test_whitespace_around_the_value_is_ignored() -> None:
    assert parse_retry_after(" 30\t", now=NOW) == 30.0


@pytest.mark.parametrize(
    "date",
    [
        pytest.param("Sun, 06 Nov 1994 08:49:37 GMT", id="IMF-fixdate"),
        pytest.param("Sunday, 06-Nov-94 08:49:37 GMT", id="RFC-850"),
        pytest.param("Sun Nov  6 08:49:37 1994", id="asctime"),
    ],
)
def test_every_http_date_form_is_seconds_from_now(date: str) -> None:
    assert parse_retry_after(date, now=NOW) == 60.0


@pytest.mark.usefixtures("local_time_is_not_utc")
@pytest.mark.parametrize(
    "date",
    [
        pytest.param("Sun, 06 Nov 1994 08:49:37 -0000", id="minus-zero-zone"),
        pytest.param("Sun Nov  6 08:49:37 1994", id="asctime"),
    ],
)
def test_a_date_without_a_zone_is_gmt_not_local_time(date: str) -> None:
    assert parse_retry_after(date, now=NOW) == 60.0


@pytest.mark.usefixtures("local_time_is_not_utc")
def test_a_date_from_formatdate_is_read_back_exactly() -> None:
    # email.utils.formatdate writes `-0000` (a date without a zone) unless told usegmt.
    assert parse_retry_after(email.utils.formatdate(NOW + 90), now=NOW) == 90.0


def test_a_date_in_the_past_means_now() -> None:
    assert parse_retry_after("Sat, 05 Nov 1994 08:49:37 GMT", now=NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="absent"),
        pytest.param("", id="empty"),
        pytest.param("  ", id="blank"),
        pytest.param("soon", id="garbage"),
        pytest.param("-5", id="negative"),
        pytest.param("1.5", id="fraction"),
        pytest.param("+5", id="signed"),
        pytest.param("1e3", id="exponent"),
        pytest.param("nan", id="nan"),
        pytest.param("inf", id="infinity"),
        pytest.param("\u0663", id="non-ascii-digit"),
        pytest.param("9" * 400, id="too-many-digits"),
        pytest.param("Sun, 32 Nov 1994 08:49:37 GMT", id="impossible-date"),
    ],
)
def test_a_value_that_is_neither_seconds_nor_a_date_is_no_hint(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_without_now_the_clock_is_read() -> None:
    in_two_minutes = email.utils.formatdate(time.time() + 120, usegmt=True)

    seconds = parse_retry_after(in_two_minutes)

    assert seconds is not None
    assert 118 <= seconds <= 121


@given(st.integers(min_value=0, max_value=10**12))
def test_any_delay_seconds_round_trip(seconds: int) -> None:
    assert parse_retry_after(str(seconds), now=NOW) == float(seconds)


@given(st.one_of(st.text(), st.binary()))
def test_any_input_is_no_hint_or_a_wait_of_zero_or_more(value: str | bytes) -> None:
    seconds = parse_retry_after(value, now=NOW)

    assert seconds is None or seconds >= 0
