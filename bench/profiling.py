"""Sampling profiles of the component under load, with py-spy (attached by pid).

py-spy reads the process from outside, so the component runs the same code as in the
measured runs. It pauses the process for each sample (without that, most stacks come
out torn), which is why a profiled run is never one of the measured ones. Only stacks
holding the GIL are kept (`--gil`): that is the Python work of the event loop, without
the worker threads (aiosqlite, pycares, the executor) that sit blocked on a queue and
that py-spy would otherwise count as busy. The raw output (collapsed stacks, one line
per distinct stack with its sample count) is kept next to the results, and summarised
here into the functions and packages that take the time.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

__all__ = ["PySpy", "pyspy_path", "summarise"]

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def pyspy_path() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    if beside.is_file():
        return str(beside)
    return shutil.which("py-spy")


class PySpy:
    """`py-spy record` attached to one process until `stop()`."""

    def __init__(self, pid: int, output: Path, rate: int = 200) -> None:
        self.pid = pid
        self.output = output
        self.rate = rate
        self._process: asyncio.subprocess.Process | None = None
        self.log = output.with_suffix(".log")

    async def start(self) -> None:
        executable = pyspy_path()
        if executable is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        with self.log.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                executable,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(self.rate),
                "--gil",
                "--format",
                "raw",
                "--output",
                str(self.output),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        await asyncio.sleep(0.3)  # it attaches before the load starts

    async def stop(self) -> bool:
        """Stop sampling and write the output; False if py-spy failed."""
        process = self._process
        if process is None:
            return False
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()
        return self.output.is_file() and self.output.stat().st_size > 0


def _package(file: str) -> str:
    """The package a file belongs to; xmpp_push by subpackage (xmpp_push.providers)."""
    # py-spy names files relative to the sys.path entry they came from
    # ("h2/connection.py", "asyncio/events.py", "xmpp_push/xmpp/component.py").
    parts = file.split("/")
    if parts[0] == "xmpp_push" and len(parts) > 2:
        return f"xmpp_push.{parts[1]}"
    if parts[0] in {"", "<frozen runpy>"}:
        return file or "?"
    return parts[0].removesuffix(".py")


def _short(frame: str) -> tuple[str, str]:
    """("function (file)", package) without the line number."""
    found = _FRAME.match(frame)
    if found is None:
        return frame, "?"
    file = found.group("file")
    return f"{found.group('function')} ({file})", _package(file)


_TRUNK_SHARE = 0.9
"""Frames on (nearly) every stack, such as the event loop's, say nothing: left out of
the inclusive list."""


def summarise(raw: Path, top: int = 15) -> dict[str, object]:
    """Self and inclusive shares of the samples, by function and by package."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        # py-spy puts the thread as the first frame when asked; skip anything without a file.
        frames = [frame for frame in frames if frame[1] != "?"] or frames
        total += count
        leaf_name, leaf_package = frames[-1]
        own[leaf_name] += count
        by_package[leaf_package] += count
        for name in {name for name, _ in frames}:
            inclusive[name] += count

    def shares(counter: Counter[str]) -> list[dict[str, object]]:
        return [
            {"name": name, "percent": round(100 * count / total, 1)}
            for name, count in counter.most_common(top)
        ]

    if total == 0:
        return {"samples": 0}
    for name, count in list(inclusive.items()):
        if count >= _TRUNK_SHARE * total:
            del inclusive[name]
    return {
        "samples": total,
        "self_by_package": shares(by_package),
        "self_by_function": shares(own),
        "inclusive_by_function": shares(inclusive),
    }
