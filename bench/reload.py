"""A hot reload of a 10,000-project manifest under steady traffic.

    python bench/reload.py [--projects 10000] [--seconds 20] [--format yaml|json]

The gateway runs a manifest of --projects projects (each with an rpm and a monthly budget;
their keys would be runtime keys). wrk sends ~100 requests/s on one connection (10 ms between
requests) for --seconds; a third of the way in, one project's rpm is edited. Reported: how long
the services took from the edit to the new manifest in force (their log), wrk's p50/p99/max and
non-2xx during the run, next to the same run without an edit (same gateway, same run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from common import wrk_figures
from latency import BODY
from wrk_script import post_script

from tests.e2e.harness import run_gateway, wait_until
from tollway.render import SAFE_DUMPER


def run_wrk(url: str, key: str, seconds: int, tmp: Path) -> str:
    script = post_script(tmp / "paced.lua", BODY, {"authorization": f"Bearer {key}"},
                         "function delay() return 10 end\n")
    return subprocess.run(["wrk", "-t1", "-c1", "-s", str(script), "--latency",
                           f"-d{seconds}s", url], capture_output=True, text=True).stdout


def summary(out: str) -> str:
    f = wrk_figures(out)
    return (f"p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f} ms, max {f['max']:.2f} ms, "
            f"{f['requests']:.0f} requests, non-2xx {f['non_2xx']:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--projects", type=int, default=10_000)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--format", choices=("yaml", "json"), default="yaml")
    args = ap.parse_args()
    per_org = 100

    def big(doc: dict[str, Any]) -> None:
        doc["organizations"] += [{"id": f"org{o}", "projects": [
            {"id": f"p{p}", "quotas": [{"name": "team", "rpm": 300},
                                       {"name": "budget", "spend_per_month": 50}]}
            for p in range(per_org)]} for o in range(args.projects // per_org)]

    with tempfile.TemporaryDirectory() as tmpdir, run_gateway(Path(tmpdir), mutate=big) as gw:
        tmp = Path(tmpdir)
        key = gw.issue("k-main")
        url = f"{gw.url}/v1/chat/completions"
        doc = yaml.safe_load(gw.manifest_path.read_text())
        edited: list[datetime] = []

        def write(doc: dict[str, Any]) -> None:
            """Atomically, as a ConfigMap update; the edit's time is taken once the text is
            ready (PyYAML's dumper alone takes seconds for 10,000 projects)."""
            tmp_file = gw.manifest_path.with_suffix(".tmp")
            tmp_file.write_text(yaml.dump(doc, Dumper=SAFE_DUMPER) if args.format == "yaml"
                                else json.dumps(doc))
            edited.append(datetime.now())
            tmp_file.replace(gw.manifest_path)

        if args.format == "json":  # the same manifest, written as JSON, in force first
            log = tmp / "logs" / "services.log"
            before = log.read_text().count("manifest reloaded")
            write(doc)
            wait_until(lambda: log.read_text().count("manifest reloaded") > before, "json", 30)
        quiet = run_wrk(url, key, args.seconds, tmp)

        def edit() -> None:
            time.sleep(args.seconds / 3)
            doc["organizations"][1]["projects"][0]["quotas"][0]["rpm"] = 301
            edited.clear()
            write(doc)
        editor = threading.Thread(target=edit)
        editor.start()
        busy = run_wrk(url, key, args.seconds, tmp)
        editor.join()
        log = (tmp / "logs" / "services.log").read_text()
        applied = [(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f"),
                    line.rpartition("(")[2].rstrip(")"))
                   for line in log.splitlines() if "manifest reloaded" in line]
        after = [(t, what) for t, what in applied if t >= edited[0].replace(microsecond=0)]
        took = (after[0][0] - edited[0]).total_seconds() if after else float("nan")
    print(f"## {args.projects:,} projects, ~100 requests/s on one connection, "
          f"{args.seconds} s each")
    print(f"no edit:                 {summary(quiet)}")
    print(f"one rpm edited mid-run:  {summary(busy)}")
    print(f"the services applied it {took:.2f} s after the edit ({args.format}; their watcher "
          "stats the file every 0.25 s, then parses and compiles off the event loop and swaps)"
          + (f"; {after[0][1]}" if after else ""))


if __name__ == "__main__":
    main()
