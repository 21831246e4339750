"""The implementations under test, each started as its own process, the way production does.

The project: `python -m xmpp_push.cli run --config <generated toml>`. The baseline:
`python -m bench.baseline --config <the same toml>`. Each scenario gets a fresh
process, so peak RSS and CPU belong to that scenario alone.

The scale-out scenario runs several project processes on one PostgreSQL database, as
a deployment of more than one process does: `prepare_postgresql` makes the database
(once; it is kept between runs), `upgrade_database` runs `xmpp-push db upgrade` on it
as an operator would, and `database_backends` finds the server processes serving it,
so that their CPU is counted as the benchmark's own.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.procstat import cpu_seconds, peak_rss_kib, rss_kib
from bench.sinks import Sink
from bench.workload import COMPONENT_JID

__all__ = [
    "IMPLEMENTATIONS",
    "DatabaseUnavailable",
    "Implementation",
    "RunningComponent",
    "database_backends",
    "prepare_postgresql",
    "upgrade_database",
    "write_config",
    "write_toml",
]

REPO: Final = Path(__file__).resolve().parent.parent
SECRET: Final = "bench-secret"
POSTGRESQL_URL: Final = "postgresql+asyncpg://postgres@127.0.0.1:5432/xmpp_push_bench"
"""The scale-out scenario's shared database (this machine's server, trust auth)."""


@dataclass(frozen=True)
class Implementation:
    name: str
    module: str

    def command(self, config: Path) -> list[str]:
        return [sys.executable, "-m", self.module, *self.arguments(config)]

    def arguments(self, config: Path) -> list[str]:
        if self.module == "xmpp_push.cli":
            return ["run", "--config", str(config)]
        return ["--config", str(config)]


IMPLEMENTATIONS: Final = {
    "project": Implementation("project", "xmpp_push.cli"),
    "baseline": Implementation("baseline", "bench.baseline"),
}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_toml(path: Path, sections: Mapping[str, Mapping[str, object]]) -> None:
    """`sections` as a TOML file of tables of plain values (all a config needs)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))


def write_config(
    path: Path,
    *,
    port: int,
    sinks: Mapping[str, Sink],
    extra: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """An xmpp-push.toml for a server on `port` and the given sinks; quiet logs.

    The registration database is a fresh SQLite file beside the config (never the
    default ./xmpp-push.db of whoever runs the benchmark); the direct-mode workload
    (bench.direct) names its loaded database through `config_sections` instead.
    """
    sections: dict[str, dict[str, object]] = {
        "component": {
            "jid": COMPONENT_JID,
            "secret": SECRET,
            "host": "127.0.0.1",
            "port": port,
        },
        "storage": {"url": f"sqlite+aiosqlite:///{path.with_suffix('.db')}"},
        "log": {"level": "warning", "format": "json"},
    }
    for service, sink in sinks.items():
        sections[service] = sink.config_section()
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)
    write_toml(path, sections)
    return path


def child_environment() -> dict[str, str]:
    """This environment without XMPP_PUSH_* overrides, which would change the config."""
    return {key: value for key, value in os.environ.items() if not key.startswith("XMPP_PUSH_")}


class RunningComponent:
    """One component process; its log goes to a file next to its config."""

    def __init__(self, implementation: Implementation, config: Path, log: Path) -> None:
        self.implementation = implementation
        self.config = config
        self.log = log
        self._process: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None

    async def start(self) -> None:
        with self.log.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self.implementation.command(self.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                cwd=REPO,
                env=child_environment(),
            )

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def peak_rss_kib(self) -> int:
        return peak_rss_kib(self.pid)

    async def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (the project drains and closes), then SIGKILL after `timeout`."""
        process = self._process
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
        self.exit_code = process.returncode
        return self.exit_code

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""


# --------------------------------------------------------------------------------------
# The shared database of the scale-out scenario


class DatabaseUnavailable(RuntimeError):
    """The scale-out database cannot be used (no server, no driver, a failed upgrade)."""


async def prepare_postgresql(url: str, timeout: float = 30.0) -> None:
    """Create the database of `url` unless it exists, through the server's `postgres`
    database. Raises DatabaseUnavailable when the server or the driver is missing."""
    if importlib.util.find_spec("asyncpg") is None:
        raise DatabaseUnavailable("asyncpg is not installed (pip install 'xmpp-push[postgresql]')")
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    name = parsed.database
    if parsed.get_backend_name() != "postgresql" or not name:
        raise DatabaseUnavailable(
            f"not a PostgreSQL database URL: {parsed.render_as_string(hide_password=True)}"
        )
    admin = create_async_engine(
        parsed.set(database="postgres"), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with asyncio.timeout(timeout), admin.connect() as connection:
            found = await connection.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if found.first() is None:
                quoted = name.replace('"', '""')
                await connection.exec_driver_sql(f'CREATE DATABASE "{quoted}"')
    except (OSError, TimeoutError, sa.exc.DBAPIError) as exc:
        where = parsed.render_as_string(hide_password=True)
        raise DatabaseUnavailable(f"PostgreSQL at {where} is not usable: {exc}") from exc
    finally:
        await admin.dispose()


async def upgrade_database(config: Path, timeout: float = 120.0) -> str:
    """`xmpp-push db upgrade --config <config>`, as an operator runs it before starting
    the processes; its output line. Raises DatabaseUnavailable when it fails."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "xmpp_push.cli",
        "db",
        "upgrade",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
        env=child_environment(),
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise DatabaseUnavailable(f"xmpp-push db upgrade took over {timeout:g} s") from None
    text = output.decode(errors="replace").strip()
    if process.returncode != 0:
        raise DatabaseUnavailable(f"xmpp-push db upgrade failed: {text[-1000:]}")
    return text.splitlines()[-1] if text else ""


async def database_backends(url: str, timeout: float = 10.0) -> list[int]:
    """The pids of the PostgreSQL server processes connected to the database of `url`
    (the components' pools and listeners); empty when they cannot be listed."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    engine = create_async_engine(parsed, poolclass=NullPool)
    try:
        async with asyncio.timeout(timeout), engine.connect() as connection:
            rows = await connection.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": parsed.database},
            )
            return sorted(int(row[0]) for row in rows)
    except (OSError, TimeoutError, sa.exc.DBAPIError):
        return []
    finally:
        await engine.dispose()
