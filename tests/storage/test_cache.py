"""The `for_owner` cache: on PostgreSQL, kept honest across processes by
LISTEN/NOTIFY; on SQLite and MySQL, absent.

Two `SqlStore`s on one database, each with its own engine, stand for two processes
(a component and the CLI, or two components behind one JID)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from xmpp_push.core.model import Priority
from xmpp_push.core.registrations import Registration, RegistrationRequest, Target
from xmpp_push.storage import MigratePolicy, SqlStore, open_store
from xmpp_push.storage.sql import NOTIFY_CHANNEL, _Fill, _OwnerCache

OWNER = "alice@example.org"
PUSH_JID = "push.example.org"
NOW = 1_700_000_000.0

MakeStore = Callable[[], Awaitable[SqlStore]]

# Tests build the writer and its rows first and the reader after: a store hears only
# commits made once it listens, so the reader starts with no notification in flight
# and its counters are exact.


@pytest.fixture(scope="module", params=["postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def enable_request(node: str = "n1", **fields: Any) -> RegistrationRequest:
    values: dict[str, Any] = {"target": Target.FCM, "token": f"token-{node}"} | fields
    return RegistrationRequest(owner=OWNER, push_jid=PUSH_JID, node=node, **values)


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> float:
    """Seconds until `check()` holds; fails the test after `within`."""
    began = time.monotonic()
    while not await check():
        if time.monotonic() - began > within:
            pytest.fail(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - began


async def test_a_change_in_another_process_reaches_the_cache_within_a_second(
    make_store: MakeStore,
) -> None:
    writer = await make_store()
    stored = (
        await writer.enable(enable_request(priority=Priority.HIGH), max_per_owner=5, now=NOW)
    ).registration
    reader = await make_store()
    await reader.for_owner(OWNER)
    assert reader.cache_stats().entries == 1

    await writer.set_operator_priority(stored.id, Priority.NORMAL)

    async def reader_sees_it() -> bool:
        (seen,) = await reader.for_owner(OWNER)
        return seen.operator_priority is Priority.NORMAL

    await eventually(reader_sees_it, within=1.0, what="the other process's change")


async def test_a_new_registration_elsewhere_reaches_a_cached_empty_answer(
    make_store: MakeStore,
) -> None:
    writer, reader = await make_store(), await make_store()
    assert list(await reader.for_owner(OWNER)) == []

    await writer.enable(enable_request(), max_per_owner=5, now=NOW)

    async def reader_sees_it() -> bool:
        return len(await reader.for_owner(OWNER)) == 1

    await eventually(reader_sees_it, within=1.0, what="the new registration")


async def test_a_quarantine_set_elsewhere_reaches_the_cache(make_store: MakeStore) -> None:
    writer = await make_store()
    stored = (await writer.enable(enable_request(), max_per_owner=5, now=NOW)).registration
    reader = await make_store()
    await reader.for_owner(OWNER)

    await writer.record_failure(stored.id, NOW + 1, "BadDeviceToken", quarantine_until=NOW + 60)

    async def reader_sees_it() -> bool:
        (seen,) = await reader.for_owner(OWNER)
        return seen.quarantined(NOW + 2)

    await eventually(reader_sees_it, within=1.0, what="the quarantine")


async def test_a_store_sees_its_own_writes_at_once(make_store: MakeStore) -> None:
    store = await make_store()
    stored = (await store.enable(enable_request(), max_per_owner=5, now=NOW)).registration
    await store.for_owner(OWNER)

    await store.set_operator_silent(stored.id, True)

    (seen,) = await store.for_owner(OWNER)
    assert seen.operator_silent is True


async def test_the_counters_move(make_store: MakeStore) -> None:
    writer = await make_store()
    await writer.enable(enable_request(), max_per_owner=5, now=NOW)
    reader = await make_store()
    before = reader.cache_stats()

    await reader.for_owner(OWNER)
    await reader.for_owner(OWNER)
    await reader.for_owner(OWNER)

    after = reader.cache_stats()
    assert (after.enabled, after.listening) == (True, True)
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 2)
    await writer.enable(enable_request("n2"), max_per_owner=5, now=NOW)

    async def invalidated() -> bool:
        return reader.cache_stats().invalidations > after.invalidations

    await eventually(invalidated, within=1.0, what="an invalidation counted")
    assert reader.cache_stats().entries == 0


async def test_a_plain_success_does_not_invalidate(make_store: MakeStore) -> None:
    # A success follows every push; dropping the owner each time would empty the cache.
    writer = await make_store()
    stored = (await writer.enable(enable_request(), max_per_owner=5, now=NOW)).registration
    reader = await make_store()
    await reader.for_owner(OWNER)
    invalidations = reader.cache_stats().invalidations

    await writer.record_success(stored.id, NOW + 1)
    # Then a write that does notify, so that we know the first one's moment has passed.
    await writer.enable(
        RegistrationRequest(
            owner="bob@example.org", push_jid=PUSH_JID, node="n", target=Target.FCM
        ),
        max_per_owner=5,
        now=NOW,
    )

    async def bob_arrived() -> bool:
        return reader.cache_stats().invalidations > invalidations

    await eventually(bob_arrived, within=1.0, what="the second write's notification")
    assert reader.cache_stats().invalidations == invalidations + 1
    assert reader.cache_stats().entries == 1


async def test_a_write_by_another_tool_that_notifies_reaches_the_cache(
    make_store: MakeStore, database_url: str
) -> None:
    # The channel is the contract for anything that writes outside xmpp-push.
    store = await make_store()
    stored = (await store.enable(enable_request(), max_per_owner=5, now=NOW)).registration
    await store.for_owner(OWNER)
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                sa.text("UPDATE registrations SET operator_silent = true WHERE id = :id"),
                {"id": stored.id},
            )
            await connection.execute(
                sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, OWNER)),
            )
    finally:
        await engine.dispose()

    async def store_sees_it() -> bool:
        (seen,) = await store.for_owner(OWNER)
        return seen.operator_silent is True

    await eventually(store_sees_it, within=1.0, what="the outside write")


async def test_a_lost_listener_clears_the_cache_and_comes_back(
    make_store: MakeStore, database_url: str
) -> None:
    writer = await make_store()
    stored = (await writer.enable(enable_request(), max_per_owner=5, now=NOW)).registration
    reader = await make_store()
    await reader.for_owner(OWNER)
    first = reader.cache_stats()
    pid = reader.listener_pid
    assert pid is not None
    assert first.entries == 1

    await terminate_backend(database_url, pid)

    async def cleared() -> bool:
        stats = reader.cache_stats()
        return stats.resets > first.resets and stats.entries == 0

    async def back() -> bool:
        return reader.cache_stats().listening and reader.listener_pid not in {None, pid}

    await eventually(cleared, within=1.0, what="the cache cleared")
    await eventually(back, within=5.0, what="the listener reconnected")
    # And it works again: cache, change elsewhere, see the change.
    await reader.for_owner(OWNER)
    await reader.for_owner(OWNER)
    assert reader.cache_stats().entries == 1
    await writer.set_operator_priority(stored.id, Priority.NORMAL)

    async def reader_sees_it() -> bool:
        (seen,) = await reader.for_owner(OWNER)
        return seen.operator_priority is Priority.NORMAL

    await eventually(reader_sees_it, within=1.0, what="a change after the reconnect")


async def test_the_cache_holds_at_most_cache_size_owners(database_url: str) -> None:
    async with await open_store(database_url, migrate=MigratePolicy.CHECK, cache_size=2) as store:
        for owner in ("a@example.org", "b@example.org", "c@example.org"):
            await store.for_owner(owner)

        assert store.cache_stats().entries == 2


async def test_connections_killed_by_the_server_are_replaced_unnoticed(
    make_store: MakeStore, database_url: str
) -> None:
    # What a PostgreSQL restart or failover does to every connection a store holds.
    store = await make_store()
    await store.enable(enable_request(), max_per_owner=5, now=NOW)
    await store.for_owner(OWNER)
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
    finally:
        await engine.dispose()

    assert len(await store.for_owner(OWNER)) == 1
    assert await store.count() == 1
    await store.enable(enable_request("n2"), max_per_owner=5, now=NOW)
    assert len(await store.list(OWNER)) == 2

    async def listening() -> bool:
        return store.cache_stats().listening

    await eventually(listening, within=5.0, what="the listener back")


async def test_a_store_without_cache_still_notifies_the_others(
    make_store: MakeStore, database_url: str
) -> None:
    # The CLI: short-lived, caches nothing, listens to nothing, and must be heard.
    reader = await make_store()
    async with await open_store(database_url, migrate=MigratePolicy.CHECK, cache_size=0) as cli:
        assert (cli.cache_stats().enabled, cli.listener_pid) == (False, None)
        await reader.for_owner(OWNER)

        await cli.enable(enable_request(), max_per_owner=5, now=NOW)

    async def reader_sees_it() -> bool:
        return len(await reader.for_owner(OWNER)) == 1

    await eventually(reader_sees_it, within=1.0, what="the CLI's write")


async def terminate_backend(url: str, pid: int) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------- without a cache


@pytest.mark.parametrize("backend", ["sqlite", "mysql"])
async def test_sqlite_and_mysql_read_through_every_time(fresh_url: str) -> None:
    async with (
        await open_store(fresh_url, migrate=MigratePolicy.UPGRADE) as writer,
        await open_store(fresh_url, migrate=MigratePolicy.CHECK) as reader,
    ):
        await reader.for_owner(OWNER)

        await writer.enable(enable_request(), max_per_owner=5, now=NOW)

        assert len(await reader.for_owner(OWNER)) == 1
        stats = reader.cache_stats()
        assert (stats.enabled, stats.hits, stats.misses, stats.entries) == (False, 0, 2, 0)


# --------------------------------------------------------------------------- the race


def registration(owner: str) -> Registration:
    return Registration(
        id=1,
        owner=owner,
        push_jid=PUSH_JID,
        node="n",
        target=Target.FCM,
        token="t",
        topic=None,
        mode=None,
        client_priority=None,
        operator_priority=None,
        client_silent=None,
        operator_silent=None,
        voip_token=None,
        resource=None,
        secret=None,
        options={},
        created_at=NOW,
        updated_at=NOW,
    )


def test_a_read_overtaken_by_an_invalidation_is_not_cached() -> None:
    # The read may have seen the rows before the change that the invalidation announces.
    cache = _OwnerCache(max_entries=10, listening=True)
    fill = cache.begin_fill(OWNER)

    cache.invalidate(OWNER)
    cache.end_fill(fill, (registration(OWNER),))

    assert cache.lookup(OWNER) is None


def test_a_read_overtaken_by_a_reset_is_not_cached() -> None:
    cache = _OwnerCache(max_entries=10, listening=True)
    fill = cache.begin_fill(OWNER)

    cache.reset(listening=True)
    cache.end_fill(fill, (registration(OWNER),))

    assert cache.lookup(OWNER) is None


def test_a_read_while_not_listening_is_not_cached() -> None:
    cache = _OwnerCache(max_entries=10, listening=False)

    fill: _Fill | None = cache.begin_fill(OWNER)
    cache.end_fill(fill, (registration(OWNER),))

    assert fill is None
    assert cache.lookup(OWNER) is None
