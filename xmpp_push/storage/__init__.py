"""Where registrations are kept: implementations of `RegistrationStore`.

* `open_store(url, migrate=...)` -> `SqlStore`: PostgreSQL, MySQL/MariaDB or SQLite
  (docs/storage.md).
* `xmpp_push.storage.memory.MemoryStore`: in memory, for tests and trials.
* `xmpp_push.storage.migrate`: the schema revision, and `upgrade` for
  `xmpp-push db upgrade`.

The names below are loaded on first use: SQLAlchemy and Alembic take some 0.4 s to
import, which whoever only wants the memory store should not pay.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xmpp_push.storage.migrate import (
        HEAD,
        SchemaOutOfDate,
        StorageError,
        StorageUnavailable,
        current_revision,
        upgrade,
    )
    from xmpp_push.storage.sql import CacheStats, MigratePolicy, SqlStore, open_store

__all__ = [
    "HEAD",
    "CacheStats",
    "MigratePolicy",
    "SchemaOutOfDate",
    "SqlStore",
    "StorageError",
    "StorageUnavailable",
    "current_revision",
    "open_store",
    "upgrade",
]

_HOME = {
    "HEAD": "migrate",
    "SchemaOutOfDate": "migrate",
    "StorageError": "migrate",
    "StorageUnavailable": "migrate",
    "current_revision": "migrate",
    "upgrade": "migrate",
    "CacheStats": "sql",
    "MigratePolicy": "sql",
    "SqlStore": "sql",
    "open_store": "sql",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
