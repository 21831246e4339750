"""The `xmpp-push` command.

Exit codes (DESIGN.md §5): 0 clean stop, 2 bad configuration (the message names the
key and what is wrong), 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

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
    config_help = (
        "TOML config file (default: $XMPP_PUSH_CONFIG, else ./xmpp-push.toml if present, "
        "else built-in defaults)"
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help=config_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser(
        "run", parents=[common], help="run the component until SIGTERM", description=None
    )
    commands.add_parser(
        "check-config", parents=[common], help="validate the configuration and exit"
    )
    demo = commands.add_parser(
        "demo",
        help="start a throw-away local Prosody, wake an offline user, show the push",
    )
    demo.add_argument(
        "--keep", action="store_true", help="keep the demo's directory (configs and logs)"
    )
    return parser


def _load(config_arg: str | None) -> Config:
    path = resolve_config_path(config_arg, os.environ, Path.cwd())
    return load_config(path, os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from xmpp_push.demo import run_demo

            return run_demo(keep=args.keep)
        config = _load(args.config)
    except ConfigError as error:
        print(f"xmpp-push: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check-config":
        where = config.source or "built-in defaults"
        print(f"xmpp-push: configuration OK ({where})")
        return EXIT_OK
    from xmpp_push.app import run
    from xmpp_push.logs import configure_logging

    configure_logging(config.log.level, config.log.format)
    try:
        return asyncio.run(run(config))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
