"""Every row of DESIGN.md §4, on the dispatcher with a scripted provider."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from xmpp_push.core.dispatch import Dispatcher, HealthWindow, Quarantine, RetryPolicy
from xmpp_push.core.model import Device, Push, Service
from xmpp_push.core.outcomes import DeliveryError, ErrorCategory, Outcome

TOKEN = "ab" * 32


class ScriptedProvider:
    """Answers each send with the next scripted step: None = accepted, an error, or
    a float = hang that many seconds first."""

    name = "scripted"

    def __init__(self, *steps: DeliveryError | float | None) -> None:
        self.steps: deque[DeliveryError | float | None] = deque(steps)
        self.sent: list[Push] = []

    async def send(self, push: Push) -> None:
        self.sent.append(push)
        step = self.steps.popleft() if self.steps else None
        if isinstance(step, float):
            await asyncio.sleep(step)
            return
        if step is not None:
            raise step

    async def aclose(self) -> None:
        return None


def make_push(token: str = TOKEN, ttl: int = 3600, now: float = 1_000.0) -> Push:
    return Push(device=Device(Service.APNS, token), ttl=ttl, created_at=now)


def fast_policy(**overrides: float) -> RetryPolicy:
    values: dict[str, float] = {
        "reply_timeout": 2.0,
        "initial_delay": 0.01,
        "max_delay": 0.05,
        "max_pending": 100,
        "quarantine": 60.0,
    }
    values.update(overrides)
    return RetryPolicy(
        reply_timeout=values["reply_timeout"],
        initial_delay=values["initial_delay"],
        max_delay=values["max_delay"],
        max_pending=int(values["max_pending"]),
        quarantine=values["quarantine"],
    )


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def dispatcher(
    provider: ScriptedProvider, clock: Clock | None = None, **policy: float
) -> Dispatcher:
    return Dispatcher({Service.APNS: provider}, fast_policy(**policy), clock=clock or Clock())


def refused(reason: str = "BadDeviceToken") -> DeliveryError:
    return DeliveryError(ErrorCategory.TOKEN_REFUSED, reason, 400)


async def test_accepted_push_is_delivered() -> None:
    provider = ScriptedProvider(None)
    result = await dispatcher(provider).deliver(make_push())
    assert result.outcome is Outcome.DELIVERED
    assert len(provider.sent) == 1


async def test_dead_token_is_reported_without_retry() -> None:
    provider = ScriptedProvider(DeliveryError(ErrorCategory.TOKEN_DEAD, "Unregistered", 410))
    result = await dispatcher(provider).deliver(make_push())
    assert result.outcome is Outcome.TOKEN_DEAD
    assert len(provider.sent) == 1


async def test_transient_errors_are_retried_until_delivered() -> None:
    unavailable = DeliveryError(ErrorCategory.TRANSIENT, "ServiceUnavailable", 503)
    provider = ScriptedProvider(unavailable, unavailable, None)
    result = await dispatcher(provider).deliver(make_push())
    assert result.outcome is Outcome.DELIVERED
    assert len(provider.sent) == 3


async def test_retry_after_is_honoured() -> None:
    slow_down = DeliveryError(ErrorCategory.TRANSIENT, "TooManyRequests", 429, retry_after=0.3)
    provider = ScriptedProvider(slow_down, None)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await dispatcher(provider).deliver(make_push())
    assert result.outcome is Outcome.DELIVERED
    assert loop.time() - started >= 0.3


async def test_transient_errors_beyond_the_ttl_ask_the_server_to_try_later() -> None:
    unavailable = DeliveryError(ErrorCategory.TRANSIENT, "ServiceUnavailable", 503)
    provider = ScriptedProvider(unavailable)
    # A TTL of 0 leaves no room for a second attempt.
    result = await dispatcher(provider).deliver(make_push(ttl=0))
    assert result.outcome is Outcome.TRY_LATER
    assert len(provider.sent) == 1


async def test_slow_delivery_is_answered_queued_and_finishes_in_the_background() -> None:
    provider = ScriptedProvider(0.3)
    d = dispatcher(provider, reply_timeout=0.05)
    result = await d.deliver(make_push())
    assert result.outcome is Outcome.QUEUED
    assert d.pending_retries == 1
    await asyncio.sleep(0.4)
    assert d.pending_retries == 0


async def test_full_retry_queue_asks_the_server_to_try_later() -> None:
    provider = ScriptedProvider(1.0, 1.0)
    d = dispatcher(provider, reply_timeout=0.02, max_pending=1)
    assert (await d.deliver(make_push())).outcome is Outcome.QUEUED
    assert (await d.deliver(make_push())).outcome is Outcome.TRY_LATER
    await d.drain(0)


async def test_misconfiguration_keeps_the_registration() -> None:
    provider = ScriptedProvider(DeliveryError(ErrorCategory.MISCONFIGURED, "InvalidProviderToken"))
    result = await dispatcher(provider).deliver(make_push())
    assert result.outcome is Outcome.TRY_LATER
    assert len(provider.sent) == 1


async def test_refused_token_on_an_unproven_app_is_not_condemned() -> None:
    # No successful delivery seen yet: a refusal may be our wrong environment.
    provider = ScriptedProvider(refused())
    d = dispatcher(provider)
    assert (await d.deliver(make_push())).outcome is Outcome.TRY_LATER
    assert len(d.quarantine) == 0


async def test_refused_token_on_a_healthy_app_is_quarantined() -> None:
    provider = ScriptedProvider(*([None] * 12), refused())
    clock = Clock()
    d = dispatcher(provider, clock)
    for index in range(12):
        token = f"{index:02x}" * 32
        assert (await d.deliver(make_push(token))).outcome is Outcome.DELIVERED
    bad = "cd" * 32
    assert (await d.deliver(make_push(bad))).outcome is Outcome.TOKEN_REFUSED
    # Quarantined: the next push is refused without asking the push network.
    sent_before = len(provider.sent)
    assert (await d.deliver(make_push(bad))).outcome is Outcome.TOKEN_REFUSED
    assert len(provider.sent) == sent_before
    # ... until the quarantine ends.
    clock.now += 61
    assert (await d.deliver(make_push(bad))).outcome is Outcome.DELIVERED


async def test_most_tokens_refused_at_once_is_treated_as_misconfiguration() -> None:
    provider = ScriptedProvider(*([None] * 10), *([refused()] * 20))
    d = dispatcher(provider)
    for index in range(10):
        await d.deliver(make_push(f"{index:02x}" * 32))
    outcomes = [(await d.deliver(make_push(f"{i:02x}" * 32))).outcome for i in range(20, 40)]
    # The first refusals are believed while the app still looks healthy; once most answers
    # are refusals, nothing more is condemned.
    assert outcomes[-1] is Outcome.TRY_LATER
    assert outcomes.count(Outcome.TOKEN_REFUSED) <= 4


async def test_drain_answers_in_flight_deliveries_try_later() -> None:
    provider = ScriptedProvider(5.0)
    d = dispatcher(provider, reply_timeout=10.0)
    delivery = asyncio.create_task(d.deliver(make_push()))
    await asyncio.sleep(0.05)
    abandoned = await d.drain(0.05)
    assert abandoned == 1
    assert (await delivery).outcome is Outcome.TRY_LATER
    assert (await d.deliver(make_push())).outcome is Outcome.TRY_LATER


def test_quarantine_is_bounded() -> None:
    quarantine = Quarantine(period=10, capacity=3)
    for index in range(5):
        quarantine.add(Service.FCM, f"t{index}", now=0)
    assert len(quarantine) == 3
    assert not quarantine.holds(Service.FCM, "t0", now=1)
    assert quarantine.holds(Service.FCM, "t4", now=1)
    assert quarantine.release(Service.FCM, "t4")
    assert not quarantine.holds(Service.FCM, "t4", now=1)


@pytest.mark.parametrize(("refusals", "healthy"), [(0, True), (2, True), (3, False)])
def test_health_needs_fewer_than_a_quarter_refusals(refusals: int, healthy: bool) -> None:
    window = HealthWindow(min_samples=10)
    app = ("apns", "", "")
    for index in range(10):
        window.record(app, refused=index < refusals, now=0)
    assert window.healthy(app, now=1) is healthy


async def test_submit_answers_exactly_once_even_when_the_push_ends_after_the_deadline() -> None:
    provider = ScriptedProvider(0.2)
    d = dispatcher(provider, reply_timeout=0.05)
    answers: list[Outcome] = []
    d.submit(make_push(), lambda result: answers.append(result.outcome))
    await asyncio.sleep(0.4)
    assert answers == [Outcome.QUEUED]
    assert d.pending_retries == 0


async def test_submit_answers_a_quick_delivery_with_its_result() -> None:
    d = dispatcher(ScriptedProvider(None))
    answered: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    d.submit(make_push(), lambda result: answered.set_result(result.outcome))
    assert await asyncio.wait_for(answered, 1) is Outcome.DELIVERED
