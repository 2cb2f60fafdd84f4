"""One suite, two spend stores: memory and the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import gc
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

import pytest

from tests.conftest import REDIS_URL, require_redis
from tollway.budgets import Budget, SpendCounter, from_units, to_units
from tollway.expiring import MINUTE_MS, SWEEP_BATCH, Expiring
from tollway.spend import Commit, SpendStore
from tollway.spend.memory import MemorySpendStore
from tollway.spend.redis_store import RedisSpendStore

T0 = 1_800_000_000_000
DAY = SpendCounter("project:p", "day", "2027-01-15")
MONTH = SpendCounter("project:p", "month", "2027-01")
KEY_DAY = SpendCounter("key:k", "day", "2027-01-15")


def budget(limit: int, counter: SpendCounter = DAY, enforce: bool = True,
           quota: str = "q") -> Budget:
    return Budget(counter=counter, scope="project:p", quota=quota, limit=limit,
                  enforce=enforce, alerts=())


@asynccontextmanager
async def redis_store(url: str = REDIS_URL) -> AsyncIterator[RedisSpendStore]:
    """A Redis store of the test's own prefix, its keys removed afterwards."""
    s = RedisSpendStore(url, prefix=f"test-{uuid.uuid4().hex[:8]}", timeout=1.0)
    await require_redis(s.client)
    try:
        yield s
    finally:
        for key in [k async for k in s.client.scan_iter(f"{s.prefix}:*")]:
            await s.client.delete(key)  # one by one: in a cluster they lie in different slots
        await s.close()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SpendStore]:
    if request.param == "memory":
        yield MemorySpendStore()
        return
    url = request.getfixturevalue("redis_cluster") if request.param == "redis-cluster" \
        else REDIS_URL
    async with redis_store(url) as s:
        yield s


def test_units_are_exact() -> None:
    cost = Decimal(1234) * Decimal("0.075") / Decimal(1_000_000)
    assert from_units(to_units(cost)) == cost
    assert to_units(Decimal("0.00000000001"), round_up=True) == 1


async def test_holds_count_until_committed(store: SpendStore) -> None:
    b = budget(100)
    assert (await store.hold("o", "r1", [b], 60, 10_000, T0)).allowed
    refused = await store.hold("o", "r2", [b], 60, 10_000, T0)
    assert not refused.allowed and refused.refused_by is not None
    assert refused.states[0].held == 60
    assert await store.read("o", [DAY], T0) == [(0, 60)]  # a refusal holds nothing
    assert await store.commit("o", "r1", [DAY, KEY_DAY], 25, T0) == [25, 25]
    assert await store.read("o", [DAY, KEY_DAY], T0) == [(25, 0), (25, 0)]
    assert (await store.hold("o", "r2", [b], 60, 10_000, T0)).allowed
    assert not (await store.hold("o", "r3", [b], 16, 10_000, T0)).allowed
    assert (await store.hold("o", "r3", [b], 15, 10_000, T0)).allowed


async def test_an_expired_hold_is_released(store: SpendStore) -> None:
    b = budget(100)
    assert (await store.hold("o", "r1", [b], 90, 1_000, T0)).allowed
    assert not (await store.hold("o", "r2", [b], 20, 1_000, T0 + 999)).allowed
    assert (await store.hold("o", "r2", [b], 20, 1_000, T0 + 1_000)).allowed
    assert await store.read("o", [DAY], T0 + 1_000) == [(0, 20)]
    # the late entry of the expired request still counts as spent
    assert await store.commit("o", "r1", [DAY], 30, T0 + 1_500) == [30]
    assert await store.read("o", [DAY], T0 + 1_500) == [(30, 20)]


async def test_monitor_budgets_never_refuse_nor_hold(store: SpendStore) -> None:
    watch = budget(10, MONTH, enforce=False)
    outcome = await store.hold("o", "r1", [watch], 50, 10_000, T0)
    assert outcome.allowed and not outcome.states[0].fits(50)
    assert await store.read("o", [MONTH], T0) == [(0, 0)]


async def test_every_enforced_budget_must_have_room(store: SpendStore) -> None:
    day, month = budget(100, DAY, quota="d"), budget(1000, MONTH, quota="m")
    await store.commit("o", "old", [MONTH], 950, T0)
    outcome = await store.hold("o", "r1", [day, month], 60, 10_000, T0)
    assert not outcome.allowed
    assert outcome.refused_by is not None and outcome.refused_by.budget is month
    assert await store.read("o", [DAY, MONTH], T0) == [(0, 0), (950, 0)]


async def test_budgets_on_one_counter_hold_once(store: SpendStore) -> None:
    a, b = budget(100, quota="a"), budget(200, quota="b")
    assert (await store.hold("o", "r1", [a, b], 40, 10_000, T0)).allowed
    assert await store.read("o", [DAY], T0) == [(0, 40)]
    await store.commit("o", "r1", [DAY], 10, T0)
    assert await store.read("o", [DAY], T0) == [(10, 0)]


async def test_a_request_held_again_is_held_once(store: SpendStore) -> None:
    """Envoy retries a Check that timed out with the same request id: the hold its first
    try placed is not placed a second time, and one commit releases it."""
    b = budget(1000)
    for _ in range(2):
        assert (await store.hold("o", "r1", [b], 60, 10_000, T0)).allowed
    assert await store.read("o", [DAY], T0) == [(0, 60)]
    await store.commit("o", "r1", [DAY], 25, T0)
    assert await store.read("o", [DAY], T0) == [(25, 0)]


async def test_orgs_and_periods_are_separate(store: SpendStore) -> None:
    await store.commit("o1", "r1", [DAY], 10, T0)
    other_day = SpendCounter("project:p", "day", "2027-01-16")
    assert await store.read("o2", [DAY], T0) == [(0, 0)]
    assert await store.read("o1", [DAY, other_day], T0) == [(10, 0), (0, 0)]


async def test_an_alert_fires_once_per_counter_and_mark(store: SpendStore) -> None:
    assert await store.first_alert("o", DAY, "q:0.8")
    assert not await store.first_alert("o", DAY, "q:0.8")
    assert await store.first_alert("o", DAY, "q:0.95")
    assert await store.first_alert("o", SpendCounter("project:p", "day", "2027-01-16"), "q:0.8")


async def test_concurrent_requests_never_overrun_an_enforced_budget(store: SpendStore) -> None:
    """64 clients, each request's real cost anywhere up to its hold: spent stays in budget."""
    limit, rng = 10_000, random.Random(7)
    b = budget(limit)
    admitted = 0

    async def client(c: int) -> None:
        nonlocal admitted
        for i in range(20):
            rid = f"c{c}-{i}"
            hold = rng.randint(50, 400)
            if (await store.hold("o", rid, [b], hold, 60_000)).allowed:
                admitted += 1
                await asyncio.sleep(0)
                await store.commit("o", rid, [DAY], rng.randint(0, hold))
    await asyncio.gather(*(client(c) for c in range(64)))
    ((spent, held),) = await store.read("o", [DAY])
    assert held == 0 and 0 < spent <= limit and admitted > 10


async def test_many_commits_at_once_equal_one_by_one(store: SpendStore) -> None:
    b = budget(1000)
    for i in range(3):
        assert (await store.hold("o", f"r{i}", [b], 100, 10_000)).allowed
    results = await store.commit_many([Commit("o", f"r{i}", [DAY, KEY_DAY], 10 * (i + 1))
                                       for i in range(3)] + [Commit("o2", "x", [DAY], 7)])
    assert results[2] == [60, 60] and results[3] == [7]  # values after the batch
    assert await store.read("o", [DAY, KEY_DAY]) == [(60, 0), (60, 0)]
    assert await store.read("o2", [DAY]) == [(7, 0)]


async def test_commits_sharing_their_counters_release_each_hold_and_add_each_cost(
        store: SpendStore) -> None:
    """The recorder hands the commits of one key, model and minute the same counters list;
    mixed with a commit whose equal list is its own object and one of other counters."""
    shared = [DAY, KEY_DAY]
    for rid in ("a", "b", "c"):
        assert (await store.hold("o", rid, [budget(1000), budget(1000, KEY_DAY)], 50,
                                 10_000)).allowed
    results = await store.commit_many([
        Commit("o", "a", shared, 10, held=True), Commit("o", "b", [DAY, KEY_DAY], 0, held=True),
        Commit("o", "c", shared, 5, held=True), Commit("o", "d", [MONTH], 4)])
    assert results == [[15, 15], [15, 15], [15, 15], [4]]
    assert await store.read("o", [DAY, KEY_DAY, MONTH]) == [(15, 0), (15, 0), (4, 0)]


async def test_many_requests_in_flight_do_not_slow_or_grow_the_memory_store() -> None:
    store = MemorySpendStore()
    b = budget(10**12)
    for i in range(20_000):
        assert (await store.hold("o", f"r{i}", [b], 5, 60_000, T0 + i)).allowed
        await store.commit("o", f"r{i}", [DAY], 3, T0 + i)
    assert not store._holds and not store._index  # every hold released: nothing left
    assert await store.read("o", [DAY], T0) == [(60_000, 0)]


async def test_a_hold_is_found_by_its_request_id_alone(store: SpendStore) -> None:
    """Envoy gave up on the Check: the log entry has neither org nor counters."""
    b, watch = budget(100), budget(100, MONTH, enforce=False)
    assert (await store.hold("o", "lost", [b, watch], 60, 60_000)).allowed
    assert (await store.hold("o", "kept", [b], 30, 60_000)).allowed
    # Redis writes the index after answering the Check: it is there long before a log entry
    await asyncio.gather(*getattr(store, "_indexing", ()))
    assert await store.release_orphans(["lost", "never-held"]) == 1
    assert await store.read("o", [DAY]) == [(0, 30)]
    assert await store.release_orphans(["lost"]) == 0  # once
    await store.commit_many([Commit("o", "kept", [DAY], 10, held=True)])
    assert await store.release_orphans(["kept"]) == 0  # a committed hold leaves no trace
    assert await store.read("o", [DAY]) == [(10, 0)]


async def test_a_hold_placed_after_its_log_entry_is_released_at_once(
        store: SpendStore) -> None:
    """A busy node started the Check late: Envoy gave up, and costsink read the log entry
    before the Check placed its hold. Nothing may stay held until the hold expires."""
    assert await store.release_orphans(["late"]) == 0
    assert (await store.hold("o", "late", [budget(100)], 60, 60_000)).allowed
    await asyncio.gather(*getattr(store, "_indexing", ()))
    assert await store.read("o", [DAY]) == [(0, 0)]
    assert await store.release_orphans(["late"]) == 0  # released once, and no other hold
    assert (await store.hold("o", "on-time", [budget(100)], 60, 60_000)).allowed
    await asyncio.gather(*getattr(store, "_indexing", ()))
    assert await store.read("o", [DAY]) == [(0, 60)]  # only the marked id is let go


async def test_a_single_redis_indexes_a_hold_in_the_call_that_places_it() -> None:
    """The Check's one call: no second one on the loop to write the index (in a Cluster the
    index lies in another slot, and is written after). An orphan's mark found by that call
    leaves nothing held."""
    async with redis_store() as store:
        assert (await store.hold("o", "r1", [budget(100)], 60, 60_000)).allowed
        assert not store._indexing
        assert await store.client.exists(store._index_key("r1"))
        assert await store.release_orphans(["r2"]) == 0  # Envoy gave up before the Check
        assert (await store.hold("o", "r2", [budget(100)], 30, 60_000)).allowed
        assert await store.read("o", [DAY]) == [(0, 60)]
        assert await store.release_orphans(["r1"]) == 1
        assert await store.read("o", [DAY]) == [(0, 0)]


async def test_orphan_marks_expire_without_any_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests Envoy answered without a Check (no budget anywhere, so nothing else sweeps)
    must not grow the memory store for good."""
    store = MemorySpendStore()
    clock = [T0]
    monkeypatch.setattr("tollway.spend.memory.time.time", lambda: clock[0] / 1000)
    for i in range(5_000):
        clock[0] = T0 + i * 100  # ten a second, each mark living 60 s: ~600 at a time
        await store.release_orphans([f"r{i}"])
    assert len(store._orphaned) <= 600 + 600 + 10  # each goes within a minute of its time


def test_names_go_by_the_minute_of_their_time_a_batch_at_a_time() -> None:
    """What the memory store sweeps by: never a scan of every name."""
    names = Expiring()
    for i in range(100):
        names.set(f"a{i}", T0 + 10)
    names.set("b", T0 + 5 * MINUTE_MS)
    names.set("moved", T0)
    names.set("moved", T0 + 9 * MINUTE_MS)  # used again: its old time no longer counts
    assert names.due(T0 + 59_000) == []  # the minute of their time has not passed
    first = names.due(T0 + MINUTE_MS)
    assert len(first) == SWEEP_BATCH and all(n.startswith("a") for n in first)
    assert sorted(first + names.due(T0 + MINUTE_MS)) == sorted(f"a{i}" for i in range(100))
    assert names.due(T0 + 6 * MINUTE_MS) == ["b"]
    assert names.due(T0 + 10 * MINUTE_MS) == ["moved"] and len(names) == 0
    assert names.due(T0 + 99 * MINUTE_MS) == []


async def test_counters_go_their_ttl_after_their_last_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemorySpendStore()
    clock = [T0]
    monkeypatch.setattr("tollway.spend.memory.time.time", lambda: clock[0] / 1000)
    await store.commit("o", "r1", [DAY, MONTH, KEY_DAY], 5, T0)
    await store.commit("o", "r2", [KEY_DAY], 5, T0 + 86_400_000)  # used again a day later
    after = T0 + DAY.ttl_seconds * 1000 + MINUTE_MS  # the day counter's TTL and its minute
    await store.commit("o", "r3", [], 0, after)  # any operation sweeps a little
    assert await store.read("o", [DAY, MONTH, KEY_DAY], after) == [(0, 0), (5, 0), (10, 0)]


async def test_counters_at_rest_are_nothing_a_collection_walks() -> None:
    """A node that has metered 100,000 keys holds 200,000 counters: as objects the
    collector tracks, every full collection walked them all (125 ms with 200,000 keys)."""
    store = MemorySpendStore()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(2_000):
        await store.commit("o", f"r{i}", [SpendCounter(f"key:k{i}", "day", "2027-01-15"),
                                         SpendCounter(f"key:k{i}", "month", "2027-01")], 3)
    assert await store.first_alert("o", KEY_DAY, "80%")
    gc.collect()
    assert len(gc.get_objects()) - before < 50  # not per counter


async def test_a_rebuild_is_claimed_once_until_given_back(store: SpendStore) -> None:
    assert await store.claim_rebuild()
    assert not await store.claim_rebuild()  # another replica, or the next check
    await store.unclaim_rebuild()  # the rebuild failed
    assert await store.claim_rebuild()


async def test_set_spent_replaces_spent_and_keeps_holds(store: SpendStore) -> None:
    await store.commit("o", "", [DAY], 50)
    assert (await store.hold("o", "r", [budget(1000)], 100, 10_000)).allowed
    await store.set_spent("o", [(DAY, 7), (MONTH, 9)])
    assert await store.read("o", [DAY, MONTH]) == [(7, 100), (9, 0)]


async def test_a_retried_batch_is_applied_once() -> None:
    """A timeout hides whether Redis ran the script: the same batch sent again adds nothing."""
    async with redis_store() as s:
        batch = [Commit("o", "r1", [DAY], 10), Commit("o", "r2", [DAY, KEY_DAY], 5)]
        assert await s.commit_many(batch) == [[15], [15, 5]]
        assert await s.commit_many(batch) == [[15], [15, 5]]
        assert await s.commit_many([Commit("o", "r3", [DAY], 1)]) == [[16]]


async def test_a_batch_of_thousands_releases_each_hold(store: SpendStore) -> None:
    """A shutdown drains whatever was queued as one batch: more request ids than one Lua call
    can spread (unpack) into a Redis command."""
    b = budget(10**12)
    rids = [f"d{i}" for i in range(9_000)]
    for rid in rids[::1000]:  # every thousandth holds something
        assert (await store.hold("o", rid, [b], 50, 60_000)).allowed
    day = [DAY]  # one list: the commits are one shape, as the recorder builds them
    results = await store.commit_many([Commit("o", rid, day, 2, held=rid in rids[::1000])
                                       for rid in rids])
    assert results[-1] == [18_000]
    assert await store.read("o", [DAY]) == [(18_000, 0)]
