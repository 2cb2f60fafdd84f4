"""Benchmark the Redis counter script alone: Redis's own time per charge.

Run: python bench/redis_charge.py [--calls 2000] [--rounds 2] [--baseline DIR] [--redis URL]

Charges the two quotas a gpt-5.4 request of examples/team-ai.yaml meets (requests and tokens per
minute) with every bucket of their windows held (61 each, as a steady load leaves them), and
reads what Redis spent per call from its own `INFO commandstats` (usec_per_call of EVALSHA), so
neither the client nor the network counts. `--baseline DIR` loads the script of another
checkout's ratelimit/redis_backend.py (e.g. `git worktree add /tmp/base <commit>`) and measures
it interleaved with this one, on the same Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import uuid
from pathlib import Path
from types import ModuleType

from common import ROOT

from tollway.quotas import Rule

RULES = [Rule("project:p/rpm/requests60", "rpm", "requests", 10**9, 60, True),
         Rule("project:p/tpm/tokens60", "tpm", "tokens", 10**12, 60, True)]
T0 = 1_800_000_000_000  # a fixed "now": every run sees the same full window


def redis_backend_of(checkout: Path) -> ModuleType:
    """`checkout`'s ratelimit/redis_backend.py, its relative imports this checkout's."""
    path = checkout / "ratelimit" / "redis_backend.py"
    spec = importlib.util.spec_from_file_location(f"ratelimit._bench_{uuid.uuid4().hex}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "ratelimit"
    spec.loader.exec_module(module)
    return module


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
        keys = [k async for k in backend.client.scan_iter(f"{backend.prefix}:*")]
        if keys:
            await backend.client.delete(*keys)
        await backend.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", type=Path, help="another checkout to measure alongside")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args()
    checkouts = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline
                                  else {})}
    modules = {name: redis_backend_of(path) for name, path in checkouts.items()}
    runs: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(args.rounds):  # interleaved: both see the same Redis and machine
        for name, module in modules.items():
            runs[name].append(await redis_us_per_charge(module, args.redis, args.calls))
    for name, us in runs.items():
        print(f"{name:9} Redis time per charge: " + ", ".join(f"{u:.1f} us" for u in us))
    if "baseline" in runs:
        print(f"this / baseline: {sum(runs['this']) / sum(runs['baseline']):.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
