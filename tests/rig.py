"""Run the whole component (as `xmpp-push run` builds it) inside a test's event loop.

The config goes through the real loader from a real TOML file, so integration tests
exercise exactly what an operator's file would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from tests.standins.apns import ApnsStandIn
from tests.standins.fcm import FcmStandIn
from xmpp_push.app import Application, build_application, open_configured_store
from xmpp_push.config import Config, load_config
from xmpp_push.core.registrations import RegistrationStore

__all__ = ["component_config", "running_component", "toml_value"]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def component_config(
    directory: Path,
    *,
    jid: str,
    port: int,
    secret: str,
    apns: ApnsStandIn | None = None,
    fcm: FcmStandIn | None = None,
    apns_options: Mapping[str, object] | None = None,
    component: Mapping[str, object] | None = None,
    policy: Mapping[str, object] | None = None,
    storage_url: str | None = None,
) -> Config:
    """Write an xmpp-push.toml pointing at the given server and stand-ins; load it."""
    sections: dict[str, dict[str, object]] = {
        "component": {
            "jid": jid,
            "secret": secret,
            "host": "127.0.0.1",
            "port": port,
            "reconnect_max_delay": 0.5,
            **(component or {}),
        },
        "policy": {"reply_timeout": 3.0, "retry_initial_delay": 0.1, **(policy or {})},
        "storage": {"url": storage_url or f"sqlite+aiosqlite:///{directory / 'registrations.db'}"},
        "log": {"level": "debug"},
    }
    if apns is not None:
        sections["apns"] = {
            "key_file": str(apns.key_file),
            "key_id": apns.key_id,
            "team_id": apns.team_id,
            "topic": "org.example.chat",
            "endpoint": apns.endpoint,
            "ca_file": str(apns.ca_file),
            "request_timeout": 2.0,
            **(apns_options or {}),
        }
    if fcm is not None:
        sections["fcm"] = {
            "service_account_file": str(fcm.service_account_file),
            "endpoint": fcm.endpoint,
            "ca_file": str(fcm.ca_file),
            "request_timeout": 2.0,
        }
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
    path = directory / "xmpp-push.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, {})


@contextlib.asynccontextmanager
async def running_component(
    config: Config, *, store: RegistrationStore | None = None, wait: bool = True
) -> AsyncIterator[Application]:
    """Start the component (on the configured store unless one is given); yield once it
    is connected; shut it down cleanly (closing the store) after."""
    if store is None:
        store = await open_configured_store(config)
    app = build_application(config, store)
    app.component.start()
    try:
        if wait:
            await asyncio.wait_for(app.component.connected_event.wait(), 15)
        yield app
    finally:
        await app.shutdown()
