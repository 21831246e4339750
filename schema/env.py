"""Alembic's entry point for xmpp-push's migrations.

`xmpp_push.storage.migrate` (that is, `xmpp-push db upgrade`) runs Alembic with an
open connection in `config.attributes["connection"]`, already in the transaction and
holding the migration lock; this file only points Alembic at it. Nothing here reads a
URL in that case.

For developers running the `alembic` command directly (see README.md), the database
comes from `-x url=...` or `XMPP_PUSH_STORAGE_URL`; `--sql` prints the DDL instead.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from xmpp_push.storage.migrate import VERSION_TABLE
from xmpp_push.storage.sql import metadata


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        # SQLite alters a table by copying it; autogenerate should write it that way.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def url_from_command_line() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get(
        "XMPP_PUSH_STORAGE_URL", ""
    )
    if not url:
        raise SystemExit(
            "no database: pass -x url=postgresql+asyncpg://... or set XMPP_PUSH_STORAGE_URL"
            " (xmpp-push itself runs migrations with `xmpp-push db upgrade`)"
        )
    return url


async def run_with_url(url: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run_on)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=url_from_command_line(),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    handed_over = context.config.attributes.get("connection")
    if isinstance(handed_over, Connection):
        run_on(handed_over)
    else:
        asyncio.run(run_with_url(url_from_command_line()))
