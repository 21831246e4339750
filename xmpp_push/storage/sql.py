"""Registrations in PostgreSQL, MySQL/MariaDB or SQLite: `RegistrationStore` on
SQLAlchemy Core (asyncio), never the ORM.

`open_store(url, migrate=...)` gives a ready `SqlStore`. What it does per database,
and why (docs/storage.md says the same for operators):

* **Writes** are one transaction each, retried on a deadlock or serialization
  failure. `enable` is an upsert on `key_hash` (INSERT ... ON CONFLICT on PostgreSQL
  and SQLite, ON DUPLICATE KEY UPDATE on MySQL), so two enables of the same
  (owner, push_jid, node) racing from two connections end in one row. Before it, the
  owner is locked (an advisory lock on PostgreSQL, the owner's index range with
  SELECT ... FOR UPDATE on MySQL, the database write lock SQLite takes with BEGIN
  IMMEDIATE) so that two enables of one user do not both stay under the maximum.
* **Reads** go through connections the store holds open in autocommit mode: no
  checkout per lookup, and no BEGIN ... ROLLBACK around each one, which SQLAlchemy's
  asyncpg dialect otherwise adds (PROTOCOLS.md §8 measured it at half the speed).
  On SQLite and PostgreSQL they also skip SQLAlchemy's per-execution work: the
  SELECTs, compiled once, run on sqlite3 connections in the store's reader threads
  and as asyncpg prepared statements (see "reads" below; MySQL keeps SQLAlchemy's).
* **The lookup cache** (`for_owner`, the per-push hot path) exists on PostgreSQL only.
  Every write calls `pg_notify('xmpp_push_registrations', owner)` inside its
  transaction, so every process listening, this one included, drops that owner at
  commit; the CLI writes through this class and notifies the same way. The store
  listens on a connection of its own; while that connection is down nothing is
  cached, and when it comes back the cache starts empty, since notifications sent in
  between are lost. SQLite has no way to tell one process about another's commit (and
  is meant for one process anyway); MySQL has no notification channel either. There
  the store reads through, every time. One write does not notify, on purpose: a
  success that only moves `last_success_at` (see `record_success`).

Times are kept as BIGINT microseconds since the epoch (see schema/versions/0001):
`now` values are rounded to the microsecond, and a time read back equals the one
stored whenever that time was already a whole number of microseconds.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.util
import json
import random
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, Final, Generic, TypeAlias, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.dialects import mysql as mysql_dialect
from sqlalchemy.dialects import postgresql as postgresql_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool
from sqlalchemy.sql.base import ReadOnlyColumnCollection

from xmpp_push.core.model import Mode, Priority
from xmpp_push.core.registrations import (
    EnableOutcome,
    Registration,
    RegistrationRequest,
    RegistrationStore,
    Target,
)
from xmpp_push.storage import migrate as migrations
from xmpp_push.storage.migrate import SchemaOutOfDate, StorageError, StorageUnavailable

__all__ = [
    "NOTIFY_CHANNEL",
    "CacheStats",
    "MigratePolicy",
    "SqlStore",
    "metadata",
    "open_store",
    "registrations",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

NOTIFY_CHANNEL: Final = "xmpp_push_registrations"
"""PostgreSQL channel on which every write names the owner it changed."""

_LAST_ERROR_MAX = 1000
"""Characters of a failure reason kept; reasons come from providers and are short,
but one echoing a whole response body must not grow the row without bound."""

_WRITE_ATTEMPTS = 5
_OPERATION_TIMEOUT_SECONDS = 30.0
"""Bound on one read or one write, waiting for a connection included: a database
that hangs must surface as an error, not as pushes that never end."""
_SQLITE_BUSY_SECONDS = 10.0
"""How long a write waits for another process's write lock (shorter than the above,
so that the caller hears "database is locked" rather than a bare timeout)."""
_SQLITE_READER_THREADS = 2
"""Threads (each with its connection) that SQLite reads run in; see _SqliteReaders.
Two gave ~10% more direct-mode pushes/s than one, at ~13% less CPU per push (bench/run
--quick, four runs each)."""
_LISTENER_CHECK_SECONDS = 15.0
"""How often the listener connection is pinged: a connection that dies without a word
(a network partition) must not keep the cache alive for long."""
_LISTENER_RETRY_MAX_SECONDS = 5.0
_LISTENER_READY_WAIT_SECONDS = 5.0
_CONNECT_TIMEOUT_SECONDS = 10.0

# Advisory-lock class for per-owner locks; see migrate.py for the spelling.
_PG_LOCK_CLASS: Final = 0x78707368


# --------------------------------------------------------------------------- the table

metadata = sa.MetaData()

registrations = sa.Table(
    "registrations",
    metadata,
    # Keep in step with schema/versions (a test compares the two); the reasons for
    # key_hash, token_hash, the prefix index and the microsecond times are in 0001.
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("key_hash", sa.String(64), nullable=False),
    sa.Column("owner", sa.Text(), nullable=False),
    sa.Column("push_jid", sa.Text(), nullable=False),
    sa.Column("node", sa.Text(), nullable=False),
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("token", sa.Text()),
    sa.Column("token_hash", sa.String(64)),
    sa.Column("topic", sa.Text()),
    sa.Column("mode", sa.String(16)),
    sa.Column("client_priority", sa.String(16)),
    sa.Column("client_silent", sa.Boolean()),
    sa.Column("voip_token", sa.Text()),
    sa.Column("resource", sa.Text()),
    sa.Column("secret", sa.Text()),
    sa.Column(
        "options",
        sa.Text().with_variant(mysql_dialect.MEDIUMTEXT(), "mysql", "mariadb"),
        nullable=False,
    ),
    sa.Column("created_at", sa.BigInteger(), nullable=False),
    sa.Column("updated_at", sa.BigInteger(), nullable=False),
    sa.Column("operator_priority", sa.String(16)),
    sa.Column("operator_silent", sa.Boolean()),
    sa.Column("last_success_at", sa.BigInteger()),
    sa.Column("last_error_at", sa.BigInteger()),
    sa.Column("last_error", sa.Text()),
    sa.Column("failure_count", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("quarantined_until", sa.BigInteger()),
    sa.UniqueConstraint("key_hash", name="uq_registrations_key_hash"),
    sa.Index("ix_registrations_owner", "owner", mysql_length=191),
    sa.Index("ix_registrations_token", "target", "token_hash"),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
    mysql_collate="utf8mb4_bin",
)

_t = registrations.c

# In the order of Registration's fields: rows are unpacked by position.
_COLUMNS = (
    _t.id,
    _t.owner,
    _t.push_jid,
    _t.node,
    _t.target,
    _t.token,
    _t.topic,
    _t.mode,
    _t.client_priority,
    _t.operator_priority,
    _t.client_silent,
    _t.operator_silent,
    _t.voip_token,
    _t.resource,
    _t.secret,
    _t.options,
    _t.created_at,
    _t.updated_at,
    _t.last_success_at,
    _t.last_error_at,
    _t.last_error,
    _t.failure_count,
    _t.quarantined_until,
)

_SELECT = sa.select(*_COLUMNS)
_Read: TypeAlias = sa.Select[*tuple[Any, ...]]
"""What the read path runs: one of the SELECTs below."""
_BY_OWNER = _SELECT.where(_t.owner == sa.bindparam("owner")).order_by(_t.id)
_BY_ID = _SELECT.where(_t.id == sa.bindparam("id"))
_ALL = _SELECT.order_by(_t.id)
_COUNT = sa.select(sa.func.count()).select_from(registrations)
_NOTIFY = sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, sa.bindparam("owner", type_=sa.Text())))
_PG_LOCK_OWNER = sa.text("SELECT pg_advisory_xact_lock(:class_id, :object_id)").bindparams(
    sa.bindparam("class_id", type_=sa.Integer()), sa.bindparam("object_id", type_=sa.Integer())
)


# --------------------------------------------------------------------------- values


def _micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _seconds(micros: int) -> float:
    # An exact integer divided once: the nearest double to the stored microsecond.
    return micros / 1_000_000


def _optional_seconds(micros: int | None) -> float | None:
    return None if micros is None else micros / 1_000_000


def _sha256(*parts: str) -> str:
    # JSON keeps the parts apart unambiguously and is ASCII whatever the JIDs hold.
    return hashlib.sha256(json.dumps(parts).encode("ascii")).hexdigest()


def key_hash(owner: str, push_jid: str, node: str) -> str:
    """The unique key of a registration row (see schema/versions/0001)."""
    return _sha256(owner, push_jid, node)


def token_hash(token: str) -> str:
    return _sha256(token)


_OPTION_NAMES: Final[dict[str, str]] = {
    name: name
    for name in (
        "service",
        "device_id",
        "voip_device_id",
        "secret",
        "topic",
        "mode",
        "priority",
        "silent",
        "sound",
        "time_to_live",
        "mutable_content",
        "click_action",
    )
}
"""The publish-options field names clients send (PROTOCOLS.md, docs/clients.md)."""


def _options(text: str) -> dict[str, str]:
    """The stored publish-options. The usual field names are the same few in every
    row: one shared string each instead of a copy per cached row keeps a 10,000-user
    cache about 2 MiB smaller. Only known names are shared (not `sys.intern`): names
    are the clients' choice, and interned strings live forever on some Pythons."""
    return {_OPTION_NAMES.get(name, name): value for name, value in json.loads(text).items()}


def _registration(row: Sequence[Any]) -> Registration:
    (
        id_,
        owner,
        push_jid,
        node,
        target,
        token,
        topic,
        mode,
        client_priority,
        operator_priority,
        client_silent,
        operator_silent,
        voip_token,
        resource,
        secret,
        options,
        created_at,
        updated_at,
        last_success_at,
        last_error_at,
        last_error,
        failure_count,
        quarantined_until,
    ) = row
    return Registration(
        id=id_,
        owner=owner,
        push_jid=push_jid,
        node=node,
        target=Target(target),
        token=token,
        topic=topic,
        mode=None if mode is None else Mode(mode),
        client_priority=None if client_priority is None else Priority(client_priority),
        operator_priority=None if operator_priority is None else Priority(operator_priority),
        client_silent=None if client_silent is None else bool(client_silent),
        operator_silent=None if operator_silent is None else bool(operator_silent),
        voip_token=voip_token,
        resource=resource,
        secret=secret,
        # A plain dict, as from MemoryStore (dataclasses.asdict and pickle cannot copy
        # a read-only mapping). Cached rows are shared: callers must not mutate it.
        options=_options(options),
        created_at=_seconds(created_at),
        updated_at=_seconds(updated_at),
        last_success_at=_optional_seconds(last_success_at),
        last_error_at=_optional_seconds(last_error_at),
        last_error=last_error,
        failure_count=failure_count,
        quarantined_until=_optional_seconds(quarantined_until),
    )


def _enable_values(request: RegistrationRequest, now: int) -> dict[str, Any]:
    return {
        "key_hash": key_hash(request.owner, request.push_jid, request.node),
        "owner": request.owner,
        "push_jid": request.push_jid,
        "node": request.node,
        "target": request.target.value,
        "token": request.token,
        "token_hash": None if request.token is None else token_hash(request.token),
        "topic": request.topic,
        "mode": None if request.mode is None else request.mode.value,
        "client_priority": None if request.priority is None else request.priority.value,
        "client_silent": request.silent,
        "voip_token": request.voip_token,
        "resource": request.resource,
        "secret": request.secret,
        "options": json.dumps(dict(request.options), sort_keys=True),
        "created_at": now,
        "updated_at": now,
        "failure_count": 0,
    }


# Columns an enable overwrites on an existing row; id, created_at, the operator's
# overrides and the delivery record stay.
_CLIENT_COLUMNS = (
    "target",
    "token",
    "token_hash",
    "topic",
    "mode",
    "client_priority",
    "client_silent",
    "voip_token",
    "resource",
    "secret",
    "options",
    "updated_at",
)


@functools.cache
def _upsert(backend: str) -> sa.Executable:
    """INSERT, or UPDATE the row with the same key_hash, atomically; executed with the
    row's values (`_enable_values`) as parameters.

    Built once per backend: building it (`excluded` makes an alias of every column)
    cost 0.4-0.5 ms of CPU per enable, more than the database's work."""
    if backend == "mysql":
        my_insert = mysql_dialect.insert(registrations)
        new = my_insert.inserted
        # MySQL applies ON DUPLICATE KEY assignments left to right, each seeing the
        # ones before: the device comparison must come before target/token change.
        device_kept = sa.and_(
            _t.target == new.target, _t.token_hash.is_not_distinct_from(new.token_hash)
        )
        assignments: list[tuple[str, Any]] = [
            ("failure_count", sa.case((device_kept, _t.failure_count), else_=0)),
            ("quarantined_until", sa.case((device_kept, _t.quarantined_until), else_=None)),
        ]
        assignments += [(name, new[name]) for name in _CLIENT_COLUMNS]
        return my_insert.on_duplicate_key_update(assignments)

    if backend == "postgresql":
        pg_insert = postgresql_dialect.insert(registrations)
        return pg_insert.on_conflict_do_update(
            index_elements=[_t.key_hash], set_=_on_conflict(pg_insert.excluded)
        )
    lite_insert = sqlite_dialect.insert(registrations)
    return lite_insert.on_conflict_do_update(
        index_elements=[_t.key_hash], set_=_on_conflict(lite_insert.excluded)
    )


def _on_conflict(excluded: ReadOnlyColumnCollection[str, Any]) -> dict[str, Any]:
    """The SET of INSERT ... ON CONFLICT (PostgreSQL, SQLite), where each expression
    sees the row as it was before the update."""
    device_kept = sa.and_(
        _t.target == excluded.target, _t.token_hash.is_not_distinct_from(excluded.token_hash)
    )
    changes: dict[str, Any] = {name: excluded[name] for name in _CLIENT_COLUMNS}
    # Failures and a quarantine judged the old device; a new token starts clean.
    changes["failure_count"] = sa.case((device_kept, _t.failure_count), else_=0)
    changes["quarantined_until"] = sa.case((device_kept, _t.quarantined_until), else_=None)
    return changes


def _is_retryable(exc: sa.exc.DBAPIError) -> bool:
    """A deadlock or serialization failure: the database rolled back, try again."""
    orig = exc.orig
    if getattr(orig, "sqlstate", None) in {"40001", "40P01"}:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    # MySQL: 1213 deadlock (InnoDB rolled the transaction back).
    return bool(args) and args[0] == 1213


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True, slots=True)
class CacheStats:
    """The `for_owner` cache, for metrics."""

    enabled: bool
    """False on SQLite and MySQL: there every lookup is a miss."""
    listening: bool
    """PostgreSQL: the invalidation listener is connected (nothing is cached while not)."""
    entries: int
    hits: int
    misses: int
    invalidations: int
    """Invalidations applied: one per owner a write changed, from this process's own
    writes and from the notifications of every process (this one's included)."""
    resets: int
    """Whole-cache clears: the listener connection was lost or came back."""


@dataclass(slots=True, eq=False)
class _Fill:
    """A database read under way whose result may go into the cache, unless the owner
    was invalidated while it ran (the read may have seen the old rows)."""

    owner: str
    valid: bool = True


@dataclass(slots=True)
class _OwnerCache:
    """Each owner's registrations, least recently used dropped beyond `max_entries`."""

    max_entries: int
    entries: OrderedDict[str, tuple[Registration, ...]] = field(default_factory=OrderedDict)
    fills: dict[str, list[_Fill]] = field(default_factory=dict)
    listening: bool = False
    hits: int = 0
    misses: int = 0
    invalidations: int = 0
    resets: int = 0

    def lookup(self, owner: str) -> tuple[Registration, ...] | None:
        found = self.entries.get(owner)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
            self.entries.move_to_end(owner)
        return found

    def begin_fill(self, owner: str) -> _Fill | None:
        if not self.listening:
            return None
        fill = _Fill(owner)
        self.fills.setdefault(owner, []).append(fill)
        return fill

    def end_fill(self, fill: _Fill | None, rows: tuple[Registration, ...] | None) -> None:
        if fill is None:
            return
        pending = self.fills.get(fill.owner, [])
        pending.remove(fill)
        if not pending:
            self.fills.pop(fill.owner, None)
        if rows is None or not fill.valid or not self.listening:
            return
        self.entries[fill.owner] = rows
        self.entries.move_to_end(fill.owner)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def invalidate(self, owner: str) -> None:
        self.invalidations += 1
        self.entries.pop(owner, None)
        for fill in self.fills.get(owner, ()):
            fill.valid = False

    def reset(self, *, listening: bool) -> None:
        self.resets += 1
        self.listening = listening
        self.entries.clear()
        for pending in self.fills.values():
            for fill in pending:
                fill.valid = False

    def stats(self) -> CacheStats:
        return CacheStats(
            enabled=True,
            listening=self.listening,
            entries=len(self.entries),
            hits=self.hits,
            misses=self.misses,
            invalidations=self.invalidations,
            resets=self.resets,
        )


class _Listener:
    """LISTENs for NOTIFY_CHANNEL on a connection of its own and keeps the cache honest:
    the cache is live only while this connection is, and starts empty each time."""

    def __init__(self, engine: AsyncEngine, cache: _OwnerCache) -> None:
        self._engine = engine
        self._cache = cache
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.server_pid: int | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="xmpp-push cache listener")

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._cache.reset(listening=False)

    async def _run(self) -> None:
        delay = 0.05
        while True:
            began = asyncio.get_running_loop().time()
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cache listener failed", error=str(exc))
            finally:
                self._ready.clear()
                self.server_pid = None
                # Notifications sent while nobody listened are gone: forget everything.
                self._cache.reset(listening=False)
            if asyncio.get_running_loop().time() - began > _LISTENER_CHECK_SECONDS:
                delay = 0.05  # it had been up a while: this is a new outage
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, _LISTENER_RETRY_MAX_SECONDS)

    async def _listen_once(self) -> None:
        connection = await asyncio.wait_for(self._engine.connect(), _CONNECT_TIMEOUT_SECONDS)
        try:
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection  # the asyncpg Connection
            lost = asyncio.Event()
            driver.add_termination_listener(lambda _connection: lost.set())
            await driver.add_listener(NOTIFY_CHANNEL, self._on_notify)
            # Only now are commits from elsewhere sure to reach us: start caching.
            self._cache.reset(listening=True)
            self.server_pid = driver.get_server_pid()
            self._ready.set()
            log.info("cache listener connected", channel=NOTIFY_CHANNEL)
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), _LISTENER_CHECK_SECONDS)
                except TimeoutError:
                    await asyncio.wait_for(driver.execute("SELECT 1"), _CONNECT_TIMEOUT_SECONDS)
            log.warning("cache listener connection lost; cache cleared, reconnecting")
        finally:
            # The connection may be dead: drop it without a polite goodbye.
            with contextlib.suppress(Exception):
                await connection.invalidate()
                await connection.close()

    def _on_notify(self, _connection: object, _pid: int, _channel: str, owner: str) -> None:
        self._cache.invalidate(owner)


# --------------------------------------------------------------------------- reads
#
# Every read is a SELECT the store builds once (`_BY_OWNER`, `_BY_ID`, `_ALL`, `_COUNT`),
# and the per-push lookup is most of a direct-mode push's CPU. So reads skip what
# SQLAlchemy does per execution (compile cache lookup, cursor wrapper, result
# processing, and through aiosqlite four trips to its thread per SELECT) and run each
# statement's SQL, compiled once by the engine's own dialect, on the driver: a
# stdlib sqlite3 connection in a reader thread (one thread hop per read), an asyncpg
# prepared statement. MySQL keeps SQLAlchemy's path. Rows come back as tuples (asyncpg:
# Records) in `_COLUMNS` order, with the types `_registration` takes from any driver.


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A read's SQL as its dialect sends it, and the order its parameters go in."""

    sql: str
    names: tuple[str, ...]

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(params[name] for name in self.names)


class _CompiledReads:
    """Each read statement compiled once for one dialect: the text SQLAlchemy itself
    would send (asyncpg's `$1::VARCHAR` casts included), with positional parameters."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[_Read, _Compiled] = {}

    def __getitem__(self, statement: _Read) -> _Compiled:
        found = self._compiled.get(statement)
        if found is None:
            compiled = statement.compile(dialect=self._dialect)
            if not compiled.positional or compiled.post_compile_params:
                raise AssertionError(f"not a plain positional statement: {compiled}")
            found = _Compiled(compiled.string, tuple(compiled.positiontup or ()))
            self._compiled[statement] = found
        return found


class _ReadPath:
    """How a store reads: `rows` of one of its SELECTs, bounded by the operation
    timeout; a connection that died is replaced and the read tried once more."""

    async def open(self) -> None:
        raise NotImplementedError

    async def rows(self, statement: _Read, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


C = TypeVar("C")


class _Readers(_ReadPath, Generic[C]):
    """Connections held open for reads, handed out one task at a time, first come first
    served. A connection that fails is dropped and reopened on next use; a read that
    failed because the connection had died is tried once more on a fresh one.

    Hand-off is strictly FIFO: with a plain asyncio.Queue the task that returns a
    connection takes it straight back before the woken waiter runs, and under load some
    lookups waited seconds while one task did all the work (bench/registrations.py
    measured a 3.7 s max at 8 tasks; FIFO brings it to a few milliseconds).

    Subclasses say how a connection is opened, read on, dropped and closed."""

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        self._engine = engine
        self._idle: asyncio.Queue[C | None] = asyncio.Queue()
        self._waiters: collections.deque[asyncio.Future[C | None]] = collections.deque()
        for _ in range(size):
            self._idle.put_nowait(None)
        self._size = size

    async def _connect(self) -> C:
        raise NotImplementedError

    async def _fetch(
        self, connection: C, statement: _Read, params: Mapping[str, Any]
    ) -> Sequence[Sequence[Any]]:
        """Raises sa.exc.DBAPIError, with `connection_invalidated` if the connection died."""
        raise NotImplementedError

    async def _drop(self, connection: C) -> None:
        """Forget a connection that failed or may be out of step, best effort."""
        raise NotImplementedError

    async def _close(self, connection: C) -> None:
        raise NotImplementedError

    async def _take(self) -> C | None:
        if not self._waiters and not self._idle.empty():
            return self._idle.get_nowait()
        waiter: asyncio.Future[C | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._give(waiter.result())  # handed over just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _give(self, connection: C | None) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self._idle.put_nowait(connection)

    async def open(self) -> None:
        slots = [self._idle.get_nowait() for _ in range(self._size)]
        try:
            opened = await asyncio.gather(*(self._connect() for _ in slots))
        except BaseException:
            for _ in slots:
                self._idle.put_nowait(None)
            raise
        for connection in opened:
            self._idle.put_nowait(connection)

    async def rows(self, statement: _Read, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        async with asyncio.timeout(_OPERATION_TIMEOUT_SECONDS):
            connection = await self._take()
            try:
                for attempt in (1, 2):
                    if connection is None:
                        connection = await self._connect()
                    try:
                        return await self._fetch(connection, statement, params)
                    except sa.exc.DBAPIError as exc:
                        await self._drop(connection)
                        connection = None
                        if attempt == 2 or not exc.connection_invalidated:
                            raise
                    except BaseException:
                        # Cancelled (or timed out) mid-query: the wire may be out of step.
                        await self._drop(connection)
                        connection = None
                        raise
                raise AssertionError("unreachable")
            finally:
                self._give(connection)

    async def close(self) -> None:
        for _ in range(self._size):
            connection = await self._take()
            if connection is not None:
                await self._close(connection)


class _SqlAlchemyReaders(_Readers[AsyncConnection]):
    """MySQL/MariaDB: SQLAlchemy connections in autocommit mode (no BEGIN ... ROLLBACK
    around each SELECT)."""

    async def _connect(self) -> AsyncConnection:
        connection = await self._engine.connect()
        return await connection.execution_options(isolation_level="AUTOCOMMIT")

    async def _fetch(
        self, connection: AsyncConnection, statement: _Read, params: Mapping[str, Any]
    ) -> Sequence[Sequence[Any]]:
        result = await connection.execute(statement, params)
        return result.all()

    async def _drop(self, connection: AsyncConnection) -> None:
        await _invalidate(connection)

    async def _close(self, connection: AsyncConnection) -> None:
        await connection.close()


@dataclass(slots=True, eq=False)
class _AsyncpgReader:
    """A read connection of the pool and, under it, the asyncpg connection the reads
    run on, with the statements prepared on it so far (by SQL text)."""

    connection: AsyncConnection
    driver: Any  # asyncpg.Connection (asyncpg is an optional dependency)
    prepared: dict[str, Any] = field(default_factory=dict)  # asyncpg PreparedStatement


class _AsyncpgReaders(_Readers[_AsyncpgReader]):
    """PostgreSQL: each read is an asyncpg prepared statement run on the driver
    connection under a pooled SQLAlchemy one (autocommit: asyncpg sends no BEGIN).
    A cache miss of `for_owner` cost 165-185 µs of CPU through SQLAlchemy, 70-80 µs
    this way, of which the prepared statement alone is 45-50 µs."""

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        super().__init__(engine, size)
        self._reads = _CompiledReads(engine.dialect)

    async def _connect(self) -> _AsyncpgReader:
        connection = await self._engine.connect()
        try:
            connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
            raw = await connection.get_raw_connection()
        except BaseException:
            await _invalidate(connection)
            raise
        return _AsyncpgReader(connection, raw.driver_connection)

    async def _fetch(
        self, reader: _AsyncpgReader, statement: _Read, params: Mapping[str, Any]
    ) -> Sequence[Sequence[Any]]:
        compiled = self._reads[statement]
        args = compiled.args(params)
        try:
            prepared = reader.prepared.get(compiled.sql)
            if prepared is None:
                prepared = await reader.driver.prepare(compiled.sql)
                reader.prepared[compiled.sql] = prepared
            rows: Sequence[Sequence[Any]] = await prepared.fetch(*args)
        except Exception as exc:  # asyncpg's own exceptions, not importable here
            # What SQLAlchemy's asyncpg dialect calls a disconnect (is_disconnect).
            dead: bool = reader.driver.is_closed()
            raise sa.exc.DBAPIError.instance(
                compiled.sql, args, exc, Exception, connection_invalidated=dead
            ) from exc
        return rows

    async def _drop(self, reader: _AsyncpgReader) -> None:
        await _invalidate(reader.connection)

    async def _close(self, reader: _AsyncpgReader) -> None:
        await reader.connection.close()


async def _invalidate(connection: AsyncConnection) -> None:
    try:
        await connection.invalidate()
        await connection.close()
    except Exception as exc:  # closing a broken connection is best effort
        log.debug("dropping a read connection failed", error=str(exc))


class _SqliteReaders(_ReadPath):
    """SQLite: each read runs whole (execute and fetchall) on a stdlib sqlite3
    connection in a reader thread the store owns, one hop there and back per read.

    Through SQLAlchemy and aiosqlite a SELECT took four trips to aiosqlite's thread
    (cursor, execute, fetchall, close), each waking the event loop: a lookup cost
    400-550 µs of CPU where the SELECT itself is ~10 µs; one hop brings it to
    135-185 µs (docs/storage.md, "How reads work"). The executor's queue is the FIFO
    hand-off: reads run in the order they were asked for, and the thread goes from one
    to the next without waiting for the event loop.

    Each thread keeps its own connection, opened with the URL's arguments like the
    engine's, WAL and synchronous as `_sqlite_pragmas` sets them, and query_only: it
    never writes. In autocommit, every SELECT is a read transaction of its own that
    sees every commit before it, this process's writer's or another process's.

    A read that fails is retried once on a fresh connection (except when the database
    was busy, which waiting again does not cure). A read cancelled or timed out is
    abandoned, not interrupted: if it had started, the thread finishes it (a lookup
    is an index probe) and drops the answer."""

    def __init__(self, engine: AsyncEngine, threads: int) -> None:
        connect_args, connect_kwargs = engine.dialect.create_connect_args(engine.url)
        self._connect_args: list[Any] = list(connect_args)
        self._connect_kwargs: dict[str, Any] = {
            **connect_kwargs,
            "timeout": _SQLITE_BUSY_SECONDS,
            "isolation_level": None,
            # Opened and used in one reader thread; closed from another once they stop.
            "check_same_thread": False,
        }
        self._reads = _CompiledReads(engine.dialect)
        self._threads = threads
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="xmpp-push sqlite reader"
        )
        self._local = threading.local()
        self._opened: set[sqlite3.Connection] = set()
        self._opened_lock = threading.Lock()
        self._closed = False

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        # WAL once, before the readers: switching needs an exclusive lock, and two
        # readers switching a new file at the same moment made one of them fail at
        # once with "database is locked" (SQLite does not wait there, to avoid a
        # deadlock). On a file already in WAL, each reader's switch is a no-op.
        await loop.run_in_executor(self._executor, self._switch_to_wal)
        # Every thread and its connection now: a file that cannot be read fails
        # open_store, and no early lookup waits for a thread to start and connect (an
        # executor starts a thread for each job submitted while none is idle, and the
        # barrier keeps each job in a thread of its own).
        started = threading.Barrier(self._threads)
        await asyncio.gather(
            *(
                loop.run_in_executor(self._executor, self._first_connection, started)
                for _ in range(self._threads)
            )
        )

    async def rows(self, statement: _Read, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        if self._closed:
            raise StorageError("the registration store is closed")
        compiled = self._reads[statement]
        read = functools.partial(self._fetch, compiled.sql, compiled.args(params))
        async with asyncio.timeout(_OPERATION_TIMEOUT_SECONDS):
            return await asyncio.get_running_loop().run_in_executor(self._executor, read)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._shut_down)

    # -- in a reader thread --------------------------------------------------------

    def _fetch(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        for attempt in (1, 2):
            try:
                connection = self._connection()
                return connection.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                self._discard()
                # Errors of the sqlite3 module itself (a closed connection) have no code.
                busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
                if attempt == 2 or busy:
                    raise sa.exc.DBAPIError.instance(
                        sql, args, exc, sqlite3.Error, connection_invalidated=True
                    ) from exc
                log.debug("sqlite read retried on a new connection", error=str(exc))
        raise AssertionError("unreachable")

    def _switch_to_wal(self) -> None:
        try:
            connection = sqlite3.connect(*self._connect_args, **self._connect_kwargs)
            try:
                _sqlite_pragmas(connection)
            finally:
                connection.close()
        except sqlite3.Error as exc:
            raise sa.exc.DBAPIError.instance(None, None, exc, sqlite3.Error) from exc

    def _first_connection(self, started: threading.Barrier) -> None:
        started.wait(_CONNECT_TIMEOUT_SECONDS)
        try:
            self._connection()
        except sqlite3.Error as exc:
            raise sa.exc.DBAPIError.instance(None, None, exc, sqlite3.Error) from exc

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is not None:
            return connection
        connection = sqlite3.connect(*self._connect_args, **self._connect_kwargs)
        try:
            journal_mode = _sqlite_pragmas(connection)
            if journal_mode != "wal":
                raise sqlite3.OperationalError(
                    f"the database is in journal mode {journal_mode!r}, not WAL"
                    " (is another program holding it?)"
                )
            connection.execute("PRAGMA query_only = ON")
        except BaseException:
            connection.close()
            raise
        with self._opened_lock:
            self._opened.add(connection)
        self._local.connection = connection
        return connection

    def _discard(self) -> None:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is None:
            return
        with self._opened_lock:
            self._opened.discard(connection)
        with contextlib.suppress(sqlite3.Error):
            connection.close()

    # -- in a thread of the event loop's default executor --------------------------

    def _shut_down(self) -> None:
        # Reads already queued are index probes: they finish, and their callers get
        # their rows rather than a CancelledError nobody asked for.
        self._executor.shutdown(wait=True)
        with self._opened_lock:
            connections, self._opened = self._opened, set()
        for connection in connections:
            connection.close()


# --------------------------------------------------------------------------- connections


def _sqlite_pragmas(dbapi_connection: Any) -> str:
    """Set a new connection up (the writer's and the readers'); its journal mode."""
    # WAL: readers do not block the writer nor the writer them; NORMAL is durable
    # across application crashes in WAL mode.
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        (journal_mode,) = cursor.fetchone()
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()
    return str(journal_mode).lower()


def _sqlite_on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    # Let SQLAlchemy's "begin" event below decide when a transaction starts, instead
    # of sqlite3's legacy implicit BEGIN before DML only.
    dbapi_connection.isolation_level = None
    _sqlite_pragmas(dbapi_connection)


def _sqlite_on_begin(connection: Connection) -> None:
    if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
        return  # a read connection: each SELECT on its own
    # Take the write lock at BEGIN: a deferred transaction that reads first and then
    # writes may fail with "database is locked" without waiting (SQLite's deadlock
    # avoidance); IMMEDIATE waits for the busy timeout instead.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _backend(url: str) -> str:
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StorageError(f"not a database URL: {exc}") from None
    backend = parsed.get_backend_name()
    driver = parsed.get_driver_name()
    supported = {
        "sqlite": {"aiosqlite"},
        "postgresql": {"asyncpg"},
        "mysql": {"asyncmy", "aiomysql"},
        "mariadb": {"asyncmy", "aiomysql"},
    }
    if driver not in supported.get(backend, set()):
        raise StorageError(
            f"unsupported database URL scheme {backend}+{driver}: use sqlite+aiosqlite,"
            " postgresql+asyncpg or mysql+asyncmy"
        )
    if importlib.util.find_spec(driver) is None:
        extra = {"asyncpg": "xmpp-push[postgresql]", "asyncmy": "xmpp-push[mysql]"}
        raise StorageError(
            f"the {driver} driver is not installed: pip install '{extra.get(driver, driver)}'"
        )
    return "mysql" if backend == "mariadb" else backend


def _engine(url: str, backend: str, pool_size: int) -> AsyncEngine:
    if backend == "sqlite":
        engine = create_async_engine(
            url,
            pool_size=pool_size,
            max_overflow=0,
            connect_args={"timeout": _SQLITE_BUSY_SECONDS},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        return engine
    options: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": 0,
        # A database restart must not fail the first write after it.
        "pool_pre_ping": True,
    }
    parsed = make_url(url)
    if backend == "mysql":
        # The server closes connections idle for wait_timeout (8 h by default).
        options["pool_recycle"] = 3600
        if "charset" not in parsed.query:
            # Every JID and emoji fits in utf8mb4; MySQL's older "utf8" is 3 bytes.
            parsed = parsed.update_query_dict({"charset": "utf8mb4"})
    return create_async_engine(parsed, **options)


# --------------------------------------------------------------------------- the store


class MigratePolicy(StrEnum):
    """What `open_store` does about the database schema."""

    AUTO = "auto"
    """SQLite: UPGRADE (one process, no DBA, a file created on first start).
    PostgreSQL and MySQL: CHECK, so that a schema change is an operator's decision."""
    UPGRADE = "upgrade"
    """Bring the schema to HEAD, creating it if needed."""
    CHECK = "check"
    """Raise SchemaOutOfDate unless the schema is at HEAD; change nothing."""


class SqlStore:
    """Registrations in a SQL database. Build it with `open_store`; `close()` it.

    Counters of the lookup cache are in `cache_stats()`.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        backend: str,
        read_connections: int,
        cache: _OwnerCache | None,
        listener_engine: AsyncEngine | None,
    ) -> None:
        self._engine = engine
        self._backend = backend
        self._readers: _ReadPath
        if backend == "sqlite":
            self._readers = _SqliteReaders(engine, read_connections)
        elif backend == "postgresql":
            self._readers = _AsyncpgReaders(engine, read_connections)
        else:
            self._readers = _SqlAlchemyReaders(engine, read_connections)
        self._cache = cache
        self._listener_engine = listener_engine
        self._listener = (
            _Listener(listener_engine, cache)
            if listener_engine is not None and cache is not None
            else None
        )
        # Every PostgreSQL writer announces its changes, cache or not: the CLI caches
        # nothing yet its writes must reach the services' caches.
        self._notify = backend == "postgresql"
        self._lookups = 0
        self._closed = False

    async def _start(self) -> None:
        async with asyncio.timeout(_CONNECT_TIMEOUT_SECONDS):
            await self._readers.open()
        if self._listener is not None:
            self._listener.start()
            if not await self._listener.wait_ready(_LISTENER_READY_WAIT_SECONDS):
                log.warning("cache listener not connected yet; reading through until it is")

    async def __aenter__(self) -> SqlStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def backend(self) -> str:
        """One of "sqlite", "postgresql" or "mysql" (MariaDB included)."""
        return self._backend

    @property
    def listener_pid(self) -> int | None:
        """PostgreSQL: the server process of the listener connection, if connected."""
        return None if self._listener is None else self._listener.server_pid

    def cache_stats(self) -> CacheStats:
        if self._cache is None:
            return CacheStats(
                enabled=False,
                listening=False,
                entries=0,
                hits=0,
                misses=self._lookups,
                invalidations=0,
                resets=0,
            )
        return self._cache.stats()

    # -- reads ------------------------------------------------------------------------

    async def for_owner(self, owner: str) -> Sequence[Registration]:
        cache = self._cache
        if cache is None:
            self._lookups += 1
            return await self._owned_by(owner)
        cached = cache.lookup(owner)
        if cached is not None:
            return cached
        fill = cache.begin_fill(owner)
        found: tuple[Registration, ...] | None = None
        try:
            found = await self._owned_by(owner)
        finally:
            cache.end_fill(fill, found)
        return found

    async def get(self, registration_id: int) -> Registration | None:
        rows = await self._readers.rows(_BY_ID, {"id": registration_id})
        return _registration(rows[0]) if rows else None

    async def list(self, owner: str | None = None) -> Sequence[Registration]:
        if owner is not None:
            return await self._owned_by(owner)
        return tuple(_registration(row) for row in await self._readers.rows(_ALL, {}))

    async def count(self) -> int:
        rows = await self._readers.rows(_COUNT, {})
        return int(rows[0][0])

    async def _owned_by(self, owner: str) -> tuple[Registration, ...]:
        rows = await self._readers.rows(_BY_OWNER, {"owner": owner})
        # Exact match: MariaDB's binary collation still ignores trailing spaces.
        return tuple(_registration(row) for row in rows if row[1] == owner)

    # -- writes -----------------------------------------------------------------------

    async def enable(
        self, request: RegistrationRequest, *, max_per_owner: int, now: float
    ) -> EnableOutcome:
        if max_per_owner < 1:
            raise ValueError(f"max_per_owner must be at least 1, got {max_per_owner}")
        values = _enable_values(request, _micros(now))
        upsert = _upsert(self._backend)

        async def work(connection: AsyncConnection, touched: set[str]) -> EnableOutcome:
            owner = request.owner
            touched.add(owner)
            await self._lock_owner(connection, owner)
            await connection.execute(upsert, values)
            rows = await self._locked(connection, _t.owner == owner)
            mine = [row for row in rows if row.owner == owner]
            current = next(
                row for row in mine if (row.push_jid, row.node) == (request.push_jid, request.node)
            )
            replaced = [
                row
                for row in mine
                if row.id != current.id
                and current.token is not None
                and (row.target, row.token) == (current.target, current.token)
            ]
            gone = {row.id for row in replaced}
            others = sorted(
                (row for row in mine if row.id != current.id and row.id not in gone),
                key=lambda row: (row.updated_at, row.id),
            )
            evicted = others[: max(0, len(others) + 1 - max_per_owner)]
            gone.update(row.id for row in evicted)
            if gone:
                await connection.execute(sa.delete(registrations).where(_t.id.in_(gone)))
            return EnableOutcome(
                registration=current, replaced=tuple(replaced), evicted=tuple(evicted)
            )

        return await self._write(work)

    async def disable(self, owner: str, push_jid: str, node: str | None) -> Sequence[Registration]:
        async def work(connection: AsyncConnection, touched: set[str]) -> Sequence[Registration]:
            touched.add(owner)
            if node is not None:
                condition = _t.key_hash == key_hash(owner, push_jid, node)
            else:
                condition = sa.and_(_t.owner == owner, _t.push_jid == push_jid)
            removed = [
                row
                for row in await self._locked(connection, condition)
                if row.owner == owner
                and row.push_jid == push_jid
                and (node is None or row.node == node)
            ]
            if removed:
                ids = [row.id for row in removed]
                await connection.execute(sa.delete(registrations).where(_t.id.in_(ids)))
            return tuple(removed)

        return await self._write(work)

    async def delete(self, registration_id: int) -> Registration | None:
        async def work(connection: AsyncConnection, touched: set[str]) -> Registration | None:
            found = await self._locked(connection, _t.id == registration_id)
            if not found:
                return None
            touched.add(found[0].owner)
            await connection.execute(sa.delete(registrations).where(_t.id == registration_id))
            return found[0]

        return await self._write(work)

    async def delete_token(self, target: Target, token: str) -> int:
        async def work(connection: AsyncConnection, touched: set[str]) -> int:
            condition = sa.and_(_t.target == target.value, _t.token_hash == token_hash(token))
            doomed = [
                row for row in await self._locked(connection, condition) if row.token == token
            ]
            if not doomed:
                return 0
            touched.update(row.owner for row in doomed)
            ids = [row.id for row in doomed]
            await connection.execute(sa.delete(registrations).where(_t.id.in_(ids)))
            return len(doomed)

        return await self._write(work)

    async def set_operator_priority(
        self, registration_id: int, priority: Priority | None
    ) -> Registration | None:
        return await self._update(
            registration_id, operator_priority=None if priority is None else priority.value
        )

    async def set_operator_silent(
        self, registration_id: int, silent: bool | None
    ) -> Registration | None:
        return await self._update(registration_id, operator_silent=silent)

    async def release_quarantine(self, registration_id: int) -> Registration | None:
        return await self._update(registration_id, quarantined_until=None)

    async def record_success(self, registration_id: int, now: float) -> None:
        await self.record_successes({registration_id: now})

    async def record_successes(self, successes: Mapping[int, float]) -> None:
        if not successes:
            return

        async def work(connection: AsyncConnection, touched: set[str]) -> None:
            # The common case, one statement for the batch: a healthy row only gets its
            # time. That change alone notifies nobody (see docs/storage.md): a success
            # follows every push, and invalidating on each would make the cache useless.
            await connection.execute(
                sa.update(registrations)
                .where(
                    _t.id == sa.bindparam("registration_id"),
                    _t.failure_count == 0,
                    _t.quarantined_until.is_(None),
                )
                .values(last_success_at=sa.bindparam("stamp")),
                [
                    {"registration_id": registration_id, "stamp": _micros(now)}
                    for registration_id, now in successes.items()
                ],
            )
            # Rows that had failed or were quarantined: reset them, and tell the caches.
            recovering = await self._locked(
                connection,
                sa.and_(
                    _t.id.in_(list(successes)),
                    sa.or_(_t.failure_count != 0, _t.quarantined_until.is_not(None)),
                ),
            )
            for row in recovering:
                touched.add(row.owner)
                await connection.execute(
                    sa.update(registrations)
                    .where(_t.id == row.id)
                    .values(
                        last_success_at=_micros(successes[row.id]),
                        failure_count=0,
                        quarantined_until=None,
                    )
                )

        await self._write(work)

    async def record_failure(
        self,
        registration_id: int,
        now: float,
        reason: str,
        *,
        quarantine_until: float | None = None,
    ) -> None:
        changes: dict[str, Any] = {
            "last_error_at": _micros(now),
            "last_error": reason[:_LAST_ERROR_MAX],
            "failure_count": _t.failure_count + 1,
        }
        if quarantine_until is not None:
            changes["quarantined_until"] = _micros(quarantine_until)

        async def work(connection: AsyncConnection, touched: set[str]) -> None:
            found = await self._locked(connection, _t.id == registration_id)
            if not found:
                return
            touched.add(found[0].owner)
            await connection.execute(
                sa.update(registrations).where(_t.id == registration_id).values(changes)
            )

        await self._write(work)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            await self._listener.stop()
        await self._readers.close()
        await self._engine.dispose()
        if self._listener_engine is not None:
            await self._listener_engine.dispose()

    # -- helpers ----------------------------------------------------------------------

    async def _update(self, registration_id: int, **changes: Any) -> Registration | None:
        async def work(connection: AsyncConnection, touched: set[str]) -> Registration | None:
            found = await self._locked(connection, _t.id == registration_id)
            if not found:
                return None
            touched.add(found[0].owner)
            await connection.execute(
                sa.update(registrations).where(_t.id == registration_id).values(changes)
            )
            after = await connection.execute(_BY_ID, {"id": registration_id})
            return _registration(after.one())

        return await self._write(work)

    @staticmethod
    async def _locked(
        connection: AsyncConnection, condition: sa.ColumnElement[bool]
    ) -> tuple[Registration, ...]:
        # FOR UPDATE: MySQL's plain SELECT reads the transaction's snapshot, which may
        # miss a row committed since; a locking read sees and holds the latest.
        # (SQLite has no FOR UPDATE and needs none: BEGIN IMMEDIATE holds the database.)
        result = await connection.execute(
            _SELECT.where(condition).order_by(_t.id).with_for_update()
        )
        return tuple(_registration(row) for row in result)

    async def _lock_owner(self, connection: AsyncConnection, owner: str) -> None:
        """Serialize writes that count an owner's rows (enable's eviction)."""
        if self._backend == "postgresql":
            digest = hashlib.sha256(owner.encode("utf-8", "surrogatepass")).digest()
            object_id = int.from_bytes(digest[:4], "big", signed=True)
            await connection.execute(
                _PG_LOCK_OWNER, {"class_id": _PG_LOCK_CLASS, "object_id": object_id}
            )
        elif self._backend == "mysql":
            # Next-key locks on the owner's index range, gaps included: a concurrent
            # insert for this owner waits (or deadlocks, and is retried).
            await connection.execute(sa.select(_t.id).where(_t.owner == owner).with_for_update())

    async def _write(self, work: Callable[[AsyncConnection, set[str]], Awaitable[T]]) -> T:
        """Run `work` in one transaction, retried on deadlock. Owners it adds to the
        set are announced to other processes at commit (PostgreSQL) and dropped from
        this process's cache after it, whatever the outcome."""
        touched: set[str] = set()
        try:
            async with asyncio.timeout(_OPERATION_TIMEOUT_SECONDS):
                for attempt in range(1, _WRITE_ATTEMPTS + 1):
                    try:
                        async with self._engine.begin() as connection:
                            result = await work(connection, touched)
                            if self._notify:
                                for owner in sorted(touched):
                                    await connection.execute(_NOTIFY, {"owner": owner})
                        return result
                    except sa.exc.DBAPIError as exc:
                        if attempt == _WRITE_ATTEMPTS or not _is_retryable(exc):
                            raise
                        log.debug("write retried", attempt=attempt, error=str(exc.orig))
                        await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
                raise AssertionError("unreachable")
        finally:
            # Our own listener will hear the NOTIFY too, but later: a caller that
            # reads right after writing must already see its write.
            if self._cache is not None:
                for owner in touched:
                    self._cache.invalidate(owner)


async def open_store(
    url: str,
    *,
    pool_size: int = 8,
    migrate: MigratePolicy,
    cache_size: int = 10_000,
) -> SqlStore:
    """Open the registration database at `url` (a `[storage] url`).

    `pool_size` connections are kept open (at least 2; SQLite ignores it: one writer,
    since SQLite writes one at a time, and a connection in each of its reader
    threads); PostgreSQL adds one for the cache listener. `cache_size` bounds the
    owners cached (PostgreSQL only); 0 turns the cache and its listener off, for
    short-lived processes such as the CLI (whose writes still notify the others).

    Raises SchemaOutOfDate when the schema is not at HEAD and `migrate` does not allow
    upgrading it, StorageUnavailable when the database cannot be reached, StorageError
    for a URL this store cannot use.
    """
    backend = _backend(url)
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, got {pool_size}")
    policy = migrate
    if policy is MigratePolicy.AUTO:
        policy = MigratePolicy.UPGRADE if backend == "sqlite" else MigratePolicy.CHECK
    current = await migrations.current_revision(url)
    if current != migrations.HEAD:
        if policy is not MigratePolicy.UPGRADE:
            raise SchemaOutOfDate(current, migrations.HEAD)
        # Only now: a database already at HEAD starts without importing Alembic.
        await migrations.upgrade(url)

    if backend == "sqlite":
        readers, writers = _SQLITE_READER_THREADS, 1
    else:
        readers = max(1, pool_size // 2)
        writers = max(1, pool_size - readers)
    # SQLite's readers are connections of their own, not the engine's.
    engine = _engine(url, backend, writers if backend == "sqlite" else readers + writers)
    cache: _OwnerCache | None = None
    listener_engine: AsyncEngine | None = None
    if backend == "postgresql" and cache_size > 0:
        cache = _OwnerCache(max_entries=cache_size)
        listener_engine = create_async_engine(
            url,
            poolclass=NullPool,
            # Named so that an operator can tell it apart in pg_stat_activity.
            connect_args={"server_settings": {"application_name": "xmpp-push cache listener"}},
        )
    store = SqlStore(
        engine,
        backend=backend,
        read_connections=readers,
        cache=cache,
        listener_engine=listener_engine,
    )
    try:
        await store._start()
    except BaseException as exc:
        await store.close()
        if isinstance(exc, (OSError, sa.exc.DBAPIError)):
            raise StorageUnavailable(
                f"cannot open the database {migrations.safe_url(url)}: {exc}"
            ) from exc
        raise
    return store


_CONFORMS: type[RegistrationStore] = SqlStore
"""mypy --strict checks here that SqlStore keeps to the protocol."""
