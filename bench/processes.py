"""The implementations under test, each started as its own process, the way production does.

The project: `python -m xmpp_push.cli run --config <generated toml>`. The baseline:
`python -m bench.baseline --config <the same toml>`. Each scenario gets a fresh
process, so peak RSS and CPU belong to that scenario alone.
"""

from __future__ import annotations

import asyncio
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

__all__ = ["IMPLEMENTATIONS", "Implementation", "RunningComponent", "write_config"]

REPO: Final = Path(__file__).resolve().parent.parent
SECRET: Final = "bench-secret"


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
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def write_config(
    path: Path,
    *,
    port: int,
    sinks: Mapping[str, Sink],
    extra: Mapping[str, Mapping[str, object]] | None = None,
) -> Path:
    """An xmpp-push.toml for a server on `port` and the given sinks; quiet logs.

    The registration database is a fresh SQLite file beside the config (never the
    default ./xmpp-push.db of whoever runs the benchmark); a direct-mode workload
    seeds it in `prepare` or names another through `config_sections`.
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
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines))
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
