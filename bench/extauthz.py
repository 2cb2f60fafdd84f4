"""Benchmark extauthz. Run: python bench/extauthz.py [--seconds 5] [--concurrency 32]

1. gRPC: Check calls per second and p50/p99 for a cache-hit allow against the real `tollway
   serve`, next to a no-op grpc.aio Authorization servicer (always OK) measured in the same run,
   each in its own process. The ratio is the figure: what Tollway's decision costs over gRPC
   plumbing in Python.
2. HTTP: p50/p99 of a chat completion through Envoy with Tollway's whole chain (json_to_metadata,
   ext_authz, the Lua usage filter, the rate limit, the access log to costsink) and through
   Envoy alone (the same rendered config with only the router, no access log) in front of the
   same mock provider.
3. Cedar policies: the cost of one policy evaluation in process (the request's entities parsed
   and the Cedar call, every input distinct so the decision cache never hits) with 1, 10 and
   100 policies, and Check/s over gRPC with the key's project evaluating 1, 10 and 100 policies
   against the same gateway with policies off, each in its own run.

Sections: --sections grpc,http,policies (default: all).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import bare_envoy, check_load, check_request, ms, pct, serve_forever
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from tests.e2e.harness import free_port, run_gateway, tcp_open, wait_until
from tollway.manifest import load


class Noop(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request, context):  # type: ignore[no-untyped-def]
        return external_auth_pb2.CheckResponse()


def http_load(url: str, headers: dict[str, str], n: int) -> list[float]:
    body = {"model": "gpt-5.4-mini", "messages": [{"role": "user", "content": "hello"}]}
    lat = []
    with httpx.Client(timeout=10) as c:
        for _ in range(50):
            c.post(url, json=body, headers=headers).raise_for_status()
        for _ in range(n):
            t = time.perf_counter()
            c.post(url, json=body, headers=headers).raise_for_status()
            lat.append(time.perf_counter() - t)
    return lat


def policies(n: int) -> list[dict[str, str]]:
    """n - 1 policies for other tenants, in the shape of reference 000, and one that permits."""
    out = [{"id": f"tenant-{i}", "text":
            'permit (principal, action in [Action::"completion", Action::"embedding"], resource)'
            f' when {{ principal.user.tenant == "tenant{i}" && principal.status == "active" && '
            f'context.ip_address.isInRange(ip("10.{i % 256}.0.0/16")) && '
            'principal.current_daily_spend.lessThan(decimal("100.0")) };'}
           for i in range(n - 1)]
    out.append({"id": "ours", "text": 'permit (principal, action, resource) when { '
                'principal.status == "active" && '
                'principal.current_monthly_spend.lessThan(decimal("10000.0")) };'})
    return out


def policy_section(seconds: float, concurrency: int) -> None:
    from datetime import UTC, datetime

    from tollway.policy import CompiledPolicies, request_context

    def with_policies(n: int) -> Any:
        def mutate(doc: dict[str, Any]) -> None:
            if n:
                doc["policies"] = policies(n)
                doc["organizations"][0]["projects"][0]["policies"] = {"enabled": True}
        return mutate

    print("\n## Cedar policy evaluation, in process, 5,000 calls with distinct inputs (no "
          "decision-cache hits: the entities parsed and Cedar run every time)")
    print("| policies | per evaluation |\n|---|---|")
    for n in (1, 10, 100):
        with tempfile.TemporaryDirectory() as tmp, run_gateway(Path(tmp), mutate=with_policies(n)) \
                as gw:
            m = load(gw.manifest_path)
        cp = CompiledPolicies(m)
        b = m.bindings["k-main"]
        ctxs = [request_context("gpt-5.4-mini", f"127.0.{i // 256}.{i % 256}", datetime.now(UTC),
                                False, "/v1/chat/completions") for i in range(5000)]
        assert cp.evaluate(b, b.status, "completion", "gpt-5.4-mini", ctxs[0]).allowed
        cp._cache.clear()
        t = time.perf_counter()
        for ctx in ctxs:
            cp.evaluate(b, b.status, "completion", "gpt-5.4-mini", ctx)
        print(f"| {n} | {(time.perf_counter() - t) / 5000 * 1e6:.0f} µs |")

    def with_budget(counters: str) -> Any:
        def mutate(doc: dict[str, Any]) -> None:
            doc["storage"]["counters"] = counters
            doc["organizations"][0]["projects"][0]["quotas"] = [
                {"name": "bench-budget", "spend_per_day": 10**9}]
        return mutate

    variants = [("off", with_policies(0))] + [
        (f"{n} {'policy' if n == 1 else 'policies'}", with_policies(n)) for n in (1, 10, 100)
    ] + [("budget hold, memory", with_budget("memory")),
         ("budget hold, Redis", with_budget("redis://127.0.0.1:6379/0"))]
    rows = []
    for name, mutate in variants:
        with tempfile.TemporaryDirectory() as tmp, run_gateway(Path(tmp), mutate=mutate) as gw:
            key = gw.issue("k-main")
            m = load(gw.manifest_path)
            rps, lat = asyncio.run(check_load(m.services.extauthz[1],
                                              check_request(key, m.routes[0].name),
                                              seconds, concurrency))
            rows.append((name, rps, pct(lat, 50), pct(lat, 99)))
    print(f"\n## gRPC Check with Cedar policies or a budget, {concurrency} in flight, "
          f"{seconds:.0f} s each (policies: one hot key, decisions from the exact decision "
          "cache after the first; budget: every Check places a hold, none is released)")
    print("| variant | Check/s | p50 | p99 | throughput vs off |\n|---|---|---|---|---|")
    for name, rps, p50, p99 in rows:
        print(f"| {name} | {rps:,.0f} | {ms(p50)} | {ms(p99)} | {rps / rows[0][1]:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--sections", default="grpc,http,policies")
    ap.add_argument("--noop-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_server:
        serve_forever(external_auth_pb2_grpc.add_AuthorizationServicer_to_server, Noop(),
                      args.noop_server)
        return
    sections = set(args.sections.split(","))
    if "policies" in sections:
        policy_section(args.seconds, args.concurrency)
    if not sections & {"grpc", "http"}:
        return

    with tempfile.TemporaryDirectory() as tmp, run_gateway(Path(tmp)) as gw:
        key = gw.issue("k-main")
        m = load(gw.manifest_path)
        noop_port = free_port()
        noop = subprocess.Popen([sys.executable, __file__, "--noop-server", str(noop_port)])
        try:
            wait_until(lambda: tcp_open(noop_port), "no-op servicer", proc=noop)
            req = check_request(key, m.routes[0].name)
            rows = []
            for name, port in (("no-op servicer", noop_port),
                               ("extauthz (cache-hit allow)", m.services.extauthz[1])):
                rps, lat = asyncio.run(check_load(port, req, args.seconds, args.concurrency))
                rows.append((name, rps, pct(lat, 50), pct(lat, 99)))
        finally:
            noop.terminate()
            noop.wait()
        print(f"\n## gRPC Check, {args.concurrency} in flight, {args.seconds:.0f} s each")
        print("| server | Check/s | p50 | p99 |\n|---|---|---|---|")
        for name, rps, p50, p99 in rows:
            print(f"| {name} | {rps:,.0f} | {ms(p50)} | {ms(p99)} |")
        print(f"ratio extauthz/no-op: throughput {rows[1][1] / rows[0][1]:.2f}x, "
              f"p50 {rows[1][2] / rows[0][2]:.2f}x, p99 {rows[1][3] / rows[0][3]:.2f}x")

        # Envoy alone: the same bootstrap with the router only
        plain, plain_url = bare_envoy(gw.manifest_path, Path(tmp))
        try:
            provider_auth = {"authorization": "Bearer sk-provider-secret-0123456789"}
            base = http_load(plain_url, provider_auth, args.requests)
            full = http_load(f"{gw.url}/v1/chat/completions",
                             {"authorization": f"Bearer {key}"}, args.requests)
        finally:
            plain.terminate()
            plain.wait()
        print(f"\n## HTTP chat completion through Envoy, sequential, {args.requests} requests")
        print("| path | p50 | p99 | mean |\n|---|---|---|---|")
        for name, lat in (("Envoy alone → mock", base), ("Envoy + Tollway → mock", full)):
            print(f"| {name} | {ms(pct(lat, 50))} | {ms(pct(lat, 99))} | "
                  f"{ms(statistics.mean(lat))} |")
        print(f"added by Tollway: p50 +{ms(pct(full, 50) - pct(base, 50))} "
              f"({pct(full, 50) / pct(base, 50):.2f}x), "
              f"p99 +{ms(pct(full, 99) - pct(base, 99))} ({pct(full, 99) / pct(base, 99):.2f}x)")


if __name__ == "__main__":
    main()
