"""The request path's lane to Redis (`tollway.redis_client.Lane`) when Redis misbehaves: a
restart, a stall past the timeout, a call cancelled while Redis holds it, every connection
busy. Against a real Redis of each test's own, to pause and restart."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from ratelimit.backend import BackendUnavailable
from ratelimit.redis_backend import RedisBackend
from tests.conftest import unavailable
from tests.e2e.harness import PrivateRedis
from tests.test_ratelimit_backends import rule
from tests.test_spend_stores import DAY, KEY_DAY, budget
from tollway.spend.redis_store import RedisSpendStore

RULES = [rule(100, name="a"), rule(100, name="b")]
THREE = [*RULES, rule(100, name="c")]  # an answer of another length than RULES'


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if not shutil.which("redis-server"):
        unavailable("redis-server is needed for the lane's tests")
    r = PrivateRedis(tmp_path)
    r.start()
    yield r
    r.kill()


@pytest.fixture
async def admin(private_redis: PrivateRedis) -> AsyncIterator[redis.Redis]:
    client = redis.Redis(port=private_redis.port)
    yield client
    await client.aclose()


async def pause(admin: redis.Redis, ms: int) -> None:
    """Every client's commands held by Redis for `ms`, as a Redis stalled by a slow script or
    a fork would hold them."""
    await admin.execute_command("CLIENT", "PAUSE", ms, "ALL")


async def charge_held_by_redis(b: RedisBackend, admin: redis.Redis,
                               ms: int) -> asyncio.Task[Any]:
    """A charge sent while Redis holds every command for `ms`: returned once it has taken
    the lane's connection, its answer still to come."""
    await pause(admin, ms)
    call = asyncio.create_task(b.charge("org", RULES, [1, 1]))
    deadline = time.monotonic() + 2
    while b.lane.free:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.001)
    return call


async def next_call_reads_its_own_answer(b: RedisBackend, admin: redis.Redis) -> None:
    """Once Redis answers again (the pause over), a charge of three quotas reads an answer of
    three, not the answer a call before it left unread (two quotas')."""
    await admin.ping()  # answered once the pause is over
    out = await b.charge("org", THREE, [1, 1, 1])
    assert len(out.states) == 3 and out.states[2].used == 0


async def test_charges_go_by_one_lane_connection_and_count(
        private_redis: PrivateRedis) -> None:
    b = RedisBackend(private_redis.url, timeout=5.0)
    try:
        for n in range(3):
            out = await b.charge("org", RULES, [1, 1])
            assert out.allowed and [s.used for s in out.states] == [n, n]  # before this one
        assert b.lane.opened == 1 and len(b.lane.free) == 1
    finally:
        await b.close()


async def test_a_restarted_redis_answers_the_next_charge(private_redis: PrivateRedis) -> None:
    """kill -9 and a start: the lane's connection is closed and the script unknown; the
    charge after it is counted on the new Redis, not refused or failed."""
    b = RedisBackend(private_redis.url, timeout=5.0)
    try:
        assert (await b.charge("org", RULES, [1, 1])).allowed
        private_redis.kill()
        private_redis.start()
        out = await b.charge("org", RULES, [1, 1])
        assert out.allowed and [s.used for s in out.states] == [0, 0]  # nothing kept on disk
        assert b.lane.opened == 1  # reconnected, not replaced
    finally:
        await b.close()


async def test_a_stall_past_the_timeout_fails_the_call_and_not_the_next(
        private_redis: PrivateRedis, admin: redis.Redis) -> None:
    """The stalled call's answer, sent once Redis resumes, must not be read as the next
    call's."""
    b = RedisBackend(private_redis.url, timeout=0.25)
    try:
        await b.charge("org", RULES, [1, 1])
        await pause(admin, 800)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await b.charge("org", RULES, [1, 1])
        assert time.monotonic() - started < 0.5  # the lane's timeout, not the stall's length
        await next_call_reads_its_own_answer(b, admin)
    finally:
        await b.close()


async def test_a_cancelled_call_leaves_no_answer_for_the_next(
        private_redis: PrivateRedis, admin: redis.Redis) -> None:
    """Envoy's deadline passing cancels the Check while Redis holds its call."""
    b = RedisBackend(private_redis.url, timeout=5.0)
    try:
        await b.charge("org", RULES, [1, 1])
        call = await charge_held_by_redis(b, admin, 500)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await next_call_reads_its_own_answer(b, admin)
    finally:
        await b.close()


async def test_a_lane_closed_during_a_call_leaves_no_connection_open(
        private_redis: PrivateRedis, admin: redis.Redis) -> None:
    """A shutdown while Redis holds a charge: the charge still gets its answer, and its
    connection is closed once it has, not put back on a lane nobody will close again. The
    pool's connection (the script was loaded through it) is closed with the client."""
    b = RedisBackend(private_redis.url, timeout=5.0)
    await b.charge("org", RULES, [1, 1])
    call = await charge_held_by_redis(b, admin, 300)
    await b.close()
    assert (await call).allowed
    assert not b.lane.free
    deadline = time.monotonic() + 2
    while len(await admin.client_list()) > 1:  # the admin's own, once Redis has seen it
        left = [c["cmd"] for c in await admin.client_list()]
        assert time.monotonic() < deadline, f"still open, by last command: {left}"
        await asyncio.sleep(0.01)


async def test_with_every_lane_connection_busy_a_call_goes_the_clients_way(
        private_redis: PrivateRedis, admin: redis.Redis) -> None:
    b = RedisBackend(private_redis.url, timeout=5.0)
    b.lane.size = 1
    try:
        outs = await asyncio.gather(*(b.charge("org", RULES, [1, 1]) for _ in range(8)))
        assert all(o.allowed for o in outs)
        assert sorted(o.states[0].used for o in outs) == list(range(8))
        assert b.lane.opened == 1
        clients = await admin.client_list()
        assert len(clients) >= 3  # the admin, the lane's one, the pool's for the rest
    finally:
        await b.close()


async def test_the_lane_writes_the_bytes_redis_py_would(private_redis: PrivateRedis) -> None:
    """The lane packs with hiredis alone; redis-py encodes each argument first. For the
    arguments of every call the lane makes (a charge, a hold, both in one), the same bytes."""
    counters = RedisBackend(private_redis.url, timeout=5.0)
    spend = RedisSpendStore(private_redis.url, timeout=5.0)
    sent: list[bytes] = []
    packed_by_redis_py: list[bytes] = []
    for lane in (counters.lane, spend.lane):
        def sending(conn: Any, command: list[bytes], _send: Any = lane._call) -> Any:
            sent.append(b"".join(command))
            return _send(conn, command)
        lane._call = sending  # type: ignore[method-assign]
        run, conn = lane.run, lane.client.connection_pool.make_connection()

        async def packing(script: Any, keys: list[str], args: list[Any], _run: Any = run,
                          _conn: Any = conn) -> Any:
            packed_by_redis_py.append(b"".join(
                _conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *args)))
            return await _run(script, keys, args)
        lane.run = packing  # type: ignore[method-assign]
    try:
        budgets = [budget(10**9), budget(10**9, KEY_DAY), budget(5, DAY, False)]
        await counters.charge("org", THREE, [1, 1, 1])
        await spend.hold("org", "req-1", budgets, 1234, 60_000)
        held, charged = await counters._charge_holding(
            spend, "org", "req-é2", budgets, 1234, 60_000, THREE, [1, 1, 1])
        assert held.allowed and charged is not None and charged.allowed
        assert len(sent) == 3 and sent == packed_by_redis_py
    finally:
        await spend.close()
        await counters.close()
