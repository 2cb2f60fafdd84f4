"""Benchmark the Redis scripts alone: Redis's own time per rate-limit charge and per spend batch.

Run: python bench/redis_charge.py [--calls 2000] [--rounds 2] [--baseline DIR] [--redis URL]

Charges the two quotas a gpt-5.4 request of examples/team-ai.yaml meets (requests and tokens per
minute) with every bucket of their windows held (61 each, as a steady load leaves them), all at
one instant (so from the window's kept sum, as every charge but about one a second per counter
is), and reads what Redis spent per call from its own `INFO commandstats` (usec_per_call of
EVALSHA), so neither the client nor the network counts. Then costsink's spend commit of a batch
of 100 requests of one key (its 6 counters: key, project and org, by day and month), once with
no request holding anything (a project without a budget) and once with each holding a budget
hold to release. The client's CPU per budget hold, as a Check places one with its index. A
budgeted Check's hold and charge (services.rate_limit: check) as two calls and as one. And
costsink's settlement of a batch of 100 requests' token reservations: one call each, as before
settle_many, against settle_many's one call; there the client's CPU (the event loop's, which
costsink may share with the Checks) counts as well. `--baseline DIR` loads the charge's and the
spend store's scripts of another checkout (ratelimit/redis_backend.py,
tollway/spend/redis_store.py; e.g. `git worktree add /tmp/base <commit>`) and measures them
interleaved with this one's, on the same Redis, the Check's hold and charge included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest.mock import patch

from common import ROOT

from ratelimit.backend import Settlement
from ratelimit.redis_backend import RedisBackend
from tollway.budgets import Budget, base_counters
from tollway.quotas import Rule
from tollway.spend import Commit

RULES = [Rule("project:p/rpm/requests60", "rpm", "requests", 10**9, 60, True),
         Rule("project:p/tpm/tokens60", "tpm", "tokens", 10**12, 60, True)]
T0 = 1_800_000_000_000  # a fixed "now": every run sees the same full window


def module_of(checkout: Path, package: str, name: str,
              beside: dict[str, ModuleType] | None = None) -> ModuleType:
    """`checkout`'s module `package`.`name`, its imports this checkout's but for `beside`:
    modules by the name they stand in for ("tollway.spend.redis_store"), imported instead
    while it loads (the backend's one-call script is made of the spend store's scripts)."""
    path = checkout.joinpath(*package.split("."), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{package}._bench_{uuid.uuid4().hex}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    sys.modules[spec.name] = module  # a dataclass of the module looks itself up there
    with contextlib.ExitStack() as restore:
        for dotted, stand_in in (beside or {}).items():
            parent, leaf = dotted.rsplit(".", 1)
            restore.enter_context(patch.dict(sys.modules, {dotted: stand_in}))
            restore.enter_context(patch.object(sys.modules[parent], leaf, stand_in))
        spec.loader.exec_module(module)
    return module


async def forget(client_of: Any) -> None:
    """A backend's or store's bench keys (its prefix is the run's own) removed, then closed."""
    keys = [k async for k in client_of.client.scan_iter(f"{client_of.prefix}:*")]
    if keys:
        await client_of.client.delete(*keys)
    await client_of.close()


async def redis_us_per_charge(module: ModuleType, url: str, calls: int) -> float:
    backend = module.RedisBackend(url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    try:
        for i in range(61):  # one charge in every bucket of the window
            await backend.charge("org", RULES, [1, 100], T0 + i * 1000)
        await backend.client.config_resetstat()
        for _ in range(calls):
            await backend.charge("org", RULES, [1, 100], T0 + 60_500)
        stats = await backend.client.info("commandstats")
        return float(stats["cmdstat_evalsha"]["usec_per_call"])
    finally:
        await forget(backend)


async def redis_us_per_spend_batch(module: ModuleType, url: str, batches: int,
                                   held: bool) -> float:
    """Redis's time per commit_many of 100 requests of one key, each holding a budget hold
    or none."""
    store = module.RedisSpendStore(url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    counters = base_counters("acme", "team-ai", "k1", {"day": "2026-12-03", "month": "2026-12"})
    budget = Budget(counters[2], "project:team-ai", "cap", 10**15, True, ())
    spent = 0
    try:
        for b in range(-1, batches):  # -1: unmeasured, Redis loading the script (NOSCRIPT first)
            rids = [f"b{b}-{i}" for i in range(100)]
            if held:
                for rid in rids:
                    await store.hold("acme", rid, [budget], 1000, 60_000)
            await store.client.config_resetstat()  # the commit alone, not the holds
            await store.commit_many([Commit("acme", rid, counters, 7, held=held)
                                     for rid in rids])
            stats = (await store.client.info("commandstats"))["cmdstat_evalsha"]
            if b >= 0:
                assert stats["calls"] == 1, stats
                spent += stats["usec"]
        return spent / batches
    finally:
        await forget(store)


async def client_us_per_hold(module: ModuleType, url: str, calls: int) -> float:
    """The client's CPU (the event loop's, which the Checks share) per budget hold as a Check
    places it, its index by request id written too (drained, as it is apart from the Check
    where it is written after the hold)."""
    store = module.RedisSpendStore(url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    counters = base_counters("acme", "team-ai", "k1", {"day": "2026-12-03", "month": "2026-12"})
    budget = Budget(counters[4], "project:team-ai", "cap", 10**15, True, ())
    try:
        for i in range(-100, calls):  # the first 100 unmeasured: the script loaded, warm
            if i == 0:
                cpu = time.process_time()
            await store.hold("acme", f"h{i}", [budget], 1000, 60_000)
            await asyncio.gather(*store._indexing)
        return (time.process_time() - cpu) / calls * 1e6
    finally:
        await forget(store)


async def check_hold_and_charge(backend_of: ModuleType, store_of: ModuleType, url: str,
                                calls: int, one_call: bool) -> tuple[float, float]:
    """The client's CPU and Redis's time per budgeted, rate-limited Check with
    services.rate_limit: check: its budget hold and its charge of the two quotas, as two calls
    (the hold, then the charge) or as the one call the Check makes when spend and counters
    share a Redis (RedisBackend.holding)."""
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    store = store_of.RedisSpendStore(url, prefix=prefix)
    backend = backend_of.RedisBackend(url, prefix=prefix)
    counters = base_counters("acme", "team-ai", "k1", {"day": "2026-12-03", "month": "2026-12"})
    budgets = [Budget(counters[4], "project:team-ai", "cap", 10**15, True, ())]
    in_one_step = backend.holding(store)
    assert in_one_step is not None
    try:
        for i in range(-100, calls):  # the first 100 unmeasured: the scripts loaded, warm
            if i == 0:
                await backend.client.config_resetstat()
                cpu = time.process_time()
            if one_call:
                await in_one_step("acme", f"c{i}", budgets, 1000, 60_000, RULES, [1, 100])
            else:
                await store.hold("acme", f"c{i}", budgets, 1000, 60_000)
                await backend.charge("acme", RULES, [1, 100])
        cpu = (time.process_time() - cpu) / calls
        stats = (await backend.client.info("commandstats"))["cmdstat_evalsha"]
        return cpu * 1e6, stats["usec"] / calls
    finally:
        await forget(backend)
        await store.close()


async def settlement_of_100(url: str, batches: int, many: bool) -> tuple[float, float]:
    """The client's CPU and Redis's time per batch of 100 settlements (two token quotas each,
    charged over a second and a half, as a 0.1 s access-log flush of a busy key brings them),
    one call each or settle_many's one."""
    backend = RedisBackend(url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    now = int(time.time() * 1000)
    settlements = [Settlement("org", RULES, now - 15 * i, -(i % 50) - 1) for i in range(100)]
    try:
        await backend.charge("org", RULES, [1, 1])
        await backend.client.config_resetstat()
        cpu = time.process_time()
        for _ in range(batches):
            if many:
                await backend.settle_many(settlements)
            else:
                await asyncio.gather(*(backend.settle(s.org, s.rules, s.charged_at_ms, s.delta)
                                       for s in settlements))
        cpu = (time.process_time() - cpu) / batches
        stats = (await backend.client.info("commandstats"))["cmdstat_evalsha"]
        return cpu * 1e6, stats["usec"] / batches
    finally:
        await forget(backend)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", type=Path, help="another checkout to measure alongside")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    checkouts = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline
                                  else {})}
    stores = {name: module_of(path, "tollway.spend", "redis_store")
              for name, path in checkouts.items()}
    backends = {name: module_of(path, "ratelimit", "redis_backend",
                                beside={"tollway.spend.redis_store": stores[name]})
                for name, path in checkouts.items()}
    measures = {"charge": lambda name: redis_us_per_charge(backends[name], args.redis,
                                                           args.calls),
                "spend batch of 100, no holds": lambda name: redis_us_per_spend_batch(
                    stores[name], args.redis, args.calls // 100, held=False),
                "spend batch of 100, each held": lambda name: redis_us_per_spend_batch(
                    stores[name], args.redis, args.calls // 100, held=True)}
    for what, measure in measures.items():
        runs: dict[str, list[float]] = {name: [] for name in checkouts}
        for _ in range(args.rounds):  # interleaved: both see the same Redis and machine
            for name in checkouts:
                runs[name].append(await measure(name))
        for name, us in runs.items():
            print(f"{name:9} Redis time per {what}: " + ", ".join(f"{u:.1f} us" for u in us))
        if "baseline" in runs:
            print(f"this / baseline: {sum(runs['this']) / sum(runs['baseline']):.2f}x")
    holds: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name in checkouts:
            holds[name].append(await client_us_per_hold(stores[name], args.redis, args.calls))
    for name, us in holds.items():
        print(f"{name:9} client CPU per budget hold: " + ", ".join(f"{u:.0f} us" for u in us))
    if "baseline" in holds:
        print(f"this / baseline: {sum(holds['this']) / sum(holds['baseline']):.2f}x")
    for _ in range(args.rounds):
        for name in checkouts:
            for one_call, how in ((False, "two calls"), (True, "one call")):
                cpu, redis_us = await check_hold_and_charge(
                    backends[name], stores[name], args.redis, args.calls, one_call)
                print(f"{name:9} a Check's hold and charge, {how:9}: client CPU {cpu:,.0f} "
                      f"us, Redis {redis_us:,.0f} us")
    for _ in range(args.rounds):
        for many, how in ((False, "one call each"), (True, "settle_many")):
            cpu, redis_us = await settlement_of_100(args.redis, args.calls // 100, many)
            print(f"settlement of 100, {how:13}: client CPU {cpu:,.0f} us, "
                  f"Redis {redis_us:,.0f} us")


if __name__ == "__main__":
    asyncio.run(main())
