"""`xmpp-push demo`: see a push happen on this machine, no Apple or Google account needed.

Starts a throw-away Prosody on loopback ports with mod_cloud_notify, the component
with the `log` provider, and two users. Alice enables push (as an iPhone app would)
and goes offline; Bob writes to her; Prosody publishes to the component and the
component shows the push it would have sent to APNs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from xmpp_push.app import build_application, open_configured_store
from xmpp_push.config import load_config
from xmpp_push.core.model import Push, Service
from xmpp_push.core.ports import Provider
from xmpp_push.devtools.client import XmppClient
from xmpp_push.devtools.prosody import Prosody, ProsodyOptions
from xmpp_push.logs import configure_logging
from xmpp_push.providers.log import LogProvider

__all__ = ["run_demo"]

DEMO_TOKEN = "d3" * 32
"""Stands in for the hex device token an iPhone app would get from APNs."""


class _RecordingLogProvider(LogProvider):
    def __init__(self, stands_in_for: str) -> None:
        super().__init__(stands_in_for)
        self.pushes: asyncio.Queue[Push] = asyncio.Queue()

    async def send(self, push: Push) -> None:
        await super().send(push)
        self.pushes.put_nowait(push)


def _say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run_demo(*, keep: bool = False) -> int:
    if shutil.which("prosody") is None:
        print(
            "xmpp-push demo needs Prosody: run ./scripts/bootstrap (or apt-get install "
            "prosody prosody-modules) first.",
            file=sys.stderr,
        )
        return 1
    run_dir = Path(tempfile.mkdtemp(prefix="xmpp-push-demo-"))
    try:
        return asyncio.run(_demo(run_dir))
    finally:
        if keep:
            print(f"\n(demo files kept in {run_dir})")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)


async def _demo(run_dir: Path) -> int:
    secret = secrets.token_urlsafe(16)
    prosody = Prosody(
        run_dir / "prosody",
        ProsodyOptions(
            component_secret=secret,
            extra_global="push_notification_with_body = true\npush_notification_with_sender = true",
        ),
    )
    _say(
        f"starting a local Prosody (c2s port {prosody.c2s_port}, component port "
        f"{prosody.component_port})"
    )
    prosody.start()
    try:
        prosody.register("alice", "alice-demo")
        prosody.register("bob", "bob-demo")
        config_file = run_dir / "xmpp-push.toml"
        config_file.write_text(
            "# Written by `xmpp-push demo`.\n"
            "[component]\n"
            'jid = "push.localhost"\n'
            f'secret = "{secret}"\n'
            f"port = {prosody.component_port}\n"
            "[storage]\n"
            f'url = "sqlite+aiosqlite:///{run_dir / "registrations.db"}"\n'
            "[policy]\n"
            "# Demo only: by default bodies and senders are not sent to Apple/Google.\n"
            "show_body = true\n"
            "show_sender = true\n"
            "[log]\n"
            'format = "console"\n'
        )
        environ = {k: v for k, v in os.environ.items() if not k.startswith("XMPP_PUSH_")}
        config = load_config(config_file, environ)
        configure_logging(config.log.level, config.log.format, stream=sys.stdout)
        apns = _RecordingLogProvider("apns")
        providers: dict[Service, Provider] = {Service.APNS: apns, Service.FCM: LogProvider("fcm")}
        store = await open_configured_store(config)
        app = build_application(config, store, providers)
        _say("starting the xmpp-push component with the log provider (no APNs key needed)")
        app.component.start()
        try:
            await asyncio.wait_for(app.component.connected_event.wait(), 15)
            return await _story(prosody, apns)
        finally:
            await app.shutdown()
    finally:
        prosody.stop()


async def _story(prosody: Prosody, apns: _RecordingLogProvider) -> int:
    port = prosody.c2s_port
    _say("alice logs in from her phone and enables push through push.localhost")
    alice = await XmppClient.connect("alice@localhost", "alice-demo", "127.0.0.1", port)
    await alice.enable_push(
        "push.localhost",
        "alice-phone",
        {"service": "apns", "device_id": DEMO_TOKEN, "priority": "high"},
    )
    _say("alice's app goes to sleep (she logs out)")
    await alice.close()
    _say("bob sends alice a message")
    bob = await XmppClient.connect("bob@localhost", "bob-demo", "127.0.0.1", port)
    await bob.send_message("alice@localhost", "Hi Alice, dinner at eight?")
    try:
        push = await asyncio.wait_for(apns.pushes.get(), 15)
    except TimeoutError:
        print("\nNo push arrived within 15 s: see the log above.", file=sys.stderr)
        return 1
    finally:
        await bob.close()
    content = push.content
    _say(
        "push delivered (log provider, in place of APNs):\n"
        f"      device   {push.device.service.value} {push.device.redacted_token}\n"
        f"      priority {push.priority.value}\n"
        f"      title    {content.sender}\n"
        f"      body     {content.body}\n"
        f"      badge    {content.message_count}\n\n"
        "With an APNs key in [apns] (or a service account in [fcm]) the same push goes to "
        "the phone. See README.md for the server configuration."
    )
    return 0
