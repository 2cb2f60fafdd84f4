"""Benchmark redis-py's own work per call: the client's instructions, counted by callgrind.

Run: python bench/redis_client.py [--calls 200]   (needs valgrind: apt-get install valgrind)

What a Redis call costs the event loop that makes it (the Checks' loop, for a charge or a budget
hold), apart from Redis's own time (bench/redis_charge.py): a rate-limit charge of two quotas
(ratelimit's RedisBackend), a budget hold (the spend store's) and costsink's spend commit of a
batch of 100 requests. Each runs `--calls` times in a process under `valgrind --tool=callgrind`,
after a warm-up (the connection, the scripts loaded), and once with no calls; the difference
over the calls is the instructions per call: the same count whatever else the machine is doing,
where seconds on a shared 2-core machine moved by ±20% between runs of the same code. Each is
measured with hiredis, redis-py's C reply parser (a dependency), and with it hidden from
redis-py (its pure-Python parser), in the same run against the same Redis.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT

REDIS = os.environ.get("TOLLWAY_BENCH_REDIS", "redis://127.0.0.1:6379/0")

# run in the measured process: warm up, then `calls` calls of one kind
CHILD = """
import asyncio, sys, uuid
from ratelimit.redis_backend import RedisBackend
from tollway.budgets import Budget, base_counters
from tollway.spend import Commit
from tollway.spend.redis_store import RedisSpendStore
from tollway.quotas import Rule

kind, calls, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
prefix = "bench-" + uuid.uuid4().hex[:8]
RULES = [Rule("p/rpm/1", "rpm", "requests", 10**9, 60, True),
         Rule("p/tpm/1", "tpm", "tokens", 10**12, 60, True)]
counters = base_counters("acme", "team-ai", "k1", {"day": "2026-12-03", "month": "2026-12"})
budget = Budget(counters[2], "project:team-ai", "cap", 10**15, True, ())

async def main():
    backend = RedisBackend(url, prefix=prefix)
    store = RedisSpendStore(url, prefix=prefix)
    async def one(i):
        if kind == "charge":
            await backend.charge("org", RULES, [1, 100])
        elif kind == "hold":
            await store.hold("acme", f"h{i}", [budget], 1000, 60_000)
        else:
            await store.commit_many([Commit("acme", f"c{i}-{j}", counters, 7)
                                     for j in range(100)])
    try:
        for i in range(10):
            await one(-1 - i)
        for i in range(calls):
            await one(i)
    finally:
        keys = [k async for k in backend.client.scan_iter(prefix + ":*")]
        if keys:
            await backend.client.delete(*keys)
        await backend.close()
        await store.close()

asyncio.run(main())
"""

KINDS = {"charge": "rate-limit charge, two quotas", "hold": "budget hold",
         "commit": "spend commit, batch of 100"}


def instructions(kind: str, calls: int, pythonpath: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out",
             sys.executable, "-c", CHILD, kind, str(calls), REDIS],
            env={**os.environ, "PYTHONPATH": pythonpath}, cwd=ROOT, capture_output=True,
            text=True, check=True)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if not found:
        raise SystemExit(f"callgrind printed no count:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    with tempfile.TemporaryDirectory() as hidden:
        # a module named hiredis that fails to import, first on the path: redis-py then
        # parses replies in Python, as without the dependency
        Path(hidden, "hiredis.py").write_text("raise ImportError('hidden by the bench')\n")
        variants = {"hiredis": str(ROOT), "pure Python": f"{hidden}{os.pathsep}{ROOT}"}
        print(f"\n## redis-py's instructions per call (callgrind, {args.calls} calls)")
        print("| call | " + " | ".join(variants) + " | hiredis / pure Python |")
        print("|---|---|---|---|")
        for kind, name in KINDS.items():
            per_call = {v: (instructions(kind, args.calls, path)
                            - instructions(kind, 0, path)) / args.calls
                        for v, path in variants.items()}
            a, b = per_call["hiredis"], per_call["pure Python"]
            print(f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
