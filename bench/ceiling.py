"""Load a sink straight from the project's own provider client, without XMPP.

The benchmark runs a few of these processes side by side to show what a sink serves
when the XMPP side is not the limit, and how much of a core it spends per request::

    python -m bench.ceiling --config xmpp-push.toml --service apns --count 20000

prints one JSON line: {"sent", "ok", "failed", "seconds", "rate"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.workload import TokenSet
from xmpp_push.app import build_providers
from xmpp_push.config import load_config
from xmpp_push.core.model import Content, Device, Push, Service
from xmpp_push.core.outcomes import DeliveryError
from xmpp_push.logs import configure_logging

__all__ = ["main"]


async def blast(
    config_file: Path, service: Service, count: int, concurrency: int
) -> dict[str, float]:
    providers = build_providers(load_config(config_file, {}))
    provider = providers[service]
    tokens = TokenSet(service.value, min(count, 100_000)).tokens
    now = time.time()
    pushes = [
        Push(
            device=Device(service=service, token=tokens[i % len(tokens)]),
            content=Content(message_count=1, body="New message"),
            created_at=now,
        )
        for i in range(count)
    ]
    ok = failed = 0
    next_push = 0

    async def worker() -> None:
        nonlocal ok, failed, next_push
        while next_push < count:
            push = pushes[next_push]
            next_push += 1
            try:
                await provider.send(push)
            except DeliveryError:
                failed += 1
            else:
                ok += 1

    # Open the connection (TLS, JWT or OAuth token) before the clock starts.
    await provider.send(pushes[0])
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - began
    for each in providers.values():
        await each.aclose()
    return {"sent": count, "ok": ok, "failed": failed, "seconds": seconds, "rate": count / seconds}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--service", choices=["apns", "fcm"], required=True)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=500)
    args = parser.parse_args(argv)
    configure_logging("warning", "json", stream=sys.stderr)  # stdout carries the figures
    figures = asyncio.run(blast(args.config, Service(args.service), args.count, args.concurrency))
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
