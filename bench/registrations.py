"""Direct mode's registration store at scale: `SqlStore` against 1,000,000 rows.

Not a test: a benchmark (issue #4, item 5). For each backend it loads N registrations
into a database of its own, then measures the real store opened by `open_store`:

* `enable` of a new row, `enable` of an existing row again (same token, as every app
  start sends it) and `disable` of one node: operations/s, p50 and p99 latency, first
  with one task, then with 8 concurrent tasks on the same store;
* `for_owner` of random owners, cold (the owner's first lookup: a miss of the store's
  cache, the database's pages in the OS page cache) and warm (owners looked up before:
  a hit of PostgreSQL's per-owner cache; SQLite and MySQL have no cache and read
  through), one task and 8 tasks;
* the baseline, in the same run: the same lookup done the naive way, a fresh
  `engine.connect()` and the same SELECT per lookup on an engine with SQLAlchemy's
  defaults, rows turned into `Registration` by the same function as the store's.

    .venv/bin/python -m bench.registrations                          # 1M rows, ~4 min
    .venv/bin/python -m bench.registrations --rows 20000             # quick check, ~30 s
    .venv/bin/python -m bench.registrations --backends postgresql --out /tmp/r.json

The load writes rows built by the store's own `_enable_values` (private, imported on
purpose: the bulk rows must be exactly what `SqlStore.enable` writes) from requests
built by `registration_request`, the function the component turns an `<enable/>`
into a request with; PostgreSQL loads by COPY, SQLite and MySQL by executemany of a
Core INSERT. Afterwards a few loaded rows are disabled and enabled again through the
store and every column compared with the bulk-loaded row (`row_shape` in the JSON).

Results: a table on the terminal, every figure in `bench/results/registrations-<UTC
time>.json`, and the section between `<!-- registrations:start -->` and
`<!-- registrations:end -->` of docs/performance.md (only that section is rewritten;
by default only for a run at the default 1,000,000 rows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import hashlib
import json
import os
import platform
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Final, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from bench._common import (
    REPO,
    command_line,
    console_table,
    markdown_table,
    percentile,
    relative,
    update_docs_section,
)
from xmpp_push.core.direct import EnableCommand, registration_request
from xmpp_push.core.registrations import Registration, RegistrationRequest
from xmpp_push.storage import migrate as migrations
from xmpp_push.storage.sql import (
    # Private, imported on purpose: the bulk rows must be exactly what enable writes
    # (_enable_values), and the baseline must run the store's own SELECT and build the
    # same Registration objects (_BY_OWNER, _registration), so that only the way the
    # connection is had (and the cache) differs.
    _BY_OWNER,
    CacheStats,
    MigratePolicy,
    SqlStore,
    _enable_values,
    _registration,
    key_hash,
    open_store,
    registrations,
)

T = TypeVar("T")

DEFAULT_ROWS: Final = 1_000_000
MIN_ROWS: Final = 4_000
DEVICES_PER_OWNER: Final = 4
"""Devices per user in the loaded table (N rows = N / 4 users)."""
NEW_DEVICE: Final = DEVICES_PER_OWNER
"""Device number an "enable, new row" adds to a loaded user (a fifth phone)."""
PUSH_JID: Final = "push.bench.example"
OWN_JIDS: Final = frozenset({PUSH_JID})
MAX_PER_OWNER: Final = 10
"""`[direct] max_registrations_per_user` default: no enable here evicts."""
POOL_SIZE: Final = 8
"""`[storage] pool_size` default: 4 read and 4 write connections on PostgreSQL."""
CACHE_SIZE: Final = 10_000
"""`open_store`'s default number of owners cached (PostgreSQL)."""
CONCURRENCY: Final = 8
TARGET_P99_MS: Final = 2.0
"""Issue #6: direct-mode lookup p99 at most 2 ms on PostgreSQL at 1,000,000 rows."""
DATABASE: Final = "xmpp_push_bench_registrations"
POSTGRESQL_ADMIN_URL: Final = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
MYSQL_ADMIN_URL: Final = "mysql+asyncmy://root@127.0.0.1:3306/"
BACKENDS: Final = ("sqlite", "postgresql", "mysql")
LOAD_BATCH: Final = 20_000
QUIET_BELOW: Final = 0.5
"""Cores busy on the machine under which measuring starts (see --quiet-wait)."""
OTHER_LOAD_WARNING: Final = 0.3
"""Cores used by processes other than this one and the database's during a phase
above which the summary says the figures were disturbed."""
WARMUP_LOOKUPS: Final = 200
WARMUP_WRITES: Final = 50
SHAPE_CHECKS: Final = DEVICES_PER_OWNER
"""Loaded rows re-enabled through the store to prove the bulk rows right: one per
kind of device."""
DOCS_START: Final = "<!-- registrations:start -->"
DOCS_END: Final = "<!-- registrations:end -->"
LIBRARIES: Final = ("xmpp-push", "SQLAlchemy", "asyncpg", "aiosqlite", "asyncmy", "alembic")


# --------------------------------------------------------------------------- the data


@dataclass(frozen=True, slots=True)
class Dataset:
    """Users `user<i>@bench.example`, each with `devices` registrations at PUSH_JID:
    even devices APNs (production, then sandbox with a VoIP token), odd devices FCM.
    Everything follows from (seed, user, device), so any row can be made again."""

    owners: int
    devices: int
    seed: int
    epoch_micros: int
    """updated_at of the first loaded row; each next row is one microsecond later."""

    @property
    def rows(self) -> int:
        return self.owners * self.devices

    @staticmethod
    def owner(index: int) -> str:
        return f"user{index}@bench.example"

    def command(self, owner: int, device: int) -> EnableCommand:
        digest = hashlib.blake2b(
            f"{self.seed}/{owner}/{device}".encode(), digest_size=64
        ).hexdigest()
        node = f"{digest[:10]}{device}"  # clients pick short random nodes
        secret = digest[100:124]
        options: dict[str, str]
        if device % 2 == 0:
            options = {
                "service": "apns",
                "device_id": digest[:64],
                "topic": "org.bench.messenger",
                "mode": "prod" if device % 4 == 0 else "sandbox",
                "secret": secret,
            }
            if device % 4 == 2:
                options["voip_device_id"] = digest[64:128]
        else:
            # FCM tokens: "<instance id>:APA91b<about 140 URL-safe characters>".
            options = {
                "service": "fcm",
                "device_id": f"{digest[:22]}:APA91b{digest[22:128]}{digest[:36]}",
                "secret": secret,
                "priority": "high",
            }
        return EnableCommand(
            owner=self.owner(owner),
            resource=f"phone-{device}",
            jid=PUSH_JID,
            node=node,
            options=options,
        )

    def request(self, owner: int, device: int) -> RegistrationRequest:
        """What the component would hand the store for this user's enable."""
        return registration_request(self.command(owner, device), OWN_JIDS)

    def loaded_at(self, owner: int, device: int) -> int:
        return self.epoch_micros + owner * self.devices + device

    def batches(self, size: int) -> Iterator[list[dict[str, Any]]]:
        """The loaded rows, exactly as `SqlStore.enable` would insert them."""
        batch: list[dict[str, Any]] = []
        for owner in range(self.owners):
            for device in range(self.devices):
                batch.append(
                    _enable_values(self.request(owner, device), self.loaded_at(owner, device))
                )
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch


class OwnerPool:
    """Hands out users in a random order, each at most once: a cold lookup must be an
    owner nobody asked for before, and no two operations of a phase share a user."""

    def __init__(self, owners: int, rng: random.Random) -> None:
        self._order = list(range(owners))
        rng.shuffle(self._order)
        self._next = 0

    @property
    def left(self) -> int:
        return len(self._order) - self._next

    def take(self, count: int) -> list[int]:
        if count > self.left:
            raise ValueError(f"{count} more users wanted, {self.left} left: load more rows")
        taken = self._order[self._next : self._next + count]
        self._next += count
        return taken


@dataclass(frozen=True, slots=True)
class Plan:
    """How many operations each measured phase runs."""

    write_ops: int
    lookup_ops: int
    warm_owners: int
    notes: tuple[str, ...] = ()

    @staticmethod
    def fit(owners: int, write_ops: int, lookup_ops: int) -> Plan:
        """The requested counts, scaled down when the table has too few users for every
        phase to get users of its own (quick runs)."""
        warm_owners = min(lookup_ops, CACHE_SIZE // 2)
        fixed = SHAPE_CHECKS + 2 * WARMUP_LOOKUPS + 3 * WARMUP_WRITES
        # 4 cold lookup phases, the warm set, 4 write phases needing users of their own.
        wanted = 4 * lookup_ops + warm_owners + 4 * write_ops
        if fixed + wanted <= owners:
            return Plan(write_ops, lookup_ops, warm_owners)
        scale = (owners - fixed) / wanted
        write_ops = max(1, int(write_ops * scale))
        lookup_ops = max(1, int(lookup_ops * scale))
        note = (
            f"{owners:,} users cannot give every phase users of its own: scaled to"
            f" {write_ops:,} writes and {lookup_ops:,} lookups per phase"
        )
        return Plan(write_ops, lookup_ops, max(1, int(warm_owners * scale)), (note,))


# --------------------------------------------------------------------------- timing


@dataclass(slots=True)
class Timing:
    ops: int
    concurrency: int
    seconds: float
    latencies: list[float]
    """Seconds per operation, waiting for a connection included."""
    rows: int
    """Rows the operations returned or removed, to check them."""
    client_cpu_seconds: float
    """CPU time of this process (event loop and the aiosqlite threads)."""
    machine_busy_cores: float | None
    """CPU of the whole machine in use over the phase, in cores (database included)."""
    server_cpu_seconds: float
    """CPU time of the database server's processes (PostgreSQL, MariaDB)."""
    ops_per_task: list[int]
    """Operations each task completed: far apart means some tasks were starved."""
    gc: GcWatch

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        return {
            "ops": self.ops,
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 3),
            "ops_per_s": round(self.ops / self.seconds, 1),
            "p50_ms": round(percentile(ordered, 0.50) * 1000, 3),
            "p99_ms": round(percentile(ordered, 0.99) * 1000, 3),
            "max_ms": round(ordered[-1] * 1000, 3),
            "mean_ms": round(sum(ordered) / len(ordered) * 1000, 3),
            "rows": self.rows,
            "client_cpu_ms_per_op": round(self.client_cpu_seconds / self.ops * 1000, 3),
            "machine_busy_cores": self.machine_busy_cores,
            "client_cores": round(self.client_cpu_seconds / self.seconds, 2),
            "server_cores": round(self.server_cpu_seconds / self.seconds, 2),
            "other_cores": (
                None
                if self.machine_busy_cores is None
                else round(
                    max(
                        0.0,
                        self.machine_busy_cores
                        - (self.client_cpu_seconds + self.server_cpu_seconds) / self.seconds,
                    ),
                    2,
                )
            ),
            "ops_per_task": sorted(self.ops_per_task),
            "gc_collections": self.gc.collections,
            "gc_pause_ms_max": round(max(self.gc.pauses, default=0.0) * 1000, 1),
            "gc_pause_ms_total": round(sum(self.gc.pauses) * 1000, 1),
            "gc_collected_per_op": round(self.gc.collected / self.ops, 1),
        }


class GcWatch:
    """Python's cyclic garbage collections during a phase: each one stops the event
    loop, and a full (generation 2) one takes as long as the live heap is large."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.pauses: list[float] = []
        self.collected = 0
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        self.pauses.append(time.perf_counter() - self._began)
        self.collections[info["generation"]] += 1
        self.collected += info["collected"]


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


SERVER_PROCESSES: Final[Mapping[str, frozenset[str]]] = {
    "sqlite": frozenset(),  # in this process
    "postgresql": frozenset({"postgres"}),
    "mysql": frozenset({"mariadbd", "mysqld"}),
}
"""Names of the database server's processes, whose CPU is the server's."""
_TICKS: Final = os.sysconf("SC_CLK_TCK")


def _server_cpu_seconds(names: frozenset[str]) -> float:
    """CPU seconds used so far by the database servers (every process so named,
    whichever database it serves), from /proc. Children's time counts too: a
    PostgreSQL backend that exits (a connection closed mid-phase) passes its time to
    the postmaster, so the difference of two readings still holds it."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue  # gone meanwhile
        name = raw[raw.index(b"(") + 1 : raw.rindex(b")")].decode(errors="replace")
        if name in names:
            fields = raw[raw.rindex(b")") + 2 :].split()
            ticks += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return ticks / _TICKS


def _busy_cores(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] == before[1]:
        return None
    cores = os.cpu_count() or 1
    return round((after[0] - before[0]) / (after[1] - before[1]) * cores, 2)


async def timed(
    operation: Callable[[T], Awaitable[int]],
    items: Sequence[T],
    concurrency: int,
    server: frozenset[str] = frozenset(),
) -> Timing:
    """Run `operation` on every item, `concurrency` at a time, timing each; `server`
    names the database server's processes."""
    latencies = [0.0] * len(items)
    work = iter(enumerate(items))
    rows = 0
    done = [0] * concurrency

    async def worker(task: int) -> None:
        nonlocal rows
        for index, item in work:  # one iterator shared by the workers
            began = time.perf_counter()
            found = await operation(item)
            latencies[index] = time.perf_counter() - began
            rows += found  # not `rows += await ...`: that reads `rows` before awaiting
            done[task] += 1

    gc.collect()
    watch = GcWatch()
    gc.callbacks.append(watch)
    server_before = _server_cpu_seconds(server)
    ticks = _cpu_ticks()
    cpu = time.process_time()
    began = time.perf_counter()
    try:
        await asyncio.gather(*(worker(task) for task in range(concurrency)))
    finally:
        gc.callbacks.remove(watch)
    seconds = time.perf_counter() - began
    return Timing(
        ops=len(items),
        concurrency=concurrency,
        seconds=seconds,
        latencies=latencies,
        rows=rows,
        client_cpu_seconds=time.process_time() - cpu,
        machine_busy_cores=_busy_cores(ticks, _cpu_ticks()),
        server_cpu_seconds=_server_cpu_seconds(server) - server_before,
        ops_per_task=done,
        gc=watch,
    )


async def wait_for_quiet(limit: float, busy_below: float = QUIET_BELOW) -> float | None:
    """Wait (up to `limit` seconds) until the machine uses under `busy_below` cores for
    two seconds: other work on these 2 cores would show up as our latency. Returns the
    last reading."""
    deadline = time.monotonic() + limit
    while True:
        before = _cpu_ticks()
        await asyncio.sleep(2)
        busy = _busy_cores(before, _cpu_ticks())
        if busy is None or busy < busy_below or time.monotonic() >= deadline:
            return busy


# --------------------------------------------------------------------------- databases


@dataclass(slots=True)
class Database:
    """A database made for this run, dropped after it."""

    backend: str
    url: str
    engine: AsyncEngine
    """For loading and inspection: never used while the store is measured."""


@contextlib.asynccontextmanager
async def fresh_database(backend: str, args: argparse.Namespace) -> AsyncIterator[Database]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="xmpp-push-bench-registrations-") as directory:
            url = f"sqlite+aiosqlite:///{directory}/registrations.db"
            engine = create_async_engine(url, poolclass=NullPool)
            try:
                yield Database(backend, url, engine)
            finally:
                await engine.dispose()
        return

    admin_url = make_url(args.postgresql_url if backend == "postgresql" else args.mysql_url)
    admin = create_async_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    if backend == "postgresql":
        # WITH (FORCE): a run killed before its cleanup leaves connections behind.
        drop = f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'
        create = f'CREATE DATABASE "{DATABASE}"'
    else:
        drop = f"DROP DATABASE IF EXISTS `{DATABASE}`"
        create = f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
    try:
        async with admin.connect() as connection:
            await connection.exec_driver_sql(drop)
            await connection.exec_driver_sql(create)
        url = admin_url.set(database=DATABASE).render_as_string(hide_password=False)
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            yield Database(backend, url, engine)
        finally:
            await engine.dispose()
            if not args.keep_database:
                async with admin.connect() as connection:
                    await connection.exec_driver_sql(drop)
    finally:
        await admin.dispose()


async def load(database: Database, dataset: Dataset) -> dict[str, Any]:
    """Create the schema (the real migrations) and write every row of `dataset`."""
    began = time.perf_counter()
    await migrations.upgrade(database.url)
    migrated = time.perf_counter()
    if database.backend == "postgresql":
        async with database.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection  # the asyncpg Connection
            columns: list[str] | None = None
            for batch in dataset.batches(LOAD_BATCH):
                columns = columns or list(batch[0])
                records = [tuple(row[name] for name in columns) for row in batch]
                await driver.copy_records_to_table(
                    registrations.name, records=records, columns=columns
                )
    else:
        insert = sa.insert(registrations)
        async with database.engine.begin() as connection:
            if database.backend == "sqlite":
                # This loading connection only: room for the indexes being built.
                await connection.exec_driver_sql("PRAGMA cache_size = -1000000")
            for batch in dataset.batches(LOAD_BATCH):
                await connection.execute(insert, batch)
    loaded = time.perf_counter()
    settle: list[str] = []
    async with database.engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        if database.backend == "postgresql":
            # What autovacuum would do soon after such a load (planner statistics,
            # visibility map), and the checkpoint that would otherwise land mid-run.
            settle = ["VACUUM (ANALYZE) registrations", "CHECKPOINT"]
        elif database.backend == "mysql":
            settle = ["ANALYZE TABLE registrations"]
        # SQLite: nothing. The store never runs ANALYZE, so neither does the bench.
        for statement in settle:
            await autocommit.exec_driver_sql(statement)
    settled = time.perf_counter()
    return {
        "rows": dataset.rows,
        "owners": dataset.owners,
        "method": "COPY (asyncpg)" if database.backend == "postgresql" else "Core INSERT",
        "batch_rows": LOAD_BATCH,
        "migrate_seconds": round(migrated - began, 2),
        "load_seconds": round(loaded - migrated, 2),
        "rows_per_s": round(dataset.rows / (loaded - migrated)),
        "settle": settle,
        "settle_seconds": round(settled - loaded, 2),
        "total_seconds": round(settled - began, 2),
    }


async def server_info(database: Database) -> dict[str, Any]:
    async with database.engine.connect() as connection:

        async def scalar(sql: str) -> Any:
            return (await connection.exec_driver_sql(sql)).scalar()

        if database.backend == "postgresql":
            return {
                "version": await scalar("SHOW server_version"),
                "shared_buffers": await scalar("SHOW shared_buffers"),
                "synchronous_commit": await scalar("SHOW synchronous_commit"),
                "fsync": await scalar("SHOW fsync"),
                "table_bytes": await scalar("SELECT pg_relation_size('registrations')"),
                "total_bytes": await scalar("SELECT pg_total_relation_size('registrations')"),
            }
        if database.backend == "mysql":
            return {
                "version": await scalar("SELECT VERSION()"),
                "innodb_buffer_pool_size": await scalar("SELECT @@innodb_buffer_pool_size"),
                "innodb_flush_log_at_trx_commit": await scalar(
                    "SELECT @@innodb_flush_log_at_trx_commit"
                ),
                "total_bytes": await scalar(
                    "SELECT data_length + index_length FROM information_schema.tables"
                    f" WHERE table_schema = '{DATABASE}' AND table_name = 'registrations'"
                ),
            }
        path = migrations.sqlite_path(database.url)
        assert path is not None
        return {
            "version": sqlite3.sqlite_version,
            "journal_mode": "wal (set by the store)",
            "synchronous": "normal (set by the store)",
            "page_size": await scalar("PRAGMA page_size"),
            "total_bytes": path.stat().st_size,
        }


async def lookup_plan(database: Database, owner: str) -> list[str]:
    """How the database runs the store's lookup, for the record."""
    statement = _BY_OWNER.params(owner=owner).compile(
        dialect=database.engine.dialect, compile_kwargs={"literal_binds": True}
    )
    explain = "EXPLAIN QUERY PLAN" if database.backend == "sqlite" else "EXPLAIN"
    async with database.engine.connect() as connection:
        result = await connection.exec_driver_sql(f"{explain} {statement}")
        return [" ".join(str(value) for value in row) for row in result]


async def check_row_shape(
    store: SqlStore, database: Database, dataset: Dataset, owners: Sequence[int]
) -> dict[str, Any]:
    """Disable loaded rows and enable them again through the store, with the time
    they were loaded with: every column but the id must come back as loaded."""
    checked = []
    for device, owner in enumerate(owners):
        request = dataset.request(owner, device % dataset.devices)
        where = registrations.c.key_hash == key_hash(request.owner, request.push_jid, request.node)
        async with database.engine.connect() as connection:
            loaded = (await connection.execute(sa.select(registrations).where(where))).one()
        await store.disable(request.owner, request.push_jid, request.node)
        await store.enable(request, max_per_owner=MAX_PER_OWNER, now=loaded.updated_at / 1_000_000)
        async with database.engine.connect() as connection:
            enabled = (await connection.execute(sa.select(registrations).where(where))).one()
        differ = [
            name
            for name in (column.name for column in registrations.c)
            if name != "id" and loaded._mapping[name] != enabled._mapping[name]
        ]
        if differ:
            raise SystemExit(
                f"bulk-loaded row differs from what enable writes in {differ}:"
                f" loaded {loaded._asdict()}, enabled {enabled._asdict()}"
            )
        checked.append(request.target.value + (" + voip" if request.voip_token else ""))
    return {"identical_but_id": True, "rows_checked": len(checked), "kinds": checked}


# --------------------------------------------------------------------------- baseline


class NaiveLookup:
    """The lookup as one would first write it: SQLAlchemy's default engine (a queue
    pool of 5 plus 10 overflow) and a connection checked out for each lookup."""

    def __init__(self, url: str) -> None:
        self.engine = create_async_engine(url)

    async def for_owner(self, owner: str) -> tuple[Registration, ...]:
        async with self.engine.connect() as connection:
            result = await connection.execute(_BY_OWNER, {"owner": owner})
            return tuple(_registration(row) for row in result)

    async def close(self) -> None:
        await self.engine.dispose()


# --------------------------------------------------------------------------- one backend


@dataclass(slots=True)
class BackendRun:
    backend: str
    phases: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, kind: str, timing: Timing, **extra: Any) -> dict[str, Any]:
        phase = {"name": name, "kind": kind, **timing.summary(), **extra}
        self.phases.append(phase)
        print(
            f"  {self.backend:<10} {name:<34} x{timing.concurrency}"
            f" {phase['ops_per_s']:>10,.0f}/s  p50 {phase['p50_ms']:7.3f} ms"
            f"  p99 {phase['p99_ms']:7.3f} ms",
            flush=True,
        )
        return phase

    async def timed(
        self, operation: Callable[[T], Awaitable[int]], items: Sequence[T], concurrency: int
    ) -> Timing:
        return await timed(operation, items, concurrency, SERVER_PROCESSES[self.backend])

    def find(self, kind: str, concurrency: int) -> dict[str, Any] | None:
        for phase in self.phases:
            if phase["kind"] == kind and phase["concurrency"] == concurrency:
                return phase
        return None


def _cache_delta(store: SqlStore, before: CacheStats) -> dict[str, int]:
    after = store.cache_stats()
    return {
        "cache_hits": after.hits - before.hits,
        "cache_misses": after.misses - before.misses,
    }


async def measure_lookups(
    run: BackendRun,
    store: SqlStore,
    naive: NaiveLookup,
    dataset: Dataset,
    pool: OwnerPool,
    plan: Plan,
    rng: random.Random,
) -> None:
    devices = dataset.devices

    async def project(owner: int) -> int:
        return len(await store.for_owner(dataset.owner(owner)))

    async def baseline(owner: int) -> int:
        return len(await naive.for_owner(dataset.owner(owner)))

    def checked(timing: Timing, what: str) -> Timing:
        if timing.rows != timing.ops * devices:
            raise SystemExit(f"{what}: {timing.rows} rows for {timing.ops} lookups")
        return timing

    # Warm-up, not recorded: compiled statements, prepared statements, connections.
    await run.timed(project, pool.take(WARMUP_LOOKUPS), CONCURRENCY)
    await run.timed(baseline, pool.take(WARMUP_LOOKUPS), CONCURRENCY)

    # Cold: owners nobody looked up. Project and baseline alternate so that drift on a
    # shared machine hits both alike.
    for concurrency in (1, CONCURRENCY):
        before = store.cache_stats()
        timing = checked(await run.timed(project, pool.take(plan.lookup_ops), concurrency), "cold")
        run.add("for_owner, cold", "lookup_cold", timing, **_cache_delta(store, before))
        timing = checked(
            await run.timed(baseline, pool.take(plan.lookup_ops), concurrency), "naive"
        )
        run.add("baseline lookup, cold", "baseline_cold", timing)

    # Warm: a set of owners looked up once (filling the cache on PostgreSQL), then
    # random lookups among them.
    warm_set = pool.take(plan.warm_owners)
    await run.timed(project, warm_set, CONCURRENCY)
    listening = store.cache_stats().listening
    for concurrency in (1, CONCURRENCY):
        owners = rng.choices(warm_set, k=plan.lookup_ops)
        before = store.cache_stats()
        timing = checked(await run.timed(project, owners, concurrency), "warm")
        delta = _cache_delta(store, before)
        run.add("for_owner, warm", "lookup_warm", timing, cache_listening=listening, **delta)
        owners = rng.choices(warm_set, k=plan.lookup_ops)
        timing = checked(await run.timed(baseline, owners, concurrency), "naive warm")
        run.add("baseline lookup, warm", "baseline_warm", timing)


async def measure_writes(
    run: BackendRun, store: SqlStore, dataset: Dataset, pool: OwnerPool, plan: Plan
) -> None:
    now = time.time

    async def enable(request: RegistrationRequest) -> int:
        await store.enable(request, max_per_owner=MAX_PER_OWNER, now=now())
        return 1

    async def disable(request: RegistrationRequest) -> int:
        return len(await store.disable(request.owner, request.push_jid, request.node))

    def new_rows(owners: Sequence[int]) -> list[RegistrationRequest]:
        return [dataset.request(owner, NEW_DEVICE) for owner in owners]

    def existing_rows(owners: Sequence[int]) -> list[RegistrationRequest]:
        return [dataset.request(owner, owner % dataset.devices) for owner in owners]

    # Warm-up, not recorded.
    warmup = pool.take(WARMUP_WRITES)
    await run.timed(enable, new_rows(warmup), CONCURRENCY)
    await run.timed(enable, existing_rows(pool.take(WARMUP_WRITES)), CONCURRENCY)
    await run.timed(disable, new_rows(warmup), CONCURRENCY)

    added: dict[int, list[RegistrationRequest]] = {}
    for concurrency in (1, CONCURRENCY):
        added[concurrency] = new_rows(pool.take(plan.write_ops))
        timing = await run.timed(enable, added[concurrency], concurrency)
        run.add("enable, new row", "enable_new", timing)
    for concurrency in (1, CONCURRENCY):
        timing = await run.timed(enable, existing_rows(pool.take(plan.write_ops)), concurrency)
        run.add("enable, existing row again", "enable_again", timing)
    for concurrency in (1, CONCURRENCY):
        # Removes what "enable, new row" added: the table ends as loaded.
        timing = await run.timed(disable, added[concurrency], concurrency)
        if timing.rows != timing.ops:
            raise SystemExit(f"disable removed {timing.rows} rows for {timing.ops} nodes")
        run.add("disable one node", "disable", timing)


def ratios(run: BackendRun) -> dict[str, float]:
    """Project / baseline operations per second, for each lookup phase."""
    found: dict[str, float] = {}
    for temperature in ("cold", "warm"):
        for concurrency in (1, CONCURRENCY):
            project = run.find(f"lookup_{temperature}", concurrency)
            naive = run.find(f"baseline_{temperature}", concurrency)
            if project and naive:
                label = "sequential" if concurrency == 1 else f"{concurrency}_tasks"
                found[f"{temperature}_{label}"] = round(
                    project["ops_per_s"] / naive["ops_per_s"], 2
                )
    return found


def target(run: BackendRun) -> dict[str, Any]:
    """Issue #6's lookup p99 target, phase by phase."""
    checks: dict[str, Any] = {"p99_ms_at_most": TARGET_P99_MS}
    for kind in ("lookup_cold", "lookup_warm"):
        for concurrency in (1, CONCURRENCY):
            phase = run.find(kind, concurrency)
            if phase:
                label = "sequential" if concurrency == 1 else f"{concurrency}_tasks"
                checks[f"{kind.removeprefix('lookup_')}_{label}"] = {
                    "p99_ms": phase["p99_ms"],
                    "met": phase["p99_ms"] <= TARGET_P99_MS,
                }
    return checks


async def bench_backend(
    backend: str, args: argparse.Namespace, dataset: Dataset, plan: Plan
) -> dict[str, Any]:
    rng = random.Random(args.seed)
    pool = OwnerPool(dataset.owners, rng)
    print(f"{backend}: loading {dataset.rows:,} rows ...", flush=True)
    async with fresh_database(backend, args) as database:
        loaded = await load(database, dataset)
        print(
            f"{backend}: loaded in {loaded['load_seconds']} s"
            f" ({loaded['rows_per_s']:,} rows/s), settled in {loaded['settle_seconds']} s",
            flush=True,
        )
        quiet = await wait_for_quiet(args.quiet_wait)
        if quiet is not None and quiet >= QUIET_BELOW:
            print(f"{backend}: warning: {quiet} cores busy before measuring", flush=True)
        store = await open_store(database.url, pool_size=POOL_SIZE, migrate=MigratePolicy.CHECK)
        naive = NaiveLookup(database.url)
        run = BackendRun(backend)
        try:
            shape = await check_row_shape(store, database, dataset, pool.take(SHAPE_CHECKS))
            count = await store.count()
            if count != dataset.rows:
                raise SystemExit(f"{count} rows in the table, {dataset.rows} loaded")
            await measure_lookups(run, store, naive, dataset, pool, plan, rng)
            await measure_writes(run, store, dataset, pool, plan)
            rows_after = await store.count()
            stats = store.cache_stats()
        finally:
            await naive.close()
            await store.close()
        return {
            "server": await server_info(database),
            "load": loaded,
            "row_shape": shape,
            "rows_before": count,
            "rows_after": rows_after,
            "lookup_plan": await lookup_plan(database, dataset.owner(0)),
            "machine_busy_cores_before": quiet,
            "store": {
                "pool_size": POOL_SIZE,
                "cache_size": CACHE_SIZE if backend == "postgresql" else 0,
                "max_per_owner": MAX_PER_OWNER,
                "cache_stats": {
                    "enabled": stats.enabled,
                    "listening": stats.listening,
                    "hits": stats.hits,
                    "misses": stats.misses,
                    "invalidations": stats.invalidations,
                    "resets": stats.resets,
                },
            },
            "baseline": {
                "engine": "create_async_engine(url) defaults",
                "pool": type(naive.engine.pool).__name__,
            },
            "phases": run.phases,
            "ratios": ratios(run),
            "target": target(run) if backend == "postgresql" else None,
        }


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    def first(path: str, prefix: str) -> str | None:
        with contextlib.suppress(OSError), open(path) as file:
            for line in file:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        return None

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def git(*arguments: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(REPO), *arguments], capture_output=True, text=True, check=False
        )
        # Not strip(): porcelain lines start with a status column that may be a space.
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""

    memory = first("/proc/meminfo", "MemTotal")
    return {
        "cores": os.cpu_count(),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "ram_gib": round(int(memory.split()[0]) / 1024**2, 1) if memory else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libraries": {name: version(name) for name in LIBRARIES},
        "load_average": os.getloadavg(),
        "commit": git("rev-parse", "--short", "HEAD").strip() or None,
        "uncommitted_product_files": [
            line[3:] for line in git("status", "--porcelain", "--", "xmpp_push").splitlines()
        ],
    }


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _label(backend: str, phase: Mapping[str, Any]) -> str:
    name = str(phase["name"])
    if phase["kind"] == "lookup_warm":
        return name + (" (cache hit)" if backend == "postgresql" else " (no cache)")
    if phase["kind"] == "lookup_cold":
        return name + (" (cache miss)" if backend == "postgresql" else "")
    return name


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows = [["backend", "operation", "tasks", "ops/s", "p50 ms", "p99 ms", "max ms"]]
    for backend, run in results["backends"].items():
        for phase in run["phases"]:
            rows.append(
                [
                    backend,
                    _label(backend, phase),
                    str(phase["concurrency"]),
                    f"{phase['ops_per_s']:,.0f}",
                    _ms(phase["p50_ms"]),
                    _ms(phase["p99_ms"]),
                    _ms(phase["max_ms"]),
                ]
            )
    return rows


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    lines = []
    for backend, run in results["backends"].items():
        ratio = run["ratios"]
        lines.append(
            f"* {backend}: for_owner / naive lookup, ops/s: cold {ratio['cold_sequential']}×"
            f" (1 task), {ratio[f'cold_{CONCURRENCY}_tasks']}× ({CONCURRENCY} tasks);"
            f" warm {ratio['warm_sequential']}× (1 task),"
            f" {ratio[f'warm_{CONCURRENCY}_tasks']}× ({CONCURRENCY} tasks)."
        )
    for backend, run in results["backends"].items():
        load = run["load"]
        lines.append(
            f"* {backend}: {load['rows']:,} rows loaded in {load['load_seconds']} s"
            f" ({load['rows_per_s']:,} rows/s, {load['method']})"
            + (
                f", then {' + '.join(load['settle'])} in {load['settle_seconds']} s"
                if load["settle"]
                else ""
            )
            + f"; {run['server']['total_bytes'] / 1024**2:,.0f} MiB on disk"
            f" ({run['server']['version']})."
        )
    for backend, run in results["backends"].items():
        starved = [
            f"{_label(backend, phase)} {phase['ops_per_task']}"
            for phase in run["phases"]
            # A task that finished next to nothing while one of its operations waited
            # about the whole phase. (A task with none never started one: cache hits
            # never await, so the first task does them all.)
            if phase["concurrency"] > 1
            and any(
                0 < done * 4 < phase["ops"] / phase["concurrency"] for done in phase["ops_per_task"]
            )
            and phase["max_ms"] >= phase["seconds"] * 1000 / 2
        ]
        if starved:
            lines.append(
                f"* {backend}: tasks starved with {CONCURRENCY} tasks: some finished a single"
                " operation, which waited about the whole phase (the max column), while the"
                " others did the rest. Operations per task: " + "; ".join(starved) + "."
            )
    for backend, run in results["backends"].items():
        full = [
            f"{_label(backend, phase)} x{phase['concurrency']}: {phase['gc_collections'][2]}"
            f" (longest {phase['gc_pause_ms_max']:g} ms)"
            for phase in run["phases"]
            if phase["gc_collections"][2]
        ]
        if full:
            lines.append(
                f"* {backend}: full garbage collections (generation 2), each pausing the event"
                " loop: " + "; ".join(full) + "."
            )
    for backend, run in results["backends"].items():
        # Phases under a second (cache hits) are too short for /proc's 10 ms ticks.
        long_enough = [phase for phase in run["phases"] if phase["seconds"] >= 1]
        busiest = max(long_enough, key=lambda phase: phase["other_cores"] or 0.0, default=None)
        if busiest and (busiest["other_cores"] or 0.0) > OTHER_LOAD_WARNING:
            lines.append(
                f"* {backend}: other processes on the machine used up to"
                f" {busiest['other_cores']} cores during the phases"
                f" ({_label(backend, busiest)} x{busiest['concurrency']}): figures lower than"
                " on an idle machine."
            )
    postgresql = results["backends"].get("postgresql")
    if postgresql:
        checks = postgresql["target"]
        parts = [
            f"{name.replace('_', ' ')} {check['p99_ms']:.2f} ms" + (" ✓" if check["met"] else " ✗")
            for name, check in checks.items()
            if isinstance(check, dict)
        ]
        lines.append(
            f"* Issue #6 target, lookup p99 ≤ {TARGET_P99_MS:g} ms on PostgreSQL: "
            + ", ".join(parts)
            + "."
        )
    return lines


def docs_section(results: Mapping[str, Any]) -> str:
    config = results["config"]
    info = results["machine"]
    body = [
        DOCS_START,
        f"## Direct mode: registrations at {config['rows']:,} rows",
        "",
        "<!-- Written by `python -m bench.registrations` (bench/registrations.py): edit"
        " that, not this section. -->",
        "",
        f"Measured {results['date']} with `{results['command']}`"
        f" (results file `{results['results_file']}`).",
        "",
        f"{config['rows']:,} registrations of {config['owners']:,} users"
        f" ({config['devices_per_owner']} devices each, APNs and FCM), loaded in bulk as"
        " `SqlStore.enable` writes them, then the real store (`open_store`, pool_size"
        f" {POOL_SIZE}, cache {CACHE_SIZE:,} users on PostgreSQL). Each phase uses users"
        f" of its own: {config['write_ops']:,} writes or {config['lookup_ops']:,} lookups,"
        f" with 1 task, then {CONCURRENCY} concurrent tasks on the same store. Latency"
        " includes waiting for a connection.",
        "",
        "* **cold**: each user's first lookup (a miss of the store's cache); the"
        " table is in the OS page cache, as on a server that has been up a while.",
        "* **warm**: random users among"
        f" {config['warm_owners']:,} looked up before: on PostgreSQL a hit of the"
        " per-user cache, which answers without awaiting anything, so that with"
        f" {CONCURRENCY} tasks one task does every lookup; SQLite has no cache and reads"
        " the table again.",
        "* **baseline**: the same SELECT, rows made into `Registration` the same way, through"
        " a fresh `engine.connect()` per lookup on an engine with SQLAlchemy's defaults.",
        "* **enable, existing row again**: the same token re-enabled, as every app start"
        " does; **disable** removes one node (the rows the new-row enables added).",
        "",
        *markdown_table(table_rows(results)),
        "",
        *summary_lines(results),
        f"* Machine: {info['cores']} cores, {info['ram_gib']} GiB RAM, {info['cpu_model']};"
        f" Python {info['python']}, SQLAlchemy {info['libraries']['SQLAlchemy']},"
        f" asyncpg {info['libraries']['asyncpg']}, aiosqlite {info['libraries']['aiosqlite']};"
        f" code at commit {info['commit']}"
        + (
            f" plus uncommitted changes to {len(info['uncommitted_product_files'])} product"
            " files (listed in the results file)"
            if info["uncommitted_product_files"]
            else ""
        )
        + ".",
        DOCS_END,
    ]
    return "\n".join(body)


# --------------------------------------------------------------------------- main


def _positive(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _backends(text: str) -> list[str]:
    names = ["mysql" if name == "mariadb" else name for name in text.split(",") if name]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend {unknown}: choose from {BACKENDS}")
    return list(dict.fromkeys(names))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.registrations",
        description="Direct mode's registration store (SqlStore) at N rows, with a baseline.",
    )
    parser.add_argument(
        "--rows",
        type=_positive,
        default=DEFAULT_ROWS,
        help=f"registrations to load, a multiple of {DEVICES_PER_OWNER} (default 1,000,000)",
    )
    parser.add_argument(
        "--backends",
        type=_backends,
        default=["sqlite", "postgresql"],
        help="comma-separated: sqlite, postgresql, mysql (default sqlite,postgresql)",
    )
    parser.add_argument("--out", type=Path, help="results file (default bench/results/...)")
    parser.add_argument("--write-ops", type=_positive, default=3000, help="per write phase")
    parser.add_argument("--lookup-ops", type=_positive, default=10_000, help="per lookup phase")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--postgresql-url", default=POSTGRESQL_ADMIN_URL, help="admin URL")
    parser.add_argument("--mysql-url", default=MYSQL_ADMIN_URL, help="admin URL")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="seconds to wait, before measuring each backend, for the machine to be idle"
        " (default 120)",
    )
    parser.add_argument(
        "--keep-database", action="store_true", help=f"leave the {DATABASE} database behind"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        help="Markdown file whose registrations section to update (default: "
        "docs/performance.md, for a run at the default row count only)",
    )
    parser.add_argument("--no-docs", action="store_true", help="leave the docs alone")
    args = parser.parse_args(argv)
    if args.rows % DEVICES_PER_OWNER:
        parser.error(f"--rows must be a multiple of {DEVICES_PER_OWNER}")
    if args.rows < MIN_ROWS:
        parser.error(f"--rows must be at least {MIN_ROWS:,}: every phase needs users of its own")
    return args


async def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    owners = args.rows // DEVICES_PER_OWNER
    plan = Plan.fit(owners, args.write_ops, args.lookup_ops)
    for note in plan.notes:
        print(f"note: {note}", flush=True)
    dataset = Dataset(
        owners=owners,
        devices=DEVICES_PER_OWNER,
        seed=args.seed,
        epoch_micros=round((time.time() - 86_400) * 1_000_000),
    )
    began = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "registrations",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line("bench.registrations", argv),
        "machine": machine(),
        "config": {
            "rows": dataset.rows,
            "owners": owners,
            "devices_per_owner": DEVICES_PER_OWNER,
            "write_ops": plan.write_ops,
            "lookup_ops": plan.lookup_ops,
            "warm_owners": plan.warm_owners,
            "concurrency": CONCURRENCY,
            "seed": args.seed,
        },
        "notes": list(plan.notes),
        "backends": {},
    }
    for backend in args.backends:
        results["backends"][backend] = await bench_backend(backend, args, dataset, plan)
    results["seconds"] = round(time.perf_counter() - began, 1)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or REPO / "bench" / "results" / f"registrations-{stamp}.json"
    results = asyncio.run(run(args, arguments))
    results["results_file"] = relative(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

    print()
    print("\n".join(console_table(table_rows(results))))
    print()
    print("\n".join(summary_lines(results)))
    print(f"\nresults: {relative(out)} ({results['seconds']} s)")
    docs = args.docs
    if docs is None and args.rows == DEFAULT_ROWS:
        docs = REPO / "docs" / "performance.md"
    if docs is not None and not args.no_docs:
        update_docs_section(docs, docs_section(results), DOCS_START, DOCS_END)
        print(f"docs:    {relative(docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
