"""Latency Tollway adds over bare Envoy at a fixed 100 requests/s, and the architecture's floor.

    python bench/latency.py [--seconds 20] [--rate-limit filter|check] [--pin-cpus]
                            [--costsink-apart]

Each gateway is driven at a fixed 100 requests/s by h2load (open loop: requests leave on
schedule whatever the answers' pace) and, for streams, by a small client timing the first
event of 100 streams/s, all in front of the same mock provider:
1. bare Envoy: the rendered config with the router alone (no filters, no access log);
2. Tollway: the real services, memory counters, the same Envoy config;
3. the floor: that Envoy config, but ext_authz, rate limit and access log answered by no-op
   Python servicers (OK with the metadata Tollway's filters expect): what the gRPC round trips
   into Python cost before any of Tollway's work;
4. a second gateway with Redis counters (a Redis of its own), with its own bare Envoy.
Bare Envoy is measured before and after in each gateway; the added latency is over their mean.
Also printed: the services' CPU per request during Tollway's run.

`--rate-limit filter|check` sets services.rate_limit and gives the project an rpm and a tpm
too high to refuse, so every request is charged: by Envoy's rate-limit filter asking ratelimit
(filter), or by extauthz in its Check (check; the floor then has no rate-limit filter either).
Without it, the base manifest has no quota and the Check skips the rate-limit call. `--pin-cpus`
sets services.pin_cpus and pins the floor's no-op servicers to the same CPU.
`--costsink-apart` adds a third gateway: Redis counters with costsink in a process of its own,
as the Kubernetes deployment runs it (deploy/base: costsink beside Envoy in the gateway pod), so
that costsink's reading of Envoy's access-log flushes leaves the Checks' event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from common import bare_envoy, charge_every_request, pct
from noop_services import pin as noop_pin
from noop_services import replace_services
from procstat import cpu_seconds

from tests.e2e.harness import PROVIDER_KEY, PrivateRedis, run_gateway

BODY = {"model": "gpt-5.4-mini", "max_tokens": 5,
        "messages": [{"role": "user", "content": "word " * 50}]}


class Request(NamedTuple):
    """One line of h2load's per-request log."""

    start: float  # seconds since the epoch
    status: str
    ms: float  # until the end of the response


def figures(rows: list[Request]) -> dict[str, float]:
    """p50/p99/max (ms), how many requests and how many were not answered 2xx."""
    lat = sorted(r.ms for r in rows)
    return {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": lat[-1], "requests": len(rows),
            "non_2xx": sum(1 for r in rows if not r.status.startswith("2"))}


def h2load(url: str, headers: dict[str, str], seconds: int, tmp: Path) -> dict[str, float]:
    """The figures of h2load_requests, and the requests/s."""
    rows = h2load_requests(url, headers, seconds, tmp)
    return {"rps": len(rows) / seconds, **figures(rows)}


def h2load_requests(url: str, headers: dict[str, str], seconds: int, tmp: Path
                    ) -> list[Request]:
    """A fixed 100 requests/s, open loop: h2load sends each request on schedule (4 HTTP/1.1
    connections, 25 requests/s each: a request every 40 ms per connection, well above any
    latency here) whatever the answers' pace, so a slow answer does not hold the next ones
    back and hide its own delay. Each request from h2load's per-request log."""
    body = tmp / "body.json"
    body.write_text(json.dumps(BODY))
    log = tmp / "h2load.log"
    # the four connections open 10 ms apart (-r 1 per 10 ms), so their requests interleave
    # every 10 ms rather than leave in bursts of four
    cmd = ["h2load", "--h1", "-c4", "--rps", "25", "-r1", "--rate-period", "10ms",
           "-d", str(body),
           "-H", "content-type: application/json",
           *(x for k, v in headers.items() for x in ("-H", f"{k}: {v}"))]
    subprocess.run([*cmd, "-n", "200", url], capture_output=True, check=True)  # warm-up
    log.unlink(missing_ok=True)  # h2load appends to its log
    subprocess.run([*cmd, "-n", str(seconds * 100), "--log-file", str(log), url],
                   capture_output=True, check=True)
    rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    return [Request(int(r[0]) / 1e6, r[1], int(r[2]) / 1000) for r in rows]


async def _first_event(host: str, port: int, path: str, headers: dict[str, str]) -> float:
    """One streamed request on its own connection: seconds until its first SSE event."""
    body = json.dumps({**BODY, "stream": True}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {
        "host": f"{host}:{port}", "content-type": "application/json",
        "content-length": str(len(body)), "connection": "close", **headers}.items())
    reader, writer = await asyncio.open_connection(host, port)
    try:
        started = time.perf_counter()
        writer.write(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode() + body)
        seen = b""
        while b"data:" not in seen.split(b"\r\n\r\n", 1)[-1] or b"\r\n\r\n" not in seen:
            chunk = await reader.read(65536)
            if not chunk:
                raise RuntimeError(f"closed before the first event: {seen[:300]!r}")
            seen += chunk
        took = time.perf_counter() - started
        if not seen.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(seen[:300].decode(errors="replace"))
        return took
    finally:
        writer.close()


def streamed_ttfb(url: str, headers: dict[str, str], seconds: int) -> dict[str, float]:
    """p50/p99/max (ms) of streamed_firsts."""
    lat = streamed_firsts(url, headers, seconds)
    return {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": lat[-1]}


def streamed_firsts(url: str, headers: dict[str, str], seconds: int) -> list[float]:
    """Time to the first event of a stream (ms, sorted), at 100 streams/s started on schedule
    (open loop; the mock pauses 50 ms after the first event, so the first event's time is
    measured, not the stream's). A Python client: no native load generator reads SSE events,
    and 100 requests/s cost it little."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port = u.hostname, u.port
    assert host and port
    hdrs = {**headers, "x-mock-stall-ms": "50"}

    async def run(duration: float) -> list[float]:
        tasks = []
        start = time.perf_counter()
        for n in range(int(duration * 100)):
            await asyncio.sleep(max(0.0, start + n / 100 - time.perf_counter()))
            tasks.append(asyncio.create_task(_first_event(host, port, u.path, hdrs)))
        return sorted(await asyncio.gather(*tasks))
    asyncio.run(run(2))  # warm-up
    return [x * 1000 for x in asyncio.run(run(seconds))]


Rows = list[tuple[str, dict[str, float]]]


class GatewayRun(NamedTuple):
    """One gateway's part of the report: its rows' prefix, its Tollway row's name, and its
    rows for requests and for streams."""

    prefix: str
    name: str
    requests: Rows
    streams: Rows


def service_pids(gw: Any) -> list[int]:
    """The processes whose CPU counts as the services' (costsink's too where it runs apart)."""
    return [p.pid for n, p in gw.named.items() if n in ("services", "costsink")]


def gateway_runs(tmp: Path, label: str, seconds: int, mutate: Any = None, floor: bool = False,
                 pin: bool = False, split: bool = False,
                 headers: dict[str, str] | None = None) -> tuple[Rows, Rows, float, float]:
    """One gateway: bare Envoy, Tollway (and the floor), bare Envoy again, in that order;
    the same for streamed time to first event. Returns both tables' rows and the services'
    CPU per request during Tollway's run, and the no-op servicers' during the floor's; `pin`:
    the no-op servicers pinned to the CPU services.pin_cpus picks; `split`: costsink in a
    process of its own, its CPU counted with the services'; `headers`: sent with every
    request, to each gateway."""
    rows: Rows = []
    ttfb: Rows = []
    floor_cpu = 0.0
    with run_gateway(tmp, mutate=mutate, split=split) as gw:
        key = gw.issue("k-main")
        bare, bare_url = bare_envoy(gw.manifest_path, tmp)
        provider = {"authorization": f"Bearer {PROVIDER_KEY}", **(headers or {})}
        ours = {"authorization": f"Bearer {key}", **(headers or {})}
        url = f"{gw.url}/v1/chat/completions"
        try:
            rows.append(("bare Envoy", h2load(bare_url, provider, seconds, tmp)))
            ttfb.append(("bare Envoy", streamed_ttfb(bare_url, provider, seconds)))
            pids = service_pids(gw)
            cpu = sum(map(cpu_seconds, pids))
            rows.append((f"Tollway ({label})", h2load(url, ours, seconds, tmp)))
            cpu = (sum(map(cpu_seconds, pids)) - cpu) / ((seconds + 2) * 100)
            ttfb.append((f"Tollway ({label})", streamed_ttfb(url, ours, seconds)))
            if floor:  # the same Envoy, the services replaced by no-op servicers
                noop = replace_services(gw)
                if pin:
                    noop_pin(noop.pid)
                try:
                    floor_cpu = cpu_seconds(noop.pid)
                    rows.append(("floor (no-op servicers)", h2load(url, provider, seconds, tmp)))
                    floor_cpu = (cpu_seconds(noop.pid) - floor_cpu) / ((seconds + 2) * 100)
                    ttfb.append(("floor (no-op servicers)",
                                 streamed_ttfb(url, provider, seconds)))
                finally:
                    noop.terminate()
                    noop.wait()
            rows.append(("bare Envoy (again)", h2load(bare_url, provider, seconds, tmp)))
            ttfb.append(("bare Envoy (again)", streamed_ttfb(bare_url, provider, seconds)))
        finally:
            bare.terminate()
            bare.wait()
    return rows, ttfb, cpu, floor_cpu


def added(rows: Rows, name: str) -> str:
    by = dict(rows)
    t = by[name]
    base50 = (by["bare Envoy"]["p50"] + by["bare Envoy (again)"]["p50"]) / 2
    base99 = (by["bare Envoy"]["p99"] + by["bare Envoy (again)"]["p99"]) / 2
    text = f"{name}: p50 +{t['p50'] - base50:.2f} ms, p99 +{t['p99'] - base99:.2f} ms"
    f = by.get("floor (no-op servicers)")
    if f:
        text += (f"; floor p50 +{f['p50'] - base50:.2f} ms, p99 +{f['p99'] - base99:.2f} ms; "
                 f"{name} / floor: p50 {t['p50'] / f['p50']:.2f}x, p99 {t['p99'] / f['p99']:.2f}x")
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rate-limit", choices=["filter", "check"],
                    help="services.rate_limit, with quotas charged on every request")
    ap.add_argument("--pin-cpus", action="store_true",
                    help="services.pin_cpus, and the floor's no-op servicers pinned alike")
    ap.add_argument("--costsink-apart", action="store_true",
                    help="also the Redis gateway with costsink in a process of its own")
    ap.add_argument("--provider-counts-differ", action="store_true",
                    help="the mock reports 100 prompt tokens where Tollway reserves for 84 "
                         "(a real tokenizer's count), so each charged request's reservation "
                         "is settled")
    args = ap.parse_args()
    headers = {"x-mock-input-tokens": "100"} if args.provider_counts_differ else None

    def rate_limited(doc: dict[str, Any]) -> None:
        if args.pin_cpus:
            doc["services"]["pin_cpus"] = True
        if args.rate_limit:
            charge_every_request(doc, args.rate_limit)

    def with_redis(url: str) -> Any:
        def mutate(doc: dict[str, Any]) -> None:
            rate_limited(doc)
            doc["storage"]["counters"] = url
        return mutate
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "memory").mkdir()
        mem, mem_ttfb, mem_cpu, floor_cpu = gateway_runs(tmp / "memory", "memory", args.seconds,
                                              mutate=rate_limited, floor=True,
                                              pin=args.pin_cpus, headers=headers)
        redis = PrivateRedis(tmp)
        redis.start()
        try:
            (tmp / "redis").mkdir()
            red, red_ttfb, red_cpu, _ = gateway_runs(
                tmp / "redis", "Redis", args.seconds, mutate=with_redis(redis.url),
                headers=headers)
            runs = [GatewayRun("", "Tollway (memory)", mem, mem_ttfb),
                    GatewayRun("Redis run: ", "Tollway (Redis)", red, red_ttfb)]
            cpus = [f"memory {mem_cpu * 1000:.2f} ms", f"Redis {red_cpu * 1000:.2f} ms"]
            if args.costsink_apart:
                (tmp / "apart").mkdir()
                label = "Redis, costsink apart"
                apart, apart_ttfb, apart_cpu, _ = gateway_runs(
                    tmp / "apart", label, args.seconds, mutate=with_redis(redis.url),
                    split=True, headers=headers)
                runs.append(GatewayRun("costsink apart run: ", f"Tollway ({label})", apart,
                                       apart_ttfb))
                cpus.append(f"{label} {apart_cpu * 1000:.2f} ms (both processes)")
        finally:
            redis.kill()
    if args.rate_limit:
        print(f"services.rate_limit: {args.rate_limit}, every request charged to an rpm and "
              f"a tpm\n")
    print(f"## A fixed 100 requests/s (h2load --h1 -c4 --rps 25 -r1 --rate-period 10ms, "
          f"open loop), {args.seconds} s each")
    table(runs, "requests", "| gateway | requests | p50 | p99 | max | non-2xx |",
          lambda r: f"{r['requests']:.0f} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | "
                    f"{r['max']:.2f} ms | {int(r['non_2xx'])}",
          "added over bare Envoy (the mean of its runs before and after, same gateway):")
    print(f"\nservices' CPU per request (extauthz, ratelimit and costsink): {', '.join(cpus)}; "
          f"the no-op servicers' (the floor's) {floor_cpu * 1000:.2f} ms")
    print(f"\n## Streamed: time to the first event, 100 streams/s started on schedule, "
          f"{args.seconds} s each")
    table(runs, "streams", "| gateway | p50 | p99 | max |",
          lambda r: f"{r['p50']:.2f} ms | {r['p99']:.2f} ms | {r['max']:.2f} ms",
          "added over bare Envoy:")


def table(runs: list[GatewayRun], which: str, header: str, cells: Any,
          added_title: str) -> None:
    """One of the report's tables (`which`: "requests" or "streams"): every gateway's rows
    with `cells(figures)`, then each Tollway's time added over bare Envoy."""
    print(header + "\n" + "|---" * header.count(" | ") + "|---|")
    for run in runs:
        for name, r in getattr(run, which):
            print(f"| {run.prefix}{name} | {cells(r)} |")
    print("\n" + added_title)
    for run in runs:
        print(f"- {added(getattr(run, which), run.name)}")


if __name__ == "__main__":
    main()
