"""Benchmark the ledger's write of a batch by how many rows the ledger already holds.

Run: python bench/ledger_size.py [--rows 0,1000000,3000000] [--batches 60]
     [--ledger sqlite|postgresql]

A gateway writes every request into the ledger for as long as it runs; a bench of seconds
writes into an empty one. This fills a ledger with N rows (random request ids, as Envoy's
are) outside the ledger's code, then times `Ledger.append` of `--batches` batches of 500 new
rows, as costsink commits them: wall time per batch (p50 / p99) and, for SQLite (whose work runs
in this process), this process's CPU per batch. The first size given is the baseline of the
ratios printed. PostgreSQL is the local server, in a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
from common import ROOT  # noqa: F401  (puts this checkout first on the path)

from costsink.ledger import COLUMNS, Ledger, LedgerRow, PostgresLedger, SqliteLedger, _sqlite_params

BATCH = 500
PG_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
SCHEMA = "bench_ledger_size"
START = datetime(2026, 12, 1, tzinfo=UTC)


def row(n: int) -> LedgerRow:
    return LedgerRow(str(uuid.uuid4()), START + timedelta(milliseconds=n), "org-a", "proj-a",
                     "client-a", "key-a", "openai", "gpt-5.4-mini", "openai", 200, 120, 30, 0,
                     0, Decimal("0.0000435"), "USD", "2026-11", 180, False, False, None)


async def fill(kind: str, path: Path, rows: int) -> None:
    """N rows written outside the ledger's code: in big transactions, or by COPY."""
    chunk = 200_000
    if kind == "sqlite":
        sql = (f"INSERT INTO tollway_ledger ({', '.join(COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(COLUMNS))})")
        db = sqlite3.connect(path)
        for start in range(0, rows, chunk):
            db.executemany(sql, (_sqlite_params(row(n))
                                 for n in range(start, min(rows, start + chunk))))
            db.commit()
        db.close()
        return
    conn = await asyncpg.connect(PG_DSN)
    try:
        for start in range(0, rows, chunk):
            await conn.copy_records_to_table(
                "tollway_ledger", schema_name=SCHEMA, columns=list(COLUMNS),
                records=[tuple(row(n)) for n in range(start, min(rows, start + chunk))])
        await conn.execute(f'VACUUM ANALYZE "{SCHEMA}".tollway_ledger')
    finally:
        await conn.close()


async def reset(kind: str, path: Path) -> Ledger:
    if kind == "sqlite":
        for p in path.parent.glob(path.name + "*"):
            p.unlink()
        ledger: Ledger = SqliteLedger(path)
    else:
        conn = await asyncpg.connect(PG_DSN)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
        await conn.close()
        ledger = PostgresLedger(PG_DSN, schema=SCHEMA)
    await ledger.open()
    return ledger


async def measure(kind: str, path: Path, rows: int, batches: int) -> dict[str, float]:
    ledger = await reset(kind, path)
    await fill(kind, path, rows)
    walls, cpus = [], []
    for b in range(batches):
        new = [row(rows + b * BATCH + i) for i in range(BATCH)]
        c, w = time.process_time(), time.perf_counter()  # every thread's, the writer's too
        await ledger.append(new)
        walls.append((time.perf_counter() - w) * 1000)
        cpus.append((time.process_time() - c) * 1000)
    await ledger.close()
    walls.sort()
    cpus.sort()
    return {"p50": walls[len(walls) // 2], "p99": walls[int(len(walls) * 0.99)],
            "cpu": cpus[len(cpus) // 2]}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="0,1000000,3000000")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--ledger", choices=["sqlite", "postgresql"], default="sqlite")
    args = ap.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.db"
        base: dict[str, float] | None = None
        try:
            for rows in sizes:
                f = await measure(args.ledger, path, rows, args.batches)
                base = base or f
                cpu = (f"  this process's CPU {f['cpu']:.1f} ms ({f['cpu'] / base['cpu']:.2f}x)"
                       if args.ledger == "sqlite" else "")
                print(f"{args.ledger} holding {rows:>9,} rows: a batch of {BATCH} p50 "
                      f"{f['p50']:.1f} ms ({f['p50'] / base['p50']:.2f}x), p99 {f['p99']:.1f} ms"
                      f"{cpu}", flush=True)
        finally:
            if args.ledger == "postgresql":
                conn = await asyncpg.connect(PG_DSN)
                await conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
                await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
