"""Deliver one push and decide what it ended in (DESIGN.md §4).

The dispatcher owns retries: a transient failure (timeout, 429, 5xx, a lost
connection) is tried again with exponential backoff and full jitter, honouring
Retry-After, for as long as the push's TTL allows. The caller waits at most
`reply_timeout` for an answer; after that the retries go on in the background,
bounded in number, and the caller hears `QUEUED`.

Refused tokens (APNs BadDeviceToken, FCM SENDER_ID_MISMATCH, ...) are only believed
when the same app is otherwise delivering fine. A sandbox key pointed at production
makes every token look bad; a service that condemned tokens on that evidence would
make every server delete every registration after one config mistake.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog

from xmpp_push.core.model import Push, Service
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory, Outcome, Result
from xmpp_push.core.ports import Provider

__all__ = ["Dispatcher", "HealthWindow", "Quarantine", "RetryPolicy"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    reply_timeout: float = 5.0
    initial_delay: float = 1.0
    max_delay: float = 60.0
    max_pending: int = 10_000
    quarantine: float = 86_400.0


class Quarantine:
    """Tokens a push network refused, not tried again until their time is up.

    Bounded: past `capacity` the entry closest to release goes first.
    """

    def __init__(self, period: float, capacity: int = 100_000) -> None:
        self._period = period
        self._capacity = capacity
        self._until: OrderedDict[tuple[Service, str], float] = OrderedDict()

    def add(self, service: Service, token: str, now: float) -> None:
        key = (service, token)
        self._until[key] = now + self._period
        self._until.move_to_end(key)
        while len(self._until) > self._capacity:
            self._until.popitem(last=False)

    def holds(self, service: Service, token: str, now: float) -> bool:
        until = self._until.get((service, token))
        if until is None:
            return False
        if until <= now:
            del self._until[(service, token)]
            return False
        return True

    def release(self, service: Service, token: str) -> bool:
        return self._until.pop((service, token), None) is not None

    def __len__(self) -> int:
        return len(self._until)


class HealthWindow:
    """Recent deliveries per app, to tell a bad token from our own bad config.

    An app is *healthy* when, among its last `size` answers within `window` seconds,
    at least `min_samples` came back and fewer than a quarter refused the token. A
    working app sees refusals rarely (a user who reinstalled); a wrong environment or
    topic makes nearly every answer a refusal, and the last few dozen answers show
    that after a handful of pushes.
    """

    def __init__(self, window: float = 300.0, min_samples: int = 10, size: int = 50) -> None:
        self._window = window
        self._min_samples = min_samples
        self._size = size
        self._answers: dict[tuple[str, ...], deque[tuple[float, bool]]] = {}

    def record(self, app: tuple[str, ...], refused: bool, now: float) -> None:
        answers = self._answers.setdefault(app, deque(maxlen=self._size))
        answers.append((now, refused))

    def healthy(self, app: tuple[str, ...], now: float) -> bool:
        answers = self._answers.get(app)
        if not answers:
            return False
        recent = [refused for at, refused in answers if now - at <= self._window]
        if len(recent) < self._min_samples:
            return False
        return sum(recent) * 4 < len(recent)


def _app_of(push: Push) -> tuple[str, ...]:
    device = push.device
    return (device.service.value, device.mode.value if device.mode else "", device.topic or "")


class _Reply:
    """Calls `on_result` once, whichever of the result and the reply deadline comes
    first."""

    __slots__ = ("_on_result", "answered")

    def __init__(self, on_result: Callable[[Result], None]) -> None:
        self._on_result = on_result
        self.answered = False

    def answer(self, result: Result) -> None:
        self.answered = True
        self._on_result(result)


class Dispatcher:
    """Sends pushes through the providers and maps what they say to an `Outcome`."""

    def __init__(
        self,
        providers: Mapping[Service, Provider],
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._providers = dict(providers)
        self._policy = policy
        self._clock = clock
        self._jitter = jitter
        self._quarantine = Quarantine(policy.quarantine)
        self._health = HealthWindow()
        self._in_flight: set[asyncio.Task[Result]] = set()
        self._background: set[asyncio.Task[Result]] = set()
        self._closing = False

    @property
    def quarantine(self) -> Quarantine:
        return self._quarantine

    @property
    def pending_retries(self) -> int:
        return len(self._background)

    def submit(self, push: Push, on_result: Callable[[Result], None]) -> None:
        """Start delivering `push`; `on_result` is called exactly once: with the final
        result when it comes within `reply_timeout`, else with QUEUED (retries go on in
        the background) or TRY_LATER (the retry queue is full).

        Callback-shaped so that a publish costs one task, not a task plus a waiter:
        the XMPP adapter answers the server from `on_result`."""
        if self._closing:
            on_result(Result(Outcome.TRY_LATER))
            return
        device = push.device
        if self._quarantine.holds(device.service, device.token, self._clock()):
            on_result(Result(Outcome.TOKEN_REFUSED))
            return
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._attempts(push))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        reply = _Reply(on_result)
        timer = loop.call_later(self._policy.reply_timeout, self._reply_due, task, reply)
        task.add_done_callback(lambda done: self._settled(done, reply, timer))

    async def deliver(self, push: Push) -> Result:
        """Deliver `push`, waiting at most `reply_timeout` for a final answer."""
        answered: asyncio.Future[Result] = asyncio.get_running_loop().create_future()

        def settle(result: Result) -> None:
            if not answered.done():  # the caller may have given up (cancelled)
                answered.set_result(result)

        self.submit(push, settle)
        return await answered

    def _settled(
        self, task: asyncio.Task[Result], reply: _Reply, timer: asyncio.TimerHandle
    ) -> None:
        timer.cancel()
        if reply.answered:
            return
        if task.cancelled():
            # Cancelled by drain() at shutdown: the server should try again later.
            reply.answer(Result(Outcome.TRY_LATER))
        elif (problem := task.exception()) is not None:
            log.error("delivery_failed", error=repr(problem))
            reply.answer(Result(Outcome.TRY_LATER))
        else:
            reply.answer(task.result())

    def _reply_due(self, task: asyncio.Task[Result], reply: _Reply) -> None:
        if task.done() or reply.answered:
            return
        if self._closing or len(self._background) >= self._policy.max_pending:
            log.warning("retry_queue_full", pending=len(self._background))
            reply.answer(Result(Outcome.TRY_LATER))
            task.cancel()
            return
        self._background.add(task)
        task.add_done_callback(self._background_done)
        reply.answer(Result(Outcome.QUEUED))

    def _background_done(self, task: asyncio.Task[Result]) -> None:
        self._background.discard(task)
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        log.info("background_delivery_ended", outcome=result.outcome.value)

    async def _attempts(self, push: Push) -> Result:
        provider = self._providers.get(push.device.service)
        if provider is None:
            # The adapters only build pushes for services the config knows; reaching this
            # is a wiring bug, not the device's fault.
            log.error("no_provider", service=push.device.service.value)
            return Result(Outcome.TRY_LATER)
        attempt = 0
        while True:
            attempt += 1
            try:
                await provider.send(push)
            except DeliveryError as error:
                result = self._judge(push, error)
                if result is not None:
                    return result
                delay = self._backoff(attempt, error.retry_after)
                if self._clock() + delay >= push.expires_at:
                    log.info(
                        "retries_exhausted",
                        provider=provider.name,
                        token=push.device.redacted_token,
                        attempts=attempt,
                        reason=error.reason,
                    )
                    return Result(Outcome.TRY_LATER, error)
                log.info(
                    "retrying",
                    provider=provider.name,
                    token=push.device.redacted_token,
                    attempt=attempt,
                    delay=round(delay, 3),
                    reason=error.reason,
                )
                await asyncio.sleep(delay)
            else:
                self._health.record(_app_of(push), refused=False, now=self._clock())
                log.info(
                    "delivered",
                    provider=provider.name,
                    token=push.device.redacted_token,
                    priority=push.priority.value,
                    silent=push.silent,
                    attempts=attempt,
                )
                return Result(Outcome.DELIVERED)

    def _judge(self, push: Push, error: DeliveryError) -> Result | None:
        """The final result for `error`, or None when it is worth another try."""
        device = push.device
        now = self._clock()
        fields: dict[str, str] = {"provider": device.service.value, "token": device.redacted_token}
        match error.category:
            case ErrorCategory.TRANSIENT:
                return None
            case ErrorCategory.TOKEN_DEAD:
                log.info("token_dead", reason=error.reason, **fields)
                return Result(Outcome.TOKEN_DEAD, error)
            case ErrorCategory.TOKEN_REFUSED:
                app = _app_of(push)
                healthy = self._health.healthy(app, now)
                self._health.record(app, refused=True, now=now)
                if not healthy:
                    log.error(
                        "token_refused_app_unhealthy",
                        reason=error.reason,
                        hint="most tokens of this app are refused: check the environment "
                        "(production/sandbox), topic and credentials",
                        **fields,
                    )
                    return Result(Outcome.TRY_LATER, error)
                self._quarantine.add(device.service, device.token, now)
                log.warning("token_refused", reason=error.reason, **fields)
                return Result(Outcome.TOKEN_REFUSED, error)
            case ErrorCategory.MISCONFIGURED:
                log.error(
                    "provider_misconfigured", reason=error.reason, status=error.status, **fields
                )
                return Result(Outcome.TRY_LATER, error)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        ceiling = min(self._policy.max_delay, self._policy.initial_delay * 2.0 ** (attempt - 1))
        delay = ceiling * (0.5 + 0.5 * self._jitter())
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    async def drain(self, timeout: float) -> int:
        """Stop taking pushes, let in-flight ones finish for up to `timeout` seconds,
        then cancel the rest. Returns how many were cancelled."""
        self._closing = True
        pending = set(self._in_flight)
        if pending and timeout > 0:
            _, pending = await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.warning("deliveries_abandoned", count=len(pending))
        return len(pending)
