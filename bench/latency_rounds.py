"""latency.py's comparison with the gateways running side by side, measured in alternation.

    python bench/latency_rounds.py [--rounds 6] [--seconds 5] [--rate-limit filter|check]
                                   [--budget] [--baseline DIR]

latency.py measures one gateway after the other, each against its own bare Envoy before and
after it, so the Redis gateway always runs second, minutes later: on this machine class two
runs of the same gateway differ by more (p50 1.7-3.4 ms) than the goals tell apart. Here all
four run at once, each in front of a mock of its own, and h2load drives them in turn:

1. bare Envoy (the memory gateway's rendered config with the router alone),
2. Tollway with memory counters,
3. the floor: a third gateway whose services are replaced by no-op servicers,
4. Tollway with Redis counters (a Redis of its own).

Each round gives each of them --seconds of a fixed 100 requests/s and then of 100 streams/s
(time to the first event), in an order rotated every round, so that a slower minute of the
machine falls on all of them alike. A gateway's figures are those of all its requests, pooled
over the rounds; the added latency is over bare Envoy's. Printed too: the services' CPU per
request during their slices (the floor's no-op servicers', likewise). A gateway waiting its
turn only idles: its timers' CPU (about 1% of a core, docs/performance.md) is the noise.
Without --rate-limit the manifest has no quota, so the Redis gateway asks Redis nothing on a
request's path; with it, every request is charged to an rpm and a tpm, as in latency.py. With
--budget, every request is also held against a project budget (the Check's hold, costsink's
commit), in Redis for the Redis gateway. `--baseline DIR` adds a fifth gateway, the Redis one
run from another checkout (a worktree of an earlier commit) on a Redis of its own, in the same
rotation: a change measured against its commit within one invocation.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from common import bare_envoy, charge_every_request, hold_every_request, pct
from latency import Request, figures, h2load_requests, service_pids, streamed_firsts
from noop_services import replace_services
from procstat import cpu_seconds

from tests.e2e.harness import PROVIDER_KEY, PrivateRedis, run_gateway

BASELINE = "baseline (Redis)"

ORDER = ("bare Envoy", "Tollway (memory)", "floor (no-op servicers)", "Tollway (Redis)")


class Target(NamedTuple):
    url: str
    headers: dict[str, str]
    pids: list[int]  # whose CPU counts as the services' (none for bare Envoy)


def tollway_target(gw: Any) -> Target:
    """A Tollway gateway's chat completions, called with a key of its own."""
    return Target(f"{gw.url}/v1/chat/completions",
                  {"authorization": f"Bearer {gw.issue('k-main')}"}, service_pids(gw))


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait()


@contextmanager
def targets(tmp: Path, rate_limit: str | None, budget: bool = False,
            baseline: Path | None = None) -> Iterator[dict[str, Target]]:
    """The four gateways of ORDER, running, and with `baseline` a fifth (BASELINE); with
    `rate_limit`, as latency.py's option; with `budget`, every request held against a budget
    too (not in the floor: nothing to hold)."""
    with ExitStack() as stack:
        def gateway(name: str, mutate: Any = None, **kw: Any) -> Any:
            (tmp / name).mkdir()
            return stack.enter_context(run_gateway(tmp / name, mutate=mutate, **kw))

        def private_redis(name: str) -> PrivateRedis:
            (tmp / name).mkdir()
            r = PrivateRedis(tmp / name)
            r.start()
            stack.callback(r.kill)
            return r

        provider = {"authorization": f"Bearer {PROVIDER_KEY}"}

        def charged(doc: dict[str, Any]) -> None:
            if rate_limit:
                charge_every_request(doc, rate_limit)

        def held(doc: dict[str, Any]) -> None:
            charged(doc)
            if budget:
                hold_every_request(doc)

        def counters_in(redis: PrivateRedis) -> Any:
            """`held`, with the counters and spend in `redis`."""
            def mutate(doc: dict[str, Any]) -> None:
                held(doc)
                doc["storage"]["counters"] = redis.url
            return mutate
        memory, floor = gateway("memory", held), gateway("floor", charged)
        red = gateway("redis", counters_in(private_redis("redis-data")))
        bare, bare_url = bare_envoy(memory.manifest_path, tmp)
        stack.callback(stop, bare)
        noop = replace_services(floor)
        stack.callback(stop, noop)
        more = {}
        if baseline:
            base = gateway("baseline", counters_in(private_redis("baseline-redis-data")),
                           root=baseline)
            more[BASELINE] = tollway_target(base)
        yield {
            "bare Envoy": Target(bare_url, provider, []),
            "Tollway (memory)": tollway_target(memory),
            "floor (no-op servicers)": Target(f"{floor.url}/v1/chat/completions", provider,
                                              [noop.pid]),
            "Tollway (Redis)": tollway_target(red),
            **more,
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=int, default=5, help="each gateway's slice in a round")
    ap.add_argument("--rate-limit", choices=["filter", "check"],
                    help="services.rate_limit, with quotas charged on every request (without, "
                         "no quota: the Redis gateway asks Redis nothing on a request's path)")
    ap.add_argument("--baseline", type=Path,
                    help="another checkout: its Redis gateway measured in the same rounds")
    ap.add_argument("--budget", action="store_true",
                    help="every request also held against a project budget too high to refuse "
                         "it (the Check's hold, then costsink's commit), in Redis for the Redis "
                         "gateway")
    args = ap.parse_args()
    order = (*ORDER, BASELINE) if args.baseline else ORDER
    requests: dict[str, list[Request]] = {name: [] for name in order}
    firsts: dict[str, list[float]] = {name: [] for name in order}
    cpu: dict[str, float] = dict.fromkeys(order, 0.0)
    baseline = args.baseline.resolve() if args.baseline else None
    with tempfile.TemporaryDirectory() as tmpdir, \
            targets(Path(tmpdir), args.rate_limit, args.budget, baseline) as gateways:
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                t = gateways[name]
                before = sum(map(cpu_seconds, t.pids))
                requests[name] += h2load_requests(t.url, t.headers, args.seconds,
                                                  Path(tmpdir))
                # h2load's 200 requests of warm-up count: 2 s more of 100 requests/s
                cpu[name] += sum(map(cpu_seconds, t.pids)) - before
                firsts[name] += streamed_firsts(t.url, t.headers, args.seconds)
            print(f"round {r + 1} of {args.rounds} done", flush=True)
    served = args.rounds * (args.seconds + 2) * 100
    if args.rate_limit:
        print(f"services.rate_limit: {args.rate_limit}, every request charged to an rpm and "
              f"a tpm")
    if args.budget:
        print("every request held against a project budget, then committed")
    print(f"\n## {args.rounds} rounds, each gateway {args.seconds} s a round of a fixed 100 "
          f"requests/s (h2load, open loop), then {args.seconds} s of 100 streams/s")
    print("| gateway | requests | p50 | p99 | max | non-2xx | streamed p50 | streamed p99 |"
          "\n|---|---|---|---|---|---|---|---|")
    fig = {name: figures(requests[name]) for name in order}
    first = {name: (pct(firsts[name], 50), pct(firsts[name], 99)) for name in order}
    for name in order:
        f = fig[name]
        print(f"| {name} | {f['requests']:.0f} | {f['p50']:.2f} ms | {f['p99']:.2f} ms | "
              f"{f['max']:.2f} ms | {f['non_2xx']:.0f} | {first[name][0]:.2f} ms | "
              f"{first[name][1]:.2f} ms |")
    bare, floor = fig["bare Envoy"], fig["floor (no-op servicers)"]
    sbare, sfloor = first["bare Envoy"], first["floor (no-op servicers)"]
    print("\nadded over bare Envoy, p50 / p99 (requests; streamed, first event):")
    for name in order[1:]:
        f, s = fig[name], first[name]
        line = (f"- {name}: +{f['p50'] - bare['p50']:.2f} / +{f['p99'] - bare['p99']:.2f} ms;"
                f" streamed +{s[0] - sbare[0]:.2f} / +{s[1] - sbare[1]:.2f} ms")
        if name != "floor (no-op servicers)":
            line += (f"; / the floor: p50 {f['p50'] / floor['p50']:.2f}x, p99 "
                     f"{f['p99'] / floor['p99']:.2f}x, streamed p50 {s[0] / sfloor[0]:.2f}x "
                     f"(the time added / the floor's added: p50 "
                     f"{(f['p50'] - bare['p50']) / (floor['p50'] - bare['p50']):.2f}x)")
        print(line)
    print("\nservices' CPU per request: " + ", ".join(
        f"{name} {1000 * cpu[name] / served:.2f} ms" for name in order[1:]))
    if args.baseline:
        this, base = fig["Tollway (Redis)"], fig[BASELINE]
        print(f"\nthis checkout's Redis gateway / the baseline's: p50 {this['p50']:.2f} / "
              f"{base['p50']:.2f} ms ({this['p50'] / base['p50']:.3f}x), p99 "
              f"{this['p99'] / base['p99']:.3f}x, services' CPU per request "
              f"{cpu['Tollway (Redis)'] / cpu[BASELINE]:.3f}x")


if __name__ == "__main__":
    main()
