"""Fixtures that run real XMPP servers (Prosody 0.12, ejabberd 23.01) on loopback ports.

| fixture | scope | gives |
|---|---|---|
| `prosody_server` | session | a running Prosody, host `localhost`, component `push.localhost` |
| `ejabberd_server` | session | a running ejabberd, host `localhost`, component `push.localhost` |
| `make_prosody` | test | `make_prosody(options=None) -> Prosody`: a fresh, running Prosody |
| | | of the test's own, stopped after it (restart it, change its options) |
| `fresh_prosody` | test | `make_prosody()` with default options |

Every server carries the accounts in `tests.servers.USERS` (alice, bob, carol). Both
session servers use the same component JID so a test can be parametrized over them;
their component secrets are in `server.options.component_secret`. Session servers
are shared: a test that enables push there should use its own node and disable it
when done, and must not restart them.

A missing server binary skips these tests on a developer's machine and fails them
when `CI` is set.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import pytest

from tests.servers import COMPONENT_JID, DOMAIN, require_server, started_with_users
from tests.servers.ejabberd import Ejabberd, EjabberdOptions
from xmpp_push.devtools.prosody import Prosody, ProsodyOptions

PROSODY_PACKAGES = "prosody prosody-modules lua-unbound lua-event lua-sec"
EJABBERD_PACKAGES = "ejabberd"

# How long the session servers took to start, reported once at the end of the run.
_startup_seconds: dict[str, float] = {}


@contextlib.contextmanager
def _session_server(server: Prosody | Ejabberd, label: str) -> Iterator[None]:
    """Start `server` with the accounts, note how long that took, stop it after."""
    began = time.monotonic()
    with started_with_users(server):
        _startup_seconds[label] = time.monotonic() - began
        yield


@pytest.fixture(scope="session")
def prosody_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prosody]:
    require_server("prosody", PROSODY_PACKAGES)
    server = Prosody(
        tmp_path_factory.mktemp("prosody-session"),
        ProsodyOptions(domain=DOMAIN, component_jid=COMPONENT_JID, component_secret="s3cret-p"),
    )
    with _session_server(server, "prosody (incl. 3 accounts)"):
        yield server


@pytest.fixture(scope="session")
def ejabberd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ejabberd]:
    require_server("ejabberdctl", EJABBERD_PACKAGES)
    server = Ejabberd(
        tmp_path_factory.mktemp("ejabberd-session"),
        EjabberdOptions(domain=DOMAIN, component_jid=COMPONENT_JID, component_secret="s3cret-e"),
    )
    with _session_server(server, "ejabberd (incl. 3 accounts)"):
        yield server


@pytest.fixture
def make_prosody(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Prosody]]:
    require_server("prosody", PROSODY_PACKAGES)
    with contextlib.ExitStack() as started:

        def make(options: ProsodyOptions | None = None) -> Prosody:
            server = Prosody(
                tmp_path_factory.mktemp("prosody"),
                options or ProsodyOptions(domain=DOMAIN, component_jid=COMPONENT_JID),
            )
            return started.enter_context(started_with_users(server))

        yield make


@pytest.fixture
def fresh_prosody(make_prosody: Callable[..., Prosody]) -> Prosody:
    return make_prosody()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _startup_seconds:
        times = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in _startup_seconds.items())
        terminalreporter.write_line(f"server start-up: {times}")
