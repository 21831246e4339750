"""Logs: JSON lines off a terminal, tokens and secrets never in full."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from xmpp_push.core.model import Content, Device, Push, Service
from xmpp_push.logs import configure_logging, redact_secrets
from xmpp_push.providers.log import LogProvider

TOKEN = "a1b2c3d4" * 8


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_pushes_are_logged_as_json_with_the_token_redacted() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)  # a StringIO is not a terminal
    push = Push(Device(Service.APNS, TOKEN), Content(body="hi"), created_at=1.0)
    await LogProvider("apns").send(push)
    [entry] = lines(stream)
    assert entry["event"] == "push_logged"
    assert entry["level"] == "info"
    assert "timestamp" in entry
    assert entry["token"] == "a1b2…c3d4"
    assert TOKEN not in stream.getvalue()


def test_sensitive_keys_are_redacted_whoever_logs_them() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    structlog.get_logger("anywhere").info(
        "oops", secret="hunter2-hunter2", device_id=TOKEN, authorization="bearer eyJhbGciOi"
    )
    text = stream.getvalue()
    assert "hunter2-hunter2" not in text
    assert TOKEN not in text
    assert "eyJhbGciOi" not in text


def test_standard_library_logging_goes_to_the_same_json_stream() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    logging.getLogger("aiohttp.client").warning("something from a library")
    [entry] = lines(stream)
    assert entry["event"] == "something from a library"
    assert entry["logger"] == "aiohttp.client"


def test_level_filters() -> None:
    stream = io.StringIO()
    configure_logging("warning", "json", stream=stream)
    log = structlog.get_logger("x")
    log.info("quiet")
    log.warning("loud")
    assert [entry["event"] for entry in lines(stream)] == ["loud"]


def test_console_format_is_readable() -> None:
    stream = io.StringIO()
    configure_logging("info", "console", stream=stream)
    structlog.get_logger("x").info("connected", jid="push.example.org")
    assert "connected" in stream.getvalue()
    assert "jid=push.example.org" in stream.getvalue()


def test_tokens_are_shortened_and_secrets_hidden_entirely() -> None:
    event = {
        "token": "a1b2…c3d4",  # already redacted: left alone
        "node": "0123456789abcdef0123",  # may be a token (component.default_service)
        "secret": "correct-horse-battery",
        "jid": "alice@example.org",
    }
    assert redact_secrets(None, "info", event) == {
        "token": "a1b2…c3d4",
        "node": "0123…0123",
        "secret": "…",
        "jid": "alice@example.org",
    }
