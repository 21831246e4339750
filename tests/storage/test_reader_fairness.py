"""Read connections are handed out first come, first served.

With a plain queue, a task returning a connection took it straight back before the
woken waiter ran: one task did nearly all lookups while the others waited for seconds
(bench/registrations.py, 8 tasks). Here SQLite's single read connection makes the
order visible.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from xmpp_push.storage import MigratePolicy, open_store

TASKS = 8
LOOKUPS = 20


async def test_concurrent_lookups_take_turns(tmp_path: Path) -> None:
    store = await open_store(
        f"sqlite+aiosqlite:///{tmp_path / 'fair.db'}", migrate=MigratePolicy.AUTO
    )
    finished: list[int] = []

    async def lookups(task: int) -> None:
        for _ in range(LOOKUPS):
            await store.for_owner(f"user{task}@example.org")
            finished.append(task)

    try:
        await asyncio.gather(*(lookups(task) for task in range(TASKS)))
    finally:
        await store.close()
    # Every task's first lookup is done before any task could finish its third.
    first_round = finished[: 2 * TASKS]
    assert set(first_round) == set(range(TASKS)), finished[: 3 * TASKS]
