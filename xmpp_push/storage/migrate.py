"""The registration database's schema: which revision it is at, and the upgrade to the
revision this xmpp-push needs (`xmpp-push db upgrade`).

The Alembic revisions live in `schema/` of the source tree, installed as the package
`xmpp_push.schema`. `schema/env.py` runs them on the connection handed over here, so
no `alembic.ini` and no URL outside the config are involved.

The errors of the storage layer live here too, because the two that matter at start
(`SchemaOutOfDate`, `StorageUnavailable`) are raised while the schema is checked.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

__all__ = [
    "HEAD",
    "REVISIONS",
    "VERSION_TABLE",
    "SchemaOutOfDate",
    "StorageError",
    "StorageUnavailable",
    "current_revision",
    "downgrade",
    "script_location",
    "upgrade",
]

REVISIONS: Final = ("0001", "0002")
"""Every revision in `schema/versions`, oldest first (a test keeps this in step)."""
HEAD: Final = REVISIONS[-1]
"""The revision this version of xmpp-push reads and writes."""

VERSION_TABLE: Final = "xmpp_push_alembic_version"
"""Alembic's bookkeeping table, named for us so that a database shared with another
Alembic-managed application keeps both histories apart."""


# Serializes concurrent upgrades (two processes starting at once, or the CLI next to a
# running service). Arbitrary constants, spelled "xpsh" so a DBA can tell whose they are.
_PG_LOCK_CLASS: Final = 0x78707368
_PG_LOCK_MIGRATE: Final = 1
_MYSQL_LOCK_NAME: Final = "xmpp_push.migrate"
_MYSQL_LOCK_SECONDS: Final = 60


class StorageError(Exception):
    """Something about the registration database that stops xmpp-push from using it."""


class StorageUnavailable(StorageError):
    """The database cannot be reached or opened. The message never holds a password."""


class SchemaOutOfDate(StorageError):
    """The database is not at the revision this xmpp-push needs (the CLI exits 2)."""

    current: str | None
    head: str

    def __init__(self, current: str | None, head: str) -> None:
        super().__init__(current, head)
        self.current = current
        self.head = head

    def __str__(self) -> str:
        if self.current is None:
            return (
                f"the database has no xmpp-push schema yet (revision {self.head} is needed):"
                " run `xmpp-push db upgrade`"
            )
        if self.current in REVISIONS:
            return (
                f"the database schema is at revision {self.current}, this xmpp-push needs"
                f" {self.head}: run `xmpp-push db upgrade`"
            )
        # Upgrading cannot help: a newer xmpp-push migrated this database.
        return (
            f"the database schema is at revision {self.current}, which this xmpp-push"
            f" (needing {self.head}) does not know: a newer xmpp-push has migrated it;"
            " run that version"
        )


def script_location() -> Path:
    """The directory of the installed revisions (the package `xmpp_push.schema`).

    Found through the import system rather than imported: pyproject maps schema/ into
    the package, which type checkers and linters cannot follow."""
    spec = importlib.util.find_spec("xmpp_push.schema")
    if spec is None or not spec.submodule_search_locations:
        raise StorageError(
            "the migrations (package xmpp_push.schema) are not installed: reinstall"
            " xmpp-push (`pip install .`, or `pip install -e .` in a checkout)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def safe_url(url: str) -> str:
    """The URL as it may appear in a message: password masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "<unparsable database URL>"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases. Refuses in-memory SQLite,
    which would vanish with the connection that made it."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if database in {"", ":memory:"} or "mode=memory" in database:
        raise StorageError(
            "an in-memory SQLite database cannot hold registrations (each connection"
            " would see its own): give a file path, e.g. sqlite+aiosqlite:///xmpp-push.db"
        )
    return Path(database)


async def upgrade(url: str, revision: str = "head") -> str:
    """Bring the database at `url` to `revision` (default: HEAD) and return the
    revision it is at afterwards. Creates a SQLite file that does not exist yet."""
    reached = await _run(url, revision, downgrade=False)
    if reached is None:  # only "upgrading" to "base" ends without a revision
        raise StorageError(f"no revision after upgrading to {revision!r}")
    return reached


async def downgrade(url: str, revision: str) -> str | None:
    """Take the database back to `revision` ("base": no schema). For development and
    tests; operators restore a backup instead. Returns the revision it is at."""
    return await _run(url, revision, downgrade=True)


async def current_revision(url: str) -> str | None:
    """The revision the database is at; None if it has no schema (or, for SQLite, no
    file: asking does not create one)."""
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    engine = _engine(url)
    try:
        async with _connected(engine, url) as connection:
            return await connection.run_sync(revision_of)
    finally:
        await engine.dispose()


def revision_of(connection: Connection) -> str | None:
    """Read Alembic's version table with plain SQL: every start asks this, and
    importing Alembic for it would cost the running service its memory (~5 MiB) for
    good; Alembic is imported only when there is something to migrate."""
    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    version = sa.table(VERSION_TABLE, sa.column("version_num"))
    rows = connection.execute(sa.select(version.c.version_num)).all()
    if len(rows) > 1:
        heads = ", ".join(sorted(str(row[0]) for row in rows))
        raise StorageError(f"the database has several schema heads ({heads}): restore a backup")
    return str(rows[0][0]) if rows else None


# --------------------------------------------------------------------------- internals


async def _run(url: str, revision: str, *, downgrade: bool) -> str | None:
    sqlite_path(url)  # refuses in-memory SQLite before anything is created
    engine = _engine(url)
    try:
        async with _connected(engine, url) as connection:
            result = await connection.run_sync(_migrate, revision, downgrade)
            await connection.commit()
            return result
    finally:
        await engine.dispose()


def _engine(url: str) -> AsyncEngine:
    # One short-lived connection: migrations and revision checks are rare.
    return create_async_engine(url, poolclass=NullPool)


@contextlib.asynccontextmanager
async def _connected(engine: AsyncEngine, url: str) -> AsyncIterator[AsyncConnection]:
    try:
        connection = await engine.connect()
    except (OSError, sa.exc.DBAPIError) as exc:
        raise StorageUnavailable(f"cannot open the database {safe_url(url)}: {exc}") from exc
    try:
        yield connection
    finally:
        await connection.close()


def _migrate(connection: Connection, revision: str, downgrade: bool) -> str | None:
    with _migration_lock(connection):
        current = revision_of(connection)
        if current is not None and current not in REVISIONS:
            raise SchemaOutOfDate(current, HEAD)
        from alembic import command  # imported here: see revision_of
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(script_location()))
        config.attributes["connection"] = connection
        if downgrade:
            command.downgrade(config, revision)
        else:
            command.upgrade(config, revision)
        return revision_of(connection)


@contextlib.contextmanager
def _migration_lock(connection: Connection) -> Iterator[None]:
    backend = connection.dialect.name
    if backend == "postgresql":
        # Held until the transaction that also carries the DDL commits.
        connection.execute(
            sa.text("SELECT pg_advisory_xact_lock(:class_id, :object_id)"),
            {"class_id": _PG_LOCK_CLASS, "object_id": _PG_LOCK_MIGRATE},
        )
        yield
    elif backend in {"mysql", "mariadb"}:
        # MySQL commits each DDL statement on its own, so a transaction cannot hold
        # the lock; a named lock belongs to the session instead.
        got = connection.execute(
            sa.text("SELECT GET_LOCK(:name, :seconds)"),
            {"name": _MYSQL_LOCK_NAME, "seconds": _MYSQL_LOCK_SECONDS},
        ).scalar()
        if got != 1:
            raise StorageError("another `xmpp-push db upgrade` holds the migration lock")
        try:
            yield
        finally:
            connection.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": _MYSQL_LOCK_NAME})
    else:
        # SQLite: take the write lock up front, so that a second process waits for
        # this upgrade and then finds nothing left to do.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield
