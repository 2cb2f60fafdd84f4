"""Benchmark the whole gateway over HTTP with a native load generator.

Run: python bench/gateway_http.py [--seconds 10] [--connections 8] [--baseline DIR]
                                  [--accept-encoding gzip|identity] [--workers]
                                  [--rate-limit filter|check] [--rate-limit-in-check]
                                  [--pin-cpus] [--redis] [--budget] [--baseline-python EXE]

Starts the test harness's gateway (mock provider, `tollway serve`, the real Envoy) and drives a
1 KB chat completion through it with `wrk` (Debian package `wrk`), so the load client does not
eat the 2 cores the gateway runs on. `--baseline DIR` runs the same against another checkout
(e.g. `git worktree add /tmp/base <commit>`) in the same invocation, interleaved, so the ratio
compares like with like. Measured in every round too: bare Envoy (router only) in front of the
same mock, and the architecture's floor, this checkout's Envoy config with no-op Python
servicers in place of the services (bench/noop_services.py). Prints requests/s, p50/p99 and
the CPU per request of each process (the services, Envoy, the mock provider) per run, then
the ratios. `--rate-limit MODE` sets services.rate_limit in every run and charges each request
to a project rpm and tpm too high to refuse it (without it no quota applies, and the Check
skips the rate-limit call, which the floor still makes); `--rate-limit-in-check` compares
instead the two modes, so charged, in this checkout; `--pin-cpus` compares services.pin_cpus off
and on; `--redis` runs the gateway (this checkout and the baseline) with Redis counters, a
Redis of each run's own; `--budget` holds every request against a project budget too high to
refuse it (the Check's hold, costsink's commit), on Redis with `--redis`.
`--baseline-python EXE` runs the baseline under another interpreter (a venv of another Python
release with the project installed), this checkout's unless `--baseline` names another: the
gateway's Python processes (the services, the mock provider) then run on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import wrk_figures, wrk_with_cpu
from wrk_script import CHAT_1KB, post_script

ROOT = Path(__file__).resolve().parents[1]

# run inside the checkout under test: its harness, its package
CHILD = """
import json, os, pathlib, subprocess, sys, tempfile
sys.path.insert(0, os.environ["BENCH_ROOT"])
from tests.e2e.harness import run_gateway
sys.path.append(os.environ["BENCH_DIR"])  # appended: the checkout's packages come first
from procstat import cpu_seconds
from wrk_script import CHAT_1KB, post_script
workers = int(os.environ.get("BENCH_WORKERS", "0"))
rate_limit = os.environ.get("BENCH_RATE_LIMIT", "")
if os.environ.get("BENCH_CPUS"):  # inherited by everything started below, wrk included
    os.sched_setaffinity(0, {int(c) for c in os.environ["BENCH_CPUS"].split(",")})
redis = None
with_redis = workers or os.environ.get("BENCH_REDIS")
if with_redis:  # a Redis of the run's own: on the same cores, its CPU read like the others'
    from tests.e2e.harness import PrivateRedis
    redis = PrivateRedis(pathlib.Path(tempfile.mkdtemp()))
    redis.start()
    import atexit
    atexit.register(redis.kill)
def mutate(doc):
    if rate_limit:  # every request charged: quotas that never refuse
        doc["services"]["rate_limit"] = rate_limit
        doc["organizations"][0]["projects"][0]["quotas"] = [
            {"name": "bench-rpm", "rpm": 10**9}, {"name": "bench-tpm", "tpm": 10**12}]
    if os.environ.get("BENCH_BUDGET"):  # every request held against a budget, then committed
        doc["organizations"][0]["projects"][0].setdefault("quotas", []).append(
            {"name": "bench-budget", "spend_per_month": 10**9})
    if os.environ.get("BENCH_PIN"):
        doc["services"]["pin_cpus"] = True
    if workers:  # services.workers: N processes, costsink in its own
        doc["services"]["workers"] = workers
    if with_redis:
        # spelled out: this runs on the harness of the checkout under test, maybe an older one
        doc["storage"]["counters"] = f"redis://127.0.0.1:{redis.port}/0"
with run_gateway(pathlib.Path(tempfile.mkdtemp()), mutate=mutate,
                 split=bool(workers)) as gw:
    key = gw.issue("k-main")
    script = post_script(pathlib.Path(tempfile.mkdtemp()) / "post.lua", CHAT_1KB,
                         {"authorization": f"Bearer {key}",
                          "accept-encoding": os.environ["BENCH_ENCODING"]})
    url = gw.url + "/v1/chat/completions"
    wrk = ["wrk", "-t1", "-c" + os.environ["BENCH_CONNS"], "-s", str(script)]
    subprocess.run([*wrk, "-d3s", url], capture_output=True)  # warm-up
    pids = {n: gw.named[n].pid for n in ("services", "costsink", "envoy", "mock")
            if n in gw.named}  # costsink: a process of its own with workers
    if redis:
        pids["redis"] = redis.proc.pid
    before = {n: cpu_seconds(pid, descendants=True) for n, pid in pids.items()}
    out = subprocess.run([*wrk, "-d" + os.environ["BENCH_SECONDS"] + "s", "--latency", url],
                         capture_output=True, text=True).stdout
    cpu = {n: cpu_seconds(pid, descendants=True) - before[n] for n, pid in pids.items()}
    print("CPU " + json.dumps(cpu))
    print("WRK-OUTPUT-BEGIN")
    print(out)
"""


def run(checkout: Path, seconds: int, connections: int, encoding: str,
        workers: int = 0, rate_limit: str = "", cpus: str = "",
        pin: bool = False, redis: bool = False, budget: bool = False,
        python: str = sys.executable) -> dict[str, float]:
    """One gateway run in `checkout`; `cpus` ("0", "0,1"): the cores that the gateway, its
    mock provider and wrk all run on (default: every core); `pin`: services.pin_cpus;
    `python`: the interpreter of the run's Python processes."""
    env = {**os.environ, "BENCH_ROOT": str(checkout), "PYTHONPATH": str(checkout),
           "BENCH_SECONDS": str(seconds), "BENCH_CONNS": str(connections),
           "BENCH_ENCODING": encoding, "BENCH_WORKERS": str(workers),
           "BENCH_RATE_LIMIT": rate_limit, "BENCH_CPUS": cpus, "BENCH_PIN": "1" if pin else "",
           "BENCH_REDIS": "1" if redis else "", "BENCH_BUDGET": "1" if budget else "",
           "BENCH_DIR": str(Path(__file__).resolve().parent)}
    child = subprocess.run([python, "-c", CHILD], env=env, capture_output=True,
                           text=True, cwd=checkout, timeout=seconds + 120)
    if "WRK-OUTPUT-BEGIN" not in child.stdout:
        raise SystemExit(f"the gateway run in {checkout} failed:\n{child.stderr[-3000:]}")
    cpu_line, wrk_out = child.stdout.split("WRK-OUTPUT-BEGIN", 1)
    f = wrk_figures(wrk_out)
    cpu = json.loads(cpu_line.rsplit("CPU ", 1)[1])
    return {"rps": f["rps"], "p50_ms": f["p50"], "p99_ms": f["p99"], "non_2xx": f["non_2xx"],
            **{f"cpu_ms_{n}": 1000 * s / f["requests"] for n, s in cpu.items()}}


def cpu_line(r: dict[str, float]) -> str:
    """CPU per request of each process during one run, and their sum (empty for bare Envoy,
    whose processes are not measured)."""
    cpu = {k[len("cpu_ms_"):]: v for k, v in r.items() if k.startswith("cpu_ms_")}
    if not cpu:
        return ""
    return ("  cpu/request " + ", ".join(f"{n} {v:.2f}" for n, v in cpu.items())
            + f", all {sum(cpu.values()):.2f} ms")


def print_runs(runs: dict[str, list[dict[str, float]]]) -> None:
    """One line per run: requests/s, latency, failures and the CPU per request."""
    for name, results in runs.items():
        for r in results:
            print(f"{name:10} {r['rps']:8.1f} rps  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  non-2xx {int(r['non_2xx'])}" + cpu_line(r))


def mean(results: list[dict[str, float]], k: str) -> float:
    return sum(r[k] for r in results) / len(results)


def drive(url: str, encoding: str, seconds: int, connections: int, tmp: Path,
          pids: dict[str, int] | None = None) -> dict[str, float]:
    """wrk's warm-up and its measured run against `url` with the provider's own key, as bare
    Envoy and the no-op servicers need; with `pids`, those processes' CPU per request."""
    from tests.e2e.harness import PROVIDER_KEY

    script = post_script(tmp / "post.lua", CHAT_1KB, {"authorization": f"Bearer {PROVIDER_KEY}",
                                                      "accept-encoding": encoding})
    wrk = ["wrk", "-t1", f"-c{connections}", "-s", str(script)]
    f, cpu = wrk_with_cpu(wrk, url, seconds, pids or {}, warm_up=3)
    return {"rps": f["rps"], "p50_ms": f["p50"], "p99_ms": f["p99"], "non_2xx": f["non_2xx"],
            **{f"cpu_ms_{n}": v for n, v in cpu.items()}}


def bare(seconds: int, connections: int, encoding: str) -> dict[str, float]:
    """The same load on bare Envoy (router only) in front of the same mock: the baseline."""
    from common import bare_envoy

    from tests.e2e.harness import run_gateway

    with tempfile.TemporaryDirectory() as tmpdir, run_gateway(Path(tmpdir)) as gw:
        proc, url = bare_envoy(gw.manifest_path, Path(tmpdir))
        try:
            return drive(url, encoding, seconds, connections, Path(tmpdir))
        finally:
            proc.terminate()
            proc.wait()


def floor(seconds: int, connections: int, encoding: str, rate_limit: str,
          pin: bool = False) -> dict[str, float]:
    """The floor of the architecture at full load: this checkout's Envoy config (for
    `rate_limit`: with or without the rate-limit filter) with no-op Python servicers in place
    of the services (noop_services.py), i.e. the gRPC round trips into Python and nothing of
    Tollway's own work; `pin`: the servicers' threads on the CPU services.pin_cpus picks."""
    from noop_services import pin as noop_pin
    from noop_services import replace_services

    from tests.e2e.harness import run_gateway

    def mutate(doc: dict[str, Any]) -> None:
        if rate_limit:
            doc["services"]["rate_limit"] = rate_limit

    with tempfile.TemporaryDirectory() as tmpdir, \
            run_gateway(Path(tmpdir), mutate=mutate) as gw:
        noop = replace_services(gw)
        if pin:
            noop_pin(noop.pid)
        try:
            return drive(gw.url + "/v1/chat/completions", encoding, seconds, connections,
                         Path(tmpdir), {"noop": noop.pid, "envoy": gw.named["envoy"].pid,
                                        "mock": gw.named["mock"].pid})
        finally:
            noop.terminate()
            noop.wait()


def compare_rate_limit(args: argparse.Namespace) -> None:
    """Rate limit by Envoy's filter (two gRPC round trips per request) or in the Check (one),
    interleaved with bare Envoy in the same invocation."""
    runs: dict[str, list[dict[str, float]]] = {"filter": [], "check": [], "bare Envoy": []}
    for _ in range(args.rounds):
        for mode in ("filter", "check"):
            runs[mode].append(run(ROOT, args.seconds, args.connections, args.accept_encoding,
                                  rate_limit=mode))
        runs["bare Envoy"].append(bare(args.seconds, args.connections, args.accept_encoding))
    print_runs(runs)

    def ratio(k: str, name: str, base: str) -> float:
        return round(mean(runs[name], k) / mean(runs[base], k), 3)
    print(json.dumps({"check_over_filter": {k: ratio(k, "check", "filter") for k in (
                          "rps", "p50_ms", "p99_ms", "cpu_ms_services")},
                      "check_over_bare_envoy_rps": ratio("rps", "check", "bare Envoy")}))


def compare_pinning(args: argparse.Namespace) -> None:
    """services.pin_cpus off and on, and the floor likewise (its no-op servicers unpinned and
    pinned to the same CPU), interleaved, with bare Envoy in the same invocation."""
    runs: dict[str, list[dict[str, float]]] = {
        "unpinned": [], "pinned": [], "floor": [], "floor pin": [], "bare Envoy": []}
    for _ in range(args.rounds):
        for pin in (False, True):
            runs["pinned" if pin else "unpinned"].append(run(
                ROOT, args.seconds, args.connections, args.accept_encoding,
                rate_limit=args.rate_limit, pin=pin))
            runs["floor pin" if pin else "floor"].append(floor(
                args.seconds, args.connections, args.accept_encoding, args.rate_limit, pin=pin))
        runs["bare Envoy"].append(bare(args.seconds, args.connections, args.accept_encoding))
    print_runs(runs)

    def ratio(k: str, name: str, base: str) -> float:
        return round(mean(runs[name], k) / mean(runs[base], k), 3)
    print(json.dumps({
        "pinned_over_unpinned": {k: ratio(k, "pinned", "unpinned") for k in (
            "rps", "p50_ms", "p99_ms", "cpu_ms_services")},
        "floor_pinned_over_unpinned": {k: ratio(k, "floor pin", "floor") for k in (
            "rps", "cpu_ms_noop")},
        "rps_over_its_floor": {"unpinned": ratio("rps", "unpinned", "floor"),
                               "pinned": ratio("rps", "pinned", "floor pin")}}))


# (name, cores the whole run is pinned to, services.workers)
SCALING = [("1 core, 1 worker", "0", 1), ("2 cores, 1 worker", "0,1", 1),
           ("2 cores, 2 workers", "0,1", 2)]


def compare_workers(args: argparse.Namespace) -> None:
    """The gateway's scaling with cores and service processes: everything (Envoy, the
    services, a Redis of the run's own, the mock provider and wrk) pinned to one core, then to
    both, with one service process and with two; interleaved. Each run's Redis CPU per request
    bounds how far one Redis carries more processes on a bigger node."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in SCALING}
    for _ in range(args.rounds):
        for name, cpus, workers in SCALING:
            runs[name].append(run(ROOT, args.seconds, args.connections, args.accept_encoding,
                                  workers=workers, rate_limit=args.rate_limit, cpus=cpus))
    print_runs(runs)
    one = SCALING[0][0]
    print(json.dumps({f"{name} / {one}": {k: round(mean(runs[name], k) / mean(runs[one], k), 3)
                                          for k in ("rps", "p50_ms", "p99_ms")}
                      for name, _, _ in SCALING[1:]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", type=Path, help="another checkout to measure alongside")
    ap.add_argument("--baseline-python", default="",
                    help="the baseline's interpreter (another Python release's venv with the "
                         "project installed); the baseline is this checkout unless --baseline")
    ap.add_argument("--accept-encoding", default="gzip",
                    help="what the client accepts (gzip, as the SDKs send; identity: no "
                         "compression work for the gateway)")
    ap.add_argument("--workers", action="store_true",
                    help="instead: this checkout with Redis counters on 1 core with 1 "
                         "service process, then on 2 cores with 1 and with 2 (the scaling "
                         "over cores and processes; with --rate-limit, quotas charged)")
    ap.add_argument("--rate-limit", choices=["filter", "check"], default="",
                    help="services.rate_limit in every run, with quotas charged")
    ap.add_argument("--rate-limit-in-check", action="store_true",
                    help="instead: services.rate_limit filter vs check, with quotas charged")
    ap.add_argument("--pin-cpus", action="store_true",
                    help="instead: services.pin_cpus off vs on (and the floor unpinned vs "
                         "pinned)")
    ap.add_argument("--redis", action="store_true",
                    help="Redis counters (a Redis of each run's own) instead of memory ones")
    ap.add_argument("--budget", action="store_true",
                    help="every request also held against a project's monthly budget too high "
                         "to refuse it, and the hold committed (this checkout and the baseline)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    if args.rate_limit_in_check:
        compare_rate_limit(args)
        return
    if args.workers:
        compare_workers(args)
        return
    if args.pin_cpus:
        compare_pinning(args)
        return
    runs: dict[str, list[dict[str, float]]] = {"this": [], "baseline": [], "floor": [],
                                               "bare Envoy": []}
    baseline = args.baseline.resolve() if args.baseline else ROOT if args.baseline_python else None
    for _ in range(args.rounds):  # interleaved: all see the same machine
        if baseline:
            runs["baseline"].append(run(baseline, args.seconds, args.connections,
                                        args.accept_encoding, rate_limit=args.rate_limit,
                                        redis=args.redis, budget=args.budget,
                                        python=args.baseline_python or sys.executable))
        runs["this"].append(run(ROOT, args.seconds, args.connections, args.accept_encoding,
                                rate_limit=args.rate_limit, redis=args.redis,
                                budget=args.budget))
        runs["floor"].append(floor(args.seconds, args.connections, args.accept_encoding,
                                   args.rate_limit))
        runs["bare Envoy"].append(bare(args.seconds, args.connections, args.accept_encoding))
    print_runs(runs)
    print(json.dumps({f"rps_this_over_{name.replace(' ', '_').lower()}":
                      round(mean(runs["this"], "rps") / mean(runs[name], "rps"), 3)
                      for name in ("floor", "bare Envoy")}))
    if runs["baseline"]:
        print(json.dumps({k: round(mean(runs["this"], k) / mean(runs["baseline"], k), 3)
                          for k in ("rps", "p50_ms", "p99_ms", "cpu_ms_services")}))


if __name__ == "__main__":
    main()
