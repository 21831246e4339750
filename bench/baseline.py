"""The baseline: the push component a developer writes first, with the usual libraries.

slixmpp's `ComponentXMPP` with the XEP-0060 plugin (and XEP-0004 for the forms), one
coroutine handler per publish that reads the stanza through slixmpp's stanza
interfaces, sends with aioapns (APNs) or aiohttp + google-auth (FCM), and answers with
`iq.reply()`. Nothing here is tuned; it is what the libraries' documentation leads to.

It reads the same TOML file as `xmpp-push run` (only the keys it needs), so the
benchmark starts both the same way::

    python -m bench.baseline --config xmpp-push.toml

Two things exist only because the benchmark's sinks are not Apple and Google:
aioapns takes its host and port from class constants, so they are overridden in a
subclass (`_at_endpoint`); and the TLS contexts trust the sinks' test CA. aioapns
itself offers no ALPN, and is left that way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import requests
from aioapns import APNs, NotificationRequest, PushType
from aioapns.connection import APNsProductionClientProtocol
from google.auth.transport.requests import Request as GoogleAuthRequest
from google.oauth2 import service_account
from slixmpp import ComponentXMPP
from slixmpp.plugins.xep_0004 import Form
from slixmpp.xmlstream.handler import CoroutineCallback
from slixmpp.xmlstream.matcher import StanzaPath

__all__ = ["BaselinePushComponent", "FcmSender", "main"]

log = logging.getLogger("baseline")

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


def _at_endpoint(apns: APNs, endpoint: str) -> None:
    """Point aioapns at `endpoint` instead of api.push.apple.com:443 (bench only)."""
    url = urlsplit(endpoint)

    class SinkProtocol(APNsProductionClientProtocol):
        APNS_SERVER = url.hostname or "127.0.0.1"
        APNS_PORT = url.port or 443

    apns.pool.protocol_class = SinkProtocol


def make_apns(section: dict[str, Any]) -> APNs:
    context = ssl.create_default_context(cafile=section.get("ca_file") or None)
    apns = APNs(
        key=Path(section["key_file"]).read_text(),
        key_id=section["key_id"],
        team_id=section["team_id"],
        topic=section["topic"],
        use_sandbox=section.get("environment") == "sandbox",
        ssl_context=context,
    )
    if section.get("endpoint"):
        _at_endpoint(apns, section["endpoint"])
    return apns


class FcmSender:
    """FCM HTTP v1 with a service account: one POST per push."""

    def __init__(self, section: dict[str, Any]) -> None:
        self.credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            section["service_account_file"], scopes=[FCM_SCOPE]
        )
        endpoint = (section.get("endpoint") or "https://fcm.googleapis.com").rstrip("/")
        self.url = f"{endpoint}/v1/projects/{self.credentials.project_id}/messages:send"
        ca_file = section.get("ca_file") or None
        http = requests.Session()
        http.verify = ca_file or True
        http.trust_env = False  # else REQUESTS_CA_BUNDLE beats `verify` (bench CA only)
        self.auth_request = GoogleAuthRequest(http)
        self.ssl_context = ssl.create_default_context(cafile=ca_file)
        self.session: aiohttp.ClientSession | None = None
        self.lock = asyncio.Lock()

    async def access_token(self) -> str:
        if not self.credentials.valid:
            async with self.lock:
                if not self.credentials.valid:
                    await asyncio.to_thread(self.credentials.refresh, self.auth_request)
        return str(self.credentials.token)

    async def send(self, token: str, body: str | None) -> bool:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl_context)
            )
        message: dict[str, Any] = {"token": token, "android": {"priority": "HIGH"}}
        if body:
            message["notification"] = {"title": "New message", "body": body}
        else:
            message["data"] = {"wake": "1"}
        headers = {"Authorization": f"Bearer {await self.access_token()}"}
        async with self.session.post(self.url, json={"message": message}, headers=headers) as r:
            await r.read()
            return r.status == 200

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class BaselinePushComponent(ComponentXMPP):
    def __init__(
        self,
        jid: str,
        secret: str,
        host: str,
        port: int,
        apns: APNs | None,
        fcm: FcmSender | None,
    ) -> None:
        super().__init__(jid, secret, host, port)  # type: ignore[no-untyped-call]
        self.apns = apns
        self.fcm = fcm
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0004")
        self.register_plugin("xep_0060")
        self.register_handler(
            CoroutineCallback(
                "push publish", StanzaPath("iq@type=set/pubsub/publish"), self.on_publish
            )
        )

    async def on_publish(self, iq: Any) -> None:
        options = iq["pubsub"]["publish_options"]
        values = options.get_values() if options is not None else {}
        notification = iq["pubsub"]["publish"]["item"]["payload"]
        summary: dict[str, Any] = {}
        if notification is not None:
            form = notification.find("{jabber:x:data}x")
            if form is not None:
                summary = Form(xml=form).get_values()  # type: ignore[no-untyped-call]
        body = summary.get("last-message-body") or None
        try:
            delivered = await self.deliver(values.get("service"), values.get("device_id"), body)
        except Exception:
            log.exception("push failed")
            delivered = False
        reply = iq.reply()
        if not delivered:
            reply.error()
            reply["error"]["type"] = "wait"
            reply["error"]["condition"] = "resource-constraint"
        reply.send()

    async def deliver(self, service: str | None, token: str | None, body: str | None) -> bool:
        if not token:
            return False
        if service == "apns" and self.apns is not None:
            if body:
                request = NotificationRequest(
                    device_token=token,
                    message={"aps": {"alert": {"body": body}, "badge": 1, "sound": "default"}},
                    push_type=PushType.ALERT,
                )
            else:
                request = NotificationRequest(
                    device_token=token,
                    message={"aps": {"content-available": 1}},
                    priority=5,
                    push_type=PushType.BACKGROUND,
                )
            result = await self.apns.send_notification(request)
            return result.is_successful
        if service == "fcm" and self.fcm is not None:
            return await self.fcm.send(token, body)
        return False


async def run(config_file: Path) -> None:
    with config_file.open("rb") as file:
        config = tomllib.load(file)
    component = config["component"]
    apns = make_apns(config["apns"]) if config.get("apns", {}).get("key_file") else None
    fcm = FcmSender(config["fcm"]) if config.get("fcm", {}).get("service_account_file") else None
    xmpp = BaselinePushComponent(
        component["jid"],
        component["secret"],
        component.get("host", "127.0.0.1"),
        component.get("port", 5347),
        apns,
        fcm,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    xmpp.connect()
    await stop.wait()
    xmpp.disconnect()
    if fcm is not None:
        await fcm.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args.config))


if __name__ == "__main__":
    main()
