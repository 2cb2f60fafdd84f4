"""Redis backend: the bucketed sliding window of `backend.py`, in one server-side Lua script.

One script call per request checks and charges every rule, so concurrent replicas can never
interleave between the check and the charge. Keys are `tollway:{<org>}:rl:<counter>:<period>`:
the `{org}` hash tag puts all counters of a request in one Redis Cluster slot. Each key is a
hash of bucket → amount, trimmed to the window and given a TTL, so nothing grows without bound,
and the window's sum kept beside the buckets.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from redis.exceptions import RedisError

from tollway.budgets import Budget
from tollway.quotas import Rule
from tollway.redis_client import Lane, connect
from tollway.spend import HoldOutcome, SpendStore
from tollway.spend import redis_store as spend_scripts
from tollway.spend.redis_store import RedisSpendStore

from .backend import (
    BUCKETS,
    BackendUnavailable,
    CounterBackend,
    HoldingCharge,
    Outcome,
    RuleState,
    Settlement,
)

# the time the script works with: ARGV[n] in ms, or Redis's own clock when that is 0
NOW = """
local now = tonumber(ARGV[%d])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# Beside its buckets, each counter keeps the sum of its window, so that a charge reads four
# fields instead of every bucket (HGETALL of 61, parsed in Lua: most of Redis's time for a
# request, on its path). Kept under fields a bucket can never have (negative numbers), which an
# older script takes for buckets long gone and drops, so replicas of either version can share
# a counter during a rolling upgrade:
#   -1: the bucket the sum is for (the window moves: summed again from the buckets)
#   -2: the window's sum;  -3: its oldest bucket holding a positive amount (-1: none)
#   -4: when it was summed from the buckets: again after a second, whatever happened, so that
#       nothing else writing a bucket (an older replica's settlement) leaves it off for longer
# The refusal path still reads every bucket (the retry needs them in order).
#
# ARGV: now_ms, buckets, then per rule: limit, width_ms, cost, enforce (1/0)
# returns: allowed, then per rule: used, reset_ms, retry_ms (-1: never)
CHARGE = NOW % 1 + """
local n = tonumber(ARGV[2])
local result = {1}
local denied = false
local plan = {}
for i = 1, #KEYS do
  local base = 2 + (i - 1) * 4
  local limit = tonumber(ARGV[base + 1])
  local w = tonumber(ARGV[base + 2])
  local cost = tonumber(ARGV[base + 3])
  local enforce = ARGV[base + 4] == '1'
  local b = math.floor(now / w)
  local lo = b - n
  local kept = redis.call('HMGET', KEYS[i], '-1', '-2', '-3', '-4')
  local summed = tonumber(kept[4])
  local used, oldest, left, all = 0, nil, {}, nil
  if tonumber(kept[1]) == b and kept[2] and kept[3] and summed and summed <= now
      and now < summed + 1000 then
    used = tonumber(kept[2])
    oldest = tonumber(kept[3])
    if oldest < 0 then oldest = nil end
  else
    summed = now
    all = redis.call('HGETALL', KEYS[i])
    for j = 1, #all, 2 do
      local f = tonumber(all[j])
      if f < 0 then  -- the kept fields, written anew below
      elseif f < lo then
        left[#left + 1] = all[j]
      elseif f <= b then
        local v = tonumber(all[j + 1])
        used = used + v
        if v > 0 and (oldest == nil or f < oldest) then oldest = f end
      end
    end
  end
  local first = oldest
  if first == nil and cost > 0 and used + cost <= limit then first = b end
  local reset = 0
  if first ~= nil then reset = (first + n + 1) * w - now end
  local retry = 0
  if used + cost > limit then
    if cost > limit then retry = -1 else
      all = all or redis.call('HGETALL', KEYS[i])
      local window = {}  -- the window's buckets, oldest first
      for j = 1, #all, 2 do
        local f = tonumber(all[j])
        if f >= lo and f <= b then window[#window + 1] = {f, tonumber(all[j + 1])} end
      end
      table.sort(window, function(x, y) return x[1] < y[1] end)
      local freed = 0
      for _, bv in ipairs(window) do
        freed = freed + bv[2]
        if used - freed + cost <= limit then
          retry = (bv[1] + n + 1) * w - now
          break
        end
      end
    end
    if enforce then denied = true end
  end
  if oldest == nil and cost > 0 then oldest = b end
  plan[i] = {b, cost, w, left, used + cost, oldest or -1, summed}
  result[#result + 1] = used
  result[#result + 1] = reset
  result[#result + 1] = retry
end
if denied then
  result[1] = 0
  return result
end
for i = 1, #KEYS do
  local b, cost, w, left, sum, oldest, summed = unpack(plan[i])
  redis.call('HINCRBY', KEYS[i], tostring(b), cost)
  if #left > 0 then redis.call('HDEL', KEYS[i], unpack(left)) end
  redis.call('HSET', KEYS[i], '-1', b, '-2', sum, '-3', oldest, '-4', summed)
  redis.call('PEXPIRE', KEYS[i], (n + 2) * w)
end
return result
"""

# Reservations corrected in the buckets they were charged to, if still inside the window, an
# org's at once, summed by counter and bucket, and in the window's kept sum where it counts
# that bucket. A correction that empties a bucket or fills an empty one may move the oldest
# counted bucket: then the sum is dropped, to be summed again from the buckets at the next
# charge. ARGV: now_ms, buckets, then per counter and bucket: key index, bucket, width_ms, delta
SETTLE = NOW % 1 + """
local n = tonumber(ARGV[2])
for p = 3, #ARGV, 4 do
  local key = KEYS[tonumber(ARGV[p])]
  local b, w = tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2])
  local delta = tonumber(ARGV[p + 3])
  if b >= math.floor(now / w) - n and redis.call('EXISTS', key) == 1 then
    local v = redis.call('HINCRBY', key, tostring(b), ARGV[p + 3])
    local at = tonumber(redis.call('HGET', key, '-1'))
    if at then
      if (v - delta > 0) ~= (v > 0) then
        redis.call('HDEL', key, '-1')
      elseif b >= at - n and b <= at then
        redis.call('HINCRBY', key, '-2', ARGV[p + 3])
      end
    end
  end
end
return 1
"""


# A Check's budget hold and its rate-limit charge (services.rate_limit: check) in one call,
# taken as the two calls one after the other took them (the hold, then the charge, the hold
# released if the charge is refused): the hold decided, the charge made only if the hold is
# allowed, then the hold placed only if the charge was made. The hold is decided once: the
# charge touches only the rate-limit keys, so the hold's keys are as the decision read them.
# Each script's steps run as they run alone, given its own KEYS and ARGV. KEYS: the hold's,
# then the charge's. ARGV: how many of the keys and of the arguments are the hold's, the
# hold's arguments, the charge's. Returns {the hold's answer}, or {the hold's answer, the
# charge's} once the hold allows.
HOLD_AND_CHARGE = (
    "local function hold(KEYS, ARGV)\n" + spend_scripts.COMMON + spend_scripts.HOLD_DECIDE
    + "return out, function()\n" + spend_scripts.HOLD_PLACE + "end\nend\n"
    "local function charge(KEYS, ARGV)\n" + CHARGE + "end\n" + """
local nk, na = tonumber(ARGV[1]), tonumber(ARGV[2])
local held, place = hold({unpack(KEYS, 1, nk)}, {unpack(ARGV, 3, 2 + na)})
if held[1] == 0 then return {held} end
local charged = charge({unpack(KEYS, nk + 1)}, {unpack(ARGV, 3 + na)})
if charged[1] == 1 then held = place() end
return {held, charged}
""")


class RedisBackend(CounterBackend):
    def __init__(self, url: str, *, timeout: float = 0.25, prefix: str = "tollway",
                 max_connections: int = 64) -> None:
        self.url = url
        self.prefix = prefix
        self.client = connect(url, timeout=timeout, max_connections=max_connections)
        self.lane = Lane(self.client, max_connections, timeout)  # the request path's calls
        self._charge = self.client.register_script(CHARGE)
        self._settle = self.client.register_script(SETTLE)
        self._hold_and_charge = self.client.register_script(HOLD_AND_CHARGE)

    def key(self, org: str, rule: Rule) -> str:
        return f"{self.prefix}:{{{org}}}:rl:{rule.counter}:{rule.period}"

    def _charge_args(self, rules: list[Rule], costs: list[int],
                     now_ms: int | None) -> list[int]:
        # Redis's clock by default: every replica then orders charges as Redis executes them,
        # whatever their own clocks say
        args: list[int] = [now_ms or 0, BUCKETS]
        for r, c in zip(rules, costs, strict=True):
            args += [r.limit, r.period * 1000 // BUCKETS, c, 1 if r.enforce else 0]
        return args

    @staticmethod
    def _outcome(rules: list[Rule], costs: list[int], raw: list[Any]) -> Outcome:
        states = []
        for i, r in enumerate(rules):
            used, reset, retry = (int(x) for x in raw[1 + 3 * i: 4 + 3 * i])
            states.append(RuleState(rule=r, used=used, reset_seconds=reset / 1000,
                                    retry_seconds=math.inf if retry < 0 else retry / 1000))
        return Outcome(allowed=bool(int(raw[0])), states=states, costs=costs)

    async def charge(self, org: str, rules: list[Rule], costs: list[int],
                     now_ms: int | None = None) -> Outcome:
        try:
            raw = await self.lane.run(self._charge, [self.key(org, r) for r in rules],
                                      self._charge_args(rules, costs, now_ms))
        except (RedisError, OSError) as e:
            raise BackendUnavailable(f"redis: {e}") from e
        return self._outcome(rules, costs, raw)

    def holding(self, spend: SpendStore) -> HoldingCharge | None:
        """With spend in the same Redis (one storage.counters URL): both in one script call.
        A Check's two calls to Redis cost the services' loop about 0.2 ms of CPU each."""
        if not isinstance(spend, RedisSpendStore) or spend.url != self.url:
            return None
        return functools.partial(self._charge_holding, spend)

    async def _charge_holding(self, spend: RedisSpendStore, org: str, request_id: str,
                              budgets: list[Budget], amount: int, ttl_ms: int,
                              rules: list[Rule], costs: list[int],
                              now_ms: int | None = None) -> tuple[HoldOutcome, Outcome | None]:
        hold = spend.hold_call(org, request_id, budgets, amount, ttl_ms, now_ms)
        try:
            raw = await self.lane.run(
                self._hold_and_charge, [*hold.keys, *(self.key(org, r) for r in rules)],
                [len(hold.keys), len(hold.args), *hold.args,
                 *self._charge_args(rules, costs, now_ms)])
        except (RedisError, OSError) as e:
            raise BackendUnavailable(f"redis: {e}") from e
        if len(raw) == 1:
            return spend.held(hold, raw[0]), None
        charged = self._outcome(rules, costs, raw[1])
        return spend.held(hold, raw[0], placed=charged.allowed), charged

    async def settle(self, org: str, rules: list[Rule], charged_at_ms: int, delta: int,
                     now_ms: int | None = None) -> None:
        await self.settle_many([Settlement(org, rules, charged_at_ms, delta)], now_ms)

    async def settle_many(self, settlements: list[Settlement],
                          now_ms: int | None = None) -> None:
        """One script call per org for the batch: the client's work per call (about 0.2 ms
        of the loop's CPU) is most of a settlement's cost, and a batch's reservations mostly
        share their counters and buckets, so they go summed."""
        by_org: dict[str, dict[tuple[str, int, int], int]] = {}
        for s in settlements:
            if not s.delta:
                continue
            sums = by_org.setdefault(s.org, {})
            for r in s.rules:
                width = r.period * 1000 // BUCKETS
                at = (self.key(s.org, r), s.charged_at_ms // width, width)
                sums[at] = sums.get(at, 0) + s.delta
        try:
            for sums in by_org.values():
                live = [(at, delta) for at, delta in sums.items() if delta]
                if not live:
                    continue
                keys = list(dict.fromkeys(key for (key, _, _), _ in live))
                index = {key: i + 1 for i, key in enumerate(keys)}
                args: list[int] = [now_ms or 0, BUCKETS]
                for (key, bucket, width), delta in live:
                    args += [index[key], bucket, width, delta]
                await self._settle(keys=keys, args=args)
        except (RedisError, OSError) as e:
            raise BackendUnavailable(f"redis: {e}") from e

    async def close(self) -> None:
        await self.lane.close()
        await self.client.aclose()
