"""The schema's revisions (schema/versions) on real databases, `open_store`'s policy
about them, and their place in the package."""

from __future__ import annotations

import asyncio
import importlib.util
import tomllib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import xmpp_push
from xmpp_push.storage import (
    HEAD,
    MigratePolicy,
    SchemaOutOfDate,
    StorageError,
    current_revision,
    open_store,
    upgrade,
)
from xmpp_push.storage.migrate import REVISIONS, VERSION_TABLE, downgrade, script_location
from xmpp_push.storage.sql import metadata

REPO = Path(__file__).resolve().parents[2]
SERVERS = ["postgresql", "mysql"]

# A row as revision 0001 wrote it.
ROW_0001: dict[str, Any] = {
    "key_hash": "0" * 64,
    "owner": "alice@example.org",
    "push_jid": "push.example.org",
    "node": "n1",
    "target": "fcm",
    "token": "tok",
    "token_hash": "1" * 64,
    "topic": None,
    "mode": None,
    "client_priority": "high",
    "client_silent": False,
    "voip_token": None,
    "resource": "phone",
    "secret": None,
    "options": '{"service": "fcm"}',
    "created_at": 1_700_000_000_000_000,
    "updated_at": 1_700_000_000_000_000,
}


async def execute(url: str, statement: sa.Executable, params: dict[str, Any] | None = None) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.execute(statement, params or {})
    finally:
        await engine.dispose()


async def table_columns(url: str) -> set[str]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: {c["name"] for c in sa.inspect(sync).get_columns("registrations")}
            )
    finally:
        await engine.dispose()


async def test_an_empty_database_is_brought_to_head(fresh_url: str) -> None:
    assert await current_revision(fresh_url) is None

    assert await upgrade(fresh_url) == HEAD

    assert await current_revision(fresh_url) == HEAD
    assert {c.name for c in metadata.tables["registrations"].columns} == await table_columns(
        fresh_url
    )


async def test_upgrading_a_database_at_head_changes_nothing(fresh_url: str) -> None:
    await upgrade(fresh_url)

    assert await upgrade(fresh_url) == HEAD


async def test_upgrade_from_the_previous_revision_keeps_the_rows(fresh_url: str) -> None:
    assert await upgrade(fresh_url, "0001") == "0001"
    table = sa.table("registrations", *(sa.column(name) for name in ROW_0001))
    await execute(fresh_url, sa.insert(table).values(ROW_0001))

    assert await upgrade(fresh_url) == HEAD

    async with await open_store(fresh_url, migrate=MigratePolicy.CHECK) as store:
        (kept,) = await store.list()
    assert (kept.owner, kept.node, kept.token, kept.resource) == (
        "alice@example.org",
        "n1",
        "tok",
        "phone",
    )
    assert (kept.created_at, kept.client_silent, dict(kept.options)) == (
        1_700_000_000.0,
        False,
        {"service": "fcm"},
    )
    # What 0002 added reads as "no override" and "never failed".
    assert (kept.operator_priority, kept.operator_silent) == (None, None)
    assert (kept.failure_count, kept.last_success_at, kept.quarantined_until) == (0, None, None)


async def test_downgrade_and_upgrade_again(fresh_url: str) -> None:
    await upgrade(fresh_url)

    assert await downgrade(fresh_url, "0001") == "0001"
    assert "failure_count" not in await table_columns(fresh_url)
    assert await downgrade(fresh_url, "base") is None
    assert await upgrade(fresh_url) == HEAD


async def test_two_upgrades_at_once_both_succeed(fresh_url: str) -> None:
    results = await asyncio.gather(upgrade(fresh_url), upgrade(fresh_url))

    assert list(results) == [HEAD, HEAD]


async def test_the_migrated_schema_is_the_one_the_store_uses(fresh_url: str) -> None:
    await upgrade(fresh_url)

    def differences(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        return list(compare_metadata(context, metadata))

    engine = create_async_engine(fresh_url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(differences) == []
    finally:
        await engine.dispose()


# --------------------------------------------------------------------------- open_store's policy


@pytest.mark.parametrize("backend", SERVERS)
async def test_a_server_database_behind_head_is_refused_with_the_command_to_run(
    fresh_url: str,
) -> None:
    await upgrade(fresh_url, "0001")

    with pytest.raises(SchemaOutOfDate) as raised:
        await open_store(fresh_url, migrate=MigratePolicy.AUTO)

    assert (raised.value.current, raised.value.head) == ("0001", HEAD)
    assert "run `xmpp-push db upgrade`" in str(raised.value)
    assert await current_revision(fresh_url) == "0001"


@pytest.mark.parametrize("backend", SERVERS)
async def test_a_server_database_without_schema_is_refused(fresh_url: str) -> None:
    with pytest.raises(SchemaOutOfDate, match=r"no xmpp-push schema yet.*xmpp-push db upgrade"):
        await open_store(fresh_url, migrate=MigratePolicy.AUTO)


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_behind_head_is_upgraded_on_open(fresh_url: str) -> None:
    await upgrade(fresh_url, "0001")

    async with await open_store(fresh_url, migrate=MigratePolicy.AUTO):
        pass

    assert await current_revision(fresh_url) == HEAD


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_check_policy_refuses_even_sqlite(fresh_url: str) -> None:
    with pytest.raises(SchemaOutOfDate):
        await open_store(fresh_url, migrate=MigratePolicy.CHECK)


async def test_upgrade_policy_brings_a_server_database_to_head(fresh_url: str) -> None:
    async with await open_store(fresh_url, migrate=MigratePolicy.UPGRADE) as store:
        assert await store.count() == 0

    assert await current_revision(fresh_url) == HEAD


async def test_a_database_from_a_newer_xmpp_push_is_refused(fresh_url: str) -> None:
    await upgrade(fresh_url)
    version = sa.table(VERSION_TABLE, sa.column("version_num"))
    await execute(fresh_url, sa.update(version).values(version_num="9999"))

    with pytest.raises(SchemaOutOfDate, match="newer xmpp-push"):
        await open_store(fresh_url, migrate=MigratePolicy.UPGRADE)
    with pytest.raises(SchemaOutOfDate, match="newer xmpp-push"):
        await upgrade(fresh_url)


# --------------------------------------------------------------------------- SQLite files


async def test_a_fresh_sqlite_file_is_created_and_migrated_on_first_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "new.db"
    url = f"sqlite+aiosqlite:///{path}"

    async with await open_store(url, migrate=MigratePolicy.AUTO) as store:
        assert await store.count() == 0

    assert path.exists()
    assert await current_revision(url) == HEAD


async def test_asking_the_revision_of_a_missing_sqlite_file_creates_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "absent.db"

    assert await current_revision(f"sqlite+aiosqlite:///{path}") is None
    assert not path.exists()


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"])
async def test_in_memory_sqlite_is_refused(url: str) -> None:
    with pytest.raises(StorageError, match="in-memory"):
        await open_store(url, migrate=MigratePolicy.AUTO)


@pytest.mark.parametrize(
    "url", ["postgresql+psycopg2://db/push", "mysql+pymysql://db/push", "oracle://db"]
)
async def test_a_url_without_an_asyncio_driver_is_refused(url: str) -> None:
    with pytest.raises(StorageError, match="unsupported database URL scheme"):
        await open_store(url, migrate=MigratePolicy.AUTO)


async def test_a_missing_driver_is_named_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_find_spec = importlib.util.find_spec

    def without_asyncmy(name: str, package: str | None = None) -> Any:
        return None if name == "asyncmy" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_asyncmy)

    with pytest.raises(StorageError, match=r"asyncmy driver is not installed.*xmpp-push\[mysql\]"):
        await open_store("mysql+asyncmy://db/push", migrate=MigratePolicy.AUTO)


# --------------------------------------------------------------------------- packaging


def test_the_revision_list_matches_the_revision_files() -> None:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    script = ScriptDirectory.from_config(config)
    chain = [revision.revision for revision in script.walk_revisions()]

    assert list(reversed(chain)) == list(REVISIONS)
    assert script.get_current_head() == HEAD


def test_the_migrations_are_importable_from_the_package() -> None:
    assert script_location() == REPO / "schema"
    assert (script_location() / "env.py").exists()


def test_every_package_is_listed_in_pyproject() -> None:
    # pyproject lists packages by hand (schema/ is mapped into xmpp_push): one left
    # out would be missing from every non-editable install.
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_root = Path(xmpp_push.__file__).parent
    on_disk = {
        ".".join(("xmpp_push", *init.parent.relative_to(package_root).parts))
        for init in package_root.rglob("__init__.py")
    }
    schema = script_location()
    on_disk |= {
        ".".join(("xmpp_push.schema", *init.parent.relative_to(schema).parts))
        for init in schema.rglob("__init__.py")
    }

    assert set(setuptools["packages"]) == on_disk
