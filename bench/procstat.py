"""What a process costs, read from /proc (Linux): CPU time, resident memory, children.

No psutil: the smoke test runs where only the test extras are installed, and the few
numbers needed here are one line each in /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "CpuClock",
    "RssSampler",
    "cpu_seconds",
    "descendants",
    "machine_busy_seconds",
    "peak_rss_kib",
    "rss_kib",
    "wait_for_quiet",
]

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _status_kib(pid: int, key: bytes) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    """Resident set size now, KiB."""
    return _status_kib(pid, b"VmRSS:")


def peak_rss_kib(pid: int) -> int:
    """The kernel's high-water mark of the resident set (VmHWM), KiB."""
    return _status_kib(pid, b"VmHWM:")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (nginx master and its workers, say)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue
        parent = int(raw[raw.rindex(b")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found = [pid]
    for current in found:
        found.extend(children.get(current, ()))
    return found


@dataclass
class CpuClock:
    """CPU seconds used by a set of processes between `start()` and `stop()`.

    Processes are looked up again at each reading, so workers that come and go
    are counted while they live.
    """

    root_pids: Iterable[int]
    include_children: bool = False
    _started_cpu: float = 0.0
    _started_wall: float = 0.0
    cpu: float = 0.0
    wall: float = 0.0

    def _pids(self) -> list[int]:
        if not self.include_children:
            return list(self.root_pids)
        return [pid for root in self.root_pids for pid in descendants(root)]

    def read(self) -> float:
        return sum(cpu_seconds(pid) for pid in self._pids())

    def start(self) -> None:
        self._started_cpu = self.read()
        self._started_wall = time.perf_counter()

    def stop(self) -> None:
        self.cpu = self.read() - self._started_cpu
        self.wall = time.perf_counter() - self._started_wall

    @property
    def cores(self) -> float:
        """Average cores busy over the interval (1.0 = one core all the time)."""
        return self.cpu / self.wall if self.wall > 0 else 0.0


@dataclass
class RssSampler:
    """Samples one process's RSS every `interval` seconds while running."""

    pid: int
    interval: float
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(seconds since start, RSS KiB)."""
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        began = time.perf_counter()
        while True:
            self.samples.append((time.perf_counter() - began, rss_kib(self.pid)))
            await asyncio.sleep(self.interval)

    @property
    def peak_kib(self) -> int:
        return max((kib for _, kib in self.samples), default=0)


def machine_busy_seconds() -> float:
    """CPU seconds all cores together have spent busy since boot (/proc/stat)."""
    with open("/proc/stat", "rb") as stat:
        fields = stat.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


async def wait_for_quiet(
    limit: float, threshold: float = 0.15, settle: float = 3.0
) -> tuple[float, bool]:
    """Wait (at most `limit` seconds) until the machine has been less than `threshold`
    cores busy for `settle` seconds in a row. Returns (seconds waited, whether it was)."""
    began = time.perf_counter()
    quiet_since: float | None = None
    load = 0.0
    while True:
        before, at = machine_busy_seconds(), time.perf_counter()
        await asyncio.sleep(0.5)
        now = time.perf_counter()
        load = (machine_busy_seconds() - before) / (now - at)
        if load < threshold:
            quiet_since = quiet_since or at
            if now - quiet_since >= settle:
                return now - began, True
        else:
            quiet_since = None
        if now - began >= limit:
            return now - began, False
