"""The benchmark's XMPP server: accepts the component (XEP-0114) and floods it with publishes.

Built for throughput, not for generality: publishes are pre-formatted bytes, and the
answers are found with a byte scan and two regular expressions instead of an XML
parser, so that the load generator stays a small fraction of one core at the rates the
component reaches. The component's answers are one IQ each, `result` or `error`
(`<iq …/>` or `<iq …><error type='…'><condition/>…</error></iq>`), which is all the
scan has to understand.

Two ways to send (`ComponentLink.run`, or `run_on_links` over several links):

* **window**: keep `window` publishes unanswered at all times (a closed loop; the
  maximum rate the component sustains);
* **paced**: send at a fixed `rate` on a schedule, whatever the answers do (an open
  loop; latency at a given load). `window` still caps what is outstanding, and a send
  that had to wait for that cap is counted in `late_sends`.

Several links (scale-out): the server accepts any number of connections of the one
component JID, as ejabberd does, and `run_on_links` spreads one run over them the way
ejabberd's router does when a domain has several routes and no `domain_balancing`
(`ejabberd_router:balancing_route`: `phash2(erlang:system_time(), N)` per stanza): each
publish goes to a link picked at random, whatever that link has outstanding. The
window (or the pacing) is the run's, shared by the links, as the server's users do not
slow down for a busy component; answers are counted per link as well.

Latency is from the moment a publish's bytes were handed to the socket to the moment
its answer was read, both on this process's `perf_counter`.

Direct mode (bench.direct) sends the server plugin's `notify` IQs instead, which the
component answers before it pushes: there the caller keeps the window, from what
reaches the sink (`attached_run` with `refill=False`), and the server plays the plugin
too (`LoadServer.plugin`: it answers the component's `configure`, `arm` and `disarm`
as plugins/prosody/mod_xmpp_push.lua does). Its delegated enables and disables
(bench.enables) are windowed runs like the publishes; their answer is a `result`
wrapper around the client's answer, and the client's answer's type (and error) is
what a run counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import time
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from bench.workload import COMPONENT_JID, Workload

__all__ = [
    "ComponentLink",
    "LoadServer",
    "Run",
    "RunResult",
    "attached_run",
    "percentiles_ms",
    "run_on_links",
]

STREAM_ID: Final = "b3nchstr34m"
_STREAM_HEADER: Final = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' "
    "xmlns:stream='http://etherx.jabber.org/streams' "
    f"id='{STREAM_ID}' from='{COMPONENT_JID}'>"
).encode()
_STREAM_CLOSE: Final = b"</stream:stream>"
_HANDSHAKE = re.compile(rb"<handshake[^>]*>\s*([0-9a-fA-F]+)\s*</handshake>")
_ID = re.compile(rb"""\sid=(["'])(.*?)\1""")
_TYPE = re.compile(rb"""\stype=(["'])(.*?)\1""")
_FROM = re.compile(rb"""\sfrom=(["'])(.*?)\1""")
_TO = re.compile(rb"""\sto=(["'])(.*?)\1""")
NS_PLUGIN: Final = b"urn:xmpp-push:plugin:1"
_ERROR = re.compile(rb"""<error\b[^>]*?\btype=(["'])(.*?)\1[^>]*>\s*<([A-Za-z-]+)""")
SPREAD_SEED: Final = 114
"""Seed of the per-publish link choice, so that every run splits the same way."""


def percentiles_ms(values: Sequence[float], *points: float) -> dict[str, float]:
    """`{"p50": …, "p99_9": …}` in milliseconds of `values` (seconds); nearest rank."""
    ordered = sorted(values)
    out: dict[str, float] = {}
    for point in points:
        key = f"p{point:g}".replace(".", "_")
        if not ordered:
            out[key] = float("nan")
            continue
        rank = min(len(ordered) - 1, max(0, round(point / 100 * len(ordered)) - 1))
        out[key] = ordered[rank] * 1000
    return out


@dataclass
class RunResult:
    """What one run sent and got back."""

    label: str
    mode: str
    requested: int
    window: int
    offered_rate: float | None = None
    sent: int = 0
    answered: int = 0
    results: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    unexpected: int = 0
    """Answers to ids this run never sent (or answered twice)."""
    late_sends: int = 0
    first_send: float = 0.0
    last_send: float = 0.0
    last_answer: float = 0.0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    timeline: list[int] = field(default_factory=list)
    """Answers in each second since the first send."""
    stalled: bool = False
    links: int = 1
    link_sent: list[int] = field(default_factory=list)
    """Publishes sent on each link, in the order of the links given to the run."""
    link_answered: list[int] = field(default_factory=list)
    link_latencies: list[array[float]] = field(default_factory=list)
    """Per link; kept only when the run has several links (`latencies` has them all)."""

    def counts(self) -> dict[str, Any]:
        """What was sent and what came back, as every results record names it."""
        return {
            "requested": self.requested,
            "sent": self.sent,
            "answered": self.answered,
            "unanswered": self.unanswered,
            "results": self.results,
            "errors": self.errors,
            "unexpected": self.unexpected,
        }

    @property
    def unanswered(self) -> int:
        return self.sent - self.answered

    @property
    def seconds(self) -> float:
        return max(self.last_answer - self.first_send, 1e-9)

    @property
    def rate(self) -> float:
        """Answered publishes per second, first send to last answer."""
        return self.answered / self.seconds

    @property
    def send_rate(self) -> float:
        return self.sent / max(self.last_send - self.first_send, 1e-9)

    def percentiles_ms(self, *points: float) -> dict[str, float]:
        return percentiles_ms(self.latencies, *points)


class Run:
    """One run's publishes on its links: what was sent, what is still unanswered."""

    def __init__(
        self,
        links: Sequence[ComponentLink],
        workload: Workload,
        start: int,
        result: RunResult,
    ) -> None:
        self.links = tuple(links)
        self.workload = workload
        self.next_index = start
        self.end_index = start + result.requested
        self.result = result
        self.outstanding: dict[bytes, float] = {}
        self.done = asyncio.get_running_loop().create_future()
        self._choose = random.Random(SPREAD_SEED).randrange
        count = len(self.links)
        result.links = count
        result.link_sent = [0] * count
        result.link_answered = [0] * count
        self._per_link = count > 1
        if self._per_link:
            result.link_latencies = [array("d") for _ in range(count)]

    def send(self, n: int) -> None:
        """Send the next `n` publishes, one write per link."""
        n = min(n, self.end_index - self.next_index)
        if n <= 0:
            return
        links = self.links
        count = len(links)
        chunks: list[list[bytes]] = [[] for _ in range(count)]
        ids: list[bytes] = []
        stanza = self.workload.stanza
        choose = self._choose
        for index in range(self.next_index, self.next_index + n):
            iq_id, data = stanza(index)
            ids.append(iq_id.encode())
            chunks[choose(count) if count > 1 else 0].append(data)
        self.next_index += n
        now = time.perf_counter()
        result = self.result
        for slot, link_chunks in enumerate(chunks):
            if link_chunks:
                links[slot].write(b"".join(link_chunks))
                result.link_sent[slot] += len(link_chunks)
        outstanding = self.outstanding
        for sent_id in ids:
            outstanding[sent_id] = now
        if result.sent == 0:
            result.first_send = now
        result.sent += n
        result.last_send = now

    def answered(self, iq_id: bytes, kind: bytes, error: str | None, now: float, slot: int) -> bool:
        sent_at = self.outstanding.pop(iq_id, None)
        result = self.result
        if sent_at is None:
            result.unexpected += 1
            return False
        result.answered += 1
        result.last_answer = now
        result.latencies.append(now - sent_at)
        result.link_answered[slot] += 1
        if self._per_link:
            result.link_latencies[slot].append(now - sent_at)
        second = int(now - result.first_send)
        timeline = result.timeline
        if second >= len(timeline):
            timeline.extend([0] * (second + 1 - len(timeline)))
        timeline[second] += 1
        if kind == b"result":
            result.results += 1
        else:
            key = error or kind.decode(errors="replace")
            result.errors[key] = result.errors.get(key, 0) + 1
        if result.answered == result.requested and not self.done.done():
            self.done.set_result(None)
        return True


class ComponentLink(asyncio.Protocol):
    """One component connection, from its stream header to its close."""

    def __init__(self, secret: str, server: LoadServer) -> None:
        self._secret = secret
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._state = "header"
        self._run: Run | None = None
        self._slot = 0
        """This link's place in the links of the current run."""
        self._window = 0
        self.closed = asyncio.get_running_loop().create_future()
        self.configured: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done once a `configure` of the component was answered (`LoadServer.plugin`)."""
        self.plugin_configures = 0
        self.plugin_arms = 0
        self.plugin_disarms = 0
        """Answered `arm`/`disarm` requests (a direct-mode enable arms the session that
        sent it; a disable that takes its last registration disarms it)."""
        self.bytes_in = 0

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        run = self._run
        if run is not None and not run.done.done():
            run.result.stalled = True
            run.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.bytes_in += len(data)
        buffer = self._buffer
        buffer += data
        if self._state == "header":
            start = buffer.find(b"<stream:stream")
            if start < 0 or buffer.find(b">", start) < 0:
                return
            del buffer[: buffer.find(b">", start) + 1]
            self.write(_STREAM_HEADER)
            self._state = "handshake"
        if self._state == "handshake":
            match = _HANDSHAKE.search(buffer)
            if match is None:
                return
            expected = hashlib.sha1((STREAM_ID + self._secret).encode()).hexdigest()
            if match.group(1).decode().lower() != expected:
                self.write(
                    b"<stream:error><not-authorized "
                    b"xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>" + _STREAM_CLOSE
                )
                self.close()
                return
            del buffer[: match.end()]
            self.write(b"<handshake/>")
            self._state = "open"
            self._server._link_ready(self)
        if self._state == "open":
            self._answers(now)

    def eof_received(self) -> bool | None:
        return None

    # -- stream -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _answers(self, now: float) -> None:
        buffer = self._buffer
        run = self._run
        position = 0
        matched = 0
        while True:
            start = buffer.find(b"<iq", position)
            if start < 0:
                break
            head_end = buffer.find(b">", start)
            if head_end < 0:
                break
            inner_type: bytes | None = None
            if buffer[head_end - 1] == 0x2F:  # '/': <iq …/>
                end = head_end + 1
                error = None
            else:
                delegated = buffer.startswith(b"<delegation", head_end + 1)
                if delegated:
                    # A delegated IQ's answer (bench.enables): the client's answer
                    # inside, itself an <iq/> that may hold an <error/>.
                    close = buffer.find(b"</delegation>", head_end)
                    close = buffer.find(b"</iq>", close) if close >= 0 else -1
                else:
                    close = buffer.find(b"</iq>", head_end)
                if close < 0:
                    break
                end = close + 5
                found = _ERROR.search(buffer, head_end, close)
                error = (
                    f"{found.group(2).decode()}/{found.group(3).decode()}"
                    if found is not None
                    else None
                )
                if delegated:
                    inner = buffer.find(b"<iq", head_end, close)
                    inner_match = (
                        _TYPE.search(buffer, inner, buffer.find(b">", inner) + 1)
                        if inner >= 0
                        else None
                    )
                    inner_type = b"" if inner_match is None else inner_match[2]
            head = bytes(buffer[start : head_end + 1])
            position = end
            id_match = _ID.search(head)
            type_match = _TYPE.search(head)
            if type_match is not None and type_match.group(2) in {b"set", b"get"}:
                # A request of the component's own (the plugin protocol's configure).
                if self._server.plugin is not None and id_match is not None:
                    self._answer_plugin(head, bytes(buffer[head_end:end]), id_match.group(2))
                continue
            if run is None or id_match is None or type_match is None:
                continue
            kind = type_match.group(2)
            if inner_type is not None and kind == b"result":
                kind = inner_type or b"no inner iq"
            if run.answered(id_match.group(2), kind, error, now, self._slot):
                matched += 1
        if _STREAM_CLOSE in buffer:
            # The component is leaving: close our side as a server does.
            self.write(_STREAM_CLOSE)
            self.close()
        if position:
            del buffer[:position]
        elif len(buffer) > 1 << 20:
            del buffer[: len(buffer) - 64]  # nothing we read; keep a possible tag start
        if run is not None and matched and self._window:
            free = self._window - len(run.outstanding)
            if free > 0:
                run.send(free)

    def _answer_plugin(self, head: bytes, body: bytes, iq_id: bytes) -> None:
        """Answer a plugin-protocol request the way the Prosody plugin does: `configure`
        with what the plugin is (the shape Prosody 0.12.3 wrote), `arm` and `disarm` with
        an empty result. Anything else stays unanswered, as before."""
        if NS_PLUGIN not in body:
            return
        sender = _FROM.search(head)
        to = _TO.search(head)
        if sender is None or to is None:
            return
        payload = b""
        if b"<arm " in body:
            self.plugin_arms += 1
        elif b"<disarm " in body:
            self.plugin_disarms += 1
        elif b"<configure" in body:
            self.plugin_configures += 1
            payload = (
                b"<plugin server='"
                + (self._server.plugin or "").encode()
                + b"' xmlns='urn:xmpp-push:plugin:1' name='mod_xmpp_push' version='1'/>"
            )
        self.write(
            b"<iq to='"
            + sender.group(2)
            + b"' type='result' id='"
            + iq_id
            + b"' from='"
            + to.group(2)
            + b"'>"
            + payload
            + b"</iq>"
        )
        if payload and not self.configured.done():
            self.configured.set_result(None)

    # -- runs -------------------------------------------------------------------

    async def run(
        self,
        workload: Workload,
        *,
        label: str,
        start: int,
        count: int,
        window: int,
        rate: float | None = None,
        stall_timeout: float = 30.0,
        tick: float = 0.001,
    ) -> RunResult:
        """Send publishes `start` … `start+count-1` on this link; return once all are
        answered, the link closes, or no answer came for `stall_timeout` seconds."""
        return await run_on_links(
            [self],
            workload,
            label=label,
            start=start,
            count=count,
            window=window,
            rate=rate,
            stall_timeout=stall_timeout,
            tick=tick,
        )


async def run_on_links(
    links: Sequence[ComponentLink],
    workload: Workload,
    *,
    label: str,
    start: int,
    count: int,
    window: int,
    rate: float | None = None,
    stall_timeout: float = 30.0,
    tick: float = 0.001,
) -> RunResult:
    """Send publishes `start` … `start+count-1`, each on one of `links` picked at random
    (ejabberd's balancing); `window` IQs outstanding over all links together. Returns
    once all are answered, a link closes, or no answer came for `stall_timeout` s."""
    mode = "window" if rate is None else "paced"
    with attached_run(
        links,
        workload,
        label=label,
        mode=mode,
        start=start,
        count=count,
        window=window,
        rate=rate,
        refill=rate is None,
    ) as run:
        if rate is None:
            run.send(window)
            await _wait(run, stall_timeout)
        else:
            pacer = asyncio.create_task(_pace(run, rate, window, tick))
            try:
                await _wait(run, stall_timeout)
            finally:
                pacer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pacer
    return run.result


@contextlib.contextmanager
def attached_run(
    links: Sequence[ComponentLink],
    workload: Workload,
    *,
    label: str,
    mode: str,
    start: int,
    count: int,
    window: int,
    rate: float | None = None,
    refill: bool,
) -> Iterator[Run]:
    """A run of stanzas `start` … `start+count-1` of `workload` on `links`, whose
    answers are counted while the block lasts. With `refill`, every answer sends the
    next stanzas so that `window` stay unanswered; without, the caller sends
    (`Run.send`), e.g. when what it waits for is not the answer."""
    if not links:
        raise ValueError("no link to run on")
    run = Run(links, workload, start, RunResult(label, mode, count, window, offered_rate=rate))
    for slot, link in enumerate(links):
        if link._run is not None:
            raise RuntimeError(f"link {slot} is already running {link._run.result.label}")
    for slot, link in enumerate(links):
        link._run = run
        link._slot = slot
        # Every link refills the shared window as its answers come in.
        link._window = window if refill else 0
    try:
        yield run
    finally:
        for link in links:
            link._run = None
            link._slot = 0
            link._window = 0


async def _wait(run: Run, stall_timeout: float) -> None:
    seen = -1
    while not run.done.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.done), stall_timeout)
        if run.done.done():
            return
        if run.result.answered == seen:
            run.result.stalled = True
            return
        seen = run.result.answered


async def _pace(run: Run, rate: float, cap: int, tick: float) -> None:
    began = time.perf_counter()
    scheduled = 0
    while run.next_index < run.end_index:
        due = min(run.result.requested, int((time.perf_counter() - began) * rate) + 1)
        want = due - scheduled
        if want > 0:
            room = cap - len(run.outstanding)
            n = min(want, max(room, 0))
            if n < want:
                run.result.late_sends += want - n
            run.send(n)
            scheduled += n
        await asyncio.sleep(tick)


class LoadServer:
    """Listens on 127.0.0.1 for the component; each accepted handshake is one link.

    Any number of links may be open at once, all of the one component JID (ejabberd
    accepts that and balances stanzas over them; Prosody refuses the second with a
    `conflict` stream error, so there each process needs a JID of its own)."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = 0
        self.plugin: str | None = None
        """When set, links answer the component's plugin-protocol requests (`configure`,
        `arm`, `disarm`) as the server plugin does, with this as the server's name; when
        None (app-server mode), they stay unanswered, as from a server without it."""
        self._server: asyncio.Server | None = None
        self._ready: asyncio.Queue[ComponentLink] = asyncio.Queue()
        self._links: set[ComponentLink] = set()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_link, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _new_link(self) -> ComponentLink:
        link = ComponentLink(self.secret, self)
        self._links.add(link)
        link.closed.add_done_callback(lambda _: self._links.discard(link))
        return link

    def _link_ready(self, link: ComponentLink) -> None:
        self._ready.put_nowait(link)

    async def next_link(self, timeout: float) -> ComponentLink:
        """The next component that completes its handshake (and is still connected)."""
        async with asyncio.timeout(timeout):
            while True:
                link = await self._ready.get()
                if not link.closed.done():
                    return link

    async def stop(self) -> None:
        for link in list(self._links):
            link.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
