"""Real XMPP servers for integration tests, and what tests share about them.

Prosody lives in `xmpp_push.devtools.prosody` (the demo uses it too); ejabberd is
test-only and lives in `tests.servers.ejabberd`. Both speak plain TCP on free
loopback ports, host `localhost` and a component `push.localhost`, and carry the
same accounts (USERS) when started through the fixtures in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Protocol, TypeVar

import pytest

from xmpp_push.devtools import find_binary

__all__ = [
    "COMPONENT_JID",
    "DOMAIN",
    "USERS",
    "XmppServer",
    "require_server",
    "started_with_users",
]

DOMAIN = "localhost"
COMPONENT_JID = "push.localhost"
"""The push component's JID on both servers, so a test can be parametrized over them."""

USERS: dict[str, str] = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
"""Accounts the fixtures register, with their passwords."""


class _Options(Protocol):
    @property
    def domain(self) -> str: ...
    @property
    def component_jid(self) -> str: ...
    @property
    def component_secret(self) -> str: ...


class XmppServer(Protocol):
    """What Prosody and Ejabberd have in common, for tests that run against both."""

    c2s_port: int
    component_port: int

    @property
    def host(self) -> str: ...
    @property
    def options(self) -> _Options: ...
    def jid(self, user: str) -> str: ...
    def register(self, user: str, password: str) -> None: ...
    def log_text(self) -> str: ...
    def log_tail(self, lines: int = 40) -> str: ...


class _Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def register(self, user: str, password: str) -> None: ...


StartableT = TypeVar("StartableT", bound=_Startable)


@contextlib.contextmanager
def started_with_users(server: StartableT) -> Iterator[StartableT]:
    """Start `server`, register the accounts in USERS, and stop it after."""
    try:
        server.start()
        for user, password in USERS.items():
            server.register(user, password)
        yield server
    finally:
        server.stop()


def require_server(program: str, install_hint: str) -> None:
    """Skip the test when `program` is missing on a developer's machine; fail in CI
    (`CI` set), where a missing server is a broken setup, not a reason to skip."""
    if find_binary(program) is not None:
        return
    reason = f"`{program}` is not installed: run ./scripts/bootstrap (installs {install_hint})"
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)
