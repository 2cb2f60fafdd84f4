"""Benchmark the gateway minute by minute over a long run, not the first seconds of one.

Run: python bench/uptime.py [--minutes 12] [--charged] [--wrk CONNECTIONS] [--baseline DIR]

What a process keeps for a while (the request ids costsink made durable, counters' windows,
caches) costs nothing until its first expiries, minutes after the start, which a bench of
seconds never reaches. This starts the test harness's gateway (mock provider, `tollway serve`,
the real Envoy) and drives a fixed 100 requests/s through it (h2load, open loop, as
bench/latency.py) for `--minutes`, one minute at a time, and prints each minute's p50 / p99 /
max, the services' CPU per request (each minute's 200 requests of warm-up included), their
RSS, and Envoy's access-log file: its size and the disk it takes. `--charged` charges every
request to a project rpm, tpm and monthly budget that never refuse it (rate-limit windows
that expire every minute, budget holds); without it no quota applies. `--wrk N` drives the
gateway at full load instead (wrk, N connections, a 1 KB chat completion, as
bench/gateway_http.py; no warm-up). `--baseline DIR` runs the same on another checkout (e.g.
`git worktree add /tmp/base <commit>`) afterwards, on its own packages.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import ROOT, wrk_figures

# run inside the checkout under test: its harness, its packages
CHILD = """
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, os.environ["BENCH_ROOT"])
from tests.e2e.harness import run_gateway
sys.path.append(os.environ["BENCH_DIR"])  # appended: the checkout's packages come first
from latency import figures, h2load_requests
from procstat import cpu_seconds, rss_mb
from wrk_script import CHAT_1KB, post_script
tmp = pathlib.Path(tempfile.mkdtemp())
def mutate(doc):
    if os.environ["BENCH_CHARGED"]:
        doc["organizations"][0]["projects"][0]["quotas"] = [
            {"name": "bench-rpm", "rpm": 10**9}, {"name": "bench-tpm", "tpm": 10**12},
            {"name": "bench-budget", "spend_per_month": 10**6}]
with run_gateway(tmp, mutate=mutate) as gw:
    headers = {"authorization": f"Bearer {gw.issue('k-main')}"}
    url = gw.url + "/v1/chat/completions"
    pid = gw.named["services"].pid
    wrk = os.environ["BENCH_WRK"]
    if wrk:
        script = post_script(tmp / "post.lua", CHAT_1KB, {**headers, "accept-encoding": "gzip"})
    for minute in range(int(os.environ["BENCH_MINUTES"])):
        before = cpu_seconds(pid, descendants=True)
        if wrk:  # closed loop, wrk's output parsed by the bench (bench/common.py)
            out = subprocess.run(["wrk", "-t1", f"-c{wrk}", "-s", str(script), "-d60s",
                                  "--latency", url], capture_output=True, text=True).stdout
            row = {"wrk": out}
        else:
            f = figures(h2load_requests(url, headers, 60, tmp))
            row = {"p50": f["p50"], "p99": f["p99"], "max": f["max"],
                   "failed": f["non_2xx"], "requests": f["requests"]}
        cpu = cpu_seconds(pid, descendants=True) - before
        log = (tmp / "state" / "envoy-access.jsonl").stat()  # Envoy's file: its size, its disk
        print(json.dumps({**row, "minute": minute + 1, "cpu_s": cpu, "rss_mb": rss_mb(pid),
                          "log_mb": log.st_size / 2**20,
                          "log_disk_mb": log.st_blocks * 512 / 2**20}), flush=True)
"""


def run(checkout: Path, minutes: int, charged: bool, wrk: int) -> list[dict[str, float]]:
    env = {**os.environ, "BENCH_ROOT": str(checkout), "PYTHONPATH": str(checkout),
           "BENCH_MINUTES": str(minutes), "BENCH_CHARGED": "1" if charged else "",
           "BENCH_WRK": str(wrk or ""),
           "BENCH_DIR": str(Path(__file__).resolve().parent)}
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=checkout,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    rows = []
    for line in child.stdout:  # each minute as it ends: a long run shows its progress
        row = json.loads(line)
        if "wrk" in row:
            f = wrk_figures(row.pop("wrk"))
            row.update(p50=f["p50"], p99=f["p99"], max=f["max"], failed=f["non_2xx"],
                       requests=f["requests"])
        row["cpu_ms"] = 1000 * row["cpu_s"] / row["requests"]
        print(f"{checkout.name:10} minute {row['minute']:3}  {row['requests'] / 60:6.0f} "
              f"requests/s  p50 {row['p50']:6.2f} ms  p99 "
              f"{row['p99']:6.2f} ms  max {row['max']:7.2f} ms  failed {int(row['failed'])}  "
              f"services' CPU per request {row['cpu_ms']:.2f} ms  RSS {row['rss_mb']:.0f} MB  "
              f"access log {row['log_mb']:.0f} MB, {row['log_disk_mb']:.0f} MB on disk",
              flush=True)
        rows.append(row)
    if child.wait() != 0 or len(rows) != minutes:
        raise SystemExit(f"the gateway run in {checkout} failed")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=int, default=12)
    ap.add_argument("--charged", action="store_true", help="every request charged to quotas")
    ap.add_argument("--wrk", type=int, metavar="CONNECTIONS",
                    help="full load: wrk with this many connections instead of 100 requests/s")
    ap.add_argument("--baseline", type=Path, help="another checkout to measure afterwards")
    args = ap.parse_args()
    checkouts = [ROOT] + ([args.baseline.resolve()] if args.baseline else [])
    for checkout in checkouts:
        rows = run(checkout, args.minutes, args.charged, args.wrk)
        first, last = rows[0], rows[-1]
        print(f"{checkout.name:10} the last minute over the first: p50 "
              f"{last['p50'] / first['p50']:.2f}x, p99 {last['p99'] / first['p99']:.2f}x, CPU "
              f"per request {last['cpu_ms'] / first['cpu_ms']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
