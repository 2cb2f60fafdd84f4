"""The architecture's floor: no-op Python servicers in place of Tollway's services.

    python bench/noop_services.py '[EXTAUTHZ_PORT, RATELIMIT_PORT, COSTSINK_PORT]'
    python bench/noop_services.py '[["127.0.0.1:PORT", "unix:/PATH"], ...]'  (several each)

ext_authz answers OK with the metadata Tollway's Lua and rate-limit descriptors read and the
credential swap, the rate limit answers OK, the access-log sink reads and drops. Behind the
same Envoy config, they measure what the gRPC round trips into Python cost before any of
Tollway's own work (`latency.py` at a fixed rate, `gateway_http.py` at full load).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)
import grpc
import yaml
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from tests.e2e.harness import PROVIDER_KEY, Gateway, tcp_open, wait_until


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


SERVICES = ("extauthz", "ratelimit", "costsink")


async def noop_services(addresses: list[list[str]]) -> None:
    """The three servicers, each on its addresses (gRPC's: `host:port`, `unix:/path`)."""
    servers = []
    for bound, (add, servicer) in zip(addresses, (
            (external_auth_pb2_grpc.add_AuthorizationServicer_to_server, NoopAuthz()),
            (rls_pb2_grpc.add_RateLimitServiceServicer_to_server, NoopLimit()),
            (als_pb2_grpc.add_AccessLogServiceServicer_to_server, NoopSink())), strict=True):
        server = grpc.aio.server()
        add(servicer, server)
        for address in bound:
            server.add_insecure_port(address)
        await server.start()
        servers.append(server)
    await asyncio.Event().wait()


def replace_services(gw: Gateway, unix_dir: Path | None = None) -> subprocess.Popen[bytes]:
    """kill -9 the gateway's services and start the no-op servicers on their ports (and, with
    `unix_dir`, on a Unix socket each too: `unix_dir / f"{service}.sock"`); the caller
    terminates the process returned."""
    doc = yaml.safe_load(gw.manifest_path.read_text())
    gw.kill("services")
    ports = [int(doc["services"][n].rsplit(":", 1)[1]) for n in SERVICES]
    addresses = [[f"127.0.0.1:{p}"] for p in ports]
    if unix_dir is not None:
        for bound, name in zip(addresses, SERVICES, strict=True):
            bound.append(f"unix:{unix_dir / f'{name}.sock'}")
    noop = subprocess.Popen([sys.executable, str(Path(__file__)), json.dumps(addresses)])
    wait_until(lambda: all(tcp_open(p) for p in ports), "no-op servicers", proc=noop)
    return noop


def pin(pid: int) -> None:
    """Every thread of process `pid` on the CPU that services.pin_cpus gives a single
    `tollway serve` (the floor pinned as the services are)."""
    from tollway.workers import cpu_for

    cpu = cpu_for(0, os.sched_getaffinity(0))
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


if __name__ == "__main__":
    asyncio.run(noop_services([[f"127.0.0.1:{a}"] if isinstance(a, int) else a
                               for a in json.loads(sys.argv[1])]))
