"""A/B of the APNs client alone: the `h2`-based one against our own HTTP/2 framing.

Both clients run in this one process against the same sink (nginx answering 200, as in
the full benchmark; the Python stand-in without nginx), taking turns, each run on a
fresh `ApnsProvider` after a warm-up. The figure that matters is CPU per push of this
process (`time.process_time()`): the machine may be shared, wall time is reported but
says more about the neighbours and the sink::

    python -m bench.apns_client [--count 20000] [--repeats 3] [--old-rev d81ac12]

The old client is `xmpp_push/providers/apns.py` as of `--old-rev` (by default the
last commit with the `h2` client), loaded from `git show` next to the current one.
Figures go to stdout and to bench/results/apns_client-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from bench.sinks import APNS_TOPIC, Sink, nginx_version, start_sink
from bench.workload import TokenSet
from xmpp_push.core.model import Content, Device, Push, Service
from xmpp_push.core.outcomes import DeliveryError
from xmpp_push.logs import configure_logging
from xmpp_push.providers import apns

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
OLD_REV = "d81ac12"
"""The last commit whose APNs client runs on `h2` and `hyperframe`."""


class _Provider(Protocol):
    async def send(self, push: Push) -> None: ...

    async def aclose(self) -> None: ...


def _load_old_client(rev: str, directory: Path) -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:xmpp_push/providers/apns.py"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    path = directory / "apns_old.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("apns_old", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def _run_once(
    client: ModuleType, sink: Sink, pushes: Sequence[Push], warmup: int, concurrency: int
) -> dict[str, float]:
    assert sink.apns_key_file is not None
    provider: _Provider = client.ApnsProvider(
        key_pem=sink.apns_key_file.read_bytes(),
        key_id=sink.apns_key_id,
        team_id=sink.apns_team_id,
        topic=APNS_TOPIC,
        endpoint=sink.endpoint,
        ca_file=str(sink.ca_file),
    )
    failed = 0

    async def blast(batch: Sequence[Push]) -> None:
        nonlocal failed
        queue = iter(batch)

        async def worker() -> None:
            nonlocal failed
            for push in queue:
                try:
                    await provider.send(push)
                except DeliveryError:
                    failed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    try:
        # TLS, JWT, the first streams: not part of what is measured.
        await blast(pushes[:warmup])
        failed = 0
        cpu, wall = time.process_time(), time.perf_counter()
        await blast(pushes)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await provider.aclose()
    return {
        "pushes": len(pushes),
        "failed": failed,
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "cpu_us_per_push": cpu / len(pushes) * 1e6,
        "pushes_per_cpu_second": len(pushes) / cpu,
        "pushes_per_second": len(pushes) / wall,
    }


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    # The least disturbed run (least CPU) is the client's own cost; the median for spread.
    return {
        "best_cpu_us_per_push": min(r["cpu_us_per_push"] for r in runs),
        "median_cpu_us_per_push": statistics.median(r["cpu_us_per_push"] for r in runs),
        "best_pushes_per_second": max(r["pushes_per_second"] for r in runs),
        "median_pushes_per_second": statistics.median(r["pushes_per_second"] for r in runs),
    }


async def measure(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    clients = {"h2": _load_old_client(args.old_rev, directory), "own": apns}
    sink = start_sink("apns", args.sink, directory / "sink")
    try:
        now = time.time()
        tokens = TokenSet("apns", min(args.count, 100_000)).tokens
        pushes = [
            Push(
                device=Device(Service.APNS, tokens[i % len(tokens)]),
                content=Content(message_count=1, sender="juliet@example.org", body="Hi"),
                created_at=now,
            )
            for i in range(args.count)
        ]
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
        for repeat in range(args.repeats):
            # Taking turns spreads any disturbance of the machine over both clients.
            for name, client in clients.items():
                run = await _run_once(client, sink, pushes, args.warmup, args.concurrency)
                runs[name].append(run)
                print(
                    f"{name:>3} #{repeat + 1}: {run['pushes_per_second']:8,.0f} pushes/s "
                    f"{run['cpu_us_per_push']:6.1f} µs CPU/push ({run['failed']:.0f} failed)",
                    file=sys.stderr,
                    flush=True,
                )
        sink_description = sink.describe()
    finally:
        sink.stop()
    summaries = {name: _summary(r) for name, r in runs.items()}
    old, new = summaries["h2"], summaries["own"]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python -m bench.apns_client " + " ".join(sys.argv[1:]),
        "old_rev": args.old_rev,
        "sink": sink_description,
        "nginx": nginx_version(),
        "count": args.count,
        "concurrency": args.concurrency,
        "runs": runs,
        "summary": summaries,
        "cpu_per_push_ratio_own_over_h2": new["best_cpu_us_per_push"] / old["best_cpu_us_per_push"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.apns_client", description=__doc__)
    parser.add_argument("--count", type=int, default=20_000, help="pushes per run")
    parser.add_argument("--warmup", type=int, default=1_000, help="pushes before each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per client")
    parser.add_argument("--concurrency", type=int, default=500, help="pushes in flight")
    parser.add_argument("--sink", choices=["nginx", "python", "auto"], default="auto")
    parser.add_argument("--old-rev", default=OLD_REV, help=f"commit of the old client ({OLD_REV})")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    configure_logging("warning", "json", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="apns-client-") as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.results_dir / f"apns_client-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"results_file": str(out), **results["summary"]}, indent=2))


if __name__ == "__main__":
    main()
