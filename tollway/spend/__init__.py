"""Spend counters and budget holds: one interface, a memory and a Redis implementation.

Each counter holds what was spent in its period and what is held for requests in flight. A
request is let through only if, for every enforced budget, spent + held + its own maximum
possible cost stays within the limit; then that maximum is held on each counter until the
access log brings the real cost (`commit`), or until the hold expires (the request can no longer
be running, and its log entry was lost). Hence, while every request costs no more than its hold,
spent + held never exceeds an enforced budget: the budget is never overrun. See
docs/architecture.md#budgets for what can still break that.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from tollway.budgets import Budget, SpendCounter
from tollway.redis_client import counter_store_url


class SpendUnavailable(Exception):
    pass


# how long a request whose log entry came without metadata stays marked orphaned: longer than
# its Check can still be running once Envoy has answered the client without it
ORPHAN_MARK_MS = 60_000


@dataclass(frozen=True)
class BudgetState:
    budget: Budget
    spent: int
    held: int  # by other requests, before this one

    @property
    def over(self) -> bool:
        return self.spent >= self.budget.limit

    def fits(self, amount: int) -> bool:
        return self.spent + self.held + amount <= self.budget.limit


@dataclass(frozen=True)
class HoldOutcome:
    allowed: bool
    states: list[BudgetState]
    amount: int

    @property
    def refused_by(self) -> BudgetState | None:
        if self.allowed:
            return None
        return next(s for s in self.states if s.budget.enforce and not s.fits(self.amount))

    @property
    def over_budget(self) -> BudgetState | None:
        """An enforced budget that this request would overrun even if every hold of the
        requests in flight were released: a true 402."""
        return next((s for s in self.states if s.budget.enforce
                     and s.spent + self.amount > s.budget.limit), None)


def hold_states(budgets: list[Budget], values: dict[str, tuple[int, int]], amount: int
                ) -> HoldOutcome:
    """The reference decision; the Redis script takes the same one."""
    states = [BudgetState(b, *values.get(b.counter.key, (0, 0))) for b in budgets]
    allowed = all(s.fits(amount) for s in states if s.budget.enforce)
    return HoldOutcome(allowed=allowed, states=states, amount=amount)


@dataclass(frozen=True)
class Commit:
    org: str
    request_id: str
    counters: list[SpendCounter]
    amount: int
    held: bool = False  # the request placed a hold: its entry in the hold index goes too


class SpendStore(abc.ABC):
    shared_in_process = False  # True: only services in this process see the counters

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    async def hold(self, org: str, request_id: str, budgets: list[Budget], amount: int,
                   ttl_ms: int, now_ms: int | None = None) -> HoldOutcome:
        """Check every budget; if no enforced one refuses, hold `amount` once on each
        distinct counter of the enforced budgets under `request_id`, else change nothing."""

    @abc.abstractmethod
    async def commit(self, org: str, request_id: str, counters: list[SpendCounter],
                     amount: int, now_ms: int | None = None) -> list[int]:
        """Add `amount` to each counter, release any hold of `request_id` on it; return the
        counters' new spent values."""

    async def commit_many(self, commits: list[Commit]) -> list[list[int]]:
        """Several commits; each gets its counters' values after all of them (Redis sends one
        script call per org for the batch)."""
        for c in commits:
            await self.commit(c.org, c.request_id, c.counters, c.amount)
        return [[spent for spent, _ in await self.read(c.org, c.counters)] for c in commits]

    @abc.abstractmethod
    async def read(self, org: str, counters: list[SpendCounter],
                   now_ms: int | None = None) -> list[tuple[int, int]]:
        """(spent, held) of each counter."""

    @abc.abstractmethod
    async def release_orphans(self, request_ids: list[str]) -> int:
        """Release the holds of requests whose log entry cannot say where they were held:
        Envoy stopped waiting for their Check, so the entry carries no metadata. Every hold is
        indexed by request id for this; returns how many holds were found. The Check may
        not have placed its hold yet (its server started it late on a busy node, so its
        deadline ran later than Envoy's): each id is marked orphaned for ORPHAN_MARK_MS, and
        a hold placed for a marked id is released at once."""

    @abc.abstractmethod
    async def first_alert(self, org: str, counter: SpendCounter, mark: str) -> bool:
        """True exactly once per counter (and so per period) and mark: alerts fire once."""

    @abc.abstractmethod
    async def set_spent(self, org: str, values: list[tuple[SpendCounter, int]]) -> None:
        """Set counters' spent (holds untouched): a rebuild from the ledger."""

    @abc.abstractmethod
    async def claim_rebuild(self) -> bool:
        """True when the store has lost (or never had) its data since the last rebuild, for
        exactly one caller: that one rebuilds spend from the ledger. A store that keeps no
        data across restarts of its process (memory) is rebuilt at start instead."""

    @abc.abstractmethod
    async def unclaim_rebuild(self) -> None:
        """The claimed rebuild failed: the next claim must succeed again."""


def open_spend_store(spec: str) -> SpendStore:
    url = counter_store_url(spec)
    if url is None:
        from .memory import MemorySpendStore

        return MemorySpendStore()
    from .redis_store import RedisSpendStore

    return RedisSpendStore(url)
