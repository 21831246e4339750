"""The read path: what `for_owner` (and `get`, `list`, `count`) promise beyond the
contract, on SQLite, PostgreSQL and MariaDB.

Reads skip SQLAlchemy's per-execution work (docs/storage.md, "How reads work"):
SQLite reads on sqlite3 connections of their own, in a reader thread; PostgreSQL on
asyncpg prepared statements; MariaDB through SQLAlchemy. Whatever the path, a read
sees every commit before it, and a connection that failed, or a read that was
cancelled or timed out, leaves the next read working.

Stores here have one read connection (`pool_size=2`; SQLite: one reader thread) and
no cache (`cache_size=0`): every lookup reaches the database, on the same connection."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from tests.storage.conftest import empty
from xmpp_push.core.registrations import Registration, RegistrationRequest, Target
from xmpp_push.storage import MigratePolicy, SqlStore, StorageError, open_store
from xmpp_push.storage.sql import _SqliteReaders

OWNER = "alice@example.org"
PUSH_JID = "push.example.org"
NOW = 1_700_000_000.0

# Another process enabling a registration: what `xmpp-push` run from a shell is to the
# running service.
WRITER = """
import asyncio, sys
from xmpp_push.core.registrations import RegistrationRequest, Target
from xmpp_push.storage import MigratePolicy, open_store

async def main(url, owner):
    async with await open_store(url, migrate=MigratePolicy.CHECK, cache_size=0) as store:
        request = RegistrationRequest(
            owner=owner, push_jid="push.example.org", node="elsewhere",
            target=Target.FCM, token="token-elsewhere",
        )
        await store.enable(request, max_per_owner=5, now=1_700_000_000.0)

asyncio.run(main(*sys.argv[1:]))
"""


def enable_request(node: str = "n1") -> RegistrationRequest:
    return RegistrationRequest(
        owner=OWNER, push_jid=PUSH_JID, node=node, target=Target.FCM, token=f"token-{node}"
    )


@pytest.fixture(autouse=True)
def one_sqlite_reader_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("xmpp_push.storage.sql._SQLITE_READER_THREADS", 1)


@pytest.fixture
async def reader(database_url: str) -> AsyncIterator[SqlStore]:
    """A store with one read connection and no cache, on an empty table."""
    await empty(database_url)
    async with await open_store(
        database_url, pool_size=2, cache_size=0, migrate=MigratePolicy.CHECK
    ) as store:
        yield store


async def enable(store: SqlStore, node: str = "n1") -> Registration:
    return (await store.enable(enable_request(node), max_per_owner=5, now=NOW)).registration


def sqlite_readers(store: SqlStore) -> _SqliteReaders:
    readers = store._readers
    assert isinstance(readers, _SqliteReaders)
    return readers


# --------------------------------------------------------------------------- visibility


async def test_a_lookup_sees_a_row_another_process_just_committed(
    reader: SqlStore, database_url: str
) -> None:
    # The reader has read before: its connection is open, its statement prepared (and
    # on SQLite, an idle connection must not keep the snapshot of its last read).
    assert list(await reader.for_owner(OWNER)) == []

    writer = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, database_url, OWNER)
    assert await asyncio.wait_for(writer.wait(), 60) == 0

    (seen,) = await reader.for_owner(OWNER)
    assert (seen.node, seen.token) == ("elsewhere", "token-elsewhere")
    assert await reader.get(seen.id) == seen


async def test_get_list_and_count_read_the_same_rows_as_for_owner(reader: SqlStore) -> None:
    one, two = await enable(reader, "n1"), await enable(reader, "n2")

    assert list(await reader.for_owner(OWNER)) == [one, two]
    assert list(await reader.list()) == [one, two]
    assert (await reader.get(two.id), await reader.get(two.id + 1000)) == (two, None)
    assert await reader.count() == 2


# --------------------------------------------------------------------------- interrupted reads


@contextlib.asynccontextmanager
async def reads_held(backend: str, store: SqlStore, url: str) -> AsyncIterator[None]:
    """While inside, a read that starts stays in the middle of its query."""
    if backend == "sqlite":
        # A progress handler runs in the reader thread, inside the query.
        release = threading.Event()

        def hold() -> int:
            release.wait(30)
            return 0  # go on

        (reader_connection,) = sqlite_readers(store)._opened
        reader_connection.set_progress_handler(hold, 1)
        try:
            yield
        finally:
            release.set()
        return
    # A table lock held by another connection: the SELECT waits for it.
    lock = {
        "postgresql": "LOCK TABLE registrations IN ACCESS EXCLUSIVE MODE",
        "mysql": "LOCK TABLES registrations WRITE",
    }[backend]
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(lock)
            try:
                yield
            finally:
                if backend == "mysql":
                    await connection.exec_driver_sql("UNLOCK TABLES")
                await connection.rollback()
    finally:
        await engine.dispose()


async def test_a_lookup_cancelled_mid_query_leaves_reads_working(
    backend: str, reader: SqlStore, database_url: str
) -> None:
    stored = await enable(reader)
    await reader.for_owner(OWNER)

    async with reads_held(backend, reader, database_url):
        lookup = asyncio.create_task(reader.for_owner(OWNER))
        await asyncio.sleep(0.3)
        assert not lookup.done()
        lookup.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lookup

    for _ in range(3):
        assert list(await reader.for_owner(OWNER)) == [stored]


async def test_a_lookup_that_times_out_leaves_reads_working(
    backend: str, reader: SqlStore, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = await enable(reader)
    await reader.for_owner(OWNER)
    monkeypatch.setattr("xmpp_push.storage.sql._OPERATION_TIMEOUT_SECONDS", 0.3)

    async with reads_held(backend, reader, database_url):
        with pytest.raises(TimeoutError):
            await reader.for_owner(OWNER)

    for _ in range(3):
        assert list(await reader.for_owner(OWNER)) == [stored]


# --------------------------------------------------------------------------- failed connections


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_failed_sqlite_read_connection_is_replaced_and_the_read_retried(
    fresh_url: str,
) -> None:
    async with await open_store(fresh_url, migrate=MigratePolicy.UPGRADE) as store:
        stored = await enable(store)
        await store.for_owner(OWNER)
        # What a failed connection looks like to the reader: every call raises.
        (failed,) = sqlite_readers(store)._opened
        failed.close()

        assert list(await store.for_owner(OWNER)) == [stored]
        assert failed not in sqlite_readers(store)._opened


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_sqlite_read_that_fails_again_on_a_fresh_connection_raises(
    fresh_url: str,
) -> None:
    async with await open_store(fresh_url, migrate=MigratePolicy.UPGRADE) as store:
        await store.for_owner(OWNER)
        engine = create_async_engine(fresh_url, poolclass=NullPool)
        try:
            async with engine.begin() as connection:
                await connection.exec_driver_sql("DROP TABLE registrations")
        finally:
            await engine.dispose()

        with pytest.raises(sa.exc.OperationalError, match="no such table"):
            await store.for_owner(OWNER)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_read_connections_never_write(fresh_url: str) -> None:
    async with await open_store(fresh_url, migrate=MigratePolicy.UPGRADE) as store:
        await store.for_owner(OWNER)
        (connection,) = sqlite_readers(store)._opened

        assert connection.execute("PRAGMA query_only").fetchone() == (1,)
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize("backend", ["postgresql"])
async def test_a_postgresql_lookup_after_the_server_killed_its_connection_reconnects(
    fresh_url: str,
) -> None:
    async with await open_store(
        fresh_url, pool_size=2, cache_size=0, migrate=MigratePolicy.UPGRADE
    ) as store:
        stored = await enable(store)
        await store.for_owner(OWNER)
        await terminate_every_other_backend(fresh_url)

        assert list(await store.for_owner(OWNER)) == [stored]
        assert list(await store.for_owner(OWNER)) == [stored]


async def terminate_every_other_backend(url: str) -> None:
    """pg_terminate_backend on the database's other connections, and wait until they
    are gone (a backend exits a moment after it is told to)."""
    others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    engine = create_async_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            killed = await connection.scalars(sa.text(f"SELECT pg_terminate_backend(pid) {others}"))
            assert list(killed) == [True, True]  # the store's reader and writer
            for _ in range(1000):
                if not await connection.scalar(sa.text(f"SELECT count(*) {others}")):
                    return
                await asyncio.sleep(0.01)
            pytest.fail("the terminated backends did not exit within 10 s")
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------- closing


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_lookups_queued_when_the_store_closes_get_their_rows(fresh_url: str) -> None:
    store = await open_store(fresh_url, migrate=MigratePolicy.UPGRADE, cache_size=0)
    stored = await enable(store)
    # One reader thread (the fixture): the lookups queue behind each other.
    lookups = [asyncio.ensure_future(store.for_owner(OWNER)) for _ in range(20)]
    await asyncio.sleep(0)  # each has handed its read to the reader thread
    await store.close()

    results = await asyncio.gather(*lookups, return_exceptions=True)
    assert results == [(stored,)] * 20, "none cancelled, none failed"


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_a_lookup_after_the_store_closed_is_a_storage_error(fresh_url: str) -> None:
    store = await open_store(fresh_url, migrate=MigratePolicy.UPGRADE, cache_size=0)
    await store.close()
    with pytest.raises(StorageError, match="closed"):
        await store.for_owner(OWNER)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_two_readers_open_a_new_database_in_wal_mode_every_time(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both readers used to switch a new file to WAL at the same moment; SQLite refuses
    # one of two such switches at once ("database is locked"), a few opens in a hundred.
    monkeypatch.setattr("xmpp_push.storage.sql._SQLITE_READER_THREADS", 2)
    for attempt in range(40):
        url = f"sqlite+aiosqlite:///{tmp_path}/fresh-{attempt}.db"
        async with await open_store(url, migrate=MigratePolicy.UPGRADE) as store:
            assert list(await store.for_owner(OWNER)) == []
