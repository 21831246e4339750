"""The `xmpp-push` command.

Exit codes (DESIGN.md §5): 0 clean stop, 2 bad configuration (the message names the
key and what is wrong, or says to run `xmpp-push db upgrade`), 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from xmpp_push import __version__
from xmpp_push.config import Config, ConfigError, load_config, resolve_config_path

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmpp-push",
        description="Push service for XMPP servers: wakes phones through APNs and FCM.",
    )
    parser.add_argument("--version", action="version", version=f"xmpp-push {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file (default: $XMPP_PUSH_CONFIG, else ./xmpp-push.toml if "
        "present, else built-in defaults)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("run", parents=[common], help="run the component until SIGTERM")
    commands.add_parser(
        "check-config", parents=[common], help="validate the configuration and exit"
    )
    demo = commands.add_parser(
        "demo", help="start a throw-away local Prosody, wake an offline user, show the push"
    )
    demo.add_argument("--keep", action="store_true", help="keep the demo's directory")

    db = commands.add_parser("db", help="the registration database").add_subparsers(
        dest="db_command", metavar="ACTION", required=True
    )
    db.add_parser("upgrade", parents=[common], help="migrate the database schema to this version")
    db.add_parser("status", parents=[common], help="show the schema revision")

    registrations = commands.add_parser(
        "registrations", help="direct-mode push registrations"
    ).add_subparsers(dest="registrations_command", metavar="ACTION", required=True)
    listing = registrations.add_parser("list", parents=[common], help="list registrations")
    listing.add_argument("--user", metavar="JID", help="only this user's (bare JID)")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = registrations.add_parser("show", parents=[common], help="everything about one")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")
    show.add_argument("--show-token", action="store_true", help="print the full device token")
    priority = registrations.add_parser(
        "set-priority",
        parents=[common],
        help="override the client's priority (default: hand it back to the client)",
    )
    priority.add_argument("id", type=int)
    priority.add_argument("priority", choices=["high", "normal", "default"])
    silent = registrations.add_parser(
        "set-silent",
        parents=[common],
        help="make pushes silent (on), visible (off), or the client's choice (default)",
    )
    silent.add_argument("id", type=int)
    silent.add_argument("silent", choices=["on", "off", "default"])
    delete = registrations.add_parser("delete", parents=[common], help="delete one")
    delete.add_argument("id", type=int)
    release = registrations.add_parser(
        "release", parents=[common], help="end a refused token's quarantine"
    )
    release.add_argument("id", type=int)

    send_test = commands.add_parser(
        "send-test",
        parents=[common],
        help="send a test notification to one registration and print the outcome",
    )
    send_test.add_argument("id", type=int)
    return parser


def _load(config_arg: str | None) -> Config:
    path = resolve_config_path(config_arg, os.environ, Path.cwd())
    return load_config(path, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from xmpp_push.demo import run_demo

        return run_demo(keep=args.keep)
    try:
        config = _load(args.config)
    except ConfigError as error:
        print(f"xmpp-push: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        for warning in config.warnings:
            print(f"xmpp-push: warning: {warning}", file=sys.stderr)
        print(f"xmpp-push: configuration OK ({config.source or 'built-in defaults'})")
        return EXIT_OK
    return _run_async(_command(args, config))


def _command(args: argparse.Namespace, config: Config) -> Callable[[], Coroutine[Any, Any, int]]:
    if args.command == "run":
        from xmpp_push.app import run
        from xmpp_push.logs import configure_logging

        configure_logging(config.log.level, config.log.format, cache=True)
        return lambda: run(config)
    if args.command == "db":
        return lambda: _db(args, config)
    if args.command == "send-test":
        return lambda: _send_test(args.id, config)
    return lambda: _registrations(args, config)


def _run_async(command: Callable[[], Coroutine[Any, Any, int]]) -> int:
    from xmpp_push.storage import SchemaOutOfDate, StorageError, StorageUnavailable

    try:
        return asyncio.run(command())
    except KeyboardInterrupt:
        return EXIT_OK
    except ConfigError as error:
        print(f"xmpp-push: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except SchemaOutOfDate as error:
        print(f"xmpp-push: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except StorageUnavailable as error:
        print(f"xmpp-push: database unavailable: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except StorageError as error:
        # An unsupported URL or a missing driver: fixed in the configuration.
        print(f"xmpp-push: configuration error: storage.url: {error}", file=sys.stderr)
        return EXIT_CONFIG


async def _db(args: argparse.Namespace, config: Config) -> int:
    from xmpp_push.storage.migrate import HEAD, current_revision, safe_url, upgrade

    url = config.storage.url
    if args.db_command == "upgrade":
        before = await current_revision(url)
        after = await upgrade(url)
        if before == after:
            print(f"{safe_url(url)}: already at revision {after}")
        else:
            print(f"{safe_url(url)}: upgraded from {before or 'an empty database'} to {after}")
        return EXIT_OK
    current = await current_revision(url)
    state = "up to date" if current == HEAD else "run `xmpp-push db upgrade`"
    print(f"{safe_url(url)}: revision {current or 'none'}, code expects {HEAD} ({state})")
    return EXIT_OK if current == HEAD else EXIT_FAILURE


async def _registrations(args: argparse.Namespace, config: Config) -> int:
    from xmpp_push import admin
    from xmpp_push.app import open_configured_store

    store = await open_configured_store(config, cache=False)
    try:
        action = args.registrations_command
        if action == "list":
            registrations = await store.list(args.user)
            if args.json:
                for registration in registrations:
                    print(json.dumps(admin.registration_json(registration)))
            else:
                print(admin.registrations_table(registrations))
            return EXIT_OK
        if action == "show":
            found = await store.get(args.id)
            if found is not None:
                if args.json:
                    data = admin.registration_json(found, reveal_token=args.show_token)
                    print(json.dumps(data, indent=2))
                else:
                    print(admin.describe(found, reveal_token=args.show_token))
                return EXIT_OK
        elif action == "set-priority":
            priority = admin.parse_priority_setting(args.priority)
            if await store.set_operator_priority(args.id, priority) is not None:
                print(f"registration {args.id}: priority {args.priority}")
                return EXIT_OK
        elif action == "set-silent":
            silent = admin.parse_silent_setting(args.silent)
            if await store.set_operator_silent(args.id, silent) is not None:
                print(f"registration {args.id}: silent {args.silent}")
                return EXIT_OK
        elif action == "delete":
            if await store.delete(args.id) is not None:
                print(f"registration {args.id} deleted")
                return EXIT_OK
        elif action == "release" and await store.release_quarantine(args.id) is not None:
            print(f"registration {args.id}: quarantine ended")
            return EXIT_OK
        print(f"xmpp-push: no registration with id {args.id}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        await store.close()


async def _send_test(registration_id: int, config: Config) -> int:
    from xmpp_push import admin
    from xmpp_push.app import build_providers, open_configured_store
    from xmpp_push.core.model import Priority

    store = await open_configured_store(config, cache=False)
    providers = build_providers(config)
    try:
        result = await admin.send_test(
            store,
            providers,
            registration_id,
            default_priority=Priority(config.policy.default_priority),
            ttl=config.policy.default_ttl,
        )
    finally:
        for provider in providers.values():
            await provider.aclose()
        await store.close()
    print(result.summary, file=sys.stdout if result.delivered else sys.stderr)
    return EXIT_OK if result.delivered else EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
