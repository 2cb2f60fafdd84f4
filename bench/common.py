"""What the benchmarks share: percentiles, a closed-loop gRPC load, a no-op server runner, an
extauthz Check request. Run the benchmarks from the repository root (`python bench/X.py`): the
gateway's subprocesses must import the packages, not these scripts of the same names."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from envoy.service.auth.v3 import external_auth_pb2  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from tollway.metadata import REQUEST  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def ms(x: float) -> str:
    return f"{x * 1000:.3f} ms"


async def closed_loop(call: Callable[[], Awaitable[Any]], check: Callable[[Any], bool],
                      seconds: float, concurrency: int) -> tuple[float, list[float]]:
    """`concurrency` callers, each calling again as soon as its answer arrives, for `seconds`;
    returns calls per second and every latency. 200 warm-up calls first."""
    for _ in range(200):
        await call()
    lat: list[float] = []
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            t = time.perf_counter()
            answer = await call()
            lat.append(time.perf_counter() - t)
            assert check(answer), answer
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(lat) / (time.perf_counter() - started), lat


def serve_forever(add: Callable[[Any, grpc.aio.Server], None], servicer: Any, port: int) -> None:
    """Run one servicer (the no-op baselines) until the process is terminated."""
    async def run() -> None:
        server = grpc.aio.server()
        add(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()
    asyncio.run(run())


def check_request(key: str, route: str) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    attrs.context_extensions["route"] = route
    attrs.request.http.headers["authorization"] = f"Bearer {key}"
    attrs.request.http.headers["content-type"] = "application/json"
    body = struct_pb2.Struct()
    body.update({"model": "gpt-5.4-mini", "stream": False, "max_tokens": 256})
    attrs.metadata_context.filter_metadata[REQUEST].CopyFrom(body)
    return req
