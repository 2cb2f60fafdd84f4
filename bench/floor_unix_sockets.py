"""The architecture's floor over TCP and over Unix sockets, in one running gateway.

Run: python bench/floor_unix_sockets.py [--rounds 3] [--seconds 8] [--connections 16]

Starts the test harness's gateway, replaces its services with the no-op servicers of
`noop_services.py` listening on their TCP ports and on a Unix socket each, and in every round
swaps the cluster file Envoy watches between the rendered one (the services at 127.0.0.1) and
one whose three service clusters have the sockets' `pipe` addresses, waits until Envoy
reports the clusters applied, then drives the 1 KB chat completion of `gateway_http.py`: at
full load with `wrk` (requests/s, the CPU per request of each process) and at a fixed 100
requests/s with `h2load` (p50/p99, as `latency.py`). Nothing restarts between variants.

Why: every request makes two or three gRPC round trips from Envoy into Python over loopback
TCP; where Envoy and the services share a host (`tollway up`, the single pod) a Unix socket
would do, if it were cheaper.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import yaml
from common import install_watched, wrk_with_cpu
from latency import h2load
from noop_services import SERVICES, replace_services
from wrk_script import CHAT_1KB, post_script

from tests.e2e.harness import PROVIDER_KEY, run_gateway


def over_unix_sockets(doc: dict[str, Any], sockets: Path) -> dict[str, Any]:
    variant = copy.deepcopy(doc)
    clusters = {f"tollway_{name}": sockets / f"{name}.sock" for name in SERVICES}
    for cluster in variant["resources"]:
        path = clusters.pop(cluster["name"], None)
        if path is None:
            continue
        for endpoints in cluster["load_assignment"]["endpoints"]:
            for lb in endpoints["lb_endpoints"]:
                lb["endpoint"]["address"] = {"pipe": {"path": str(path)}}
    if clusters:
        raise SystemExit(f"no such cluster in the cluster file: {sorted(clusters)}")
    return variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args()
    for tool in ("wrk", "h2load"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed: apt-get install wrk nghttp2-client")
    tmp = Path(tempfile.mkdtemp())
    with run_gateway(tmp) as gw:
        noop = replace_services(gw, unix_dir=tmp)
        try:
            cds = tmp / "envoy" / "cds.yaml"
            rendered = yaml.safe_load(cds.read_text())
            variants = {"TCP": rendered, "Unix sockets": over_unix_sockets(rendered, tmp)}
            headers = {"authorization": f"Bearer {PROVIDER_KEY}", "accept-encoding": "gzip"}
            script = post_script(tmp / "post.lua", CHAT_1KB, headers)
            url = gw.url + "/v1/chat/completions"
            wrk = ["wrk", "-t1", f"-c{args.connections}", "-s", str(script)]
            pids = {"noop": noop.pid, "envoy": gw.named["envoy"].pid,
                    "mock": gw.named["mock"].pid}
            results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
            for _ in range(args.rounds):
                for name, doc in variants.items():
                    install_watched(cds, doc, gw, "cluster_manager.cds.update_success")
                    full, cpu = wrk_with_cpu(wrk, url, args.seconds, pids)
                    fixed = h2load(url, headers, args.seconds, tmp)
                    results[name].append({"rps": full["rps"], "p50": fixed["p50"],
                                          "p99": fixed["p99"],
                                          **{f"cpu_{n}": v for n, v in cpu.items()}})
                    print(f"{name:13} {full['rps']:7.1f} rps (non-2xx {full['non_2xx']:.0f})"
                          f"  cpu/request " + ", ".join(f"{n} {v:.3f}" for n, v in cpu.items())
                          + f" ms  |  100 requests/s: p50 {fixed['p50']:.2f} ms, p99 "
                          f"{fixed['p99']:.2f} ms (non-2xx {fixed['non_2xx']:.0f})", flush=True)
        finally:
            noop.terminate()
            noop.wait()

    def median(name: str, k: str) -> float:
        return round(statistics.median(r[k] for r in results[name]), 3)
    keys = ("rps", "p50", "p99", *(f"cpu_{n}" for n in pids))
    print(json.dumps({"medians": {name: {k: median(name, k) for k in keys} for name in variants},
                      "rps_unix_over_tcp": round(median("Unix sockets", "rps")
                                                 / median("TCP", "rps"), 3)}))


if __name__ == "__main__":
    main()
