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
import heapq
import time
from dataclasses import dataclass, field

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
    tag: str
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
    async def hold(self, tag: str, request_id: str, budgets: list[Budget], amount: int,
                   ttl_ms: int, now_ms: int | None = None) -> HoldOutcome:
        """Check every budget; if no enforced one refuses, hold `amount` once on each
        distinct counter of the enforced budgets under `request_id`, else change nothing."""

    @abc.abstractmethod
    async def commit(self, tag: str, request_id: str, counters: list[SpendCounter],
                     amount: int, now_ms: int | None = None) -> list[int]:
        """Add `amount` to each counter, release any hold of `request_id` on it; return the
        counters' new spent values."""

    async def commit_many(self, commits: list[Commit]) -> list[list[int]]:
        """Several commits; each gets its counters' values after all of them (Redis sends one
        script call per org for the batch)."""
        for c in commits:
            await self.commit(c.tag, c.request_id, c.counters, c.amount)
        return [[spent for spent, _ in await self.read(c.tag, c.counters)] for c in commits]

    @abc.abstractmethod
    async def read(self, tag: str, counters: list[SpendCounter],
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
    async def first_alert(self, tag: str, counter: SpendCounter, mark: str) -> bool:
        """True exactly once per counter (and so per period) and mark: alerts fire once."""

    @abc.abstractmethod
    async def set_spent(self, tag: str, values: list[tuple[SpendCounter, int]]) -> None:
        """Set counters' spent (holds untouched): a rebuild from the ledger."""

    @abc.abstractmethod
    async def claim_rebuild(self) -> bool:
        """True when the store has lost (or never had) its data since the last rebuild, for
        exactly one caller: that one rebuilds spend from the ledger. A store that keeps no
        data across restarts of its process (memory) is rebuilt at start instead."""

    @abc.abstractmethod
    async def unclaim_rebuild(self) -> None:
        """The claimed rebuild failed: the next claim must succeed again."""


@dataclass
class _Cell:
    """One counter: spent, and the holds of requests in flight with their running total and a
    heap of expiries, so a check costs O(log n) however many requests are in flight."""

    spent: int = 0
    holds: dict[str, tuple[int, int]] = field(default_factory=dict)  # request → amount, expiry
    held_total: int = 0
    expiries: list[tuple[int, str]] = field(default_factory=list)
    alerts: set[str] = field(default_factory=set)
    expires_ms: int = 0

    def held(self, now_ms: int) -> int:
        while self.expiries and self.expiries[0][0] <= now_ms:
            exp, rid = heapq.heappop(self.expiries)
            hold = self.holds.get(rid)
            if hold is not None and hold[1] == exp:
                self.release(rid)
        return self.held_total

    def add_hold(self, rid: str, amount: int, expires_ms: int) -> None:
        self.release(rid)
        self.holds[rid] = (amount, expires_ms)
        self.held_total += amount
        heapq.heappush(self.expiries, (expires_ms, rid))
        if len(self.expiries) > 2 * len(self.holds) + 64:  # drop entries of released holds
            self.expiries = [(exp, r) for r, (_, exp) in self.holds.items()]
            heapq.heapify(self.expiries)

    def release(self, rid: str) -> None:
        hold = self.holds.pop(rid, None)
        if hold is not None:
            self.held_total -= hold[0]


class MemorySpendStore(SpendStore):
    """For a single node: extauthz and costsink share it in one process. No await inside a
    step, so every step is atomic on the event loop."""

    shared_in_process = True

    def __init__(self) -> None:
        self._cells: dict[str, _Cell] = {}
        self._index: dict[str, tuple[str, list[SpendCounter], int]] = {}  # rid → tag, counters
        self._orphaned: dict[str, int] = {}  # rid → until when a hold for it is not placed
        self._ops = 0
        self._rebuilt = False

    def _cell(self, tag: str, c: SpendCounter, now_ms: int) -> _Cell:
        cell = self._cells.setdefault(f"{tag}:{c.key}", _Cell())
        cell.expires_ms = now_ms + c.ttl_seconds * 1000
        return cell

    def _sweep(self, now_ms: int) -> None:
        self._ops += 1
        if self._ops % 1000 == 0:
            for k in [k for k, c in self._cells.items() if c.expires_ms <= now_ms]:
                del self._cells[k]
            for rid in [r for r, (_, _, exp) in self._index.items() if exp <= now_ms]:
                del self._index[rid]
            for rid in [r for r, until in self._orphaned.items() if until <= now_ms]:
                del self._orphaned[rid]

    async def hold(self, tag: str, request_id: str, budgets: list[Budget], amount: int,
                   ttl_ms: int, now_ms: int | None = None) -> HoldOutcome:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        self._sweep(now)
        cells = {b.counter.key: self._cell(tag, b.counter, now) for b in budgets}
        outcome = hold_states(budgets, {k: (c.spent, c.held(now)) for k, c in cells.items()},
                              amount)
        held_on = list(dict.fromkeys(b.counter for b in budgets if b.enforce))
        if self._orphaned.get(request_id, 0) > now:  # Envoy answered without this Check
            return outcome
        if outcome.allowed and held_on:
            for c in held_on:
                cells[c.key].add_hold(request_id, amount, now + ttl_ms)
            self._index[request_id] = (tag, held_on, now + ttl_ms)
        return outcome

    async def commit(self, tag: str, request_id: str, counters: list[SpendCounter],
                     amount: int, now_ms: int | None = None) -> list[int]:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        self._index.pop(request_id, None)
        out = []
        for c in counters:
            cell = self._cell(tag, c, now)
            cell.release(request_id)
            cell.spent += amount
            out.append(cell.spent)
        return out

    async def release_orphans(self, request_ids: list[str]) -> int:
        found = 0
        now = int(time.time() * 1000)
        for rid in request_ids:
            self._sweep(now)  # marks expire even where no budget ever places a hold
            self._orphaned[rid] = now + ORPHAN_MARK_MS
            entry = self._index.pop(rid, None)
            if entry is not None:
                await self.commit(entry[0], rid, entry[1], 0)
                found += 1
        return found

    async def read(self, tag: str, counters: list[SpendCounter],
                   now_ms: int | None = None) -> list[tuple[int, int]]:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        out = []
        for c in counters:
            cell = self._cells.get(f"{tag}:{c.key}")
            out.append((cell.spent, cell.held(now)) if cell else (0, 0))
        return out

    async def first_alert(self, tag: str, counter: SpendCounter, mark: str) -> bool:
        cell = self._cell(tag, counter, int(time.time() * 1000))
        if mark in cell.alerts:
            return False
        cell.alerts.add(mark)
        return True

    async def set_spent(self, tag: str, values: list[tuple[SpendCounter, int]]) -> None:
        now = int(time.time() * 1000)
        for c, spent in values:
            self._cell(tag, c, now).spent = spent

    async def claim_rebuild(self) -> bool:
        claimed, self._rebuilt = not self._rebuilt, True
        return claimed

    async def unclaim_rebuild(self) -> None:
        self._rebuilt = False


def open_spend_store(spec: str) -> SpendStore:
    url = counter_store_url(spec)
    if url is None:
        return MemorySpendStore()
    from .redis_store import RedisSpendStore

    return RedisSpendStore(url)
