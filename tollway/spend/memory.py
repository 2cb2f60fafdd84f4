"""The spend store of a single node: extauthz and costsink share it in one process.

No await inside a step, so every step is atomic on the event loop. A node that has metered a
million keys holds two counters for each (their day and their month), so what a counter costs
while it rests matters more than what it costs when used:

- its spent value, its expiry and its alert marks are entries of plain dicts of strings and
  integers, which CPython's collector does not track. As three objects a counter (a record, its
  list and its set), 200,000 keys made every full collection 125 ms;
- counters are dropped when their period's TTL has passed since their last use, found by the
  minute of their expiry (tollway/expiring.py), a few at a time: a scan of every counter, every
  1,000 operations, took 48 ms with 200,000 keys;
- the holds of the requests in flight live apart, only on the counters that have any.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tollway.budgets import Budget, SpendCounter
from tollway.expiring import Expiring

from . import ORPHAN_MARK_MS, HoldOutcome, SpendStore, hold_states


@dataclass
class _Holds:
    """The holds on one counter, with their running total and a heap of expiries, so a check
    costs O(log n) however many requests are in flight."""

    amounts: dict[str, tuple[int, int]] = field(default_factory=dict)  # request → amount, expiry
    total: int = 0
    expiries: list[tuple[int, str]] = field(default_factory=list)

    def held(self, now_ms: int) -> int:
        while self.expiries and self.expiries[0][0] <= now_ms:
            exp, rid = heapq.heappop(self.expiries)
            hold = self.amounts.get(rid)
            if hold is not None and hold[1] == exp:
                self.release(rid)
        return self.total

    def add(self, rid: str, amount: int, expires_ms: int) -> None:
        self.release(rid)
        self.amounts[rid] = (amount, expires_ms)
        self.total += amount
        heapq.heappush(self.expiries, (expires_ms, rid))
        if len(self.expiries) > 2 * len(self.amounts) + 64:  # drop entries of released holds
            self.expiries = [(exp, r) for r, (_, exp) in self.amounts.items()]
            heapq.heapify(self.expiries)

    def release(self, rid: str) -> None:
        hold = self.amounts.pop(rid, None)
        if hold is not None:
            self.total -= hold[0]


class MemorySpendStore(SpendStore):
    shared_in_process = True

    def __init__(self) -> None:
        # per counter, named "<org>:<counter key>"
        self._spent: dict[str, int] = {}
        self._alerts: dict[str, tuple[str, ...]] = {}  # the marks that have fired
        self._kept = Expiring()  # every counter, by when it goes: its TTL after its last use
        self._holds: dict[str, _Holds] = {}  # only the counters holding for requests in flight
        # per request holding: its org and its counters (name and TTL in ms)
        self._index: dict[str, tuple[str, tuple[tuple[str, int], ...]]] = {}
        self._index_until = Expiring()
        self._orphaned = Expiring()  # request → until when a hold for it is not placed
        self._rebuilt = False

    def _use(self, name: str, ttl_ms: int, now_ms: int) -> None:
        self._kept.set(name, now_ms + ttl_ms)

    def _sweep(self, now_ms: int) -> None:
        for name in self._kept.due(now_ms):
            self._spent.pop(name, None)
            self._alerts.pop(name, None)
            self._holds.pop(name, None)
        for rid in self._index_until.due(now_ms):
            self._index.pop(rid, None)
        self._orphaned.due(now_ms)

    def _held(self, name: str, now_ms: int) -> int:
        holds = self._holds.get(name)
        if holds is None:
            return 0
        total = holds.held(now_ms)
        if not holds.amounts:
            del self._holds[name]
        return total

    def _release(self, name: str, rid: str) -> None:
        holds = self._holds.get(name)
        if holds is not None:
            holds.release(rid)
            if not holds.amounts:
                del self._holds[name]

    async def hold(self, org: str, request_id: str, budgets: list[Budget], amount: int,
                   ttl_ms: int, now_ms: int | None = None) -> HoldOutcome:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        self._sweep(now)
        values = {}
        for b in budgets:
            name = f"{org}:{b.counter.key}"
            self._use(name, b.counter.ttl_seconds * 1000, now)
            values[b.counter.key] = (self._spent.get(name, 0), self._held(name, now))
        outcome = hold_states(budgets, values, amount)
        held_on = list(dict.fromkeys(b.counter for b in budgets if b.enforce))
        orphaned_until = self._orphaned.get(request_id)
        if orphaned_until is not None and orphaned_until > now:  # Envoy answered without it
            return outcome
        if outcome.allowed and held_on:
            for c in held_on:
                name = f"{org}:{c.key}"
                holds = self._holds.get(name)
                if holds is None:
                    holds = self._holds[name] = _Holds()
                holds.add(request_id, amount, now + ttl_ms)
            self._index[request_id] = (org, tuple((c.key, c.ttl_seconds * 1000)
                                                  for c in held_on))
            self._index_until.set(request_id, now + ttl_ms)
        return outcome

    async def commit(self, org: str, request_id: str, counters: list[SpendCounter],
                     amount: int, now_ms: int | None = None) -> list[int]:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        return self._commit(org, request_id, ((c.key, c.ttl_seconds * 1000) for c in counters),
                            amount, now)

    def _commit(self, org: str, request_id: str, counters: Iterable[tuple[str, int]],
                amount: int, now_ms: int) -> list[int]:
        self._sweep(now_ms)
        self._index.pop(request_id, None)
        self._index_until.discard(request_id)
        out = []
        for key, ttl_ms in counters:
            name = f"{org}:{key}"
            self._use(name, ttl_ms, now_ms)
            self._release(name, request_id)
            spent = self._spent[name] = self._spent.get(name, 0) + amount
            out.append(spent)
        return out

    async def release_orphans(self, request_ids: list[str]) -> int:
        found = 0
        now = int(time.time() * 1000)
        for rid in request_ids:
            self._sweep(now)  # marks expire even where no budget ever places a hold
            self._orphaned.set(rid, now + ORPHAN_MARK_MS)
            entry = self._index.get(rid)
            if entry is not None:
                self._commit(entry[0], rid, entry[1], 0, now)
                found += 1
        return found

    async def read(self, org: str, counters: list[SpendCounter],
                   now_ms: int | None = None) -> list[tuple[int, int]]:
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        out = []
        for c in counters:
            name = f"{org}:{c.key}"
            out.append((self._spent.get(name, 0), self._held(name, now)))
        return out

    async def first_alert(self, org: str, counter: SpendCounter, mark: str) -> bool:
        name = f"{org}:{counter.key}"
        self._use(name, counter.ttl_seconds * 1000, int(time.time() * 1000))
        marks = self._alerts.get(name, ())
        if mark in marks:
            return False
        self._alerts[name] = (*marks, mark)
        return True

    async def set_spent(self, org: str, values: list[tuple[SpendCounter, int]]) -> None:
        now = int(time.time() * 1000)
        for c, spent in values:
            name = f"{org}:{c.key}"
            self._use(name, c.ttl_seconds * 1000, now)
            self._spent[name] = spent

    async def claim_rebuild(self) -> bool:
        claimed, self._rebuilt = not self._rebuilt, True
        return claimed

    async def unclaim_rebuild(self) -> None:
        self._rebuilt = False
