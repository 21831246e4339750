"""What the standalone benchmarks (bench.registrations, bench.wake_latency) share:
percentiles, tables for the console and for docs/performance.md, and writing one
marked section of that file."""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "REPO",
    "command_line",
    "console_table",
    "markdown_table",
    "percentile",
    "relative",
    "update_docs_section",
]

REPO = Path(__file__).resolve().parent.parent


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest rank: the smallest value with at least `fraction` of them at or below."""
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def console_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Header, a rule, then the rows; the first two columns left-aligned, the rest
    right-aligned; markdown bold (`**`) shown as spaces."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        cells = [
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).replace("**", "  "))
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def markdown_table(rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |"]
    lines.append("|" + "|".join("---" if n < 2 else "---:" for n in range(len(rows[0]))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return lines


def update_docs_section(path: Path, section: str, start_marker: str, end_marker: str) -> None:
    """Replace the section between the markers in `path` (or add it at the end),
    leaving every other byte of the file as it is: others write the rest of it."""
    text = path.read_text() if path.is_file() else ""
    start = text.find(start_marker)
    end = text.find(end_marker, start) if start >= 0 else -1
    if start >= 0 and end >= 0:
        text = text[:start] + section + text[end + len(end_marker) :]
    elif text:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        text = section + "\n"
    path.write_text(text)


def command_line(module: str, argv: Sequence[str]) -> str:
    """How this benchmark was run, with the interpreter relative to the repository."""
    python = Path(sys.executable)
    with contextlib.suppress(ValueError):
        python = python.relative_to(REPO)
    return shlex.join([str(python), "-m", module, *argv])


def relative(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(REPO))
    return str(path)
