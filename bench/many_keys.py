"""A stream of keys never seen before, through the whole gateway, against one key used alone.

    python bench/many_keys.py [--keys 200000] [--seconds 15] [--connections 8] [--redis]

The gateway of the tests with memory counters (`--redis`: in a Redis of the run's own) and a
monthly budget on its project, and --keys
runtime keys (each with its own rpm) written into its key store, the services restarted to
mirror them. Then the same wrk load twice:

1. one key for every request (the baseline);
2. a new key for every request (wrk's Lua counts through them): the key store is read for
   each, and each adds its own rate-limit counter, spend counters (its day and month) and
   ledger rows, as a node that keeps meeting new keys does.

Each: requests/s, p50/p99/max latency, and the serving process's garbage collections during
the run, read from its tollway_gc_pause_seconds: the full ones (generation 2), their total
time, and how many lasted 10 ms or more. A full collection holds every request in flight.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import yaml
from common import LONG_MS, bulk_keys, collections, wrk_figures
from wrk_script import CHAT_1KB

from tests.e2e.harness import PrivateRedis, run_gateway, tcp_open, wait_until


def script(path: Path, first_key: int | None) -> Path:
    """wrk's script: a POST with key bk<first_key + n> at its n-th request, or key bk0."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(json.dumps(CHAT_1KB))}",
             'wrk.headers["content-type"] = "application/json"']
    if first_key is None:
        lines.append('wrk.headers["authorization"] = "Bearer bk0.s"')
    else:
        lines += [f"local n = {first_key}", "function request()", "  n = n + 1",
                  '  wrk.headers["authorization"] = "Bearer bk" .. n .. ".s"',
                  "  return wrk.format()", "end"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(url: str, lua: Path, seconds: int, connections: int,
        metrics_port: int) -> dict[str, float]:
    before = collections(metrics_port)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(lua), url], capture_output=True, text=True).stdout
    after = collections(metrics_port)
    return {**wrk_figures(out), **{k: after[k] - before[k] for k in after}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--redis", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        redis = PrivateRedis(tmp) if args.redis else None
        if redis:
            redis.start()
        try:
            results = measure(args, tmp, redis)
        finally:
            if redis:
                redis.kill()
    print(f"{args.keys:,} runtime keys, wrk -t1 -c{args.connections} {args.seconds} s, "
          f"{'Redis' if args.redis else 'memory'} counters, a project budget")
    print("| keys | rps | p50 | p99 | max | non-2xx | full collections | their total | "
          f"≥ {LONG_MS} ms |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rps']:,.0f} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | "
              f"{r['max']:.1f} ms | {r['non_2xx']:.0f} | {r['full']:.0f} | "
              f"{r['seconds'] * 1000:.0f} ms | {r['long']:.0f} |")


def measure(args: argparse.Namespace, tmp: Path, redis: PrivateRedis | None
            ) -> dict[str, dict[str, float]]:
    def budget(doc: dict[str, Any]) -> None:
        doc["organizations"][0]["projects"][0]["quotas"] = [
            {"name": "budget", "spend_per_month": 10**6}]
        if redis:
            doc["storage"]["counters"] = redis.url

    with run_gateway(tmp, mutate=budget) as gw:
        state = tmp / "state"
        metrics_port = yaml.safe_load(gw.manifest_path.read_text())["services"]["metrics_port"]
        extauthz = int(yaml.safe_load(gw.manifest_path.read_text())["services"]["extauthz"]
                       .rsplit(":", 1)[1])
        pepper = (state / "pepper").read_text().strip().encode()
        bulk_keys(state / "keys.db", pepper, args.keys, 1_000, lambda c: ("acme", "team-ai"))
        gw.kill("services")
        gw.start("services")
        wait_until(lambda: tcp_open(extauthz), "extauthz", timeout=60,
                   proc=gw.named["services"])
        url = f"{gw.url}/v1/chat/completions"

        def passes() -> bool:
            return httpx.post(url, json=CHAT_1KB, timeout=5,
                              headers={"authorization": "Bearer bk0.s"}).status_code == 200
        wait_until(passes, "a runtime key", 60)
        one = script(tmp / "one.lua", None)
        subprocess.run(["wrk", "-t1", f"-c{args.connections}", "-d3s", "-s", str(one), url],
                       capture_output=True)  # warm-up
        return {"one key": run(url, one, args.seconds, args.connections, metrics_port),
                "a new key each": run(url, script(tmp / "new.lua", 0),
                                      args.seconds, args.connections, metrics_port)}


if __name__ == "__main__":
    main()
