"""10,000 projects and 1,000,000 runtime keys, against the same gateway with a small manifest.

    python bench/scale.py [--projects 10000] [--keys 1000000] [--seconds 5] [--format yaml]
                          [--store sqlite|postgres]

1. The CLI on the big manifest, in YAML and in JSON: `tollway check`, `tollway render`
   (median of three runs each; the small manifest's in the same run is the baseline).
2. The services with a small manifest (100 projects shaped as the big one's: an rpm and a
   budget each) and 100 runtime keys, the baseline: extauthz Check calls/s, p50/p99 (gRPC,
   closed loop) and the serving process's RSS.
3. The big manifest (--format) and --keys runtime keys (10,000 runtime clients, one per
   project, written straight into the key store: SQLite, or PostgreSQL in a schema of its
   own that is dropped afterwards), services restarted: time until the
   first Check of a key passes, RSS; Check of one key (held in memory) and of keys never
   presented before (each a store fetch), p50/p99, and for one key the services' CPU per
   Check against the small manifest's (steadier than Check/s: the client shares the cores).
4. `tollway keys` commands against that store: show, suspend, resume, rotate and a page of
   list, each timed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import yaml
from common import (
    LONG_MS,
    bulk_keys,
    check_load,
    check_request,
    closed_loop,
    collections,
    ms,
    pct,
)
from procstat import cpu_seconds, rss_mb

from tests.e2e.harness import run_gateway, tcp_open, wait_until
from tollway.metadata import REQUEST


def timed(cmd: list[str], env: dict[str, str], runs: int = 3) -> float:
    """Median wall time of `cmd` (seconds); it must succeed."""
    took = []
    for _ in range(runs):
        t = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        took.append(time.perf_counter() - t)
        assert out.returncode == 0, out.stderr
    return statistics.median(took)


def big_manifest(doc: dict[str, Any], projects: int) -> dict[str, Any]:
    per_org = 100
    return {**doc, "organizations": doc["organizations"] + [
        {"id": f"org{o}", "projects": [
            {"id": f"p{p}", "quotas": [{"name": "team", "rpm": 300},
                                       {"name": "budget", "spend_per_month": 10**9}]}
            for p in range(per_org)]} for o in range(projects // per_org)]}


def place(c: int) -> tuple[str, str]:
    return f"org{(c // 100) % 100}", f"p{c % 100}"


async def cold_checks(port: int, keys: list[str], seconds: float, concurrency: int
                      ) -> tuple[float, list[float]]:
    """Each Check with a key this process has not seen: the store is read for it."""
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    ids, fresh = itertools.count(), iter(keys)

    def call() -> Any:
        r = check_request(f"{next(fresh)}.s", "route0")
        r.attributes.request.http.headers["x-request-id"] = f"cold-{next(ids)}"
        return stub.Check(r)
    async with grpc_channel(port) as ch:
        stub = external_auth_pb2_grpc.AuthorizationStub(ch)
        return await closed_loop(call, lambda r: r.status.code == 0, seconds, concurrency)


def cpu_per_check(pid: int, load: Callable[[], tuple[float, list[float]]]
                  ) -> tuple[float, list[float], float]:
    """The load's Check/s and latencies, and the serving process's CPU seconds per Check:
    the closed-loop client shares the 2 cores, so its rate moves with whatever else runs;
    the CPU a Check costs the services does not."""
    before = cpu_seconds(pid)
    rate, latencies = load()
    return rate, latencies, (cpu_seconds(pid) - before) / len(latencies)


def passes(port: int, key: str, model: str | None = None) -> bool:
    """One Check with `key` (asking for `model`, else check_request's): allowed?"""
    from envoy.service.auth.v3 import external_auth_pb2_grpc

    request = check_request(key, "route0")
    if model is not None:
        request.attributes.metadata_context.filter_metadata[REQUEST].update({"model": model})

    async def one() -> bool:
        async with grpc_channel(port) as ch:
            r = await external_auth_pb2_grpc.AuthorizationStub(ch).Check(request, timeout=1)
            return bool(r.status.code == 0)
    try:
        return asyncio.run(one())
    except Exception:
        return False


def grpc_channel(port: int) -> Any:
    import grpc
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A DSN whose search_path is a fresh schema, dropped at the end."""
    import asyncpg

    from tests.conftest import PG_DSN

    name = f"bench_scale_{uuid.uuid4().hex[:8]}"

    async def execute(sql: str) -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(execute(f'CREATE SCHEMA "{name}"'))
    try:
        yield f"{PG_DSN}?options=-csearch_path%3D{name}"
    finally:
        asyncio.run(execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--projects", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--format", choices=("yaml", "json"), default="yaml")
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite",
                    help="the key store (storage.keys)")
    args = ap.parse_args()
    with postgres_schema() if args.store == "postgres" else nullcontext() as dsn:
        run(args, dsn)
    sys.stdout.flush()


def run(args: argparse.Namespace, keys_dsn: str | None) -> None:
    """The whole bench, keys in SQLite (keys_dsn None) or in PostgreSQL at keys_dsn."""
    base: dict[str, Any] = {}

    def small_manifest(doc: dict[str, Any]) -> None:
        """100 projects shaped as the big manifest's: a baseline key's Check does the same
        work (an rpm, a budget hold) as a big one's."""
        base.update(doc)
        doc.update(big_manifest(doc, 100))

    print(f"keys in {args.store}")
    with tempfile.TemporaryDirectory() as tmpdir, run_gateway(
            Path(tmpdir), keys_dsn=keys_dsn or "sqlite:///keys.db", mutate=small_manifest) as gw:
        tmp = Path(tmpdir)
        extauthz = int(base["services"]["extauthz"].rsplit(":", 1)[1])
        big = big_manifest(base, args.projects)
        (tmp / "big.yaml").write_text(yaml.safe_dump(big))
        (tmp / "big.json").write_text(json.dumps(big))
        cli = [sys.executable, "-m", "tollway.cli"]

        print(f"## The CLI, {args.projects:,} projects (median of 3 runs)")
        print("| command | small manifest | big, YAML | big, JSON |\n|---|---|---|---|")
        for name, extra in (("check", []), ("render", ["--target", "envoy"])):
            row = [timed([*cli, name, *extra, "--manifest", str(p)], gw.env)
                   for p in (gw.manifest_path, tmp / "big.yaml", tmp / "big.json")]
            print(f"| tollway {name} | " + " | ".join(f"{t:.2f} s" for t in row) + " |")

        state = tmp / "state"
        pepper = (state / "pepper").read_text().strip().encode()
        store: Path | str = keys_dsn or state / "keys.db"
        bulk_keys(store, pepper, 100, 10, place, "s")
        wait_until(lambda: passes(extauthz, "sk1.s"), "small keys", 10)
        base_rss = rss_mb(gw.named["services"].pid)
        base_rate, base_lat, base_cpu = cpu_per_check(gw.named["services"].pid, lambda: asyncio.run(
            check_load(extauthz, check_request("sk1.s", "route0"), args.seconds,
                       args.concurrency)))

        loaded = time.perf_counter()
        bulk_keys(store, pepper, args.keys, args.projects, place)
        loaded = time.perf_counter() - loaded
        gw.kill("services")
        gw.manifest_path.write_text((tmp / f"big.{args.format}").read_text())
        started = time.perf_counter()
        gw.start("services")
        wait_until(lambda: tcp_open(extauthz), "extauthz", timeout=120,
                   proc=gw.named["services"])
        last = f"bk{args.keys - 1}.s"
        wait_until(lambda: passes(extauthz, last), "a runtime key", 120)
        start_s = time.perf_counter() - started
        rss_start = rss_mb(gw.named["services"].pid)
        metrics_port = base["services"]["metrics_port"]
        gcs = [collections(metrics_port)]
        hot_rate, hot_lat, hot_cpu = cpu_per_check(gw.named["services"].pid, lambda: asyncio.run(
            check_load(extauthz, check_request("bk5.s", "route0"), args.seconds,
                       args.concurrency)))
        gcs.append(collections(metrics_port))
        never = [f"bk{i}" for i in random.Random(7).sample(range(args.keys // 2),
                                                           args.keys // 2)]
        cold_rate, cold_lat = asyncio.run(cold_checks(extauthz, never, args.seconds,
                                                      args.concurrency))
        gcs.append(collections(metrics_port))
        rss_after = rss_mb(gw.named["services"].pid)

        print(f"\n## extauthz Check ({args.concurrency} concurrent, {args.seconds:.0f} s each)")
        print("| manifest, runtime keys | Check/s | p50 | p99 | services' CPU per Check | "
              "serve RSS |\n|---|---|---|---|---|---|")
        print(f"| small, 100 | {base_rate:,.0f} | {ms(pct(base_lat, 50))} | "
              f"{ms(pct(base_lat, 99))} | {base_cpu * 1000:.3f} ms | {base_rss:.0f} MB |")
        print(f"| {args.projects:,} projects, {args.keys:,}: one key | {hot_rate:,.0f} | "
              f"{ms(pct(hot_lat, 50))} | {ms(pct(hot_lat, 99))} | {hot_cpu * 1000:.3f} ms | "
              f"{rss_start:.0f} MB at start |")
        print(f"| same, a new key each Check (store read) | {cold_rate:,.0f} | "
              f"{ms(pct(cold_lat, 50))} | {ms(pct(cold_lat, 99))} | | "
              f"{rss_after:.0f} MB after |")
        for phase, (a, b) in (("one key", gcs[:2]), ("a new key each Check", gcs[1:])):
            print(f"{phase}: {b['full'] - a['full']:.0f} full garbage collections, "
                  f"{(b['seconds'] - a['seconds']) * 1000:.0f} ms in all, "
                  f"{b['long'] - a['long']:.0f} of {LONG_MS} ms or more")
        print(f"\none key: {hot_rate / base_rate:.2f}x the baseline's calls/s, p50 "
              f"{pct(hot_lat, 50) / pct(base_lat, 50):.2f}x, the services' CPU per Check "
              f"{hot_cpu / base_cpu:.2f}x; start ({args.format}) until the "
              f"first Check passed: {start_s:.1f} s ({args.keys:,} keys written in "
              f"{loaded:.0f} s)")

        print(f"\n## tollway keys, {args.keys:,} keys in the store, big manifest "
              f"({args.format}; median of 3)")
        for action in ("show", "suspend", "resume"):
            t = timed([*cli, "keys", action, "bk7", "--manifest", str(gw.manifest_path)],
                      gw.env)
            print(f"tollway keys {action} bk7: {t:.2f} s")
        t = timed([*cli, "keys", "rotate", "bk7", "--grace", "0", "--manifest",
                   str(gw.manifest_path)], gw.env)
        print(f"tollway keys rotate bk7: {t:.2f} s")
        t = timed([*cli, "keys", "list", "--after", "bk5", "--limit", "100", "--manifest",
                   str(gw.manifest_path)], gw.env)
        print(f"tollway keys list --after bk5 --limit 100: {t:.2f} s")


if __name__ == "__main__":
    main()
