"""Direct mode in `bench/run`: the server plugin's notifies → lookups → pushes at the sink.

The harness plays the XMPP server with the server plugin in it
(docs/plugin-protocol.md): it answers the component's `configure` as
plugins/prosody/mod_xmpp_push.lua does, then sends `notify` IQs, `state='offline'`,
each for a user with a registration in the component's store. The component answers a
notify at once and pushes afterwards, so the answer says nothing about the push: the
figures are taken at the APNs sink instead, which logs each direct-mode push with the
time it was answered (`bench.sinks`, `Sink.request_log`). The harness reads that log as
it grows, keeps `window` notifies whose push has not arrived yet (the publish runs'
window, counted to the push instead of the answer), and matches each push to its notify
by the device token in the request path.

**The registrations** are bench.registrations' rows (`Dataset`, the store's own row
builder; COPY into PostgreSQL, executemany into SQLite) with one device per user, so
that every user `user<i>@bench.example` has exactly one registration, an APNs device
(64 hex digits, production, topic `org.bench.messenger`). Loading 1,000,000 takes a
minute or two, so the databases are kept between runs: the SQLite file (and a marker
beside it) in `--direct-cache`, the PostgreSQL database with the marker as its comment;
either is loaded again only when the marker (rows, seed, schema head, layout) or the
row count does not match. The enable runs (bench.enables) put the table back as it was
loaded; rows left by one that stopped half-way are removed instead of loading again.

**The users** notified: a seeded sample of the loaded ones, each at most once per
component process (warm-up included), so the coalescing window (`policy.coalesce_window`,
left at its default) never merges two notifies: every notify is one push.

**The notify** is what Prosody 0.12.3 with mod_xmpp_push wrote for a chat message to a
user with no session (captured off the wire; attribute order is the Lua table's, which
changes with each Prosody process, this is one of them): from the server domain, an id
of 24 URL-safe characters (`util.id.medium`), the sender's full JID (a 12-character
random resource), `include-sender` on and `include-body` off (the component's defaults).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import random
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from bench.processes import DatabaseUnavailable, prepare_postgresql
from bench.registrations import PUSH_JID, Database, Dataset, load
from bench.sinks import LOGGED_APNS_TOPIC
from bench.workload import COMPONENT_JID
from bench.xmppserver import ComponentLink, RunResult, attached_run, percentiles_ms
from xmpp_push.storage import migrate as migrations
from xmpp_push.storage.sql import registrations

__all__ = [
    "BACKENDS",
    "DEFAULT_ROWS",
    "PLUGIN_SERVER",
    "QUICK_ROWS",
    "Delivery",
    "DirectWorkload",
    "RequestLog",
    "deliver",
    "direct_database_url",
    "ensure_registrations",
    "remove_added_rows",
]

BACKENDS: Final = ("sqlite", "postgresql")
DEFAULT_ROWS: Final = 1_000_000
QUICK_ROWS: Final = 20_000
SEED: Final = 5357
EPOCH_MICROS: Final = 1_767_225_600_000_000
"""updated_at of the first row (2026-01-01 UTC): fixed, so a reload makes the same rows."""
LAYOUT: Final = 1
"""Raise when the loaded rows change without a schema revision (the marker holds it)."""
SERVER_DOMAIN: Final = Dataset.owner(0).partition("@")[2]
"""The harness's server domain: the loaded users' (bench.example)."""
PLUGIN_SERVER: Final = "Prosody 0.12.3"
"""What the harness's plugin says it runs in, in its answer to `configure`."""

_NOTIFY: Final = (
    "<iq to='{jid}' from='{domain}' id='{id}' type='set'>"
    "<notify state='offline' call='false' xmlns='urn:xmpp-push:plugin:1' count='1' "
    "sender='{sender}' encrypted='false' user='{user}' mention='false' type='chat'/></iq>"
)


def direct_database_url(postgresql_url: str, rows: int) -> str:
    """The direct scenario's database beside the scale-out one: `<name>_direct`, or
    `<name>_direct_<rows>` for another row count (a quick run's rows do not replace the
    full run's)."""
    parsed = make_url(postgresql_url)
    name = f"{parsed.database}_direct"
    if rows != DEFAULT_ROWS:
        name += f"_{rows}"
    return parsed.set(database=name).render_as_string(hide_password=False)


class DirectWorkload:
    """`notifies` offline notifies, each for another of the `rows` loaded users.

    A `bench.workload.Workload`: the config names the loaded database and the server
    domain, `prepare` loads it (unless it is loaded already), `stanza` is a notify.
    """

    mode = "direct"
    service = "apns"

    def __init__(
        self, backend: str, url: str, *, rows: int, notifies: int, cache: Path, seed: int = SEED
    ) -> None:
        if notifies > rows:
            raise ValueError(f"{notifies:,} notifies need as many users; {rows:,} are loaded")
        self.backend = backend
        self.url = url
        self.name = f"direct-{backend}"
        self.cache = cache
        self.dataset = Dataset(owners=rows, devices=1, seed=seed, epoch_micros=EPOCH_MICROS)
        first = self.dataset.request(0, 0)
        if first.topic != LOGGED_APNS_TOPIC or first.target.value != "apns":
            raise RuntimeError("the loaded registrations must be APNs ones for the logged topic")
        rng = random.Random(seed)
        self.users = rng.sample(range(rows), notifies)
        """The user of each notify, in order: distinct, spread over all the rows."""
        self._tokens = [self._token(user) for user in self.users]
        self._senders = [
            f"{Dataset.owner(rng.randrange(rows))}/{_b64url(rng.randbytes(9))}" for _ in range(64)
        ]
        self._salt = b"%d:" % seed
        self.loading: dict[str, Any] = {}
        """What `prepare` found or did (reloaded or not, how long it took)."""

    def _token(self, user: int) -> bytes:
        return self.dataset.command(user, 0).options["device_id"].encode()

    def token(self, index: int) -> bytes:
        """The device token notify `index` should push to (its path at the sink)."""
        return self._tokens[index]

    def config_sections(self) -> dict[str, dict[str, object]]:
        return {
            "storage": {"url": self.url},
            # The rows were enabled with PUSH_JID: this component, under an alias.
            "component": {"allowed_domains": [SERVER_DOMAIN], "aliases": [PUSH_JID]},
        }

    async def prepare(self, directory: Path) -> None:
        self.loading = await ensure_registrations(self.backend, self.url, self.dataset, self.cache)

    def stanza(self, index: int) -> tuple[str, bytes]:
        digest = hashlib.sha256(self._salt + b"%d" % index).digest()
        iq_id = _b64url(digest[:18])  # util.id.medium: 18 random bytes, 24 characters
        text = _NOTIFY.format(
            jid=COMPONENT_JID,
            domain=SERVER_DOMAIN,
            id=iq_id,
            sender=self._senders[digest[18] % len(self._senders)],
            user=Dataset.owner(self.users[index]),
        )
        return iq_id, text.encode()

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "mode": self.mode,
            "service": self.service,
            "backend": self.backend,
            "rows": self.dataset.rows,
            "users_notified": len(self.users),
            "user_choice": f"a sample without repeats (seed {SEED}) of the {self.dataset.rows:,}",
            "server_domain": SERVER_DOMAIN,
            "notify_shape": "Prosody 0.12.3 mod_xmpp_push, offline chat message",
            "example": self.stanza(0)[1].decode(),
        }


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


# --------------------------------------------------------------------------------------
# The registrations, loaded once and kept


async def ensure_registrations(
    backend: str, url: str, dataset: Dataset, cache: Path
) -> dict[str, Any]:
    """Make `url` hold exactly `dataset`'s rows at the schema head, loading them only
    when the marker or the row count says otherwise. Raises DatabaseUnavailable when
    PostgreSQL cannot be used. One process at a time (a lock in `cache`)."""
    marker = {
        "rows": dataset.rows,
        "devices": dataset.devices,
        "seed": dataset.seed,
        "epoch_micros": dataset.epoch_micros,
        "schema": migrations.HEAD,
        "layout": LAYOUT,
    }
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    with (cache / "load.lock").open("w") as lock:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        if backend == "postgresql":
            await prepare_postgresql(url)
        try:
            found = await _loaded_marker(backend, url)
            if found == marker:
                rows = await _rows(url)
                removed = 0
                if rows is not None and rows != dataset.rows:
                    # An enable run (bench.enables) that stopped half-way: drop its rows
                    # rather than load a million again.
                    removed = await remove_added_rows(url, dataset)
                    rows = await _rows(url)
                if rows == dataset.rows:
                    kept: dict[str, Any] = {"reloaded": False, "rows": rows, "marker": marker}
                    if removed:
                        kept["removed_rows_not_loaded"] = removed
                    return kept
            began = time.perf_counter()
            figures = await _reload(backend, url, dataset, json.dumps(marker, sort_keys=True))
        except (OSError, sa.exc.DBAPIError) as exc:
            if backend == "sqlite":
                raise
            where = make_url(url).render_as_string(hide_password=True)
            raise DatabaseUnavailable(f"PostgreSQL at {where} is not usable: {exc}") from exc
        return {
            "reloaded": True,
            "rows": dataset.rows,
            "marker": marker,
            "found_marker": found,
            "seconds": round(time.perf_counter() - began, 1),
            "load": figures,
        }


def _sqlite_marker_file(url: str) -> Path:
    path = migrations.sqlite_path(url)
    assert path is not None
    return path.with_suffix(".marker.json")


async def _loaded_marker(backend: str, url: str) -> dict[str, Any] | None:
    text: str | None = None
    if backend == "sqlite":
        with contextlib.suppress(OSError):
            text = _sqlite_marker_file(url).read_text()
    else:
        parsed = make_url(url)
        engine = create_async_engine(parsed.set(database="postgres"), poolclass=NullPool)
        try:
            async with engine.connect() as connection:
                text = (
                    await connection.execute(
                        sa.text(
                            "SELECT shobj_description(oid, 'pg_database') FROM pg_database "
                            "WHERE datname = :name"
                        ),
                        {"name": parsed.database},
                    )
                ).scalar()
        finally:
            await engine.dispose()
    if not text:
        return None
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


async def _rows(url: str) -> int | None:
    path = migrations.sqlite_path(url)
    if path is not None and not path.is_file():
        return None
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            if await migrations.current_revision(url) != migrations.HEAD:
                return None
            count = (
                await connection.exec_driver_sql("SELECT count(*) FROM registrations")
            ).scalar()
            return int(count) if count is not None else None
    except sa.exc.DBAPIError:
        return None
    finally:
        await engine.dispose()


async def remove_added_rows(url: str, dataset: Dataset) -> int:
    """Delete the rows the load did not write (created before the first loaded row or
    after the last: enables of new users, bench.enables), and say how many there were.
    Rows the load wrote keep their `created_at` when enabled again."""
    created = registrations.c.created_at
    first = dataset.loaded_at(0, 0)
    last = dataset.loaded_at(dataset.owners - 1, dataset.devices - 1)
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            done = await connection.execute(
                sa.delete(registrations).where(sa.or_(created < first, created > last))
            )
            return int(done.rowcount)
    finally:
        await engine.dispose()


async def _reload(backend: str, url: str, dataset: Dataset, marker: str) -> dict[str, Any]:
    if backend == "sqlite":
        path = migrations.sqlite_path(url)
        assert path is not None
        for stale in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), _sqlite_marker_file(url)):
            stale.unlink(missing_ok=True)
    else:
        parsed = make_url(url)
        quoted = str(parsed.database).replace('"', '""')
        admin = create_async_engine(
            parsed.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
        )
        try:
            async with admin.connect() as connection:
                # WITH (FORCE): a component of an interrupted run may still be connected.
                await connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{quoted}" WITH (FORCE)')
                await connection.exec_driver_sql(f'CREATE DATABASE "{quoted}"')
        finally:
            await admin.dispose()
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        figures = await load(Database(backend, url, engine), dataset)
        if backend == "postgresql":
            async with engine.connect() as connection:
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                name = str(make_url(url).database).replace('"', '""')
                comment = marker.replace("'", "''")
                await autocommit.exec_driver_sql(f"COMMENT ON DATABASE \"{name}\" IS '{comment}'")
    finally:
        await engine.dispose()
    if backend == "sqlite":
        _sqlite_marker_file(url).write_text(marker + "\n")
    return figures


# --------------------------------------------------------------------------------------
# The pushes, as the sink saw them


class RequestLog:
    """The APNs sink's log of direct-mode pushes (`<$msec> /3/device/<token>` a line),
    read from where it ended when opened, as nginx appends to it."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb", buffering=0)
        self._file.seek(0, os.SEEK_END)
        self._rest = b""

    def read(self) -> list[tuple[float, bytes]]:
        """The pushes logged since the last call: (nginx's wall clock, device token)."""
        data = self._file.readall()
        if not data:
            return []
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        pushes = []
        for line in lines:
            when, _, path = line.partition(b" ")
            pushes.append((float(when), path[path.rfind(b"/") + 1 :]))
        return pushes

    def close(self) -> None:
        self._file.close()


@dataclass
class Delivery:
    """What reached the sink for one run's notifies."""

    pushes: int = 0
    unexpected: int = 0
    """Pushes to a token no notify of this run was waiting for."""
    first_send: float = 0.0
    """Wall clock (time.time) when the first notify went out."""
    last_push: float = 0.0
    """The sink's wall clock ($msec) of the last push."""
    latencies: array[float] = field(default_factory=lambda: array("d"))
    """Notify handed to the socket → push answered by the sink, seconds (1 ms steps)."""
    timeline: list[int] = field(default_factory=list)
    """Pushes in each second since the first notify."""
    stalled: bool = False

    @property
    def seconds(self) -> float:
        return max(self.last_push - self.first_send, 1e-9)

    @property
    def rate(self) -> float:
        """Pushes per second, first notify sent → last push at the sink."""
        return self.pushes / self.seconds

    def latency_ms(self) -> dict[str, float]:
        latency = percentiles_ms(self.latencies, 50, 99, 99.9, 100)
        latency["max"] = latency.pop("p100")
        latency["mean"] = (
            1000 * sum(self.latencies) / len(self.latencies) if self.latencies else float("nan")
        )
        return latency


async def deliver(
    link: ComponentLink,
    workload: DirectWorkload,
    log: RequestLog,
    *,
    label: str,
    start: int,
    count: int,
    window: int,
    stall_timeout: float = 30.0,
    poll: float = 0.002,
) -> tuple[RunResult, Delivery]:
    """Send notifies `start` … `start+count-1` with at most `window` of them not yet
    pushed; return once each was pushed (or refused), or nothing moved for
    `stall_timeout` seconds. The RunResult counts the component's answers."""
    delivery = Delivery()
    sent_at: dict[bytes, float] = {}
    token = workload.token
    with attached_run(
        [link],
        workload,
        label=label,
        mode="direct",
        start=start,
        count=count,
        window=window,
        refill=False,
    ) as run:
        result = run.result

        def send(n: int) -> None:
            first = run.next_index
            run.send(n)
            now = time.time()
            if not delivery.first_send:
                delivery.first_send = now
            for index in range(first, run.next_index):
                sent_at[token(index)] = now

        send(window)
        moved = time.monotonic()
        answered = 0
        timeline = delivery.timeline
        while True:
            arrivals = log.read()
            for when, pushed in arrivals:
                sent = sent_at.pop(pushed, None)
                if sent is None:
                    delivery.unexpected += 1
                    continue
                delivery.pushes += 1
                delivery.latencies.append(when - sent)
                delivery.last_push = max(delivery.last_push, when)
                second = max(0, int(when - delivery.first_send))
                if second >= len(timeline):
                    timeline.extend([0] * (second + 1 - len(timeline)))
                timeline[second] += 1
            refused = result.answered - result.results
            waiting = result.sent - delivery.pushes - refused
            if result.sent < count and waiting < window:
                send(window - waiting)
            if result.sent == count and waiting <= 0 and result.answered == result.sent:
                break
            if arrivals or result.answered != answered:
                moved = time.monotonic()
                answered = result.answered
            elif time.monotonic() - moved > stall_timeout or link.closed.done():
                delivery.stalled = True
                break
            await asyncio.sleep(poll)
    return result, delivery
