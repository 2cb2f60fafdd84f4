"""What one of Envoy's filters costs the whole gateway: the same running gateway with and
without it, interleaved.

Run: python bench/filter_cost.py [--without envoy.filters.http.ratelimit] [--rounds 5]
                                 [--seconds 8] [--connections 16]
                                 [--lua-without envoy_on_response]

Starts the test harness's gateway (mock provider, `tollway serve`, the real Envoy following the
files `tollway render --dir` wrote) and, in every round, swaps the listener file Envoy watches
between the rendered one and one without the named HTTP filters, waits until Envoy reports the
listener applied, then drives the 1 KB chat completion of `gateway_http.py` through it with
`wrk`. `--lua-without FUNCTION` instead keeps every filter and renames one of the usage
filter's two functions (`envoy_on_request`, `envoy_on_response`), which Envoy then does not
call: what each side of the Lua filter costs. Nothing restarts between variants, so the
ratio compares one process set with itself.

Why: the ratelimit filter's gRPC round trip is the largest cost left on the request path
(docs/performance.md). Without it, nothing is rate limited: the figure is an upper bound of
what answering the rate limit inside ext_authz's Check would gain, not a configuration to run.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from common import install_watched, wrk_with_cpu
from wrk_script import CHAT_1KB, post_script

from tests.e2e.harness import run_gateway


def http_managers(listeners: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each HTTP connection manager's config in a listener file, to edit in place."""
    for listener in listeners["resources"]:
        for chain in listener["filter_chains"]:
            for net in chain["filters"]:
                yield net["typed_config"]


def without(doc: dict[str, Any], filters: set[str]) -> dict[str, Any]:
    variant = copy.deepcopy(doc)
    for hcm in http_managers(variant):
        missing = filters - {f["name"] for f in hcm["http_filters"]}
        if missing:
            raise SystemExit(f"no such HTTP filter in the listener: {sorted(missing)}")
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in filters]
    return variant


def lua_without(doc: dict[str, Any], function: str) -> dict[str, Any]:
    """The listener with the usage filter's `function` renamed, so Envoy never calls it."""
    variant = copy.deepcopy(doc)
    lua = [f for hcm in http_managers(variant) for f in hcm["http_filters"]
           if f["name"] == "envoy.filters.http.lua"]
    if not lua:
        raise SystemExit("no Lua filter in the listener")
    for f in lua:
        source = f["typed_config"]["default_source_code"]
        code = source["inline_string"]
        if f"function {function}(" not in code:
            raise SystemExit(f"the usage filter has no {function}")
        source["inline_string"] = code.replace(f"function {function}(",
                                               f"local function unused_{function}(")
    return variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--without", action="append", default=[],
                    help="an HTTP filter's name (repeatable; default: the rate limit filter)")
    ap.add_argument("--lua-without", choices=("envoy_on_request", "envoy_on_response"),
                    help="instead: every filter, the usage filter without this function")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed: apt-get install wrk")
    removed = set(args.without or ["envoy.filters.http.ratelimit"])
    tmp = Path(tempfile.mkdtemp())
    with run_gateway(tmp) as gw:
        lds = tmp / "envoy" / "lds.yaml"
        rendered = yaml.safe_load(lds.read_text())
        if args.lua_without:
            variants = {"as rendered": rendered, f"Lua without {args.lua_without}":
                        lua_without(rendered, args.lua_without)}
        else:
            variants = {"as rendered": rendered, "without " + ", ".join(sorted(removed)):
                        without(rendered, removed)}
        key = gw.issue("k-main")
        script = post_script(tmp / "post.lua", CHAT_1KB, {"authorization": f"Bearer {key}",
                                                          "accept-encoding": "gzip"})
        url = gw.url + "/v1/chat/completions"
        wrk = ["wrk", "-t1", f"-c{args.connections}", "-s", str(script)]
        pids = {n: gw.named[n].pid for n in ("services", "envoy", "mock")}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, doc in variants.items():
                # the draining old listener's connections close with wrk's warm-up
                install_watched(lds, doc, gw, "listener_manager.lds.update_success")
                f, cpu = wrk_with_cpu(wrk, url, args.seconds, pids)
                results[name].append({**f, **{f"cpu_{n}": v for n, v in cpu.items()}})
                print(f"{name:40} {f['rps']:7.1f} rps  p50 {f['p50']:6.2f} ms  "
                      f"p99 {f['p99']:6.2f} ms  non-2xx {int(f['non_2xx'])}  cpu/request "
                      + ", ".join(f"{n} {v:.2f}" for n, v in cpu.items()) + " ms", flush=True)

    def median(name: str, k: str) -> float:
        return statistics.median(r[k] for r in results[name])
    full, less = variants
    print(json.dumps({"medians": {name: {k: round(median(name, k), 3) for k in
                                         ("rps", "p50", "p99", *(f"cpu_{n}" for n in pids))}
                                  for name in variants},
                      "rps_without_over_rendered": round(median(less, "rps")
                                                         / median(full, "rps"), 3)}))


if __name__ == "__main__":
    main()
