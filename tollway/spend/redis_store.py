"""Redis spend store: the steps of the memory store, each in one server-side Lua script.

Per counter, a hash `tollway:{<org>}:sp:<counter>` (fields `spent`, `held`, `h:<request id>` for
each hold, `a:<mark>` for fired alerts) and a sorted set `...:exp` of holds by expiry. Every
script first releases the counter's expired holds, so `held` never counts a request that can no
longer be running. Money is added with HINCRBY on the strings it arrives in (exact 64-bit
integers); only the budget comparison happens in Lua's doubles, exact below 2^53 units.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisError

from tollway.budgets import Budget, SpendCounter
from tollway.redis_client import Lane, connect

from . import ORPHAN_MARK_MS, Commit, HoldOutcome, SpendStore, SpendUnavailable, hold_states

# what an orphaned request's index key holds instead of where its hold lives
ORPHANED = "orphaned"

COMMON = """
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function release(h, z, rid)
  local a = redis.call('HGET', h, 'h:' .. rid)
  if a then
    redis.call('HINCRBY', h, 'held', -tonumber(a))
    redis.call('HDEL', h, 'h:' .. rid)
  end
  redis.call('ZREM', z, rid)
end
local function purge(h, z)
  for _, rid in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now)) do release(h, z, rid) end
end
local function state(h)
  return {redis.call('HGET', h, 'spent') or '0', redis.call('HGET', h, 'held') or '0'}
end
"""

# KEYS: hash, zset per counter, and the request's index key where it is written here. ARGV:
# now, amount, request id, hold ttl ms, counters, then per counter: ttl s, hold here (1/0); then
# budgets, then per budget: counter index, limit, enforce; then, with the index key, what the
# index holds. Returns: allowed (1/0), then per counter: spent, held (before this request).
# In two parts: HOLD_DECIDE changes nothing but expired holds, and returns a refusal at once;
# HOLD_PLACE places what it allowed. A script that charges the rate limit too
# (ratelimit/redis_backend.py) decides, then places the hold only where the charge is made.
HOLD_DECIDE = """
local amount, rid, hold_ttl = tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local out, spent, held = {1}, {}, {}
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  purge(h, z)
  local s = state(h)
  spent[i], held[i] = tonumber(s[1]), tonumber(s[2])
  out[#out + 1] = s[1]
  out[#out + 1] = s[2]
end
local base = 6 + 2 * n
for j = 0, tonumber(ARGV[base]) - 1 do
  local i = tonumber(ARGV[base + 1 + 3 * j])
  local limit = tonumber(ARGV[base + 2 + 3 * j])
  if ARGV[base + 3 + 3 * j] == '1' and spent[i] + held[i] + amount > limit then out[1] = 0 end
end
if out[1] == 0 then return out end
"""
HOLD_PLACE = """
local index = KEYS[2 * n + 1]
if index and not redis.call('SET', index, ARGV[#ARGV], 'PX', hold_ttl, 'NX') then
  return out  -- costsink marked the request orphaned already: Envoy gave up on this Check
end
for i = 1, n do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  if ARGV[5 + 2 * i] == '1' and redis.call('HEXISTS', h, 'h:' .. rid) == 0 then
    redis.call('HSET', h, 'h:' .. rid, ARGV[2])
    redis.call('HINCRBY', h, 'held', ARGV[2])
    redis.call('ZADD', z, now + hold_ttl, rid)
  end
  redis.call('EXPIRE', h, ARGV[4 + 2 * i])
  redis.call('EXPIRE', z, ARGV[4 + 2 * i])
end
return out
"""

HOLD = COMMON + HOLD_DECIDE + HOLD_PLACE

# KEYS: hash, zset per counter. ARGV: now, amount, request id, then per counter: ttl s.
# Returns each counter's new spent.
COMMIT = COMMON + """
local rid = ARGV[3]
local out = {}
for i = 1, #KEYS / 2 do
  local h, z = KEYS[2 * i - 1], KEYS[2 * i]
  purge(h, z)
  release(h, z, rid)
  redis.call('HINCRBY', h, 'spent', ARGV[2])
  redis.call('EXPIRE', h, ARGV[3 + i])
  out[i] = redis.call('HGET', h, 'spent')
end
return out
"""

# A batch of commits of one org in one call, applied once: KEYS: hash, zset per distinct
# counter, then the batch's marker (named by its request ids: a retried batch finds it). ARGV:
# now, counters, each counter's ttl s, then per shape (the commits adding to the same
# counters): k, its k counter indexes, the shape's total amount, m, its m request ids. A batch
# is mostly one or two shapes, so the arguments are about one per commit, not a dozen.
# Returns each counter's spent after the whole batch.
COMMIT_BATCH = COMMON + """
-- release() for a shape's requests at once: one HMGET finds which of them hold anything here
-- (most requests of a project without a budget hold nothing), so a request without a hold
-- costs no HGET and ZREM of its own per counter. A hold's field and its expiry entry are made
-- and dropped together, so a request without the field has no entry to drop; purge() keeps
-- release()'s unconditional ZREM, for the entries it finds expired
-- (1,000 at a time: unpack cannot spread more than Lua's stack holds, and a shutdown's
-- drain sends a batch of whatever was queued)
local function release_all(h, z, rids, fields)
  for first = 1, #fields, 1000 do
    local last = math.min(first + 999, #fields)
    local amounts = redis.call('HMGET', h, unpack(fields, first, last))
    local held_fields, held_rids = {}, {}
    for r = first, last do
      local a = amounts[r - first + 1]
      if a then
        redis.call('HINCRBY', h, 'held', -tonumber(a))
        held_fields[#held_fields + 1] = fields[r]
        held_rids[#held_rids + 1] = rids[r]
      end
    end
    if #held_fields > 0 then
      redis.call('HDEL', h, unpack(held_fields))
      redis.call('ZREM', z, unpack(held_rids))
    end
  end
end
local n = tonumber(ARGV[2])
local fresh = redis.call('SET', KEYS[#KEYS], '1', 'NX', 'EX', 172800)
for i = 1, n do purge(KEYS[2 * i - 1], KEYS[2 * i]) end
local p = 3 + n
while fresh and p <= #ARGV do
  local k = tonumber(ARGV[p])
  local amount, m = ARGV[p + k + 1], tonumber(ARGV[p + k + 2])
  local rids, fields = {}, {}
  for r = 1, m do
    rids[r] = ARGV[p + k + 2 + r]
    fields[r] = 'h:' .. rids[r]
  end
  for j = 1, k do
    local i = tonumber(ARGV[p + j])
    local h, z = KEYS[2 * i - 1], KEYS[2 * i]
    if m > 0 then release_all(h, z, rids, fields) end
    if amount ~= '0' then redis.call('HINCRBY', h, 'spent', amount) end
  end
  p = p + k + 3 + m
end
local out = {}
for i = 1, n do
  redis.call('EXPIRE', KEYS[2 * i - 1], ARGV[2 + i])
  out[i] = redis.call('HGET', KEYS[2 * i - 1], 'spent') or '0'
end
return out
"""

# KEYS: hash, zset per counter. ARGV: now. Returns spent, held per counter.
READ = COMMON + """
local out = {}
for i = 1, #KEYS / 2 do
  purge(KEYS[2 * i - 1], KEYS[2 * i])
  local s = state(KEYS[2 * i - 1])
  out[#out + 1] = s[1]
  out[#out + 1] = s[2]
end
return out
"""


@dataclass(frozen=True)
class HoldCall:
    """One hold's call of the HOLD script, and what reading its answer needs."""

    org: str
    request_id: str
    ttl_ms: int
    budgets: list[Budget]
    amount: int
    counters: list[SpendCounter]  # distinct, in the order of the script's keys
    held_on: list[SpendCounter]  # those of enforced budgets, in the same order
    keys: list[str]
    args: list[int | str]
    indexed_here: bool  # the script writes the request id's index (a single Redis)


class RedisSpendStore(SpendStore):
    def __init__(self, url: str, *, timeout: float = 0.25, prefix: str = "tollway",
                 max_connections: int = 64) -> None:
        self.url = url
        self.prefix = prefix
        self.client = connect(url, timeout=timeout, max_connections=max_connections)
        self.lane = Lane(self.client, max_connections, timeout)  # the Check's hold
        self._hold = self.client.register_script(HOLD)
        self._commit = self.client.register_script(COMMIT)
        self._read = self.client.register_script(READ)
        self._commit_batch = self.client.register_script(COMMIT_BATCH)
        # A hold is indexed by its request id, under a key of its own: the hold script writes
        # it, in the same call, on a single Redis; in a Cluster the index lies in another slot
        # than the org's counters, so it is written after the hold, apart from the Check
        self._index_in_hold = not isinstance(self.client, RedisCluster)
        self._indexing: set[asyncio.Task[None]] = set()

    def _keys(self, org: str, counters: list[SpendCounter]) -> list[str]:
        out = []
        for c in counters:
            h = f"{self.prefix}:{{{org}}}:sp:{c.key}"
            out += [h, f"{h}:exp"]
        return out

    def hold_call(self, org: str, request_id: str, budgets: list[Budget], amount: int,
                  ttl_ms: int, now_ms: int | None = None) -> HoldCall:
        """The HOLD script's keys and arguments, for hold() or a script that runs its steps
        beside a rate-limit charge."""
        counters = list(dict.fromkeys(b.counter for b in budgets))
        index = {c: i + 1 for i, c in enumerate(counters)}
        held_on = {b.counter for b in budgets if b.enforce}
        args: list[int | str] = [now_ms or 0, amount, request_id, ttl_ms, len(counters)]
        for c in counters:
            args += [c.ttl_seconds, 1 if c in held_on else 0]
        args.append(len(budgets))
        for b in budgets:
            args += [index[b.counter], b.limit, 1 if b.enforce else 0]
        keys = self._keys(org, counters)
        held_in_order = [c for c in counters if c in held_on]
        indexed_here = self._index_in_hold and bool(held_on)
        if indexed_here:
            keys.append(self._index_key(request_id))
            args.append(self._where(org, held_in_order))
        return HoldCall(org, request_id, ttl_ms, budgets, amount, counters, held_in_order,
                        keys, args, indexed_here)

    async def hold(self, org: str, request_id: str, budgets: list[Budget], amount: int,
                   ttl_ms: int, now_ms: int | None = None) -> HoldOutcome:
        call = self.hold_call(org, request_id, budgets, amount, ttl_ms, now_ms)
        try:
            raw = await self.lane.run(self._hold, call.keys, call.args)
        except (RedisError, OSError) as e:
            raise SpendUnavailable(f"redis: {e}") from e
        return self.held(call, raw)

    def held(self, call: HoldCall, raw: list[Any], placed: bool = True) -> HoldOutcome:
        """The HOLD script's answer read. `placed`: the script held what it allowed (a hold
        beside a refused charge is not); such a hold is indexed by its request id now, where
        the script could not."""
        values = {c.key: (int(raw[1 + 2 * i]), int(raw[2 + 2 * i]))
                  for i, c in enumerate(call.counters)}
        outcome = hold_states(call.budgets, values, call.amount)
        assert outcome.allowed == bool(int(raw[0])), "the script and hold_states disagree"
        if placed and outcome.allowed and call.held_on and not call.indexed_here:
            # not awaited: the Check need not wait for it, and an orphan's log entry arrives
            # long after (Envoy's timeout, then the access-log flush)
            task = asyncio.create_task(self._index(call.org, call.request_id, call.held_on,
                                                   call.ttl_ms))
            self._indexing.add(task)
            task.add_done_callback(self._indexing.discard)
        return outcome

    async def _index(self, org: str, request_id: str, held_on: list[SpendCounter],
                     ttl_ms: int) -> None:
        """Index the hold by its request id, unless costsink has marked the id orphaned
        (the key holds the mark): then Envoy answered without this Check, release the hold."""
        with contextlib.suppress(RedisError, OSError, SpendUnavailable):  # it expires anyway
            if not await self.client.set(self._index_key(request_id),
                                         self._where(org, held_on), px=ttl_ms, nx=True):
                await self.commit(org, request_id, held_on, 0)

    @staticmethod
    def _where(org: str, held_on: list[SpendCounter]) -> str:
        """Where a hold lives, for a log entry that cannot say (release_orphans); under its
        own key, outside the org's slot: the log entry does not know the org either."""
        return json.dumps([org, [[c.name, c.period, c.label, list(c.models)]
                                 for c in held_on]])

    def _index_key(self, request_id: str) -> str:
        return f"{self.prefix}:hold:{request_id}"

    async def release_orphans(self, request_ids: list[str]) -> int:
        if not request_ids:
            return 0
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for r in request_ids:  # one by one: the keys lie in different slots
                    # the mark in place of the index, and the index it replaced (Redis 6.2)
                    pipe.set(self._index_key(r), ORPHANED, px=ORPHAN_MARK_MS, get=True)
                found = await pipe.execute()
        except (RedisError, OSError) as e:
            raise SpendUnavailable(f"redis: {e}") from e
        released = 0
        for rid, raw in zip(request_ids, found, strict=True):
            if raw is None or raw == ORPHANED.encode():
                continue
            org, specs = json.loads(raw)
            counters = [SpendCounter(name, period, label, tuple(models))
                        for name, period, label, models in specs]
            await self.commit(org, rid, counters, 0)
            released += 1
        return released

    async def commit(self, org: str, request_id: str, counters: list[SpendCounter],
                     amount: int, now_ms: int | None = None) -> list[int]:
        try:
            raw = await self._commit(keys=self._keys(org, counters),
                                     args=[now_ms or 0, amount, request_id,
                                           *(c.ttl_seconds for c in counters)])
            if request_id:
                await self.client.delete(self._index_key(request_id))
        except (RedisError, OSError) as e:
            raise SpendUnavailable(f"redis: {e}") from e
        return [int(x) for x in raw]

    async def commit_many(self, commits: list[Commit]) -> list[list[int]]:
        """One script call per org (one Cluster slot) for the whole batch. Each commit gets its
        counters' values after the batch, which is what alert thresholds compare. A batch
        retried after an error that hid whether it was applied (a timeout) is applied once:
        the script marks it applied for two days, by its request ids."""
        by_org: dict[str, list[Commit]] = {}
        for c in commits:
            by_org.setdefault(c.org, []).append(c)
        after: dict[int, list[int]] = {}  # by id(commit): its counters' values after
        try:
            for org, group in by_org.items():
                # commits of one shape share their counters list (the recorder builds it
                # once per key, model and minute); an equal list apart is a shape of its own
                shapes: dict[int, tuple[list[SpendCounter], list[Commit]]] = {}
                for c in group:
                    shapes.setdefault(id(c.counters), (c.counters, []))[1].append(c)
                counters = list(dict.fromkeys(x for cs, _ in shapes.values() for x in cs))
                index = {x: i + 1 for i, x in enumerate(counters)}
                args: list[int | str] = [0, len(counters), *(x.ttl_seconds for x in counters)]
                for cs, members in shapes.values():
                    args += [len(cs), *(index[x] for x in cs),
                             sum(c.amount for c in members), len(members),
                             *(c.request_id for c in members)]
                marker = hashlib.sha256("\n".join(c.request_id for c in group).encode())
                raw = await self._commit_batch(
                    keys=[*self._keys(org, counters),
                          f"{self.prefix}:{{{org}}}:applied:{marker.hexdigest()[:32]}"],
                    args=args)
                spent = dict(zip(counters, map(int, raw), strict=True))
                for cs, members in shapes.values():
                    values = [spent[x] for x in cs]  # one list for the shape: read only
                    after.update((id(c), values) for c in members)
            indexed = [self._index_key(c.request_id) for c in commits if c.held]
            if indexed:
                async with self.client.pipeline(transaction=False) as pipe:
                    for key in indexed:  # one by one: the keys lie in different slots
                        pipe.delete(key)
                    await pipe.execute()
        except (RedisError, OSError) as e:
            raise SpendUnavailable(f"redis: {e}") from e
        return [after[id(c)] for c in commits]

    async def read(self, org: str, counters: list[SpendCounter],
                   now_ms: int | None = None) -> list[tuple[int, int]]:
        if not counters:
            return []
        try:
            raw = await self._read(keys=self._keys(org, counters), args=[now_ms or 0])
        except (RedisError, OSError) as e:
            raise SpendUnavailable(f"redis: {e}") from e
        return [(int(raw[2 * i]), int(raw[2 * i + 1])) for i in range(len(counters))]

    async def first_alert(self, org: str, counter: SpendCounter, mark: str) -> bool:
        try:
            key = self._keys(org, [counter])[0]
            return bool(await self.client.hsetnx(key, f"a:{mark}", 1))
        except (RedisError, OSError) as e:
            raise SpendUnavailable(f"redis: {e}") from e

    async def set_spent(self, org: str, values: list[tuple[SpendCounter, int]]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for c, spent in values:
                    key = self._keys(org, [c])[0]
                    pipe.hset(key, "spent", spent)
                    pipe.expire(key, c.ttl_seconds)
                await pipe.execute()
        except (RedisError, OSError) as e:
            raise SpendUnavailable(f"redis: {e}") from e

    async def claim_rebuild(self) -> bool:
        """The marker lives as long as Redis keeps its data: a restart without persistence, a
        FLUSHALL or a failover to an empty replica removes it, and the first costsink to notice
        claims the rebuild."""
        try:
            return bool(await self.client.set(f"{self.prefix}:spend:rebuilt", "1", nx=True))
        except (RedisError, OSError) as e:
            raise SpendUnavailable(f"redis: {e}") from e

    async def unclaim_rebuild(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.client.delete(f"{self.prefix}:spend:rebuilt")

    async def close(self) -> None:
        await asyncio.gather(*self._indexing, return_exceptions=True)
        await self.lane.close()
        await self.client.aclose()
