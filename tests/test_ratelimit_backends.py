"""One suite, two counter backends: memory and the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from ratelimit.backend import (
    BUCKETS,
    BackendUnavailable,
    CounterBackend,
    MemoryBackend,
    Settlement,
)
from ratelimit.redis_backend import RedisBackend
from tests.conftest import REDIS_URL, require_redis
from tollway.expiring import MINUTE_MS, SWEEP_BATCH
from tollway.quotas import Rule

T0 = 1_800_000_000_000  # a fixed "now" in ms, aligned to every bucket width used here


def rule(limit: int, period: int = 60, kind: str = "requests", enforce: bool = True,
         name: str = "q") -> Rule:
    return Rule(counter=f"project:p/{name}/{kind}{period}", quota=name, kind=kind, limit=limit,
                period=period, enforce=enforce)


async def _redis_or_skip(url: str = REDIS_URL) -> RedisBackend:
    # generous: this suite tests what the counters grant, not how fast a busy machine answers
    backend = RedisBackend(url, prefix=f"test-{uuid.uuid4().hex[:8]}", timeout=5.0)
    await require_redis(backend.client)
    return backend


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[CounterBackend]:
    b: CounterBackend = (
        MemoryBackend() if request.param == "memory"
        else await _redis_or_skip(request.getfixturevalue("redis_cluster"))
        if request.param == "redis-cluster" else await _redis_or_skip())
    yield b
    if isinstance(b, RedisBackend):
        for key in [k async for k in b.client.scan_iter(f"{b.prefix}:*")]:
            await b.client.delete(key)  # one by one: in a cluster they lie in different slots
    await b.close()


async def test_limit_is_exact_within_a_window(backend: CounterBackend) -> None:
    r = rule(5)
    results = [(await backend.charge("org", [r], [1], T0 + i)) for i in range(7)]
    assert [o.allowed for o in results] == [True] * 5 + [False] * 2
    # the first charge is what the window waits for: one period plus the conservative bucket
    assert all(60 < o.states[0].reset_seconds <= 61 for o in results)


async def test_all_or_nothing_a_refusal_charges_no_counter(backend: CounterBackend) -> None:
    minute, month = rule(100, 60, name="minute"), rule(3, 2592000, name="month")
    for i in range(3):
        assert (await backend.charge("org", [minute, month], [1, 1], T0 + i)).allowed
    refused = await backend.charge("org", [minute, month], [1, 1], T0 + 10)
    assert not refused.allowed
    assert [s.over for s in refused.states] == [False, True]
    alone = await backend.charge("org", [minute], [1], T0 + 20)
    assert alone.states[0].used == 3, "the refused request must not have consumed the minute"


async def test_no_double_rate_across_a_window_boundary(backend: CounterBackend) -> None:
    """A fixed window would grant `limit` just before its boundary and `limit` again just
    after it; the sliding window refuses the second burst until the first has aged out."""
    r = rule(10, 60)
    w = 60_000 // BUCKETS
    boundary = T0 + 60_000
    for _ in range(10):
        assert (await backend.charge("org", [r], [1], boundary - 1)).allowed
    after = await backend.charge("org", [r], [1], boundary + 1)
    assert not after.allowed
    assert 59 <= after.states[0].retry_seconds <= 61
    # one full period (plus the one conservative bucket) later, capacity is back
    assert (await backend.charge("org", [r], [1], boundary - 1 + 60_000 + w)).allowed


async def test_concurrent_clients_never_exceed_any_window(backend: CounterBackend) -> None:
    """Randomized: many concurrent requests with random costs at random times over three
    periods; afterwards, no interval of one period holds more granted cost than the limit."""
    rng = random.Random(1234)
    period, limit = 60, 50
    r_req, r_tok = rule(limit, period), rule(400, period, kind="tokens")
    # 15 instants spread over three periods; at each, 40 clients call concurrently
    instants = sorted(T0 + rng.randrange(0, 3 * period * 1000) for _ in range(15))
    granted: list[tuple[int, int]] = []

    async def one(at: int, tokens: int) -> None:
        out = await backend.charge("org", [r_req, r_tok], [1, tokens], at)
        if out.allowed:
            granted.append((at, tokens))
    for at in instants:
        await asyncio.gather(*(one(at, rng.randrange(1, 40)) for _ in range(40)))
    assert len(granted) > limit  # the test exercises more than one full window
    times = sorted(granted)
    for start, _ in times:
        inside = [(t, c) for t, c in times if start <= t < start + period * 1000]
        assert len(inside) <= limit
        assert sum(c for _, c in inside) <= 400


async def test_monitor_rules_report_but_never_refuse(backend: CounterBackend) -> None:
    watch = rule(2, enforce=False)
    outs = [await backend.charge("org", [watch], [1], T0 + i) for i in range(4)]
    assert all(o.allowed for o in outs)
    assert [o.states[0].over for o in outs] == [False, False, True, True]


async def test_a_reservation_larger_than_the_limit_never_fits(backend: CounterBackend) -> None:
    out = await backend.charge("org", [rule(100, kind="tokens")], [101], T0)
    assert not out.allowed and out.states[0].retry_seconds == float("inf")


async def test_settle_corrects_a_reservation(backend: CounterBackend) -> None:
    tokens = rule(1000, kind="tokens")
    assert (await backend.charge("org", [tokens], [800], T0)).allowed
    assert not (await backend.charge("org", [tokens], [300], T0 + 1)).allowed
    await backend.settle("org", [tokens], T0, -600, T0 + 2)  # it used 200, not 800
    out = await backend.charge("org", [tokens], [300], T0 + 3)
    assert out.allowed and out.states[0].used == 200
    await backend.settle("org", [tokens], T0, +900, T0 + 4)  # more than reserved: charged
    assert (await backend.charge("org", [tokens], [0], T0 + 5)).states[0].used == 1400


async def test_settle_many_sums_a_batch_as_settle_would_one_by_one(
        backend: CounterBackend) -> None:
    """costsink's batch: reservations sharing a counter and bucket, one in another bucket,
    one on two quotas, one too old to correct, one of another org, a zero, and a counter
    never charged (nothing to correct: not created)."""
    tpm, tph = rule(10**6, kind="tokens", name="tpm"), rule(10**6, 3600, "tokens", name="tph")
    for at in (T0, T0 + 1000, T0 + 2000):
        assert (await backend.charge("org", [tpm, tph], [500, 500], at)).allowed
    assert (await backend.charge("other", [tpm], [500], T0)).allowed
    await backend.settle_many([
        Settlement("org", [tpm], T0, -100), Settlement("org", [tpm], T0 + 500, -50),
        Settlement("org", [tpm], T0 + 1000, 25), Settlement("org", [tpm, tph], T0 + 2000, -400),
        Settlement("org", [tpm], T0 - 120_000, -7), Settlement("other", [tpm], T0, -300),
        Settlement("org", [tpm], T0, 0), Settlement("org", [rule(9, kind="tokens",
                                                                  name="never")], T0, -5),
    ], now_ms=T0 + 3000)
    used = [(await backend.charge(org, rules, [0] * len(rules), T0 + 3000)).states
            for org, rules in (("org", [tpm, tph]), ("other", [tpm]))]
    assert [st.used for states in used for st in states] == [
        1500 - 100 - 50 + 25 - 400, 1500 - 400, 500 - 300]


async def test_counters_are_separate_per_tag(backend: CounterBackend) -> None:
    r = rule(1)
    assert (await backend.charge("org-a", [r], [1], T0)).allowed
    assert (await backend.charge("org-b", [r], [1], T0)).allowed
    assert not (await backend.charge("org-a", [r], [1], T0)).allowed


async def test_redis_clock_many_concurrent_clients_get_exactly_the_limit() -> None:
    """With Redis's own clock, 200 concurrent clients on one connection pool: exactly the
    limit is granted, and the counter holds exactly the granted amount."""
    b = await _redis_or_skip()
    try:
        r = rule(37, 3600)
        outs = await asyncio.gather(*(b.charge("acme", [r], [1]) for _ in range(200)))
        assert sum(o.allowed for o in outs) == 37
        assert (await b.charge("acme", [r], [0])).states[0].used == 37
    finally:
        keys = [k async for k in b.client.scan_iter(f"{b.prefix}:*")]
        if keys:
            await b.client.delete(*keys)
        await b.close()


async def test_redis_keys_are_hash_tagged_and_expire() -> None:
    b = await _redis_or_skip()
    try:
        now = int(time.time() * 1000)
        await b.charge("acme", [rule(5)], [1], now)
        keys = [k async for k in b.client.scan_iter(f"{b.prefix}:*")]
        assert len(keys) == 1 and b"{acme}" in keys[0]
        ttl = await b.client.pttl(keys[0])
        assert 0 < ttl <= 62 * 1000
        await b.client.delete(*keys)
    finally:
        await b.close()


async def test_redis_counters_written_without_a_kept_sum_are_summed_from_their_buckets(
) -> None:
    """A counter an older version wrote holds buckets only, and an older replica's settlement
    corrects a bucket without the sum kept beside it: a charge counts what the buckets hold,
    at once where no sum is kept, within a second where one is."""
    b = await _redis_or_skip()
    r = rule(1000, 3600, kind="tokens")  # buckets of a minute: these charges share one
    key = b.key("org", r)
    bucket = str(T0 // 60_000)
    try:
        await b.client.hset(key, mapping={bucket: 300, str(T0 // 60_000 - 5): 200})
        assert (await b.charge("org", [r], [100], T0)).states[0].used == 500
        await b.client.hincrby(key, bucket, 50)  # as the older settlement script does
        later = await b.charge("org", [r], [0], T0 + 1_000)
        assert later.states[0].used == 650
    finally:
        await b.client.delete(key)
        await b.close()


async def test_memory_counters_go_once_their_window_has_passed() -> None:
    """As Redis lets its keys expire: a stream of keys each charged once must not leave a
    counter behind for good, and a counter charged again stays."""
    b = MemoryBackend()
    for i in range(1_000):
        await b.charge(f"k{i}", [rule(5)], [1], T0 + i)
    await b.charge("steady", [rule(5, period=3600)], [1], T0)
    assert len(b._counters) == 1_001
    later = T0 + 62 * 1000 + MINUTE_MS  # the minute window has passed, and its minute
    for _ in range(1_000 // SWEEP_BATCH + 1):
        assert (await b.charge("other", [rule(10**6)], [1], later)).allowed
    assert sorted(b._counters) == [f"other:{rule(5).counter}:60",
                                   f"steady:{rule(5, period=3600).counter}:3600"]
    assert (await b.charge("steady", [rule(5, period=3600)], [4], later)).allowed
    assert not (await b.charge("steady", [rule(5, period=3600)], [1], later)).allowed


async def test_unreachable_redis_fails_fast() -> None:
    b = RedisBackend("redis://127.0.0.1:1/0", timeout=0.2)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await b.charge("org", [rule(5)], [1], T0)
    assert time.monotonic() - started < 2.0
    await b.close()


async def test_retry_after_is_when_the_oldest_counted_request_leaves(
        backend: CounterBackend) -> None:
    """40 requests over 3 s fill a 40-a-minute quota; the 41st is told to come back when the
    first of them leaves the window (60 s after it, within one 1-second bucket), not a whole
    window after the refusal."""
    r = rule(40)
    for i in range(40):
        assert (await backend.charge("o", [r], [1], now_ms=T0 + i * 75)).allowed
    for later in (3_000, 10_000, 30_000):
        refused = await backend.charge("o", [r], [1], now_ms=T0 + later)
        assert not refused.allowed
        exact = (60_000 - later) / 1000  # when the request at T0 is 60 s old
        assert exact <= refused.states[0].retry_seconds <= exact + 1
    assert (await backend.charge("o", [r], [1], now_ms=T0 + 61_000)).allowed


WIDE_GAPS = [0, 7, 250, 999, 1000, 1500, 4000, 20_000, 70_000, 130_000]
NARROW_GAPS = [0, 0, 7, 30, 120, 400]  # the Redis script's kept sums, mostly, within a second


@pytest.mark.parametrize(("seed", "gaps"), [
    pytest.param(seed, gaps, id=f"{name}-{seed}")
    for name, gaps, seeds in (("wide", WIDE_GAPS, (1, 2, 3)), ("narrow", NARROW_GAPS, (4, 5)))
    for seed in seeds])
async def test_redis_answers_as_the_memory_backend_step_by_step(seed: int,
                                                                gaps: list[int]) -> None:
    """The Redis script and the memory backend are two implementations of one computation:
    driven through the same random charges, settlements and gaps in time (within a bucket,
    across buckets, past a whole window), every answer is the same: allowed, used, reset and
    retry of every rule. The narrow gaps keep most charges within a second of the last, where
    the script answers from the window's sum it keeps rather than from the buckets."""
    redis_backend = await _redis_or_skip()
    memory = MemoryBackend()
    rng = random.Random(seed)
    rules = [rule(30, 60, name="rpm"), rule(5000, 60, kind="tokens", name="tpm"),
             rule(20000, 3600, kind="tokens", name="tph"),
             rule(10, 60, enforce=False, name="watch")]
    now = T0
    reservations: list[tuple[int, list[Rule], int]] = []  # charged at, token rules, reserved
    refused = retry_known = 0
    try:
        for step in range(800):
            now += rng.choice(gaps)
            if reservations and rng.random() < 0.25:  # a response's usage arrives
                at, tokens, reserved = reservations.pop(rng.randrange(len(reservations)))
                delta = rng.randint(-reserved, 300)  # actual - reserved
                for b in (memory, redis_backend):
                    await b.settle("org", tokens, at, delta, now)
                continue
            if len(reservations) > 3 and rng.random() < 0.1:  # a batch's, at once (costsink)
                batch = [reservations.pop(rng.randrange(len(reservations)))
                         for _ in range(rng.randint(2, 4))]
                settlements = [Settlement("org", tokens, at, rng.randint(-reserved, 300))
                               for at, tokens, reserved in batch]
                for b in (memory, redis_backend):  # memory's: settle() one by one
                    await b.settle_many(settlements, now)
                continue
            picked = [r for r in rules if rng.random() < 0.7] or rules[:1]
            reserve = rng.choice([0, 50, 400, 900, 6000])
            costs = [1 if r.kind == "requests" else reserve for r in picked]
            want = await memory.charge("org", picked, costs, now)
            got = await redis_backend.charge("org", picked, costs, now)
            differ = [(w.rule.quota, (w.used, w.reset_seconds, w.retry_seconds),
                       (g.used, g.reset_seconds, g.retry_seconds))
                      for w, g in zip(want.states, got.states, strict=True) if w != g]
            assert got.allowed == want.allowed and not differ, f"step {step}: {differ}"
            if want.allowed:
                reservations.append((now, [r for r in picked if r.kind == "tokens"], reserve))
            refused += not want.allowed
            retry_known += any(0 < st.retry_seconds < math.inf for st in want.states)
        assert refused > 50 and retry_known > 50  # the walk reached the refusal paths
    finally:
        for key in [k async for k in redis_backend.client.scan_iter(
                f"{redis_backend.prefix}:*")]:
            await redis_backend.client.delete(key)
        await redis_backend.close()
