"""Builds the object graph from the config and runs it until SIGTERM.

The one place where the pieces meet: nothing else reads the config or constructs a
provider, so tests build exactly the pieces they need.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from dataclasses import dataclass
from pathlib import Path

import structlog

from xmpp_push.config import Config, ConfigError
from xmpp_push.core.appserver import ContentPolicy, PublishPolicy
from xmpp_push.core.direct import DirectMode
from xmpp_push.core.dispatch import Dispatcher, RetryPolicy
from xmpp_push.core.model import Mode, Priority, Service
from xmpp_push.core.ports import Provider
from xmpp_push.core.registrations import RegistrationStore
from xmpp_push.core.wake import Groupchat, WakePolicy, Waker
from xmpp_push.providers.log import LogProvider
from xmpp_push.storage import MigratePolicy, SqlStore, open_store
from xmpp_push.storage.migrate import safe_url
from xmpp_push.xmpp.appserver import AppServer
from xmpp_push.xmpp.component import ComponentSettings, PushComponent
from xmpp_push.xmpp.delegation import DelegationHandler, install_direct_mode
from xmpp_push.xmpp.forward import XmppForwarder
from xmpp_push.xmpp.plugin_link import PluginKnobs, PluginLink, install_plugin_link

__all__ = ["Application", "build_application", "build_providers", "open_configured_store", "run"]

log = structlog.get_logger(__name__)


def build_providers(config: Config) -> dict[Service, Provider]:
    """The real provider for each configured service, the `log` provider otherwise."""
    providers: dict[Service, Provider] = {}
    try:
        _build_real_providers(config, providers)
    except ValueError as error:
        # The config rules catch what they can; whatever a provider still refuses is a
        # configuration problem too (exit 2), not a crash to restart in a loop.
        failed = "apns" if config.apns.enabled and Service.APNS not in providers else "fcm"
        raise ConfigError(failed, str(error)) from None
    providers.setdefault(Service.APNS, LogProvider("apns"))
    providers.setdefault(Service.FCM, LogProvider("fcm"))
    return providers


def _build_real_providers(config: Config, providers: dict[Service, Provider]) -> None:
    # Each provider's libraries (cryptography; google-auth and requests) are imported
    # only when its section is configured: unused, they would cost the process memory
    # for its whole life (google-auth and requests alone ≈ 5 MiB).
    if config.apns.enabled:
        from xmpp_push.providers.apns import ApnsProvider

        providers[Service.APNS] = ApnsProvider(
            key_pem=Path(config.apns.key_file).read_bytes(),
            key_id=config.apns.key_id,
            team_id=config.apns.team_id,
            topic=config.apns.topic,
            environment=Mode.SANDBOX if config.apns.environment == "sandbox" else Mode.PRODUCTION,
            endpoint=config.apns.endpoint or None,
            ca_file=config.apns.ca_file or None,
            request_timeout=config.apns.request_timeout,
            connections=config.apns.connections,
            jwt_lifetime=float(config.apns.jwt_lifetime),
        )
    if config.fcm.enabled:
        from xmpp_push.providers.fcm import FcmProvider

        providers[Service.FCM] = FcmProvider(
            service_account_file=config.fcm.service_account_file,
            project_id=config.fcm.project_id or None,
            endpoint=config.fcm.endpoint or None,
            ca_file=config.fcm.ca_file or None,
            request_timeout=config.fcm.request_timeout,
            connections=config.fcm.connections,
        )


async def open_configured_store(
    config: Config, *, migrate: MigratePolicy = MigratePolicy.AUTO, cache: bool = True
) -> SqlStore:
    """The registration store of `[storage]`. Raises `xmpp_push.storage.SchemaOutOfDate`
    when a PostgreSQL/MySQL schema is behind the code, `StorageUnavailable` when the
    database cannot be reached."""
    return await open_store(
        config.storage.url,
        pool_size=config.storage.pool_size,
        migrate=migrate,
        # One-shot commands (the CLI) keep no cache; their writes still notify the
        # running services.
        **({} if cache else {"cache_size": 0}),
    )


@dataclass
class Application:
    config: Config
    providers: dict[Service, Provider]
    dispatcher: Dispatcher
    component: PushComponent
    store: RegistrationStore
    direct_mode: DirectMode
    delegation: DelegationHandler
    waker: Waker
    plugin_link: PluginLink

    async def shutdown(self) -> None:
        """Stop taking publishes, send what coalescing holds back, let in-flight
        deliveries finish within `policy.drain_timeout` (the rest are answered `wait`),
        then close."""
        self.component.stop_accepting()
        await self.waker.close()
        abandoned = await self.dispatcher.drain(self.config.policy.drain_timeout)
        await self.component.finish_answers(timeout=2.0)
        # Again: wakes that finished while draining noted successes still to be written.
        await self.waker.close()
        await self.component.close()
        for provider in self.providers.values():
            await provider.aclose()
        await self.store.close()
        log.info("stopped", abandoned=abandoned)


def build_application(
    config: Config,
    store: RegistrationStore,
    providers: dict[Service, Provider] | None = None,
) -> Application:
    """Must be called inside a running event loop (slixmpp binds to it)."""
    policy = config.policy
    if providers is None:
        providers = build_providers(config)
    dispatcher = Dispatcher(
        providers,
        RetryPolicy(
            reply_timeout=policy.reply_timeout,
            initial_delay=policy.retry_initial_delay,
            max_delay=policy.retry_max_delay,
            max_pending=policy.max_pending_retries,
            quarantine=float(policy.quarantine),
        ),
    )
    default_service = config.component.default_service
    content_policy = ContentPolicy(
        show_body=policy.show_body,
        show_sender=policy.show_sender,
        body_placeholder=policy.body_placeholder,
    )
    app_server = AppServer(
        dispatcher,
        PublishPolicy(
            content=content_policy,
            default_priority=Priority(policy.default_priority),
            default_ttl=policy.default_ttl,
            default_service=Service(default_service) if default_service else None,
        ),
    )
    component = PushComponent(
        ComponentSettings(
            jid=config.component.jid,
            secret=config.component.secret,
            host=config.component.host,
            port=config.component.port,
            allowed_domains=frozenset(config.component.allowed_domains),
            reconnect=config.component.reconnect,
            reconnect_max_delay=config.component.reconnect_max_delay,
        ),
        app_server,
    )
    direct_mode = DirectMode(
        store,
        own_jids=frozenset({config.component.jid, *config.component.aliases}),
        max_per_owner=policy.max_registrations_per_user,
    )
    waker = Waker(
        store,
        dispatcher,
        XmppForwarder(component, timeout=policy.reply_timeout),
        WakePolicy(
            content=content_policy,
            default_priority=Priority(policy.default_priority),
            default_ttl=policy.default_ttl,
            coalesce_window=policy.coalesce_window,
            groupchat=Groupchat(policy.groupchat),
            quarantine=float(policy.quarantine),
        ),
    )
    plugin_link = install_plugin_link(
        component,
        waker,
        PluginKnobs(
            undecided_delay=policy.undecided_delay,
            hibernation_keepalive=policy.hibernation_keepalive,
            include_body=policy.show_body,
            include_sender=policy.show_sender,
        ),
    )
    delegation = install_direct_mode(component, direct_mode, plugin_link)
    return Application(
        config,
        providers,
        dispatcher,
        component,
        store,
        direct_mode,
        delegation,
        waker,
        plugin_link,
    )


def _announce(config: Config, providers: dict[Service, Provider]) -> None:
    log.info(
        "starting",
        jid=config.component.jid,
        server=f"{config.component.host}:{config.component.port}",
        allowed_domains=list(config.component.allowed_domains),
        providers={service.value: provider.name for service, provider in providers.items()},
        config=str(config.source) if config.source else None,
        storage=safe_url(config.storage.url),
    )
    for warning in config.warnings:
        log.warning("deprecated_config_key", hint=warning)
    if config.component.secret_is_default:
        log.warning(
            "default_secret",
            hint="component.secret is the built-in default; set your own before production",
        )
    for service, provider in providers.items():
        if isinstance(provider, LogProvider):
            log.warning(
                "provider_not_configured",
                service=service.value,
                hint=f"[{service.value}] has no credentials: pushes are logged, not sent",
            )


def freeze_startup_objects() -> None:
    """Take everything that exists once the application is built (modules, classes,
    the config, the store's engine: some 100,000 objects) out of the cyclic garbage
    collector's sight for the life of the process.

    They are never garbage, yet every full collection walked all of them again: under
    load (a publish allocates a few hundred objects, hundreds are in flight) full
    collections came often enough to cost a fifth of the CPU of an APNs publish
    (docs/performance.md, "Garbage collection"). Objects made later are collected as
    usual; reference counting frees almost all of them anyway. The price: a frozen
    object that later becomes cyclic garbage (a start-up connection of the store that a
    database restart discards, say) is never collected; that is bounded by what
    existed at start."""
    gc.collect()
    gc.freeze()
    log.debug("startup_objects_frozen", count=gc.get_freeze_count())


async def run(config: Config) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until the link is lost for good (exit 1).

    Storage problems propagate (`xmpp_push.storage.StorageError`): the CLI turns them
    into exit codes."""
    providers = build_providers(config)
    store = await open_configured_store(config)
    app = build_application(config, store, providers)
    _announce(config, app.providers)
    freeze_startup_objects()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app.component.start()
    lost = app.component.lost_for_good
    lost.add_done_callback(lambda _: stop.set())
    await stop.wait()
    log.info("stopping", reason=lost.result() if lost.done() else "signal")
    await app.shutdown()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
    return 1 if lost.done() else 0
