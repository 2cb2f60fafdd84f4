"""Redis's commands per request through the whole gateway, counted by Redis itself.

Run: python bench/redis_calls.py [--rate-limit check|filter] [--provider-counts-differ]
                                 [--requests 100] [--budget]

A gateway on Redis counters (a Redis of its own), its project charged to an rpm and a tpm
quota; `--requests` chat completions one after another, after 20 to warm up, then the
difference of Redis's `INFO commandstats` per request, once costsink has written them. Each
EVALSHA is one round trip of a service's (the commands a script runs are counted too, under
their own names). A count does not drift with a busy machine as times do, so two checkouts
compare in one line each. `--provider-counts-differ`: the mock reports 100 prompt tokens where
Tollway reserves for 84, as a real tokenizer's count differs, so each request's token
reservation is settled.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import yaml
from common import charge_every_request, hold_every_request

from tests.e2e.harness import PrivateRedis, run_gateway, wait_until


def commandstats(port: int) -> dict[str, int]:
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"],
                         capture_output=True, text=True, check=True).stdout
    return {name: int(calls) for name, calls in re.findall(r"cmdstat_(\w+):calls=(\d+)", out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate-limit", choices=["filter", "check"], default="check")
    ap.add_argument("--provider-counts-differ", action="store_true")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--budget", action="store_true",
                    help="every request also held against a project budget, then committed")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        redis = PrivateRedis(tmp)
        redis.start()

        def mutate(doc: dict[str, Any]) -> None:
            charge_every_request(doc, args.rate_limit)
            if args.budget:
                hold_every_request(doc)
            doc["storage"]["counters"] = redis.url
        try:
            (tmp / "gateway").mkdir()
            with run_gateway(tmp / "gateway", mutate=mutate) as gw, httpx.Client() as client:
                headers = {"authorization": f"Bearer {gw.issue('k-main')}",
                           **({"x-mock-input-tokens": "100"}
                              if args.provider_counts_differ else {})}
                body = {"model": "gpt-5.4-mini", "max_tokens": 5,
                        "messages": [{"role": "user", "content": "word " * 50}]}

                def send(n: int) -> None:
                    for _ in range(n):
                        r = client.post(f"{gw.url}/v1/chat/completions", json=body,
                                        headers=headers)
                        assert r.status_code == 200, r.text

                metrics = yaml.safe_load(gw.manifest_path.read_text())["services"][
                    "metrics_port"]

                def recorded() -> float:
                    text = httpx.get(f"http://127.0.0.1:{metrics}/metrics", timeout=5).text
                    found = re.search(r'^tollway_costsink_entries_total\{result="recorded"\} '
                                      r'([0-9.e+]+)$', text, re.M)
                    return float(found[1]) if found else 0.0

                send(20)
                wait_until(lambda: recorded() >= 20, "the warm-up in the ledger")
                before = commandstats(redis.port)
                send(args.requests)
                wait_until(lambda: recorded() >= 20 + args.requests, "the requests in the ledger")
                after = commandstats(redis.port)
        finally:
            redis.kill()
    print(f"services.rate_limit {args.rate_limit}, "
          f"{'provider counts differ' if args.provider_counts_differ else 'counts as reserved'}"
          f"{', held against a budget' if args.budget else ''}"
          f", {args.requests} requests: Redis commands per request")
    for name in sorted(after):
        if after[name] != before.get(name, 0):
            print(f"  {name}: {(after[name] - before.get(name, 0)) / args.requests:.2f}")


if __name__ == "__main__":
    main()
