"""Wake latency: message sent → push request at APNs, direct mode vs the servers' modules.

Not a test: a benchmark (issue #5, item 7). On real servers started from the project's
fixture classes, it sends chat messages to users who need a push and times each one
from the moment before `send_message` to the moment the APNs stand-in has read the
whole push request. Three cases:

* **offline**: the user has no session (it enabled push, then logged out cleanly);
  one message at a time, the next once the push has arrived;
* **hibernated**: a session with XEP-0198 resumption whose TCP connection was cut
  (RST): the server keeps it, waiting for a resumption;
* **undecided**: a live session that stopped reading its socket, so the message is
  never acknowledged.

Hibernated and undecided use N sessions (200 by default), each of which enabled push
with a node and an APNs token of its own, so that every push names one session; one
message each, sent 10 ms apart. Four setups, side by side in one run:

| setup | what wakes the device |
|---|---|
| prosody-direct | Prosody 0.12 + plugins/prosody/mod_xmpp_push.lua + mod_delegation |
| prosody-cloud-notify | Prosody 0.12 + mod_cloud_notify publishing to xmpp-push |
| ejabberd-direct | ejabberd 23.01 + plugins/ejabberd/mod_xmpp_push.erl + mod_delegation |
| ejabberd-mod-push | ejabberd 23.01 + mod_push / mod_push_keepalive publishing to xmpp-push |

The servers' push modules run with their default timers (Prosody: smacks_max_ack_delay
30 s, smacks_hibernation_time 600 s; ejabberd: ack_timeout 60 s, resume_timeout 300 s);
direct mode with `policy.undecided_delay = 2` and `policy.coalesce_window = 0`
(coalescing only ever delays the second and later messages of a burst to one device,
never the first, and every message here goes to a device with nothing pending).

Each setup runs a fresh component process (`python -m xmpp_push.cli run`, as in
production, `[log] level = "info"`) and the APNs stand-in of the tests in a process of
its own (bench/apns_recorder.py, which prints each request's arrival time), so neither
shares an event loop with the benchmark's clients. Accounts: 5 sessions per account on
Prosody (mod_cloud_notify keeps at most `push_max_devices` = 5 registrations a user),
8 on ejabberd (its `max_user_sessions` is 10 in the test profile, and mod_push keeps no
more registrations than that); each server is started once, its accounts registered
once, and restarted with the other setup's options (accounts survive a restart).

    .venv/bin/python -m bench.wake_latency            # ~4-6 minutes; updates docs/performance.md
    .venv/bin/python -m bench.wake_latency --quick    # 40 messages a case, no 60 s wait; ~2 minutes

Before each setup it waits (up to --quiet-wait seconds) for the machine to be idle,
and it reports, per case, the cores other processes kept busy: on 2 cores a test suite
running beside it shows up as latency.

Results: a table on the terminal, every figure in bench/results/wake-latency-<UTC
time>.json, and the section between `<!-- wake-latency:begin -->` and
`<!-- wake-latency:end -->` of docs/performance.md (a full run only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from xml.sax.saxutils import quoteattr

from slixmpp.util.sasl.mechanisms import SCRAM

from bench._common import (
    REPO,
    command_line,
    console_table,
    markdown_table,
    percentile,
    relative,
    update_docs_section,
)
from bench.apns_recorder import parse_arrival
from bench.processes import IMPLEMENTATIONS, RunningComponent, child_environment, write_toml
from bench.procstat import CpuClock, machine_busy_seconds, wait_for_quiet
from tests.servers.ejabberd import Ejabberd, EjabberdOptions
from xmpp_push.devtools import ServerError
from xmpp_push.devtools.client import XmppClient
from xmpp_push.devtools.prosody import Prosody, ProsodyOptions

T = TypeVar("T")
ServerKind = Literal["prosody", "ejabberd"]
Server = Prosody | Ejabberd

DOMAIN: Final = "localhost"
COMPONENT_JID: Final = "push.localhost"
COMPONENT_SECRET: Final = "wake-latency-secret"
APNS_TOPIC: Final = "org.example.chat"

CASES: Final = ("offline", "hibernated", "undecided")
UNDECIDED_DELAY: Final = 2.0
"""`policy.undecided_delay` of the direct-mode component, seconds."""
TARGET_MS: Final = {
    "offline": 50.0,
    "hibernated": 100.0,
    "undecided": UNDECIDED_DELAY * 1000 + 100.0,
}
"""Issue #5: p99 of direct mode, per case."""
PROSODY_ACK_DELAY: Final = 30
"""Prosody's defaults (mod_smacks), instead of the test profile's 5 s and 300 s."""
PROSODY_HIBERNATION: Final = 600
PROSODY_LOG_LEVEL: Final = "info"
"""At 200 sessions the test profile's debug log is much of Prosody's work (ejabberd's
test profile, like production, logs at info)."""
EJABBERD_ACK_TIMEOUT: Final = 60
"""ejabberd's defaults (mod_stream_mgmt), instead of the test profile's 15 s."""
EJABBERD_RESUME_TIMEOUT: Final = 300

SESSIONS_PER_ACCOUNT: Final[Mapping[ServerKind, int]] = {"prosody": 5, "ejabberd": 8}
DEFAULT_MESSAGES: Final = 200
QUICK_MESSAGES: Final = 40
WARMUP_MESSAGES: Final = 5
"""Offline messages before measuring: the component's first push opens the TLS
connection to APNs and signs a JWT; not counted."""
SEND_INTERVAL: Final = 0.010
"""Seconds between two messages of the hibernated and undecided cases."""
OFFLINE_GAP: Final = 0.020
"""Seconds between a push's arrival and the next offline message (a duplicate push
would arrive in it)."""
OFFLINE_TIMEOUT: Final = 5.0
OFFLINE_GIVE_UP: Final = 5
"""Consecutive offline messages without a push after which the case stops."""
GRACE: Final = 1.5
"""Seconds to keep listening once every message of a case has its push: duplicates
(Prosody's 1 s batch timer would put a second push about a second later)."""
CASE_MARGIN: Final = 10.0
"""Seconds to wait for pushes beyond the expected latency before counting them missing."""
CONNECT_PARALLEL: Final = 20
READY_TIMEOUT: Final = 30.0
QUIET_BELOW: Final = 0.25
"""Cores busy on the machine under which a setup starts (see --quiet-wait)."""
OTHER_LOAD_WARNING: Final = 0.3
"""Cores used by other processes during a case above which the figures are flagged."""
DOCS_START: Final = "<!-- wake-latency:begin -->"
DOCS_END: Final = "<!-- wake-latency:end -->"


# --------------------------------------------------------------------------- setups


@dataclass(frozen=True, slots=True)
class Setup:
    key: str
    server: ServerKind
    direct: bool
    label: str

    @property
    def mode(self) -> str:
        return "direct" if self.direct else "app-server"


SETUPS: Final = (
    Setup("prosody-direct", "prosody", True, "Prosody + mod_xmpp_push (direct mode)"),
    Setup("prosody-cloud-notify", "prosody", False, "Prosody + mod_cloud_notify"),
    Setup("ejabberd-direct", "ejabberd", True, "ejabberd + mod_xmpp_push (direct mode)"),
    Setup("ejabberd-mod-push", "ejabberd", False, "ejabberd + mod_push"),
)


def prosody_options(direct: bool) -> ProsodyOptions:
    return ProsodyOptions(
        domain=DOMAIN,
        component_jid=COMPONENT_JID,
        component_secret=COMPONENT_SECRET,
        delegation=direct,
        cloud_notify=not direct,
        xmpp_push_plugin=direct,
        smacks_hibernation_time=PROSODY_HIBERNATION,
        smacks_max_ack_delay=PROSODY_ACK_DELAY,
        log_level=PROSODY_LOG_LEVEL,
    )


def ejabberd_options(direct: bool) -> EjabberdOptions:
    return EjabberdOptions(
        domain=DOMAIN,
        component_jid=COMPONENT_JID,
        component_secret=COMPONENT_SECRET,
        delegation=direct,
        push=not direct,
        xmpp_push_plugin=direct,
        ack_timeout=EJABBERD_ACK_TIMEOUT,
        resume_timeout=EJABBERD_RESUME_TIMEOUT,
    )


def server_options(setup: Setup) -> ProsodyOptions | EjabberdOptions:
    if setup.server == "prosody":
        return prosody_options(setup.direct)
    return ejabberd_options(setup.direct)


def expected_seconds(setup: Setup, case: str) -> float:
    """About when the push should come, from what each implementation documents
    (PROTOCOLS.md §1.4): the wait for it is this plus CASE_MARGIN."""
    if case == "undecided":
        if setup.direct:
            return UNDECIDED_DELAY
        if setup.server == "prosody":
            return PROSODY_ACK_DELAY + 1.0  # then mod_cloud_notify's 1 s batch timer
        return float(EJABBERD_ACK_TIMEOUT)  # ejabberd closes the stream, then pushes
    if case == "hibernated" and setup.key == "prosody-cloud-notify":
        return 1.0
    return 0.0


@dataclass(frozen=True, slots=True)
class Layout:
    """Who is who on a server: N session slots spread over accounts, a sender, and one
    account per setup for the offline case."""

    server: ServerKind
    sessions: int

    @property
    def per_account(self) -> int:
        return SESSIONS_PER_ACCOUNT[self.server]

    @property
    def session_accounts(self) -> list[str]:
        return [f"s{number}" for number in range(math.ceil(self.sessions / self.per_account))]

    def session_jid(self, index: int) -> str:
        return f"s{index // self.per_account}@{DOMAIN}/r{index}"

    @staticmethod
    def offline_account(setup: Setup) -> str:
        return f"offline-{setup.key}"

    def accounts(self, setups: Iterable[Setup]) -> list[str]:
        return ["sender", *(self.offline_account(s) for s in setups), *self.session_accounts]


def password(account: str) -> str:
    return f"pw-{account}"


# --------------------------------------------------------------------------- the APNs side


@dataclass(frozen=True, slots=True)
class Arrival:
    token: str
    at: float
    status: str
    push_type: str
    priority: str


class ApnsRecorder:
    """bench/apns_recorder.py as a child process; collects the arrival lines it prints."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.description: dict[str, Any] = {}
        self.arrivals: list[Arrival] = []
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._news = asyncio.Event()

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "recorder.log").open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.apns_recorder",
                "--dir",
                str(self.directory),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=REPO,
                env=child_environment(),
            )
        assert self._process.stdout is not None
        first = await asyncio.wait_for(self._process.stdout.readline(), 30)
        if not first:
            raise RuntimeError(
                "the APNs recorder exited: " + (self.directory / "recorder.log").read_text()
            )
        self.description = json.loads(first)
        self._reader = asyncio.create_task(self._read(self._process.stdout))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            parsed = parse_arrival(line.decode("utf-8", "replace"))
            if parsed is None:
                continue
            self.arrivals.append(Arrival(*parsed))
            self._news.set()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def config_section(self) -> dict[str, object]:
        return {
            "key_file": self.description["key_file"],
            "key_id": self.description["key_id"],
            "team_id": self.description["team_id"],
            "topic": APNS_TOPIC,
            "endpoint": self.description["endpoint"],
            "ca_file": self.description["ca_file"],
            "request_timeout": 5.0,
        }

    def since(self, index: int) -> list[Arrival]:
        return self.arrivals[index:]

    async def wait_until(self, satisfied: Callable[[], bool], timeout: float) -> bool:
        """Wait until `satisfied()` (checked at each arrival) or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not satisfied():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._news.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._news.wait(), left)
        return True

    async def wait_for_pushes(self, sends: Sequence[tuple[str, float]], timeout: float) -> bool:
        """Until every (token, sent at) has an arrival for that token after it."""
        pending = dict(sends)
        checked = 0

        def satisfied() -> bool:
            nonlocal checked
            for arrival in self.arrivals[checked:]:
                sent = pending.get(arrival.token)
                if sent is not None and arrival.at >= sent:
                    del pending[arrival.token]
            checked = len(self.arrivals)
            return not pending

        return await self.wait_until(satisfied, timeout)

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


# --------------------------------------------------------------------------- the component


def component_sections(
    port: int, recorder: ApnsRecorder, database: Path
) -> dict[str, dict[str, object]]:
    return {
        "component": {
            "jid": COMPONENT_JID,
            "secret": COMPONENT_SECRET,
            "host": "127.0.0.1",
            "port": port,
            "allowed_domains": [DOMAIN],
        },
        "storage": {"url": f"sqlite+aiosqlite:///{database}"},
        "policy": {"undecided_delay": UNDECIDED_DELAY, "coalesce_window": 0},
        "apns": recorder.config_section(),
        "log": {"level": "info", "format": "json"},
    }


def log_events(path: Path) -> list[dict[str, Any]]:
    """The component's JSON log lines (anything else it printed is skipped)."""
    events = []
    with contextlib.suppress(OSError), path.open(errors="replace") as log:
        for line in log:
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
    return events


async def wait_until_ready(component: RunningComponent, direct: bool) -> dict[str, Any]:
    """Until the component is connected and, in direct mode, the server delegated
    `urn:xmpp:push:0` and its plugin answered `configure`. Returns what the plugin said
    of itself (direct mode)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        events = log_events(component.log)
        names = {str(event.get("event")) for event in events}
        if "connected" in names and (
            not direct or {"delegation_granted", "plugin_detected"} <= names
        ):
            plugin = next((e for e in events if e.get("event") == "plugin_detected"), {})
            return {key: plugin.get(key) for key in ("name", "version", "software")}
        if direct and "plugin_missing" in names:
            raise RuntimeError(
                "the server's plugin did not answer `configure`:\n" + component.log_tail()
            )
        if not component.alive:
            raise RuntimeError("the component exited:\n" + component.log_tail())
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the component was not ready within {READY_TIMEOUT:g} s (seen: "
                f"{sorted(names)}):\n" + component.log_tail()
            )
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- cases


@dataclass(slots=True)
class CaseRecord:
    """One case of one setup: what was sent when, and the interval whose arrivals
    belong to it."""

    case: str
    expected_s: float
    window_start: float = 0.0
    window_end: float = 0.0
    sends: list[tuple[str, float]] = field(default_factory=list)
    """(APNs token, time.time() just before send_message), in the order sent."""
    recipients: dict[str, str] = field(default_factory=dict)
    """Token → the JID its messages went to (full for a session, bare when offline)."""
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    load: dict[str, float] = field(default_factory=dict)
    """Cores busy while the case ran: the whole machine, the processes of this
    benchmark (clients, component, APNs stand-in, server), everything else."""
    component_cpu_s: float = 0.0


def wake_times(
    events: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str, str | None], list[float]]:
    """When the direct-mode component logged `wake` (it has looked the registrations up
    and is about to push), by (state, user, resource)."""
    found: dict[tuple[str, str, str | None], list[float]] = {}
    for event in events:
        if event.get("event") != "wake" or "timestamp" not in event:
            continue
        stamp = dt.datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
        key = (str(event.get("state")), str(event.get("owner")), event.get("resource"))
        found.setdefault(key, []).append(stamp.timestamp())
    return found


def _spread(values: list[float]) -> dict[str, float]:
    values.sort()
    return {
        "p50": round(percentile(values, 0.50) * 1000, 2),
        "p99": round(percentile(values, 0.99) * 1000, 2),
        "max": round(values[-1] * 1000, 2),
    }


def analyse(
    record: CaseRecord,
    arrivals: Sequence[Arrival],
    wakes: Mapping[tuple[str, str, str | None], list[float]] | None = None,
) -> dict[str, Any]:
    """Match each message with the first push to its token after it was sent.

    Per token, the pushes between one message and the next belong to the first: the
    first of them is its push, the rest duplicates. Pushes to a token of the case
    before its first message (within the case's interval) are `early` (the server
    pushed for something else: a stanza left unacknowledged at the cut, say).

    With the direct-mode component's `wake` times, each latency is split at the wake:
    before it the server, its plugin, the link and the registration lookup; after it
    the push to APNs."""
    result: dict[str, Any] = {
        "case": record.case,
        "sent": len(record.sends),
        "expected_s": record.expected_s,
        "notes": record.notes,
        "load_cores": record.load,
        "component_cpu_ms_per_message": (
            round(record.component_cpu_s * 1000 / len(record.sends), 2) if record.sends else None
        ),
    }
    if record.skipped is not None:
        result["skipped"] = record.skipped
        return result
    sends_by_token: dict[str, list[float]] = {}
    for token, sent in record.sends:
        sends_by_token.setdefault(token, []).append(sent)
    window = [a for a in arrivals if record.window_start <= a.at <= record.window_end]
    buckets: dict[tuple[str, int], list[Arrival]] = {}
    early = 0
    foreign = 0
    not_ok = Counter[str]()
    for arrival in window:
        sends = sends_by_token.get(arrival.token)
        if sends is None:
            foreign += 1
            continue
        if arrival.status != "200":
            not_ok[arrival.status] += 1
        position = -1
        for number, sent in enumerate(sends):
            if sent <= arrival.at:
                position = number
        if position < 0:
            early += 1
        else:
            buckets.setdefault((arrival.token, position), []).append(arrival)
    latencies: list[float] = []
    in_order: list[float | None] = []  # per message as sent: ms, None without a push
    before_wake: list[float] = []
    after_wake: list[float] = []
    duplicates = 0
    missing = 0
    push_types = Counter[str]()
    seen = Counter[str]()
    for token, _sent in record.sends:
        number = seen[token]
        seen[token] += 1
        sent = sends_by_token[token][number]
        bucket = buckets.get((token, number))
        if not bucket:
            missing += 1
            in_order.append(None)
            continue
        latencies.append(bucket[0].at - sent)
        in_order.append(round((bucket[0].at - sent) * 1000, 2))
        if wakes is not None:
            bare, _, resource = record.recipients.get(token, "").partition("/")
            key = (record.case, bare, resource or None)
            woke = next((at for at in wakes.get(key, ()) if sent <= at <= bucket[0].at), None)
            if woke is not None:
                before_wake.append(woke - sent)
                after_wake.append(bucket[0].at - woke)
        push_types[f"{bucket[0].push_type}/{bucket[0].priority}"] += 1
        duplicates += len(bucket) - 1
    latencies.sort()
    result.update(
        {
            "pushed": len(latencies),
            "missing": missing,
            "duplicates": duplicates,
            "early": early,
            "other_tokens": foreign,
            "not_200": dict(not_ok),
            "push_types": dict(push_types),
            "window_s": round(record.window_end - record.window_start, 2),
            "latencies_ms": in_order,
        }
    )
    if before_wake:
        result["before_wake_ms"] = _spread(before_wake)
        result["after_wake_ms"] = _spread(after_wake)
    if latencies:
        result.update(
            {
                "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
                "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
                "max_ms": round(latencies[-1] * 1000, 2),
                "min_ms": round(latencies[0] * 1000, 2),
                "mean_ms": round(sum(latencies) / len(latencies) * 1000, 2),
            }
        )
    return result


def server_pid(server: Server) -> int | None:
    """The server's main process, from the pid file it writes (Prosody's `pidfile`,
    ejabberd's EJABBERD_PID_PATH)."""
    name = "prosody.pid" if isinstance(server, Prosody) else "ejabberd.pid"
    try:
        return int((server.run_dir / name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def measured(pids: Sequence[int], component: int, case: Awaitable[CaseRecord]) -> CaseRecord:
    """Run a case, noting how busy the machine was, how much of it was us, and the
    component's CPU time."""
    ours = CpuClock(pids, include_children=True)
    component_clock = CpuClock([component])
    ours.start()
    component_clock.start()
    busy = machine_busy_seconds()
    record = await case
    ours.stop()
    component_clock.stop()
    record.component_cpu_s = component_clock.cpu
    if ours.wall > 0:
        machine = (machine_busy_seconds() - busy) / ours.wall
        record.load = {
            "machine": round(machine, 2),
            "ours": round(ours.cores, 2),
            "other": round(max(0.0, machine - ours.cores), 2),
        }
    return record


@contextlib.contextmanager
def cheap_logins(directory: Path) -> Iterator[None]:
    """Take two costs of the test client's login off the benchmark's CPU (2 cores
    shared with the servers and the component): they are the harness's, not what is
    measured, and at 800 logins a run they cost minutes.

    * slixmpp builds a verifying TLS context for every client and loads the system CA
      bundle into it twice (about 120 ms a client here), though these clients speak
      plain TCP: while this is active, OpenSSL's default CA file is an empty one.
    * slixmpp computes SCRAM's salted password (PBKDF2, 4,096 rounds) in pure Python,
      about 30 ms a login: while this is active, `hashlib.pbkdf2_hmac` computes it, the
      same function in C (checked against slixmpp's own on a sample first).

    Only this process changes, and only meanwhile: start child processes outside."""
    mechanism: Any = SCRAM
    original = mechanism.Hi

    def hi(self: Any, text: bytes, salt: bytes, iterations: int) -> bytes:
        return hashlib.pbkdf2_hmac(self.hash().name, bytes(text), salt, iterations)

    sample: Any = SCRAM.__new__(SCRAM)
    sample.hash = hashlib.sha1
    fast = hi(sample, b"pencil", b"salt", 64) == original(sample, b"pencil", b"salt", 64)
    empty = directory / "no-system-ca.pem"
    empty.write_text("")
    saved = {name: os.environ.get(name) for name in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    os.environ["SSL_CERT_FILE"] = str(empty)
    os.environ["SSL_CERT_DIR"] = str(directory / "no-system-ca")
    if fast:
        mechanism.Hi = hi
    try:
        yield
    finally:
        mechanism.Hi = original
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass(slots=True)
class Session:
    index: int
    client: XmppClient
    token: str
    jid: str


def new_token() -> str:
    return secrets.token_hex(32)


async def _bounded(
    items: Sequence[T], work: Callable[[T], Awaitable[Any]], parallel: int
) -> list[BaseException]:
    """Run `work` on every item, `parallel` at a time; the exceptions raised."""
    gate = asyncio.Semaphore(parallel)

    async def one(item: T) -> Any:
        async with gate:
            return await work(item)

    outcomes = await asyncio.gather(*(one(item) for item in items), return_exceptions=True)
    return [outcome for outcome in outcomes if isinstance(outcome, BaseException)]


async def close_all(clients: Iterable[XmppClient]) -> None:
    async def close(client: XmppClient) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(timeout=2), 4)

    await asyncio.gather(*(close(client) for client in clients))


async def connect_sessions(server: Server, layout: Layout) -> list[Session]:
    """N sessions with resumable stream management, each with push enabled under a node
    and an APNs token of its own."""
    sessions: list[Session | None] = [None] * layout.sessions

    async def connect(index: int) -> None:
        jid = layout.session_jid(index)
        account = jid.split("@", 1)[0]
        client = await XmppClient.connect(
            jid, password(account), server.host, server.c2s_port, stream_management=True
        )
        token = new_token()
        try:
            await client.enable_push(
                COMPONENT_JID, f"n{index}", {"service": "apns", "device_id": token}
            )
        except BaseException:
            await close_all([client])
            raise
        sessions[index] = Session(index, client, token, client.jid)

    problems = await _bounded(range(layout.sessions), connect, CONNECT_PARALLEL)
    made = [session for session in sessions if session is not None]
    if problems:
        await close_all(session.client for session in made)
        raise RuntimeError(f"{len(problems)} sessions failed to start: {problems[0]!r}")
    return made


async def send_spaced(
    sender: XmppClient, sessions: Sequence[Session], record: CaseRecord, text: str
) -> None:
    for session in sessions:
        sent = time.time()
        await sender.send_message(session.jid, f"{text} {session.index}")
        record.sends.append((session.token, sent))
        record.recipients[session.token] = session.jid
        await asyncio.sleep(SEND_INTERVAL)


async def offline_case(
    setup: Setup,
    server: Server,
    layout: Layout,
    sender: XmppClient,
    recorder: ApnsRecorder,
    messages: int,
) -> CaseRecord:
    record = CaseRecord("offline", expected_seconds(setup, "offline"))
    account = layout.offline_account(setup)
    bare = f"{account}@{DOMAIN}"
    token = new_token()
    phone = await XmppClient.connect(bare, password(account), server.host, server.c2s_port)
    try:
        await phone.enable_push(COMPONENT_JID, "offline", {"service": "apns", "device_id": token})
    finally:
        await phone.close()
    await asyncio.sleep(0.5)  # the server has ended the session

    async def one(text: str) -> tuple[float, bool]:
        sent = time.time()
        await sender.send_message(bare, text)
        arrived = await recorder.wait_for_pushes([(token, sent)], OFFLINE_TIMEOUT)
        await asyncio.sleep(OFFLINE_GAP)
        return sent, arrived

    record.recipients[token] = bare
    for number in range(WARMUP_MESSAGES):
        await one(f"warm-up {number}")
    record.window_start = time.time()
    misses = 0
    for number in range(messages):
        sent, arrived = await one(f"offline {number}")
        record.sends.append((token, sent))
        misses = 0 if arrived else misses + 1
        if misses >= OFFLINE_GIVE_UP:
            record.notes.append(
                f"stopped after {number + 1} messages: {misses} in a row got no push"
                f" within {OFFLINE_TIMEOUT:g} s"
            )
            break
    await asyncio.sleep(GRACE)
    record.window_end = time.time()
    return record


async def hibernated_case(
    setup: Setup, sessions: Sequence[Session], sender: XmppClient, recorder: ApnsRecorder
) -> CaseRecord:
    record = CaseRecord("hibernated", expected_seconds(setup, "hibernated"))
    record.window_start = time.time()
    await asyncio.gather(*(session.client.cut(rst=True) for session in sessions))
    # The server sees the RST at once; a push for a stanza left unacknowledged at the
    # cut would come now (Prosody: after its 1 s batch timer) and counts as early.
    await asyncio.sleep(GRACE)
    await send_spaced(sender, sessions, record, "hibernated")
    done = await recorder.wait_for_pushes(record.sends, record.expected_s + CASE_MARGIN)
    if not done:
        record.notes.append(f"waited {record.expected_s + CASE_MARGIN:g} s after the last send")
    await asyncio.sleep(GRACE)
    record.window_end = time.time()
    return record


async def undecided_case(
    setup: Setup,
    sessions: Sequence[Session],
    sender: XmppClient,
    recorder: ApnsRecorder,
    skip: str | None,
) -> CaseRecord:
    record = CaseRecord("undecided", expected_seconds(setup, "undecided"))
    if skip is not None:
        record.skipped = skip
        return record
    record.window_start = time.time()
    # An account's sessions one after the other: a resumption opens the new session
    # before it closes the old one, and ejabberd (max_user_sessions 10 in the test
    # profile) closes the account's oldest session when it has one too many.
    accounts: dict[str, list[Session]] = {}
    for session in sessions:
        accounts.setdefault(session.jid.split("/", 1)[0], []).append(session)

    async def resume(group: list[Session]) -> None:
        for session in group:
            await session.client.resume()

    problems = await _bounded(list(accounts.values()), resume, CONNECT_PARALLEL)
    if problems:
        raise RuntimeError(f"{len(problems)} sessions failed to resume: {problems[0]!r}")
    # Each resumed session gets the hibernated case's message again and acknowledges
    # it when the server asks; then nothing is left unacknowledged.
    await asyncio.sleep(1.0)
    for session in sessions:
        session.client.stop_reading()
    await asyncio.sleep(0.2)
    await send_spaced(sender, sessions, record, "undecided")
    done = await recorder.wait_for_pushes(record.sends, record.expected_s + CASE_MARGIN)
    if not done:
        record.notes.append(f"waited {record.expected_s + CASE_MARGIN:g} s after the last send")
    await asyncio.sleep(GRACE)
    record.window_end = time.time()
    for session in sessions:
        with contextlib.suppress(Exception):
            session.client.start_reading()
    return record


# --------------------------------------------------------------------------- one setup


def undecided_skip(setup: Setup, args: argparse.Namespace) -> str | None:
    if setup.key == "ejabberd-mod-push" and args.skip_ejabberd_undecided:
        return (
            "not measured (--quick or --skip-ejabberd-undecided): ejabberd pushes an"
            f" undecided session only at ack_timeout ({EJABBERD_ACK_TIMEOUT} s), when it"
            " closes the connection"
        )
    return None


async def run_setup(
    setup: Setup,
    server: Server,
    layout: Layout,
    recorder: ApnsRecorder,
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    began = time.monotonic()
    print(f"\n{setup.key}: {setup.label}", flush=True)
    directory = work / setup.key
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "xmpp-push.toml"
    sections = component_sections(server.component_port, recorder, directory / "registrations.db")
    write_toml(config, sections)
    component = RunningComponent(IMPLEMENTATIONS["project"], config, directory / "component.log")
    first_arrival = len(recorder.arrivals)
    records: list[CaseRecord] = []
    result: dict[str, Any] = {
        "label": setup.label,
        "server": setup.server,
        "mode": setup.mode,
        "server_options": dataclasses.asdict(server.options),
        "component_policy": sections["policy"],
    }
    sessions: list[Session] = []
    sender: XmppClient | None = None
    phases: dict[str, float] = {}
    result["phases_s"] = phases
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        phases[name] = round(now - clock, 2)
        clock = now

    waited, quiet = await wait_for_quiet(args.quiet_wait, QUIET_BELOW)
    result["quiet_wait"] = {"seconds": round(waited, 1), "quiet": quiet}
    await component.start()
    pids = [os.getpid(), component.pid, recorder.pid]
    pids += [pid for pid in [server_pid(server)] if pid is not None]
    with cheap_logins(directory):
        try:
            result["plugin"] = await wait_until_ready(component, setup.direct)
            lap("component_ready")
            sender = await XmppClient.connect(
                f"sender@{DOMAIN}", password("sender"), server.host, server.c2s_port
            )
            if "offline" in args.cases:
                record = await measured(
                    pids,
                    component.pid,
                    offline_case(setup, server, layout, sender, recorder, args.messages),
                )
                records.append(record)
                lap("offline")
                print(f"  {_progress(record, recorder.arrivals)}", flush=True)
            if "hibernated" in args.cases:
                sessions = await connect_sessions(server, layout)
                lap("sessions_connected")
                record = await measured(
                    pids, component.pid, hibernated_case(setup, sessions, sender, recorder)
                )
                records.append(record)
                lap("hibernated")
                print(f"  {_progress(record, recorder.arrivals)}", flush=True)
            if "undecided" in args.cases:
                skip = undecided_skip(setup, args)
                record = await measured(
                    pids, component.pid, undecided_case(setup, sessions, sender, recorder, skip)
                )
                records.append(record)
                lap("undecided")
                print(f"  {_progress(record, recorder.arrivals)}", flush=True)
        except Exception as problem:  # one broken setup must not lose the others' figures
            result["error"] = f"{type(problem).__name__}: {problem}"
            print(f"  FAILED: {result['error']}", flush=True)
        finally:
            lap("failed" if "error" in result else "cases_done")
            await close_all([s.client for s in sessions] + ([sender] if sender else []))
            lap("clients_closed")
            result["component_exit"] = await component.stop()
            lap("component_stopped")
    # The component's own events (stdlib loggers such as alembic's carry "logger").
    own = [event for event in log_events(component.log) if "logger" not in event]
    wakes = wake_times(own) if setup.direct else None
    result["cases"] = {record.case: analyse(record, recorder.arrivals, wakes) for record in records}
    with (work / "sends.tsv").open("a") as sends:  # for a closer look (--keep)
        for record in records:
            sends.writelines(
                f"{setup.key}\t{record.case}\t{token}\t{sent:.6f}\n" for token, sent in record.sends
            )
    result["component_events"] = dict(sorted(Counter(str(e.get("event")) for e in own).items()))
    result["component_warnings"] = _warnings(log_events(component.log))
    result["apns_requests"] = len(recorder.arrivals) - first_arrival
    result["seconds"] = round(time.monotonic() - began, 1)
    return result


def _warnings(events: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return dict(
        Counter(
            str(event.get("event"))
            for event in events
            if event.get("level") in {"warning", "error", "critical"}
            # No [fcm] section: expected, APNs is all this benchmark uses.
            and event.get("event") != "provider_not_configured"
        )
    )


def _progress(record: CaseRecord, arrivals: Sequence[Arrival]) -> str:
    summary = analyse(record, arrivals)
    if "skipped" in summary:
        return f"{record.case:<11} {summary['skipped']}"
    figures = (
        f"p50 {summary['p50_ms']:.1f} ms  p99 {summary['p99_ms']:.1f} ms"
        f"  max {summary['max_ms']:.1f} ms"
        if "p50_ms" in summary
        else "no push"
    )
    return (
        f"{record.case:<11} {summary['pushed']}/{summary['sent']} pushed  {figures}"
        f"  (missing {summary['missing']}, duplicates {summary['duplicates']},"
        f" early {summary['early']})"
    )


# --------------------------------------------------------------------------- servers


def make_server(kind: ServerKind, run_dir: Path, setup: Setup) -> Server:
    if kind == "prosody":
        options = server_options(setup)
        assert isinstance(options, ProsodyOptions)
        return Prosody(run_dir, options)
    options_e = server_options(setup)
    assert isinstance(options_e, EjabberdOptions)
    return Ejabberd(run_dir, options_e)


async def register_accounts(server: Server, accounts: Sequence[str]) -> None:
    """Prosody: `prosodyctl register` (0.05 s each). ejabberd: one `ejabberdctl
    import_piefxis` (XEP-0227) for all of them, instead of one `ejabberdctl register`
    per account (an Erlang VM boot each: about a second on 2 cores)."""
    if isinstance(server, Ejabberd):
        users = "".join(
            f"<user name={quoteattr(account)} password={quoteattr(password(account))}/>"
            for account in accounts
        )
        dump = server.run_dir / "accounts.xml"
        dump.write_text(
            "<?xml version='1.0' encoding='UTF-8'?>"
            f"<server-data xmlns='urn:xmpp:pie:0'><host jid={quoteattr(DOMAIN)}>{users}"
            "</host></server-data>\n"
        )
        dump.chmod(0o644)  # ejabberd runs as its own user
        await asyncio.to_thread(server.ctl, "import_piefxis", str(dump))
        registered = set((await asyncio.to_thread(server.ctl, "registered_users", DOMAIN)).split())
        missing = sorted(set(accounts) - registered)
        if missing:
            raise ServerError(
                f"import_piefxis did not create {len(missing)} accounts: {missing[:5]}"
            )
        return
    for account in accounts:  # one at a time: each call rewrites the config file
        await asyncio.to_thread(server.register, account, password(account))


async def run_server(
    kind: ServerKind,
    setups: Sequence[Setup],
    recorder: ApnsRecorder,
    work: Path,
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """Both setups of one server: start it with the first's options, register the
    accounts, run; restart it with the second's options (accounts survive), run."""
    layout = Layout(kind, args.messages)
    server = make_server(kind, work / kind, setups[0])
    results: dict[str, dict[str, Any]] = {}
    began = time.monotonic()
    try:
        # prosodyctl registers while Prosody is stopped; ejabberd must run.
        if isinstance(server, Prosody):
            await register_accounts(server, layout.accounts(setups))
        await asyncio.to_thread(server.start)
        if isinstance(server, Ejabberd):
            await register_accounts(server, layout.accounts(setups))
        print(
            f"\n{kind}: started, {len(layout.accounts(setups))} accounts registered in"
            f" {time.monotonic() - began:.1f} s",
            flush=True,
        )
        for number, setup in enumerate(setups):
            if number:
                restarted = time.monotonic()
                options = server_options(setup)
                if isinstance(server, Prosody):
                    assert isinstance(options, ProsodyOptions)
                    await asyncio.to_thread(server.restart, options)
                else:
                    assert isinstance(options, EjabberdOptions)
                    await asyncio.to_thread(server.restart, options)
                print(f"\n{kind}: restarted in {time.monotonic() - restarted:.1f} s", flush=True)
            results[setup.key] = await run_setup(setup, server, layout, recorder, work, args)
    except ServerError as problem:
        for setup in setups:
            results.setdefault(setup.key, {"label": setup.label, "error": str(problem)[:4000]})
        print(f"\n{kind}: FAILED: {str(problem)[:2000]}", flush=True)
    finally:
        await asyncio.to_thread(server.stop)
    return results


# --------------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def table_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows = [
        [
            "setup",
            "case",
            "messages",
            "pushed",
            "missing",
            "dup",
            "early",
            "p50 ms",
            "p99 ms",
            "max ms",
        ]
    ]
    for case in results["config"]["cases"]:
        for key, setup in results["setups"].items():
            summary = setup.get("cases", {}).get(case)
            if summary is None:
                rows.append([key, case, "–", "–", "–", "–", "–", "failed", "–", "–"])
                continue
            if "skipped" in summary:
                rows.append([key, case, "–", "–", "–", "–", "–", "skipped", "–", "–"])
                continue
            rows.append(
                [
                    key,
                    case,
                    str(summary["sent"]),
                    str(summary["pushed"]),
                    str(summary["missing"]),
                    str(summary["duplicates"]),
                    str(summary["early"]),
                    _ms(summary.get("p50_ms")),
                    _ms(summary.get("p99_ms")),
                    _ms(summary.get("max_ms")),
                ]
            )
    return rows


def ratios(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Server module latency / direct mode latency, per server and case."""
    pairs = (
        ("prosody", "prosody-cloud-notify", "prosody-direct"),
        ("ejabberd", "ejabberd-mod-push", "ejabberd-direct"),
    )
    found = []
    setups = results["setups"]
    for server, module, ours in pairs:
        if server not in results["config"]["servers"]:
            continue
        for case in results["config"]["cases"]:
            theirs_case = setups.get(module, {}).get("cases", {}).get(case, {})
            ours_case = setups.get(ours, {}).get("cases", {}).get(case, {})
            entry: dict[str, Any] = {"server": server, "case": case}
            for figure in ("p50_ms", "p99_ms"):
                a, b = theirs_case.get(figure), ours_case.get(figure)
                entry[figure.replace("_ms", "")] = round(a / b, 1) if a and b else None
                entry[f"module_{figure}"] = a
                entry[f"ours_{figure}"] = b
            found.append(entry)
    return found


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    found = []
    for key in ("prosody-direct", "ejabberd-direct"):
        if key not in results["setups"]:
            continue
        for case in results["config"]["cases"]:
            summary = results["setups"].get(key, {}).get("cases", {}).get(case, {})
            p99 = summary.get("p99_ms")
            complete = bool(summary) and summary.get("missing", 1) == 0
            found.append(
                {
                    "setup": key,
                    "case": case,
                    "target_p99_ms": TARGET_MS[case],
                    "p99_ms": p99,
                    "missing": summary.get("missing"),
                    "met": p99 is not None and complete and p99 <= TARGET_MS[case],
                }
            )
    return found


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}×"


def detail_rows(results: Mapping[str, Any]) -> list[list[str]]:
    """Where the time goes (direct mode: split at the component's `wake`), what the
    component's CPU cost per message, and how busy the rest of the machine was."""
    rows = [
        [
            "setup",
            "case",
            "to wake p50",
            "to wake p99",
            "wake→APNs p50",
            "wake→APNs p99",
            "component CPU ms/msg",
            "other load (cores)",
        ]
    ]
    for case in results["config"]["cases"]:
        for key, setup in results["setups"].items():
            summary = setup.get("cases", {}).get(case)
            if summary is None or "skipped" in summary:
                continue
            before = summary.get("before_wake_ms", {})
            after = summary.get("after_wake_ms", {})
            cpu = summary.get("component_cpu_ms_per_message")
            other = summary.get("load_cores", {}).get("other")
            rows.append(
                [
                    key,
                    case,
                    _ms(before.get("p50")),
                    _ms(before.get("p99")),
                    _ms(after.get("p50")),
                    _ms(after.get("p99")),
                    "–" if cpu is None else f"{cpu:.2f}",
                    "–" if other is None else f"{other:.2f}",
                ]
            )
    return rows


def ratio_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows = [["server", "case", "module p50 / ours", "module p99 / ours"]]
    for entry in results["ratios"]:
        rows.append([entry["server"], entry["case"], _ratio(entry["p50"]), _ratio(entry["p99"])])
    return rows


def target_rows(results: Mapping[str, Any]) -> list[list[str]]:
    rows = [["setup", "case", "target p99", "measured p99", "met"]]
    for entry in results["targets"]:
        rows.append(
            [
                entry["setup"],
                entry["case"],
                f"≤ {entry['target_p99_ms']:,.0f} ms",
                "–" if entry["p99_ms"] is None else f"{_ms(entry['p99_ms'])} ms",
                "yes" if entry["met"] else "**no**",
            ]
        )
    return rows


def observations(results: Mapping[str, Any]) -> list[str]:
    """What else a reader should know: missing and duplicate pushes, failures, notes."""
    lines = []
    for key, setup in results["setups"].items():
        if "error" in setup:
            lines.append(f"* {key}: failed: {setup['error'].splitlines()[0]}")
        quiet = setup.get("quiet_wait", {})
        if quiet and not quiet.get("quiet"):
            lines.append(
                f"* {key}: started on a busy machine (not idle after {quiet['seconds']:g} s"
                " of waiting)."
            )
        for case, summary in setup.get("cases", {}).items():
            if "skipped" in summary:
                lines.append(f"* {key}, {case}: {summary['skipped']}.")
                continue
            odd = [
                f"{summary[name]} {one if summary[name] == 1 else many}{why}"
                for name, one, many, why in (
                    ("missing", "message", "messages", " without a push"),
                    ("duplicates", "duplicate push", "duplicate pushes", ""),
                    (
                        "early",
                        "push",
                        "pushes",
                        " to a session before its message was sent (after the cut: the"
                        " server pushed for something else, e.g. a stanza still"
                        " unacknowledged when the connection went)",
                    ),
                    ("other_tokens", "push", "pushes", " to tokens of other cases"),
                )
                if summary.get(name)
            ]
            if summary.get("not_200"):
                odd.append(f"answers other than 200: {summary['not_200']}")
            other = summary.get("load_cores", {}).get("other", 0.0)
            if other > OTHER_LOAD_WARNING:
                odd.append(
                    f"other processes kept {other:.2f} cores busy meanwhile: slower than on"
                    " an idle machine"
                )
            odd += summary.get("notes", [])
            if odd:
                lines.append(f"* {key}, {case}: " + "; ".join(odd) + ".")
        if setup.get("component_warnings"):
            lines.append(f"* {key}: component warnings {setup['component_warnings']}.")
    return lines


def docs_section(results: Mapping[str, Any]) -> str:
    info = results["machine"]
    config = results["config"]
    versions = info["servers"]
    body = [
        DOCS_START,
        "## Wake latency (direct mode vs the servers' push modules)",
        "",
        "<!-- Written by `python -m bench.wake_latency` (bench/wake_latency.py): edit that,"
        " not this section. -->",
        "",
        f"Measured {results['date']} with `{results['command']}`"
        f" (results file `{results['results_file']}`), {results['seconds']:.0f} s.",
        "",
        "Time from the moment before the sender's `send_message` to the moment the APNs"
        " stand-in has read the whole push request, on real servers on loopback: the"
        " component (`xmpp-push run`) and the APNs stand-in each in a process of their own,"
        " the clients in the benchmark's.",
        "",
        f"* **offline**: the user enabled push and logged out; {config['messages']} messages"
        " one after the other, each once the previous push arrived"
        f" (after {WARMUP_MESSAGES} warm-up messages).",
        f"* **hibernated**: {config['messages']} sessions with XEP-0198 resumption, each with"
        " push enabled (a node and a token of its own), whose TCP connection was cut (RST);"
        f" one message each, {SEND_INTERVAL * 1000:.0f} ms apart.",
        "* **undecided**: the same sessions resumed, then no longer reading their socket:"
        " the message is never acknowledged.",
        f"* Direct mode: `policy.undecided_delay = {UNDECIDED_DELAY:g}`,"
        " `policy.coalesce_window = 0` (coalescing never delays the first message to a"
        " device, and each message here is a first one). The servers' modules with their"
        f" defaults: Prosody smacks_max_ack_delay {PROSODY_ACK_DELAY} s (push after it + 1 s"
        f" batch timer), smacks_hibernation_time {PROSODY_HIBERNATION} s; ejabberd"
        f" ack_timeout {EJABBERD_ACK_TIMEOUT} s (it then closes the connection and pushes"
        f" for the pending session), resume_timeout {EJABBERD_RESUME_TIMEOUT} s,"
        " mod_push_keepalive defaults. Both servers log at info (the Prosody test"
        " profile's debug file log, at 200 sessions, delayed its timers by up to 140 ms).",
        "* dup: more than one push for a message; early: a push to the session's token"
        " before its message was sent.",
        "",
        *markdown_table(table_rows(results)),
        "",
        "Where the time goes: for direct mode, each latency split at the component's"
        " `wake` log line (before it: the server, its plugin, the XEP-0114 link and the"
        " registration lookup; after it: the push to APNs); the component's CPU time per"
        " message; the cores other processes on the machine kept busy meanwhile:",
        "",
        *markdown_table(detail_rows(results)),
        "",
        "Server module latency / direct mode latency:",
        "",
        *markdown_table(ratio_rows(results)),
        "",
        "Targets (issue #5), direct mode, p99 with no push missing:",
        "",
        *markdown_table(target_rows(results)),
        "",
        *observations(results),
        f"* Machine: {info['cores']} cores, {info['ram_gib']} GiB RAM, {info['cpu_model']};"
        f" Python {info['python']}; Prosody {versions.get('prosody')}"
        f" (prosody-modules {versions.get('prosody-modules')}), ejabberd"
        f" {versions.get('ejabberd')}; code at commit {info['commit']}"
        + (
            f" plus uncommitted changes to {len(info['uncommitted_files'])} files"
            " (listed in the results file)"
            if info["uncommitted_files"]
            else ""
        )
        + ".",
        DOCS_END,
    ]
    return "\n".join(body)


def machine() -> dict[str, Any]:
    def first(path: str, prefix: str) -> str | None:
        with contextlib.suppress(OSError), open(path) as file:
            for line in file:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        return None

    def run(*command: str) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError:
            return ""
        # Not strip(): porcelain lines start with a status column that may be a space.
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""

    def package(name: str) -> str | None:
        return run("dpkg-query", "-W", "-f", "${Version}", name) or None

    memory = first("/proc/meminfo", "MemTotal")
    return {
        "cores": os.cpu_count(),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "ram_gib": round(int(memory.split()[0]) / 1024**2, 1) if memory else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "servers": {name: package(name) for name in ("prosody", "prosody-modules", "ejabberd")},
        "load_average": os.getloadavg(),
        "commit": run("git", "-C", str(REPO), "rev-parse", "--short", "HEAD").strip() or None,
        "uncommitted_files": [
            line[3:]
            for line in run(
                "git", "-C", str(REPO), "status", "--porcelain", "--", "xmpp_push", "plugins"
            ).splitlines()
        ],
    }


# --------------------------------------------------------------------------- main


def _servers(text: str) -> list[ServerKind]:
    names: list[ServerKind] = []
    for name in text.split(","):
        if name == "prosody":
            names.append("prosody")
        elif name == "ejabberd":
            names.append("ejabberd")
        elif name:
            raise argparse.ArgumentTypeError(f"unknown server {name!r}: prosody, ejabberd")
    return names


def _cases(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = sorted(set(names) - set(CASES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown case {unknown}: choose from {CASES}")
    return [case for case in CASES if case in names]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.wake_latency",
        description="Message → APNs latency: direct mode vs Prosody's and ejabberd's push"
        " modules, for offline, hibernated and undecided sessions.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_MESSAGES} messages a case and no wait for ejabberd's 60 s undecided"
        " push (~2 minutes); docs untouched",
    )
    parser.add_argument(
        "--messages",
        type=int,
        help=f"messages (and sessions) per case (default {DEFAULT_MESSAGES},"
        f" --quick {QUICK_MESSAGES})",
    )
    parser.add_argument(
        "--servers",
        type=_servers,
        default=["prosody", "ejabberd"],
        help="comma-separated: prosody, ejabberd (default both)",
    )
    parser.add_argument(
        "--cases",
        type=_cases,
        default=list(CASES),
        help="comma-separated: offline, hibernated, undecided (default all; undecided"
        " resumes the hibernated case's sessions, so it needs hibernated)",
    )
    parser.add_argument(
        "--skip-ejabberd-undecided",
        action="store_true",
        help="do not wait for mod_push's undecided push (60 s); implied by --quick",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="seconds to wait at most, before each setup, for the machine to be idle"
        f" (under {QUIET_BELOW} cores busy for 3 s; default 60, --quick 15)",
    )
    parser.add_argument("--out", type=Path, help="results file (default bench/results/...)")
    parser.add_argument(
        "--docs",
        type=Path,
        help="Markdown file whose wake-latency section to update (default:"
        " docs/performance.md, for a full run of both servers only)",
    )
    parser.add_argument("--no-docs", action="store_true", help="leave the docs alone")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs)"
    )
    args = parser.parse_args(argv)
    if args.messages is None:
        args.messages = QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES
    if args.quiet_wait is None:
        args.quiet_wait = 15.0 if args.quick else 60.0
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    if "undecided" in args.cases and "hibernated" not in args.cases:
        parser.error("--cases: undecided needs hibernated (it resumes those sessions)")
    args.skip_ejabberd_undecided = args.skip_ejabberd_undecided or args.quick
    return args


async def run(args: argparse.Namespace, argv: Sequence[str], work: Path) -> dict[str, Any]:
    began = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "wake-latency",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line("bench.wake_latency", argv),
        "quick": args.quick,
        "machine": machine(),
        "config": {
            "messages": args.messages,
            "servers": args.servers,
            "cases": args.cases,
            "warmup_messages": WARMUP_MESSAGES,
            "send_interval_s": SEND_INTERVAL,
            "sessions_per_account": dict(SESSIONS_PER_ACCOUNT),
            "undecided_delay_s": UNDECIDED_DELAY,
            "coalesce_window_s": 0,
            "prosody_smacks_max_ack_delay_s": PROSODY_ACK_DELAY,
            "prosody_smacks_hibernation_time_s": PROSODY_HIBERNATION,
            "ejabberd_ack_timeout_s": EJABBERD_ACK_TIMEOUT,
            "ejabberd_resume_timeout_s": EJABBERD_RESUME_TIMEOUT,
            "targets_p99_ms": TARGET_MS,
        },
        "notes": [
            "policy.coalesce_window = 0: coalescing only delays the 2nd and later messages"
            " of a burst to one device, never the first; every message here is a first.",
        ],
        "setups": {},
    }
    recorder = ApnsRecorder(work / "apns")
    await recorder.start()
    try:
        for kind in args.servers:
            setups = [setup for setup in SETUPS if setup.server == kind]
            results["setups"].update(await run_server(kind, setups, recorder, work, args))
    finally:
        await recorder.stop()
        with (work / "arrivals.tsv").open("w") as arrivals:  # for a closer look (--keep)
            arrivals.writelines(
                f"{a.token}\t{a.at:.6f}\t{a.status}\t{a.push_type}\t{a.priority}\n"
                for a in recorder.arrivals
            )
    results["ratios"] = ratios(results)
    results["targets"] = targets(results)
    results["seconds"] = round(time.monotonic() - began, 1)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or REPO / "bench" / "results" / f"wake-latency-{stamp}.json"
    work = Path(tempfile.mkdtemp(prefix="xmpp-push-wake-latency-"))
    try:
        results = asyncio.run(run(args, arguments, work))
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["results_file"] = relative(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

    print()
    print("\n".join(console_table(table_rows(results))))
    print()
    print("\n".join(console_table(detail_rows(results))))
    print()
    print("\n".join(console_table(ratio_rows(results))))
    print()
    print("\n".join(console_table(target_rows(results))))
    print()
    print("\n".join(results["notes"]))
    print("\n".join(observations(results)))
    print(f"\nresults: {relative(out)} ({results['seconds']} s)")
    docs = args.docs
    full = set(args.servers) == {"prosody", "ejabberd"} and args.cases == list(CASES)
    if docs is None and not args.quick and full:
        docs = REPO / "docs" / "performance.md"
    if docs is not None and not args.no_docs:
        update_docs_section(docs, docs_section(results), DOCS_START, DOCS_END)
        print(f"updated {relative(docs)}")
    failed = any("error" in setup for setup in results["setups"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
