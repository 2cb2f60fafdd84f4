"""Benchmark what costsink's durable log costs a batch after hours of uptime, not minutes.

Run: python bench/recent_ids.py [--rate 100] [--minutes 12] [--baseline DIR]

costsink remembers the request ids it has made durable, so that the reconciler of Envoy's
access-log file skips their lines (costsink/durable_log.py). A bench or a test of a few
minutes never reaches the point where the oldest of them are forgotten; a gateway does after
its first ten minutes, and from then on that cost is paid on every batch, on the event loop.
This drives a DurableLog with a simulated clock: a batch of `rate / 10` ids every 0.1 s (as
Envoy's access-log flush sends them) and the reconciler over an existing, empty access-log file
every second, as costsink runs it; it prints the time each batch's `durable()` took over the
last simulated minute (p50 / p99 / max) and how many ids are held at the end. `--baseline DIR`
runs the same on another checkout (e.g. `git worktree add /tmp/base <commit>`); each checkout
runs in a process of its own, on its own packages.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

FLUSH = 0.1  # seconds between Envoy's access-log messages, each one batch


class SimulatedClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def drive(module: ModuleType, rate: int, minutes: float, access_log: Path
                ) -> dict[str, Any]:
    """`access_log`: an existing, empty file."""
    clock = SimulatedClock()
    module.time = clock  # the module's clock: time.monotonic() is all it reads
    durable_log = module.DurableLog(access_log, access_log.with_suffix(".pos"))

    async def write(_: list[Any]) -> None:
        raise AssertionError("the file is empty: nothing to write")

    per_batch, steps, n = round(rate * FLUSH), round(minutes * 60 / FLUSH), 0
    took: list[float] = []
    for step in range(steps):
        clock.now += FLUSH
        ids = [f"{n + i:032x}" for i in range(per_batch)]
        n += per_batch
        started = time.perf_counter()
        durable_log.durable(ids)
        if step >= steps - round(60 / FLUSH):  # the last simulated minute
            took.append(time.perf_counter() - started)
        if step % round(1 / FLUSH) == 0:
            await durable_log.reconcile(None, write)
    took.sort()
    return {"p50_ms": 1000 * took[len(took) // 2], "p99_ms": 1000 * took[len(took) * 99 // 100],
            "max_ms": 1000 * took[-1], "held": len(durable_log.recent)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=100, help="requests per second")
    ap.add_argument("--minutes", type=float, default=12, help="simulated uptime")
    ap.add_argument("--baseline", type=Path, help="another checkout to measure alongside")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # the checkout to run
    args = ap.parse_args()
    if args.child:  # this checkout's packages, never the bench's scripts of the same names
        sys.path[:] = [str(args.child)] + [p for p in sys.path
                                           if Path(p or ".").resolve() != ROOT / "bench"]
        module = importlib.import_module("costsink.durable_log")
        with tempfile.TemporaryDirectory() as tmp:
            access_log = Path(tmp, "envoy-access.jsonl")
            access_log.touch()
            print(json.dumps(asyncio.run(drive(module, args.rate, args.minutes, access_log))))
        return
    checkouts = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline
                                  else {})}
    for name, checkout in checkouts.items():
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(checkout), "--rate", str(args.rate),
             "--minutes", str(args.minutes)], cwd=checkout, capture_output=True, text=True,
            check=True, env={**os.environ, "PYTHONPATH": str(checkout)})
        r = json.loads(child.stdout)
        print(f"{name:8} {args.rate} requests/s, after {args.minutes:g} min: durable() per "
              f"batch p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, max {r['max_ms']:.3f} "
              f"ms; {r['held']:,} ids held")


if __name__ == "__main__":
    main()
