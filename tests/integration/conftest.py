"""Servers only the integration tests need, on top of those in tests/conftest.py.

| fixture | scope | gives |
|---|---|---|
| `ejabberd_delegation_server` | session | ejabberd whose mod_delegation hands |
| | | `urn:xmpp:push:0` to `push.localhost` (XEP-0355, `urn:xmpp:delegation:1`); |
| | | the accounts in `tests.servers.USERS` |
| `apns` | function | the APNs stand-in, listening, its files in `tmp_path / "apns"` |
| `fcm` | function | the FCM stand-in, listening, its files in `tmp_path / "fcm"` |

Booted once per run (ejabberd takes seconds to start). Every test that connects a
component gets the delegation anew: ejabberd drops it when a component leaves and
grants it again on the next connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.servers import COMPONENT_JID, DOMAIN, require_server, started_with_users
from tests.servers.ejabberd import Ejabberd, EjabberdOptions
from tests.standins.apns import ApnsStandIn
from tests.standins.fcm import FcmStandIn


@pytest.fixture(scope="session")
def ejabberd_delegation_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ejabberd]:
    require_server("ejabberdctl", "ejabberd")
    server = Ejabberd(
        tmp_path_factory.mktemp("ejabberd-delegation"),
        EjabberdOptions(
            domain=DOMAIN,
            component_jid=COMPONENT_JID,
            component_secret="s3cret-ed",
            delegation=True,
        ),
    )
    with started_with_users(server):
        yield server


@pytest.fixture
async def apns(tmp_path: Path) -> AsyncIterator[ApnsStandIn]:
    async with ApnsStandIn(tmp_path / "apns") as stand_in:
        yield stand_in


@pytest.fixture
async def fcm(tmp_path: Path) -> AsyncIterator[FcmStandIn]:
    async with FcmStandIn(tmp_path / "fcm") as stand_in:
        yield stand_in
