"""The tests' APNs stand-in in a process of its own, telling when each request arrived.

For bench/wake_latency.py: the stand-in must not share an event loop with the
benchmark's hundreds of XMPP clients (their work would show up as push latency), and
the benchmark needs each request's arrival time. This process serves
`tests.standins.apns.ApnsStandIn` (TLS, ALPN `h2`, JWT checks, 200 for every valid
request) and writes to stdout:

* first one JSON line describing the stand-in (port, endpoint, ca_file, key_file,
  key_id, team_id), as `python -m tests.standins.apns` does;
* then one line per request, as soon as it is complete (its last frame read):
  `<device token> <arrival, time.time()> <status> <apns-push-type> <apns-priority>`,
  tab-separated ("-" for a missing header).

`time.time()` is comparable across processes on one machine, so the benchmark
subtracts the time it sent the message from the arrival time written here.

    python -m bench.apns_recorder --dir /tmp/apns

serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.standins.apns import ApnsStandIn, _describe
from tests.standins.cli import serve_until_signal
from tests.standins.h2server import Incoming

__all__ = ["RecordingApns", "main", "parse_arrival"]


class RecordingApns(ApnsStandIn):
    """The stand-in, writing one line per request to stdout and keeping none of them
    (a benchmark run sends thousands; `requests` stays empty)."""

    def _handle(
        self, connection_id: int, stream_id: int, incoming: Incoming
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        # Read the clock first: the stand-in's own checks (a JWT signature the first
        # time) are not the component's latency.
        arrived = time.time()
        answer = super()._handle(connection_id, stream_id, incoming)
        request = self.requests.pop()  # the one _handle just recorded
        headers = request.headers
        sys.stdout.write(
            f"{request.token or '-'}\t{arrived:.6f}\t{request.status}"
            f"\t{headers.get('apns-push-type', '-')}\t{headers.get('apns-priority', '-')}\n"
        )
        sys.stdout.flush()
        return answer


def parse_arrival(line: str) -> tuple[str, float, str, str, str] | None:
    """(token, arrival, status, push type, priority) from one request line, or None
    for anything else."""
    fields = line.rstrip("\n").split("\t")
    if len(fields) != 5:
        return None
    try:
        arrived = float(fields[1])
    except ValueError:
        return None
    return fields[0], arrived, fields[2], fields[3], fields[4]


async def _serve(directory: Path) -> None:
    apns = RecordingApns(directory)
    await apns.start(host="127.0.0.1", port=0)
    await serve_until_signal(apns, _describe)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.apns_recorder",
        description="Serve the APNs stand-in and print each request's arrival time.",
    )
    parser.add_argument("--dir", required=True, help="where the CA and the .p8 key go")
    args = parser.parse_args(argv)
    asyncio.run(_serve(Path(args.dir)))


if __name__ == "__main__":
    main()
