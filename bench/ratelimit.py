"""Benchmark ratelimit. Run: python bench/ratelimit.py [--seconds 5] [--concurrency 32]

ShouldRateLimit calls per second and p50/p99 for the memory and the Redis backend (the real
`tollway serve --services ratelimit`, in its own process), each next to a no-op grpc.aio
RateLimitService (always OK) measured in the same run. Each request evaluates and charges the
two counters of examples/team-ai.yaml that apply to gpt-5.4 (its requests and tokens per
minute), with the limits raised so that every call is allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc
import yaml
from common import ROOT, closed_loop, pct, serve_forever
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tests.e2e.harness import free_port, tcp_open, wait_until
from tests.test_ratelimit_service import should


class Noop(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(self, request, context):  # type: ignore[no-untyped-def]
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


async def load(port: int, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    req = should("gpt-5.4", 300)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = rls_pb2_grpc.RateLimitServiceStub(ch)
        return await closed_loop(
            lambda: stub.ShouldRateLimit(req),
            lambda r: r.overall_code == rls_pb2.RateLimitResponse.OK, seconds, concurrency)


def manifest(tmp: Path, counters: str, port: int) -> Path:
    doc = yaml.safe_load((ROOT / "examples" / "team-ai.yaml").read_text())
    doc["storage"] = {"keys": "sqlite:///keys.db", "counters": counters}
    doc["services"] = {"ratelimit": f"127.0.0.1:{port}", "metrics_port": free_port()}
    doc["providers"][0]["credential"] = "env:PATH"
    for q in doc["organizations"][0]["projects"][0]["quotas"]:
        for k in ("rpm", "tpm"):
            if k in q:
                q[k] = 10**12
    path = tmp / f"{counters.split(':')[0]}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--noop-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_server:
        serve_forever(rls_pb2_grpc.add_RateLimitServiceServicer_to_server, Noop(),
                      args.noop_server)
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TOLLWAY_STATE_DIR": tmp}
        for backend, counters in (("memory", "memory"), ("redis", args.redis)):
            noop_port, port = free_port(), free_port()
            procs = [
                subprocess.Popen([sys.executable, __file__, "--noop-server", str(noop_port)]),
                subprocess.Popen([sys.executable, "-m", "tollway.cli", "serve", "--manifest",
                                  str(manifest(Path(tmp), counters, port)), "--services",
                                  "ratelimit"], env=env, stderr=subprocess.DEVNULL),
            ]
            try:
                wait_until(lambda p=noop_port: tcp_open(p), "no-op", proc=procs[0])
                wait_until(lambda p=port: tcp_open(p), "ratelimit", proc=procs[1])
                for name, p in ((f"no-op servicer ({backend} run)", noop_port),
                                (f"ratelimit, {backend} backend", port)):
                    rps, lat = asyncio.run(load(p, args.seconds, args.concurrency))
                    rows.append((name, rps, pct(lat, 50), pct(lat, 99)))
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait()
    print(f"\n## ShouldRateLimit, {args.concurrency} in flight, {args.seconds:.0f} s each")
    print("| server | calls/s | p50 | p99 |\n|---|---|---|---|")
    for name, rps, p50, p99 in rows:
        print(f"| {name} | {rps:,.0f} | {p50 * 1000:.3f} ms | {p99 * 1000:.3f} ms |")
    for i in (0, 2):
        base, real = rows[i], rows[i + 1]
        print(f"{real[0]} / no-op: throughput {real[1] / base[1]:.2f}x, "
              f"p50 {real[2] / base[2]:.2f}x, p99 {real[3] / base[3]:.2f}x")


if __name__ == "__main__":
    main()
