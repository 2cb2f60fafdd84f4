"""Latency Tollway adds over bare Envoy at a steady ~100 requests/s, and the architecture's floor.

    python bench/latency.py [--seconds 20]

Three gateways in front of the same mock provider, each driven by `wrk` on one connection with
a 10 ms pause between requests (about 100 requests/s; wrk's latency excludes the pause):
1. bare Envoy: the rendered config with the router alone (no filters, no access log);
2. the floor: the very Envoy config Tollway runs, but ext_authz, rate limit and access log
   answered by no-op Python servicers (OK with the metadata Tollway's filters expect) — what
   two gRPC round trips into Python cost before any of Tollway's work;
3. Tollway: the real services (memory counters), the same Envoy.
Bare Envoy is measured first and last, to show the machine's drift. Prints p50/p99 per run and
Tollway's added latency over bare Envoy and its ratio to the floor's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
import yaml
from common import bare_envoy, wrk_figures
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from tests.e2e.harness import PROVIDER_KEY, run_gateway, tcp_open, wait_until

BODY = {"model": "gpt-5.4-mini", "max_tokens": 5,
        "messages": [{"role": "user", "content": "word " * 50}]}


class NoopAuthz(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """OK, with what Tollway's Lua and rate-limit descriptors read, and the credential swap."""

    def __init__(self) -> None:
        md = struct_pb2.Struct()
        md.update({"org": "acme", "project": "team-ai", "client": "app", "key_id": "k-main",
                   "model": "gpt-5.4-mini", "provider": "openai", "route": "route0",
                   "dialect": "openai", "stream": False, "reserve_tokens": "100"})
        self.response = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK), dynamic_metadata=md,
            ok_response=external_auth_pb2.OkHttpResponse(headers=[
                {"header": {"key": "authorization", "value": f"Bearer {PROVIDER_KEY}"}}]))

    async def Check(self, request: Any, context: Any) -> Any:
        return self.response


class NoopLimit(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        return rls_pb2.RateLimitResponse(overall_code=rls_pb2.RateLimitResponse.OK)


class NoopSink(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    async def StreamAccessLogs(self, it: Any, context: Any) -> Any:
        async for _ in it:
            pass
        return als_pb2.StreamAccessLogsResponse()


async def noop_services(ports: list[int]) -> None:
    servers = []
    for port, (add, servicer) in zip(ports, (
            (external_auth_pb2_grpc.add_AuthorizationServicer_to_server, NoopAuthz()),
            (rls_pb2_grpc.add_RateLimitServiceServicer_to_server, NoopLimit()),
            (als_pb2_grpc.add_AccessLogServiceServicer_to_server, NoopSink())), strict=True):
        server = grpc.aio.server()
        add(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        servers.append(server)
    await asyncio.Event().wait()


def wrk(url: str, headers: dict[str, str], seconds: int, tmp: Path) -> dict[str, float]:
    script = tmp / "paced.lua"
    script.write_text("wrk.method = 'POST'\n"
                      f"wrk.body = {json.dumps(json.dumps(BODY))}\n"
                      "wrk.headers['content-type'] = 'application/json'\n"
                      + "".join(f"wrk.headers['{k}'] = '{v}'\n" for k, v in headers.items())
                      + "function delay() return 10 end\n")
    cmd = ["wrk", "-t1", "-c1", "-s", str(script), "--latency"]
    subprocess.run([*cmd, "-d2s", url], capture_output=True)  # warm-up
    return wrk_figures(subprocess.run([*cmd, f"-d{seconds}s", url], capture_output=True,
                                      text=True).stdout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (clock ticks from /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=20)
    args = ap.parse_args()
    results: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmpdir, run_gateway(Path(tmpdir)) as gw:
        tmp = Path(tmpdir)
        key = gw.issue("k-main")
        doc = yaml.safe_load(gw.manifest_path.read_text())
        bare, bare_url = bare_envoy(gw.manifest_path, tmp)
        provider = {"authorization": f"Bearer {PROVIDER_KEY}"}
        tollway_url = f"{gw.url}/v1/chat/completions"
        try:
            results.append(("bare Envoy", wrk(bare_url, provider, args.seconds, tmp)))
            services = gw.named["services"].pid
            cpu = cpu_seconds(services)
            tollway = wrk(tollway_url, {"authorization": f"Bearer {key}"}, args.seconds, tmp)
            cpu = cpu_seconds(services) - cpu
            results.append(("Tollway", tollway))
            # the floor: the same Envoy, the services replaced by no-op servicers
            gw.kill("services")
            ports = [int(doc["services"][n].rsplit(":", 1)[1])
                     for n in ("extauthz", "ratelimit", "costsink")]
            noop = subprocess.Popen([sys.executable, __file__, "--noop", json.dumps(ports)])
            try:
                wait_until(lambda: all(tcp_open(p) for p in ports), "no-op servicers",
                           proc=noop)
                results.append(("floor (no-op servicers)",
                                wrk(tollway_url, provider, args.seconds, tmp)))
            finally:
                noop.terminate()
                noop.wait()
            results.append(("bare Envoy (again)", wrk(bare_url, provider, args.seconds, tmp)))
        finally:
            bare.terminate()
            bare.wait()
    print(f"## ~100 requests/s on one connection, {args.seconds} s each (wrk -t1 -c1, "
          "10 ms between requests)")
    print("| gateway | requests/s | p50 | p99 | non-2xx |\n|---|---|---|---|---|")
    for name, r in results:
        print(f"| {name} | {r['rps']:.0f} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | "
              f"{int(r['non_2xx'])} |")
    by = dict(results)
    t = by["Tollway"]
    base50 = (by["bare Envoy"]["p50"] + by["bare Envoy (again)"]["p50"]) / 2
    base99 = (by["bare Envoy"]["p99"] + by["bare Envoy (again)"]["p99"]) / 2
    f = by["floor (no-op servicers)"]
    requests = t["rps"] * args.seconds + 2 * t["rps"]  # the run and its 2 s warm-up
    print(f"\nservices' CPU per request: {cpu / requests * 1000:.2f} ms "
          f"(extauthz, ratelimit and costsink in one process)")
    print(f"added over bare Envoy: Tollway p50 +{t['p50'] - base50:.2f} ms, p99 "
          f"+{t['p99'] - base99:.2f} ms; floor p50 +{f['p50'] - base50:.2f} ms, p99 "
          f"+{f['p99'] - base99:.2f} ms; Tollway / floor: p50 {t['p50'] / f['p50']:.2f}x, "
          f"p99 {t['p99'] / f['p99']:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--noop":
        asyncio.run(noop_services(json.loads(sys.argv[2])))
    else:
        main()
