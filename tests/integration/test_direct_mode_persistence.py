"""Direct mode with a real database: restarts, several processes, operator overrides.

Real Prosody delegates `urn:xmpp:push:0` to the component; registrations go to real
SQLite or PostgreSQL; operators use the real `xmpp-push` command in its own process;
pushes go to the APNs and FCM stand-ins over TLS.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakeserver import FakeXmppServer
from tests.rig import component_config, running_component
from tests.standins.apns import ApnsStandIn
from tests.standins.fcm import FcmStandIn
from tests.storage.conftest import create_database, drop_database
from xmpp_push.app import Application
from xmpp_push.config import Config
from xmpp_push.core.model import Priority
from xmpp_push.devtools.client import XmppClient
from xmpp_push.devtools.prosody import Prosody, ProsodyOptions

PASSWORD = "pw-direct"
_numbers = itertools.count(1)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    url = create_database(request.param, tmp_path)
    yield url
    drop_database(url)


@pytest.fixture
def postgresql_url(tmp_path: Path) -> Iterator[str]:
    url = create_database("postgresql", tmp_path)
    yield url
    drop_database(url)


@pytest.fixture
def prosody(make_prosody: Callable[..., Prosody]) -> Prosody:
    return make_prosody(ProsodyOptions(delegation=True))


def config_for(
    prosody: Prosody,
    tmp_path: Path,
    url: str,
    apns: ApnsStandIn,
    fcm: FcmStandIn | None = None,
) -> Config:
    return component_config(
        tmp_path,
        jid=prosody.options.component_jid,
        port=prosody.component_port,
        secret=prosody.options.component_secret,
        apns=apns,
        fcm=fcm,
        storage_url=url,
    )


async def cli(config: Config, *args: str) -> tuple[int, str, str]:
    """`xmpp-push ARGS --config FILE` in a process of its own."""
    assert config.source is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMPP_PUSH_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xmpp_push.cli",
        *args,
        "--config",
        str(config.source),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def upgrade(config: Config) -> None:
    code, out, err = await cli(config, "db", "upgrade")
    assert code == 0, err
    assert "0002" in out


async def ids_of(config: Config, user: str) -> dict[str, int]:
    code, out, err = await cli(config, "registrations", "list", "--user", user, "--json")
    assert code == 0, err
    return {row["node"]: row["id"] for row in map(json.loads, out.splitlines())}


def new_user(prosody: Prosody) -> str:
    name = f"direct{next(_numbers)}"
    prosody.register(name, PASSWORD)
    return f"{name}@{prosody.options.domain}"


async def enable(prosody: Prosody, user: str, node: str, fields: dict[str, str]) -> None:
    client = await XmppClient.connect(user, PASSWORD, "127.0.0.1", prosody.c2s_port)
    try:
        await client.enable_push(prosody.options.component_jid, node, fields)
    finally:
        await client.close()


async def granted(app: Application, prosody: Prosody) -> None:
    await app.delegation.wait_until_granted(prosody.options.domain, 10)


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_registrations_survive_a_restart_and_send_test_delivers(
    prosody: Prosody, tmp_path: Path, database_url: str, apns: ApnsStandIn
) -> None:
    config = config_for(prosody, tmp_path, database_url, apns)
    if database_url.startswith("postgresql"):
        # A server database is never migrated behind the operator's back.
        code, _, err = await cli(config, "run")
        assert code == 2
        assert "xmpp-push db upgrade" in err
        await upgrade(config)
    alice = new_user(prosody)
    token = f"{next(_numbers):064x}"
    async with running_component(config) as app:
        await granted(app, prosody)
        await enable(prosody, alice, "phone", {"service": "apns", "device_id": token})
    # A new process's view: the component is down, the row is in the database.
    ids = await ids_of(config, alice)
    assert list(ids) == ["phone"]
    async with running_component(config) as app:
        [registration] = await app.store.for_owner(alice)
        assert (registration.token, registration.resource) == (token, registration.resource)
        code, out, err = await cli(config, "send-test", str(ids["phone"]))
    assert code == 0, err
    assert "delivered" in out
    [request] = apns.requests
    assert request.token == token
    assert request.headers["apns-priority"] == "10"
    assert request.status == 200


async def test_operator_priority_wins_over_re_enable_until_handed_back(
    prosody: Prosody,
    tmp_path: Path,
    postgresql_url: str,
    apns: ApnsStandIn,
    fcm: FcmStandIn,
) -> None:
    config = config_for(prosody, tmp_path, postgresql_url, apns, fcm)
    await upgrade(config)
    alice = new_user(prosody)
    apns_token = f"{next(_numbers):064x}"
    fcm_token = f"fcm{next(_numbers)}:APA91b" + "q" * 30
    devices = {
        "iphone": {"service": "apns", "device_id": apns_token, "priority": "high"},
        "android": {"service": "fcm", "device_id": fcm_token, "priority": "high"},
    }
    async with running_component(config) as app:
        await granted(app, prosody)
        for node, fields in devices.items():
            await enable(prosody, alice, node, fields)
        ids = await ids_of(config, alice)
        assert await app.store.for_owner(alice)  # cached in the component now

        for node in devices:
            code, _, err = await cli(
                config, "registrations", "set-priority", str(ids[node]), "normal"
            )
            assert code == 0, err

        async def component_sees_normal() -> bool:
            rows = await app.store.for_owner(alice)
            return all(row.operator_priority is Priority.NORMAL for row in rows)

        # Another process changed the rows: the component's cache follows.
        await eventually(component_sees_normal)
        for node, fields in devices.items():
            await enable(prosody, alice, node, fields)  # the client insists on high
        for node in devices:
            assert (await cli(config, "send-test", str(ids[node])))[0] == 0
        for node in devices:
            await cli(config, "registrations", "set-priority", str(ids[node]), "default")
        for node in devices:
            assert (await cli(config, "send-test", str(ids[node])))[0] == 0
    assert [r.headers["apns-priority"] for r in apns.requests] == ["5", "10"]
    assert [r.message["android"]["priority"] for r in fcm.requests] == ["NORMAL", "HIGH"]  # type: ignore[index]


def delegated(stanza_id: str, user: str, payload: str) -> str:
    """A delegated IQ exactly as Prosody forwards one (PROTOCOLS.md §2)."""
    return (
        f"<iq type='set' to='push.localhost' from='localhost' id='{stanza_id}'>"
        "<delegation xmlns='urn:xmpp:delegation:2'><forwarded xmlns='urn:xmpp:forward:0'>"
        f"<iq type='set' xmlns='jabber:client' from='{user}/phone' id='in-{stanza_id}'>"
        f"{payload}</iq></forwarded></delegation></iq>"
    )


def enable_payload(token: str) -> str:
    return (
        "<enable xmlns='urn:xmpp:push:0' jid='push.localhost' node='other'>"
        "<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
        "<value>http://jabber.org/protocol/pubsub#publish-options</value></field>"
        "<field var='service'><value>apns</value></field>"
        f"<field var='device_id'><value>{token}</value></field></x></enable>"
    )


async def test_two_component_processes_on_one_postgresql_see_each_others_changes(
    prosody: Prosody, tmp_path: Path, postgresql_url: str, apns: ApnsStandIn
) -> None:
    config = config_for(prosody, tmp_path, postgresql_url, apns)
    await upgrade(config)
    alice, bob = new_user(prosody), new_user(prosody)
    async with FakeXmppServer(prosody.options.component_secret) as other_server:
        other_dir = tmp_path / "second"
        other_dir.mkdir()
        other = component_config(
            other_dir,
            jid="push.localhost",
            port=other_server.port,
            secret=prosody.options.component_secret,
            storage_url=postgresql_url,
        )
        assert other.source is not None
        second = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "xmpp_push.cli",
            "run",
            "--config",
            str(other.source),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await other_server.wait_connected()
            async with running_component(config) as first:
                await granted(first, prosody)
                assert not await first.store.for_owner(bob)  # cached: nothing yet

                # The second process stores an enable; the first one sees it.
                other_server.send(delegated("e1", bob, enable_payload(f"{next(_numbers):064x}")))
                assert (await other_server.next_stanza(10)).get("type") == "result"

                async def first_sees_bob() -> bool:
                    return len(await first.store.for_owner(bob)) == 1

                await eventually(first_sees_bob)

                # The first process stores an enable; the second one removes it.
                await enable(prosody, alice, "phone", {"service": "apns", "device_id": "ab" * 32})
                assert len(await first.store.for_owner(alice)) == 1
                disable = "<disable xmlns='urn:xmpp:push:0' jid='push.localhost'/>"
                other_server.send(delegated("d1", alice, disable))
                assert (await other_server.next_stanza(10)).get("type") == "result"

                async def alice_is_gone() -> bool:
                    return not await first.store.for_owner(alice)

                await eventually(alice_is_gone)
        finally:
            second.terminate()
            _, err = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 0, err.decode()[-2000:]
