"""Benchmark the admin API and extauthz with many runtime keys.

    python bench/admin.py [--keys 100000] [--seconds 5] [--concurrency 16]

1. Admin writes: CreateKey calls per second (gRPC to the admin service, closed loop; each
   call validates the key document, writes the key and its audit row in one transaction).
2. Check latency with runtime keys: extauthz Check p50/p99 and calls/s for a runtime key,
   first with 100 runtime keys in the store (the baseline, same run), then with --keys of them
   (bulk-loaded into the SQLite store in one transaction: loading them through the API would
   only measure (1) again), after a restart so the mirror loads them all.
3. Memory: the `tollway serve` process's RSS before and after, and its start time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from common import bulk_keys, check_load, check_request, closed_loop, ms, pct
from procstat import rss_mb

from tests.e2e.harness import run_gateway, tcp_open, wait_until
from tollway._proto import admin_pb2, admin_pb2_grpc


def bulk_load(db: Path, pepper: bytes, n: int, clients: int) -> None:
    bulk_keys(db, pepper, n, clients, lambda c: ("acme", "team-ai"))


async def admin_writes(port: int, token: str, seconds: float, concurrency: int
                       ) -> tuple[float, list[float]]:
    ids = itertools.count()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        meta = (("authorization", f"Bearer {token}"),)

        def call() -> Any:
            req = admin_pb2.CreateKeyRequest(client="bench-client")
            req.key.update({"id": f"w{next(ids)}", "quotas": [{"rpm": 100}]})
            return stub.CreateKey(req, metadata=meta)
        return await closed_loop(call, lambda r: bool(r.secret), seconds, concurrency)


async def checks(port: int, key: str, seconds: float, concurrency: int
                 ) -> tuple[float, list[float]]:
    return await check_load(port, check_request(key, "route0"), seconds, concurrency)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, run_gateway(Path(tmp)) as gw:
        doc = yaml.safe_load(gw.manifest_path.read_text())
        admin_port = int(doc["services"]["admin"].rsplit(":", 1)[1])
        extauthz_port = int(doc["services"]["extauthz"].rsplit(":", 1)[1])
        token = gw.cli("admin-tokens", "issue", "--", "bench", "--scope", "*")
        httpx.post(f"{gw.url}/admin/v1/orgs/acme/projects/team-ai/clients",
                   headers={"authorization": f"Bearer {token}"},
                   json={"id": "bench-client"}).raise_for_status()
        rate, lat = asyncio.run(admin_writes(admin_port, token, args.seconds,
                                             args.concurrency))
        print(f"## Admin writes (CreateKey over gRPC, {args.concurrency} concurrent, SQLite "
              f"store)\n{rate:,.0f} writes/s, p50 {ms(pct(lat, 50))}, p99 {ms(pct(lat, 99))}")

        state = Path(tmp) / "state"
        pepper = (state / "pepper").read_text().strip().encode()
        bulk_load(state / "keys.db", pepper, 100, 10)  # the baseline's runtime keys
        services = gw.named["services"]

        def until_ok(key: str, seconds: float) -> None:
            """The mirror follows the store: poll until a Check with `key` passes."""
            deadline = time.monotonic() + seconds
            while not asyncio.run(checks(extauthz_port, key, 0.2, 1))[1]:
                assert time.monotonic() < deadline, "bulk keys never reached extauthz"
        until_ok("bk1.s", 5)
        rss_small = rss_mb(services.pid)
        base_rate, base_lat = asyncio.run(checks(extauthz_port, "bk1.s", args.seconds,
                                                 args.concurrency))

        bulk_load_more = args.keys - 100
        con = sqlite3.connect(state / "keys.db")
        con.execute("DELETE FROM tollway_keys WHERE key_id LIKE 'bk%'")
        con.execute("DELETE FROM tollway_objects WHERE id LIKE 'bc%'")
        con.commit()
        con.close()
        bulk_load(state / "keys.db", pepper, bulk_load_more + 100, 1000)
        gw.kill("services")
        started = time.monotonic()
        gw.start("services")
        wait_until(lambda: tcp_open(extauthz_port), "extauthz", timeout=60,
                   proc=gw.named["services"])
        until_ok(f"bk{args.keys - 1}.s", 60)
        start_s = time.monotonic() - started
        rss_big = rss_mb(gw.named["services"].pid)
        big_rate, big_lat = asyncio.run(checks(extauthz_port, f"bk{args.keys - 1}.s",
                                               args.seconds, args.concurrency))
        print(f"\n## extauthz Check with runtime keys ({args.concurrency} concurrent, "
              f"{args.seconds:.0f} s each)")
        print("| runtime keys | Check/s | p50 | p99 | serve RSS |\n|---|---|---|---|---|")
        print(f"| 100 | {base_rate:,.0f} | {ms(pct(base_lat, 50))} | {ms(pct(base_lat, 99))} "
              f"| {rss_small:.0f} MB |")
        print(f"| {args.keys:,} | {big_rate:,.0f} | {ms(pct(big_lat, 50))} | "
              f"{ms(pct(big_lat, 99))} | {rss_big:.0f} MB |")
        print(f"\nratio {big_rate / base_rate:.2f}x the calls/s; start with {args.keys:,} keys "
              f"until the first Check passed: {start_s:.1f} s; "
              f"{(rss_big - rss_small) * 1024 / args.keys:.2f} KB per runtime key")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
