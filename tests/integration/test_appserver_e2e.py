"""App-server mode end to end: real Prosody / ejabberd publish, the component delivers.

A client enables push with jid = the component and a MongooseIM-style form, goes
offline; another user writes to it; the server's own push module (mod_cloud_notify,
mod_push) publishes to the component, which delivers to the APNs or FCM stand-in over
TLS. Servers are started once per session by tests/conftest.py; each test uses its
own users so registrations never leak between tests.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.rig import component_config, running_component
from tests.standins.apns import ApnsStandIn
from tests.standins.fcm import FcmStandIn
from xmpp_push.devtools.client import XmppClient

PASSWORD = "pw-e2e"
_user_numbers = itertools.count(1)


@dataclass
class Setup:
    kind: str
    server: Any
    domain: str
    component_jid: str
    component_secret: str
    tmp_path: Path

    def new_user(self) -> str:
        name = f"{self.kind}user{next(_user_numbers)}"
        self.server.register(name, PASSWORD)
        return f"{name}@{self.domain}"

    async def login(self, jid: str) -> XmppClient:
        return await XmppClient.connect(jid, PASSWORD, "127.0.0.1", self.server.c2s_port)


@pytest.fixture(params=["prosody", "ejabberd"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Setup:
    server = request.getfixturevalue(f"{request.param}_server")
    options = server.options
    return Setup(
        kind=request.param,
        server=server,
        domain=options.domain,
        component_jid=options.component_jid,
        component_secret=options.component_secret,
        tmp_path=tmp_path,
    )


def component_for(
    setup: Setup, apns: ApnsStandIn | None = None, fcm: FcmStandIn | None = None, **policy: object
) -> Any:
    return component_config(
        setup.tmp_path,
        jid=setup.component_jid,
        port=setup.server.component_port,
        secret=setup.component_secret,
        apns=apns,
        fcm=fcm,
        policy=policy or None,
    )


async def enable_and_go_offline(
    setup: Setup, user: str, fields: dict[str, str], node: str = "n1"
) -> None:
    client = await setup.login(user)
    await client.enable_push(setup.component_jid, node, fields)
    await client.close()


async def send_from_new_user(setup: Setup, to: str, body: str = "Hello there") -> None:
    sender = await setup.login(setup.new_user())
    await sender.send_message(to, body)
    await sender.close()


async def no_more_than(count: int, requests: Callable[[], list[Any]], settle: float = 0.7) -> None:
    """Give a stray duplicate time to arrive, then check there was none."""
    await asyncio.sleep(settle)
    assert len(requests()) == count, requests()


def apns_token(index: int) -> str:
    return f"{index:064x}"


async def test_offline_message_reaches_apns_with_high_priority(
    setup: Setup, apns: ApnsStandIn
) -> None:
    token = apns_token(next(_user_numbers))
    alice = setup.new_user()
    async with running_component(component_for(setup, apns=apns)):
        await enable_and_go_offline(
            setup, alice, {"service": "apns", "device_id": token, "priority": "high"}
        )
        await send_from_new_user(setup, alice)
        [request] = await apns.wait_for_requests(1, timeout=10)
        await no_more_than(1, lambda: apns.requests)
    assert request.token == token
    assert (request.method, request.path) == ("POST", f"/3/device/{token}")
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-push-type"] == "alert"
    assert request.status == 200  # the stand-in verified the JWT
    assert request.jwt_claims is not None
    assert request.jwt_claims["iss"] == apns.team_id


async def test_offline_message_reaches_fcm_with_high_priority(
    setup: Setup, fcm: FcmStandIn
) -> None:
    token = f"fcm-token-{next(_user_numbers)}:APA91b" + "x" * 40
    alice = setup.new_user()
    async with running_component(component_for(setup, fcm=fcm)):
        await enable_and_go_offline(
            setup, alice, {"service": "fcm", "device_id": token, "priority": "high"}
        )
        await send_from_new_user(setup, alice)
        [request] = await fcm.wait_for_requests(1, timeout=10)
        await no_more_than(1, lambda: fcm.requests)
    assert request.token == token
    assert request.message["android"]["priority"] == "HIGH"  # type: ignore[index]
    assert request.status == 200


async def test_unregistered_token_is_answered_item_not_found(
    setup: Setup, apns: ApnsStandIn
) -> None:
    token = apns_token(next(_user_numbers))
    apns.respond(token, 410, "Unregistered")
    alice = setup.new_user()
    with capture_logs() as logs:
        async with running_component(component_for(setup, apns=apns)):
            await enable_and_go_offline(setup, alice, {"service": "apns", "device_id": token})
            await send_from_new_user(setup, alice)
            await apns.wait_for_requests(1, timeout=10)
            # The server received our cancel/item-not-found and says so in its log.
            await wait_for_log(setup, "item-not-found")
    answers = [entry["reply"] for entry in logs if entry["event"] == "publish_answered"]
    assert answers == ["cancel/item-not-found"]


async def test_transient_failures_are_retried_once_delivered_and_the_registration_kept(
    setup: Setup, apns: ApnsStandIn
) -> None:
    token = apns_token(next(_user_numbers))
    apns.respond_sequence(
        token, [(503, "ServiceUnavailable"), (503, "ServiceUnavailable"), (200, None)]
    )
    alice = setup.new_user()
    async with running_component(component_for(setup, apns=apns)):
        await enable_and_go_offline(setup, alice, {"service": "apns", "device_id": token})
        await send_from_new_user(setup, alice)
        requests = await apns.wait_for_requests(3, timeout=10)
        assert [r.status for r in requests] == [503, 503, 200]
        # The server kept the registration: the next message is pushed too.
        await send_from_new_user(setup, alice, "second")
        await apns.wait_for_requests(4, timeout=10)
        await no_more_than(4, lambda: apns.requests)
    assert sum(r.status == 200 for r in apns.requests) == 2


async def test_unknown_service_in_the_registration_is_a_bad_request(
    setup: Setup, apns: ApnsStandIn
) -> None:
    alice = setup.new_user()
    async with running_component(component_for(setup, apns=apns)):
        await enable_and_go_offline(setup, alice, {"service": "carrier-pigeon", "device_id": "x"})
        await send_from_new_user(setup, alice)
        await wait_for_log(setup, "bad-request")
    assert apns.requests == []


async def test_hanging_push_service_times_out_and_is_retried_and_the_publish_answered(
    setup: Setup, apns: ApnsStandIn
) -> None:
    token = apns_token(next(_user_numbers))
    apns.hang(token)
    alice = setup.new_user()
    config = component_for(setup, apns=apns, reply_timeout=1.0)
    with capture_logs() as logs:
        async with running_component(config):
            await enable_and_go_offline(setup, alice, {"service": "apns", "device_id": token})
            await send_from_new_user(setup, alice)
            # request_timeout is 2 s in the rig: the first attempt times out, a retry follows.
            await apns.wait_for_requests(2, timeout=15)
    assert all(request.token == token for request in apns.requests)
    assert any(entry["event"] == "retrying" and entry["reason"] == "timeout" for entry in logs)
    # The server was answered `result` (queued) long before the TTL ran out.
    answers = [entry["reply"] for entry in logs if entry["event"] == "publish_answered"]
    assert answers == ["result"]


async def wait_for_log(setup: Setup, text: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while text not in setup.server.log_text():
        if loop.time() > deadline:
            raise AssertionError(
                f"{text!r} not in the {setup.kind} log:\n{setup.server.log_text()[-3000:]}"
            )
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("kind", ["prosody"])
async def test_component_restart_keeps_prosody_registrations(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, apns: ApnsStandIn
) -> None:
    setup = Setup(kind, request.getfixturevalue("prosody_server"), "localhost", "", "", tmp_path)
    options = setup.server.options
    setup.component_jid = options.component_jid
    setup.component_secret = options.component_secret
    token = apns_token(next(_user_numbers))
    alice = setup.new_user()
    config = component_for(setup, apns=apns)
    async with running_component(config):
        await enable_and_go_offline(setup, alice, {"service": "apns", "device_id": token})
    # The component is down while a message arrives: Prosody bounces its publish
    # with 'wait' and keeps the registration.
    await send_from_new_user(setup, alice, "while you were away")
    await wait_for_log(setup, "Component unavailable")
    async with running_component(config):
        await send_from_new_user(setup, alice, "back again")
        [delivered] = await apns.wait_for_requests(1, timeout=10)
    assert delivered.token == token


async def test_component_reconnects_when_prosody_restarts_and_pushes_again(
    make_prosody: Callable[..., Any], tmp_path: Path, apns: ApnsStandIn
) -> None:
    server = make_prosody()
    options = server.options
    setup = Setup(
        "prosody", server, options.domain, options.component_jid, options.component_secret, tmp_path
    )
    token = apns_token(next(_user_numbers))
    alice = setup.new_user()
    async with running_component(component_for(setup, apns=apns)) as app:
        await asyncio.to_thread(server.restart)
        await asyncio.sleep(0.1)
        await asyncio.wait_for(app.component.connected_event.wait(), 15)
        await enable_and_go_offline(setup, alice, {"service": "apns", "device_id": token})
        await send_from_new_user(setup, alice)
        [request] = await apns.wait_for_requests(1, timeout=10)
    assert request.token == token
