"""Counter backends: one interface, a memory and a Redis implementation, one shared suite.

The scheme is a bucketed sliding window, counted conservatively. Each window of P seconds is
split into N = 60 buckets of w = P/N. A charge at time t is admitted only if the buckets
floor(t/w) - N .. floor(t/w) (N + 1 of them, which cover at least the last P seconds) plus the
charge stay within the limit.

Guarantee: for every interval of length P, the amounts granted inside it never exceed the limit
(each grant checked every earlier grant that can share a P-interval with it). The price is
that a client may be refused up to one bucket (P/60: 1 s for a minute window) before an exact
sliding log would let it in. Fixed windows, by contrast, admit twice the limit across a boundary.

All rules of one request are checked and charged in one step: either every counter is charged
or none (a request refused by its monthly quota does not consume its per-minute one). Rules in
monitor mode are charged with the rest but never refuse; their would-be refusals are reported.
"""

from __future__ import annotations

import abc
import math
import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from tollway.budgets import Budget
from tollway.expiring import Expiring
from tollway.quotas import Rule
from tollway.spend import HoldOutcome, SpendStore

BUCKETS = 60


class BackendUnavailable(Exception):
    pass


@dataclass(frozen=True)
class RuleState:
    rule: Rule
    used: int  # in the window, before this request
    reset_seconds: float  # until the oldest counted amount (this charge included) leaves
    retry_seconds: float  # until this request's charge would fit (0 if it fits now)

    @property
    def over(self) -> bool:
        return self.retry_seconds > 0

    def remaining(self, charged: int) -> int:
        return max(0, self.rule.limit - self.used - charged)


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    states: list[RuleState]
    costs: list[int]


def bucket_width_ms(period: int) -> int:
    return period * 1000 // BUCKETS


def evaluate(rule: Rule, buckets: dict[int, int], now_ms: int, cost: int) -> RuleState:
    """The reference computation. The Redis Lua script gives the same answers, from a sum of
    the window it keeps while the window stays where it is, and from the buckets as here
    otherwise. It reads the buckets held (the window's and at most a few that have left it)
    rather than look up each of the window's N + 1: most of a busy window's are there, a quiet
    one's mostly not."""
    w = bucket_width_ms(rule.period)
    b = now_ms // w
    lo = b - BUCKETS
    used, first = 0, None
    for i, v in buckets.items():
        if lo <= i <= b:
            used += v
            if v > 0 and (first is None or i < first):
                first = i
    if first is None and cost > 0 and used + cost <= rule.limit:
        first = b  # nothing older counts: the window resets when this charge leaves it
    reset = ((first + BUCKETS + 1) * w - now_ms) / 1000 if first is not None else 0.0
    retry = 0.0
    if used + cost > rule.limit:
        if cost > rule.limit:
            retry = math.inf
        else:
            freed = 0
            for i, v in sorted((i, v) for i, v in buckets.items() if lo <= i <= b):
                freed += v
                if used - freed + cost <= rule.limit:
                    retry = ((i + BUCKETS + 1) * w - now_ms) / 1000
                    break
    return RuleState(rule=rule, used=used, reset_seconds=reset, retry_seconds=retry)


class Settlement(NamedTuple):
    """One request's token reservation to correct: `delta` (actual - reserved, may be
    negative) on its token `rules`, in the bucket `charged_at_ms` fell in."""

    org: str
    rules: list[Rule]
    charged_at_ms: int
    delta: int


class CounterBackend(abc.ABC):
    @abc.abstractmethod
    async def charge(self, org: str, rules: list[Rule], costs: list[int],
                     now_ms: int | None = None) -> Outcome:
        """Check every rule; charge all of them if no enforced rule refuses, else none.
        `now_ms` None means the backend's own clock (tests pass explicit times)."""

    @abc.abstractmethod
    async def settle(self, org: str, rules: list[Rule], charged_at_ms: int, delta: int,
                     now_ms: int | None = None) -> None:
        """Correct a token reservation by `delta` (actual - reserved, may be negative) in the
        bucket it was charged to, if that bucket is still inside the window."""

    async def settle_many(self, settlements: list[Settlement],
                          now_ms: int | None = None) -> None:
        """Several settlements, as settle() one by one at the same `now_ms` (costsink settles
        a written batch's reservations at once)."""
        for s in settlements:
            await self.settle(s.org, s.rules, s.charged_at_ms, s.delta, now_ms)

    def holding(self, spend: SpendStore) -> HoldingCharge | None:
        """A charge that holds a budget of `spend` in the same step, where this backend and
        `spend` can make both in one call (one Redis): the hold decided, the charge made only
        if it allows, the hold placed only if the charge was. None: hold, then charge."""
        return None

    async def close(self) -> None:
        return None


class HoldingCharge(Protocol):
    """CounterBackend.charge with SpendStore.hold, both for one org, in the same step.
    Returns the hold's outcome, and the charge's unless the hold refused (then nothing was
    charged). Raises BackendUnavailable."""

    async def __call__(self, org: str, request_id: str, budgets: list[Budget], amount: int,
                       ttl_ms: int, rules: list[Rule], costs: list[int]
                       ) -> tuple[HoldOutcome, Outcome | None]: ...


class MemoryBackend(CounterBackend):
    """For a single node. No await inside a step, so each step is atomic on the event loop.
    A counter goes once its window has passed since its last charge (tollway/expiring.py):
    with a stream of new keys, counters nobody charges again must not pile up for good."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[int, int]] = {}  # plain: the collector tracks none
        self._idle = Expiring()  # each counter, by when its last bucket leaves its window

    @staticmethod
    def _key(org: str, rule: Rule) -> str:
        return f"{org}:{rule.counter}:{rule.period}"

    async def charge(self, org: str, rules: list[Rule], costs: list[int],
                     now_ms: int | None = None) -> Outcome:
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        for idle in self._idle.due(now_ms):
            del self._counters[idle]
        states = [evaluate(r, self._counters.get(self._key(org, r), {}), now_ms, c)
                  for r, c in zip(rules, costs, strict=True)]
        allowed = not any(s.over and s.rule.enforce for s in states)
        if allowed:
            for r, c in zip(rules, costs, strict=True):
                key, w = self._key(org, r), bucket_width_ms(r.period)
                buckets = self._counters.setdefault(key, {})
                b = now_ms // w
                buckets[b] = buckets.get(b, 0) + c
                for old in [i for i in buckets if i < b - BUCKETS]:
                    del buckets[old]  # nothing grows without bound
                self._idle.set(key, (b + BUCKETS + 1) * w)
        return Outcome(allowed=allowed, states=states, costs=costs)

    async def settle(self, org: str, rules: list[Rule], charged_at_ms: int, delta: int,
                     now_ms: int | None = None) -> None:
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        for r in rules:
            w = bucket_width_ms(r.period)
            b = charged_at_ms // w
            if b < now_ms // w - BUCKETS:
                continue
            key = self._key(org, r)
            buckets = self._counters.setdefault(key, {})
            buckets[b] = buckets.get(b, 0) + delta
            idle_at = (b + BUCKETS + 1) * w
            if (self._idle.get(key) or 0) < idle_at:  # gone since its charge
                self._idle.set(key, idle_at)
