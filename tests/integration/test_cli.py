"""`xmpp-push` as an operator runs it: exit codes, check-config, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

from tests.fakeserver import FakeXmppServer
from tests.integration.test_malformed_publishes import publish
from tests.rig import component_config
from tests.standins.apns import ApnsStandIn

SECRET = "cli-secret"
HUNG_TOKEN = "6b" * 32


def xmpp_push_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "xmpp_push.cli", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XMPP_PUSH_")}
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *xmpp_push_command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_check_config_accepts_the_defaults(tmp_path: Path) -> None:
    code, out, _ = await run_cli("check-config", env=clean_env(), cwd=tmp_path)
    assert code == 0
    assert "configuration OK" in out


async def test_bad_config_file_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[component]\nport = 99999\n")
    for command in ("check-config", "run"):
        code, _, err = await run_cli(
            command, "--config", str(config), env=clean_env(), cwd=tmp_path
        )
        assert code == 2
        assert "component.port" in err


async def test_bad_environment_override_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = clean_env(XMPP_PUSH_APNS_REQUEST_TIMEOUT="soon")
    code, _, err = await run_cli("run", env=env, cwd=tmp_path)
    assert code == 2
    assert "XMPP_PUSH_APNS_REQUEST_TIMEOUT" in err


async def test_missing_key_file_exits_2(tmp_path: Path) -> None:
    env = clean_env(
        XMPP_PUSH_APNS_KEY_FILE=str(tmp_path / "nope.p8"),
        XMPP_PUSH_APNS_KEY_ID="ABCDEFGHIJ",
        XMPP_PUSH_APNS_TEAM_ID="TEAM123456",
        XMPP_PUSH_APNS_TOPIC="org.example.chat",
    )
    code, _, err = await run_cli("check-config", env=env, cwd=tmp_path)
    assert code == 2
    assert "apns.key_file" in err


async def test_sigterm_answers_in_flight_publishes_wait_and_exits_0(tmp_path: Path) -> None:
    async with FakeXmppServer(SECRET) as server, ApnsStandIn(tmp_path / "apns") as apns:
        apns.hang(HUNG_TOKEN)
        config = component_config(
            tmp_path,
            jid="push.localhost",
            port=server.port,
            secret=SECRET,
            apns=apns,
            apns_options={"request_timeout": 30.0},
            policy={"reply_timeout": 30.0, "drain_timeout": 0.5},
        )
        assert config.source is not None
        process = await asyncio.create_subprocess_exec(
            *xmpp_push_command("run", "--config", str(config.source)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=clean_env(),
            cwd=tmp_path,
        )
        try:
            await server.wait_connected()
            # Connected: a good publish for a working token is answered.
            server.send(publish("ok", options={"service": "apns", "device_id": "7c" * 32}))
            first = await server.next_stanza(timeout=20)
            assert (first.get("id"), first.get("type")) == ("ok", "result")
            server.send(publish("hung", options={"service": "apns", "device_id": HUNG_TOKEN}))
            await apns.wait_for_requests(2, timeout=10)
            process.send_signal(signal.SIGTERM)
            reply = await server.next_stanza(timeout=10)
            assert reply.get("id") == "hung"
            error = reply.find("{jabber:component:accept}error")
            assert error is not None, ET.tostring(reply)
            assert error.get("type") == "wait"
            _, err = await asyncio.wait_for(process.communicate(), 15)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, err.decode()[-2000:]
        assert b'"stopped"' in err
