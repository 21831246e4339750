"""What the stand-ins' command lines share: serve until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

__all__ = ["serve_until_signal"]

StandInT = TypeVar("StandInT")


async def serve_until_signal(
    stand_in: AbstractAsyncContextManager[StandInT],
    describe: Callable[[StandInT], Mapping[str, object]],
) -> None:
    """Enter `stand_in`, print `describe(stand_in)` as one JSON line (for whoever
    started the process to read where it listens), and serve until SIGINT or SIGTERM;
    then leave it, which stops it. The handlers are in place before `stand_in` is
    entered, so a signal that arrives while entering it still ends the process
    cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with stand_in as serving:
        print(json.dumps(describe(serving)), flush=True)
        await stop.wait()
