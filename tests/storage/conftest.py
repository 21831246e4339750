"""Real databases for the storage tests: a SQLite file, and PostgreSQL and MariaDB
databases made for the test module (or the test) and dropped after it.

| fixture | scope | gives |
|---|---|---|
| `backend` | module | "sqlite", "postgresql" or "mysql" (a module may override it, |
| | | e.g. to add "memory" or to keep PostgreSQL only) |
| `database_url` | module | a database of that kind, at HEAD, shared by the module's tests |
| `store` | test | an empty store on it (a `MemoryStore` for "memory") |
| `make_store` | test | `await make_store()`: another `SqlStore` on the same database, |
| | | with its own engine: what a second process would have |
| `fresh_url` | test | an empty database of its own (no schema), for migration tests |

The servers default to this machine's (trust auth on 127.0.0.1); set
`XMPP_PUSH_TEST_POSTGRESQL_URL` or `XMPP_PUSH_TEST_MYSQL_URL` to an admin URL that may
create databases to use others. A server that cannot be reached skips its tests on a
developer's machine and fails them when `CI` is set.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from xmpp_push.core.registrations import RegistrationStore
from xmpp_push.storage import MigratePolicy, SqlStore, open_store, upgrade
from xmpp_push.storage.sql import registrations

T = TypeVar("T")

SQL_BACKENDS = ("sqlite", "postgresql", "mysql")

ADMIN_URLS = {
    "postgresql": os.environ.get(
        "XMPP_PUSH_TEST_POSTGRESQL_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    ),
    "mysql": os.environ.get("XMPP_PUSH_TEST_MYSQL_URL", "mysql+asyncmy://root@127.0.0.1:3306/test"),
}
START_HINTS = {
    "postgresql": "pg_ctlcluster --skip-systemctl-redirect 15 main start",
    "mysql": "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd"
    " -- --user=mysql",
}

# A server found unreachable once is not tried again by every module.
_unreachable: dict[str, str] = {}


def run_sync(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine from a synchronous fixture. In a thread of its own, so that its
    event loop never meets the one pytest-asyncio keeps for the tests."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, make()).result()


def _server_missing(backend: str, error: BaseException | str) -> None:
    url = make_url(ADMIN_URLS[backend]).render_as_string(hide_password=True)
    reason = f"{backend} at {url} is not reachable ({error}); start it with: {START_HINTS[backend]}"
    _unreachable[backend] = reason
    if os.environ.get("CI"):
        pytest.fail(f"CI is set and {reason}", pytrace=False)
    pytest.skip(reason)


async def _admin(backend: str, statement: str) -> None:
    engine = create_async_engine(
        ADMIN_URLS[backend], poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as connection:
            await asyncio.wait_for(connection.exec_driver_sql(statement), 30)
    finally:
        await engine.dispose()


def create_database(backend: str, tmp_path: Path) -> str:
    """A new, empty database; its URL. Skips (or fails in CI) if the server is down."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / f'registrations-{secrets.token_hex(4)}.db'}"
    if backend in _unreachable:
        reason = _unreachable[backend]
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and {reason}", pytrace=False)
        pytest.skip(reason)
    name = f"xmpp_push_test_{secrets.token_hex(6)}"
    # Server defaults otherwise (MariaDB's case-insensitive collation included): the
    # schema must bring its own.
    options = " CHARACTER SET utf8mb4" if backend == "mysql" else ""
    try:
        run_sync(lambda: _admin(backend, f"CREATE DATABASE {name}{options}"))
    except (OSError, TimeoutError, sa.exc.DBAPIError) as exc:
        _server_missing(backend, exc)
    return make_url(ADMIN_URLS[backend]).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return
    force = " WITH (FORCE)" if backend == "postgresql" else ""
    run_sync(lambda: _admin(backend, f"DROP DATABASE IF EXISTS {parsed.database}{force}"))


async def empty(url: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.execute(sa.delete(registrations))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module", params=SQL_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def database_url(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = create_database(backend, tmp_path_factory.mktemp("db"))
    try:
        run_sync(lambda: upgrade(url))
        yield url
    finally:
        drop_database(url)


@pytest.fixture
async def store(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[RegistrationStore]:
    if backend == "memory":
        from xmpp_push.storage.memory import MemoryStore

        yield MemoryStore()
        return
    url: str = request.getfixturevalue("database_url")
    await empty(url)
    opened = await open_store(url, pool_size=4, migrate=MigratePolicy.CHECK)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def make_store(
    backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[[], Awaitable[SqlStore]]]:
    if backend == "memory":
        pytest.skip("one MemoryStore cannot be shared between two processes")
    url: str = request.getfixturevalue("database_url")
    await empty(url)
    opened: list[SqlStore] = []

    async def make() -> SqlStore:
        store = await open_store(url, pool_size=4, migrate=MigratePolicy.CHECK)
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in opened:
            await store.close()


@pytest.fixture
def fresh_url(backend: str, tmp_path: Path) -> Iterator[str]:
    url = create_database(backend, tmp_path)
    try:
        yield url
    finally:
        drop_database(url)
