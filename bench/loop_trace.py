"""Where a request's time goes inside `tollway serve`, at a fixed 100 requests/s.

    python bench/loop_trace.py [--seconds 10]

Runs the test harness's gateway (memory counters) with the services' event loop traced: each
callback's start and duration, kept in memory and written out on SIGUSR2. h2load drives it as
bench/latency.py does (100 requests/s, open loop) and logs each request's send time and
latency; h2load and the loop read the same wall clock, so each request's window can be matched
with what the loop ran meanwhile. Prints
1. the median request's timeline: every loop callback between its send and its answer (the
   Check, the rate-limit call and gRPC's own steps around them);
2. the requests whose window held costsink reading one of Envoy's access-log flushes (Envoy
   sends the log every 100 ms; the loop step that reads it is the one before the ledger
   writer wakes) against the others: their p50/p99, and how long that step held the loop.
The trace costs a little per callback: compare latencies between runs of this script, not
with bench/latency.py's.
"""

from __future__ import annotations

import argparse
import bisect
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
WRITER = "AccessLogSink.write_forever"
FLUSH_GAP = 0.02  # s: Envoy flushes every 0.1 s (render.ACCESS_LOG_FLUSH)
READ_BEFORE = 0.002  # s: how far before the writer's wake-up its read is looked for


def serve_traced(out: str, args: list[str]) -> None:
    """`tollway serve` with each loop callback timed (the child process)."""
    import asyncio
    import asyncio.events

    sys.path[0] = str(ROOT)  # the packages, not bench/'s scripts of the same names
    from tollway.cli import main

    trace: list[tuple[float, float, str]] = []
    run = asyncio.events.Handle._run

    def label(callback: Any) -> str:
        task = getattr(callback, "__self__", None)
        if isinstance(task, asyncio.Task):
            coro = task.get_coro()
            return getattr(coro, "__qualname__", None) or repr(coro)[:60]
        return getattr(callback, "__qualname__", None) or repr(callback)[:60]

    def timed(handle: asyncio.events.Handle) -> None:
        start = time.perf_counter()
        run(handle)
        took = time.perf_counter() - start
        trace.append((time.time() - took, took, label(handle._callback)))

    def dump(*_: Any) -> None:
        part = Path(out + ".part")  # renamed when whole: the reader waits for the name
        part.write_text("\n".join(f"{t:.6f}\t{d:.6f}\t{n}" for t, d, n in trace))
        part.rename(out)
        trace.clear()

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]
    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["tollway", "serve", *args]
    main()


def timeline(trace: list[tuple[float, float, str]], starts: list[float], send: float,
             latency: float) -> list[str]:
    i = bisect.bisect_left(starts, send)
    lines = []
    while i < len(trace) and trace[i][0] < send + latency:
        t, d, name = trace[i]
        lines.append(f"  +{(t - send) * 1000:5.2f} ms  {d * 1000:5.3f} ms  {name}")
        i += 1
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--serve", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve is not None:
        serve_traced(a.serve[0], a.serve[1:])
        return

    from common import pct
    from latency import h2load  # bench/latency.py's load (it puts the checkout on the path)

    from tests.e2e.harness import run_gateway, tcp_open, wait_until

    tmp = Path(tempfile.mkdtemp(prefix="loop-trace-"))
    out = tmp / "trace.tsv"
    with run_gateway(tmp) as gw:
        key = gw.issue("k-main")
        gw.kill("services")  # the same services, traced
        doc = yaml.safe_load(gw.manifest_path.read_text())
        traced = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(out), "--manifest", str(gw.manifest_path),
             "--services", "extauthz,ratelimit,costsink,admin"],
            env=gw.env, cwd=ROOT, stdout=(tmp / "traced.log").open("wb"),
            stderr=subprocess.STDOUT)
        gw.procs.append(traced)
        port = int(doc["services"]["extauthz"].rsplit(":", 1)[1])
        wait_until(lambda: tcp_open(port), "traced services", proc=traced)
        url = f"{gw.url}/v1/chat/completions"
        headers = {"authorization": f"Bearer {key}"}
        stats = h2load(url, headers, a.seconds, tmp)  # its warm-up is not in its log
        os.kill(traced.pid, signal.SIGUSR2)
        wait_until(out.exists, "the trace")
        rows = [line.split("\t") for line in out.read_text().splitlines()]
        requests = sorted((int(r[0]) / 1e6, int(r[2]) / 1e6) for r in
                          (x.split("\t") for x in (tmp / "h2load.log").read_text().splitlines()))

    trace = sorted((float(t), float(d), n) for t, d, n in rows)
    starts = [t for t, _, _ in trace]
    print(f"h2load: {stats['requests']} requests, p50 {stats['p50']:.2f} ms, "
          f"p99 {stats['p99']:.2f} ms; the loop ran {len(trace)} callbacks")

    by_latency = sorted(requests, key=lambda r: r[1])
    send, latency = by_latency[len(by_latency) // 2]
    print(f"\nthe median request ({latency * 1000:.2f} ms), the loop's callbacks meanwhile:")
    print("\n".join(timeline(trace, starts, send, latency)))

    # the writer's first wake-up after a flush follows the step that read it: the longest of
    # the steps just before (a Check's or gRPC's own may come in between); the writer's later
    # steps, after its ledger write, come within milliseconds
    reads: list[tuple[float, float, str]] = []
    last = 0.0
    for i, (t, _, name) in enumerate(trace):
        if name == WRITER:
            before = [x for x in trace[max(0, i - 8):i] if x[0] > t - READ_BEFORE]
            if before and t - last > FLUSH_GAP:
                reads.append(max(before, key=lambda x: x[1]))
            last = t
    read_at = [t for t, _, _ in reads]
    held = [d for _, d, _ in reads]

    def met(send: float, latency: float) -> bool:
        """The request's window and a read overlap (a read may begin just before the send)."""
        i = bisect.bisect_left(read_at, send + latency) - 1
        return i >= 0 and reads[i][0] + reads[i][1] > send

    hit = [lat for s, lat in requests if met(s, lat)]
    miss = [lat for s, lat in requests if not met(s, lat)]

    def p(xs: list[float], q: float) -> str:
        return f"{pct(xs, q) * 1000:.2f} ms" if xs else "-"

    print(f"\ncostsink reading a flush held the loop {len(held)} times: p50 {p(held, 50)}, "
          f"max {p(held, 100)}")
    print(f"requests that met one: {len(hit)}, p50 {p(hit, 50)}, p99 {p(hit, 99)}")
    print(f"the others:            {len(miss)}, p50 {p(miss, 50)}, p99 {p(miss, 99)}")
    slowest = by_latency[-max(1, len(by_latency) // 100):]
    print(f"of the slowest 1% ({len(slowest)}), {sum(met(s, lat) for s, lat in slowest)} "
          f"met a flush")


if __name__ == "__main__":
    main()
