"""Benchmark `tollway simulate`: ledger rows replayed per second.

    python bench/simulate.py [--rows 1000000]

A SQLite ledger of --rows requests (100 projects x 10 keys, two models, a month of traffic;
bulk-inserted) is replayed against a manifest with an rpm, a tpm and a monthly budget on every
project and key. Reported: the whole run (reading the ledger in batches and replaying it) and
the replay alone (the time spent in Simulation.feed), as rows per second, and the peak RSS
(the ledger is streamed in batches of 20,000 rows).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)

from costsink.ledger import COLUMNS, SqliteLedger
from tollway.manifest import parse
from tollway.simulate import Simulation


def manifest(ledger: Path) -> dict[str, Any]:
    return {
        "storage": {"ledger": f"sqlite:///{ledger}", "keys": "sqlite:///unused.db"},
        "providers": [{"name": "openai", "dialect": "openai", "upstream": {"host": "x"},
                       "credential": "env:X",
                       "models": [{"name": "gpt-5.4-mini"}, {"name": "gpt-5.4"}]}],
        "routes": [{"path": "/v1/chat/completions", "provider": "openai"}],
        "rate_card": {"version": "b", "currency": "USD", "prices": [
            {"provider": "openai", "model": "gpt-5.4-mini", "input": 0.75, "output": 4.5},
            {"provider": "openai", "model": "gpt-5.4", "input": 2.5, "output": 15}]},
        "organizations": [{"id": "acme", "projects": [
            {"id": f"p{p}", "quotas": [{"name": "team", "rpm": 300, "tpm": 400_000,
                                        "spend_per_month": 10}],
             "clients": [{"id": f"c{p}", "keys": [
                 {"id": f"k{p}-{k}", "quotas": [{"name": "key", "rpm": 40}]}
                 for k in range(10)]}]} for p in range(100)]}],
    }


def fill(path: Path, n: int) -> None:
    rng = random.Random(7)
    start = datetime(2026, 10, 1, tzinfo=UTC)
    step = timedelta(days=30) / n
    con = sqlite3.connect(path)
    with con:
        def rows() -> Any:
            for i in range(n):
                p, k = rng.randrange(100), rng.randrange(10)
                model = "gpt-5.4" if rng.random() < 0.2 else "gpt-5.4-mini"
                tin, tout = rng.randrange(50, 2000), rng.randrange(10, 800)
                cost = (tin * (2.5 if model == "gpt-5.4" else 0.75)
                        + tout * (15 if model == "gpt-5.4" else 4.5)) / 1e6
                yield (f"r{i:08d}", (start + step * i).isoformat(), "acme", f"p{p}", f"c{p}",
                       f"k{p}-{k}", "openai", model, "route0", 200, tin, tout, 0, 0,
                       f"{cost:.10f}", "USD", "b", 100, 0, 0, None, 0, 0, 0)
        con.executemany(f"INSERT INTO tollway_ledger ({', '.join(COLUMNS)}) VALUES "
                        f"({', '.join('?' * len(COLUMNS))})", rows())
    con.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.db"
        ledger = SqliteLedger(path)
        await ledger.open()
        await ledger.close()
        t = time.perf_counter()
        fill(path, args.rows)
        print(f"filled {args.rows:,} ledger rows in {time.perf_counter() - t:.1f} s")
        m = parse(manifest(path))

        ledger = SqliteLedger(path)
        await ledger.open()
        simulation = Simulation(m)
        replay = 0.0
        t = time.perf_counter()
        async for batch in ledger.batches():  # streamed, as `tollway simulate` reads it
            fed = time.perf_counter()
            simulation.feed(batch)
            replay += time.perf_counter() - fed
        read = time.perf_counter() - t - replay
        await ledger.close()
        r = simulation.report
        refused = sum(t.refused_now for t in r.by_key.values())
        print(f"read {args.rows / read:,.0f} rows/s; replay {args.rows / replay:,.0f} rows/s; "
              f"whole run {args.rows / (read + replay):,.0f} rows/s ({read + replay:.1f} s); "
              f"{refused:,} refused under the proposed limits; peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
