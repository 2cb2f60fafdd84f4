"""Benchmark one call's cost to the event loop back to back and after a pause (warm, cold).

Run: python bench/redis_cold.py [--calls 300] [--rounds 3] [--gap-ms 10] [--redis URL]

Under full load a Check follows another at once; at 100 requests/s it follows 10 ms of
something else (sleep, Envoy, the mock), and the code and data of its path are no longer in the
CPU's caches. This measures the CPU (the thread's) and the wall time of one call in five ways,
each back to back, after `--gap-ms` asleep in the loop, and after as long spent on other work in
the same thread:

- `memory charge`: ratelimit's MemoryBackend charging two quotas (memory counters);
- `redis charge`: RedisBackend charging the same two quotas (Redis counters, as shipped: on
  the request path's lane of redis-py connections, `tollway.redis_client.Lane`);
- `redis-py's way`: the same script called through the redis-py client (its pool, retry and
  metrics around the same connection's write and read), as the charge was before the lane;
- `redis-py connection`: the same script call written and read on one redis-py connection held
  apart from the pool (no pool, no retry, no command wrappers);
- `bare protocol`: the same call on an asyncio Protocol that packs with hiredis, writes, and
  parses the answer with hiredis's reader. Not a client (no reconnection, no timeout, no
  Cluster, no AUTH): the least any Python client on asyncio could spend.

Rounds interleave the ways; each prints its median over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis
from common import ROOT  # noqa: F401  (the checkout's packages first on the path)
from redis_charge import RULES  # the two quotas that bench charges, so the figures compare

from ratelimit.backend import MemoryBackend
from ratelimit.redis_backend import RedisBackend

PAUSES = ("back to back", "asleep", "busy")  # what each call follows (measure's `between`)


class BareProtocol(asyncio.Protocol):
    """Commands written as they come, answers matched in order: the floor of a client's work."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (answer := self.reader.gets()) is not False:
            self.waiting.popleft().set_result(answer)

    def call(self, *args: Any) -> asyncio.Future[Any]:
        assert self.transport is not None
        future = asyncio.get_running_loop().create_future()
        self.transport.write(hiredis.pack_command(args))
        self.waiting.append(future)
        return future


def busy(seconds: float) -> None:
    """Other work on this thread: the interpreter's, not a sleep."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def ways(url: str, prefix: str) -> tuple[dict[str, Callable[[], Awaitable[Any]]], Any]:
    memory = MemoryBackend()
    backend = RedisBackend(url, prefix=prefix)
    keys = [backend.key("org", r) for r in RULES]
    args = backend._charge_args(RULES, [1, 1], None)  # the shipped script's arguments
    await backend.charge("org", RULES, [1, 1])  # the script loaded
    sha = backend._charge.sha
    held = await backend.client.connection_pool.get_connection()
    command = ("EVALSHA", sha, len(keys), *keys, *args)
    host, port = held.host, held.port
    _, bare = await asyncio.get_running_loop().create_connection(BareProtocol, host, port)
    if held.db:
        await bare.call("SELECT", held.db)

    async def on_held_connection() -> Any:
        await held.send_packed_command(held.pack_command(*command))
        return await held.read_response()

    async def on_bare_protocol() -> Any:
        async with asyncio.timeout(1):
            return await bare.call(*command)

    async def done() -> None:
        await backend.client.connection_pool.release(held)
        assert bare.transport is not None
        bare.transport.close()
        found = [k async for k in backend.client.scan_iter(f"{prefix}:*")]
        if found:
            await backend.client.delete(*found)
        await backend.close()

    return {"memory charge": lambda: memory.charge("org", RULES, [1, 1]),
            "redis charge": lambda: backend.charge("org", RULES, [1, 1]),
            "redis-py's way": lambda: backend._charge(keys=keys, args=args),
            "redis-py connection": on_held_connection,
            "bare protocol": on_bare_protocol}, done


async def measure(call: Callable[[], Awaitable[Any]], calls: int, gap: float,
                  between: str) -> tuple[float, float]:
    """Mean thread CPU and wall time of one call, in µs."""
    cpu = wall = 0
    for _ in range(10):
        await call()
    for _ in range(calls):
        if between == "asleep":
            await asyncio.sleep(gap)
        elif between == "busy":
            busy(gap)
        c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
        await call()
        cpu += time.thread_time_ns() - c0
        wall += time.perf_counter_ns() - w0
    return cpu / calls / 1000, wall / calls / 1000


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    a = ap.parse_args()
    calls, done = await ways(a.redis, f"bench-{uuid.uuid4().hex[:8]}")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for r in range(a.rounds):
            for between in PAUSES:
                for name, call in calls.items():
                    results.setdefault((between, name), []).append(
                        await measure(call, a.calls, a.gap_ms / 1000, between))
            print(f"round {r + 1} of {a.rounds} done", flush=True)
    finally:
        await done()
    print(f"\n## one call's CPU (this thread) and wall time, µs: medians of {a.rounds} rounds, "
          f"{a.calls} calls each; a pause of {a.gap_ms:g} ms before each call, or none")
    print("| before each call | " + " | ".join(calls) + " |")
    print("|---|" + "---|" * len(calls))
    for between in PAUSES:
        cells = []
        for name in calls:
            runs = results[(between, name)]
            cells.append(f"{statistics.median(c for c, _ in runs):.0f} / "
                         f"{statistics.median(w for _, w in runs):.0f}")
        label = {"back to back": "nothing", "asleep": f"{a.gap_ms:g} ms asleep",
                 "busy": f"{a.gap_ms:g} ms of other work"}[between]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\n(cells: CPU / wall, µs)")


if __name__ == "__main__":
    asyncio.run(main())
