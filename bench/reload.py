"""Hot reloads of a 10,000-project manifest under steady traffic.

    python bench/reload.py [--projects 10000] [--seconds 20] [--edits 5] [--format yaml|json]

The gateway runs a manifest of --projects projects (each with an rpm and a monthly budget;
their keys would be runtime keys). h2load sends 100 requests/s on schedule (open loop) for
--seconds, once without an edit and once while --edits edits, evenly spaced, each change one
project's rpm. Reported, from h2load's log of every request: p50/p99/max and non-2xx of the
run without an edit, of the requests that were in flight while a reload was under way (from
the edit's write to the services' log line saying it is in force; and of those, the ones in
flight while it was worked on, from the log line saying the change was noticed), and of the
edited run's other requests; as the baseline of the ones worked on, the requests in flight in
windows as long, halfway between reloads (selected the same way, so as biased towards long
requests); how long each reload took and how much of the manifest it compiled; and where
the three slowest of the other requests fell (how long after a reload).
A first reload, before both runs, puts the manifest in the bench's format in force.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from latency import Request, figures, h2load_requests

from tests.e2e.harness import run_gateway, wait_until
from tollway.render import SAFE_DUMPER


def summary(rows: list[Request]) -> str:
    if not rows:
        return "no request"
    f = figures(rows)
    return (f"{f['requests']:5.0f} requests  p50 {f['p50']:6.2f} ms  p99 {f['p99']:6.2f} ms  "
            f"max {f['max']:6.2f} ms  non-2xx {f['non_2xx']:.0f}")


def applied(log: str, what: str = "manifest reloaded") -> list[tuple[float, str]]:
    """The services' reload lines (or others, by `what`): when (seconds since the epoch) and
    what they compiled."""
    return [(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp(),
             line.rpartition("(")[2].rstrip(")"))
            for line in log.splitlines() if what in line]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--projects", type=int, default=10_000)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--format", choices=("yaml", "json"), default="yaml")
    args = ap.parse_args()
    per_org = 100

    def big(doc: dict[str, Any]) -> None:
        doc["organizations"] += [{"id": f"org{o}", "projects": [
            {"id": f"p{p}", "quotas": [{"name": "team", "rpm": 300},
                                       {"name": "budget", "spend_per_month": 50}]}
            for p in range(per_org)]} for o in range(args.projects // per_org)]

    def text(doc: dict[str, Any]) -> str:
        return yaml.dump(doc, Dumper=SAFE_DUMPER) if args.format == "yaml" else json.dumps(doc)

    with tempfile.TemporaryDirectory() as tmpdir, run_gateway(Path(tmpdir), mutate=big) as gw:
        tmp = Path(tmpdir)
        headers = {"authorization": f"Bearer {gw.issue('k-main')}"}
        url = f"{gw.url}/v1/chat/completions"
        log = tmp / "logs" / "services.log"
        doc = yaml.safe_load(gw.manifest_path.read_text())
        edited: list[float] = []

        def write(content: str) -> None:
            """Atomically, as a ConfigMap update."""
            tmp_file = gw.manifest_path.with_suffix(".tmp")
            tmp_file.write_text(content)
            edited.append(time.time())
            tmp_file.replace(gw.manifest_path)

        # the manifest in the bench's format, in force first: the harness wrote it in a
        # layout of its own, and each measured edit is to change one organization's text
        before = log.read_text().count("manifest reloaded")
        doc["organizations"][1]["projects"][0]["quotas"][0]["rpm"] = 299
        write(text(doc))
        wait_until(lambda: log.read_text().count("manifest reloaded") > before, "first", 30)
        quiet = h2load_requests(url, headers, args.seconds, tmp)

        # every edit's text is made before the run: PyYAML's dumper takes seconds of a core
        edits = []
        for i in range(args.edits):
            doc["organizations"][1]["projects"][0]["quotas"][0]["rpm"] = 301 + i
            edits.append(text(doc))
        edited.clear()
        since = time.time()

        def edit() -> None:
            for content in edits:
                time.sleep(args.seconds / (args.edits + 1))
                write(content)
        editor = threading.Thread(target=edit)
        editor.start()
        busy = h2load_requests(url, headers, args.seconds, tmp)
        editor.join()
        text = log.read_text()
        done = [(t, what) for t, what in applied(text) if t >= since - 0.001]
        noticed = [t for t, _ in applied(text, "changed: reading it") if t >= since - 0.001]

    # each edit is in force at the first reload line after it (the log's clock has ms); the
    # reload's work began at the line saying the change was noticed (before it, the watcher
    # was waiting for its next stat, up to 0.25 s, and nothing of the reload ran)
    windows, working = [], []
    for t in edited:
        after = [(at, what) for at, what in done if at >= t - 0.001]
        if after:
            windows.append((t, after[0][0], after[0][1]))
            began = [n for n in noticed if t - 0.001 <= n <= after[0][0]]
            working.append((began[0] if began else t, after[0][0]))

    def overlaps(r: Request, spans: list[tuple[float, float]]) -> bool:
        return any(r.start < end and r.start + r.ms / 1000 > start for start, end in spans)
    during = [r for r in busy if overlaps(r, [(s, e) for s, e, _ in windows])]
    reading = [r for r in busy if overlaps(r, working)]
    others = [r for r in busy if r not in during]
    # the baseline for `reading`, from the same run: windows as long as each reload's work,
    # halfway between its end and the next edit (or the run's end), where no reload runs.
    # Selecting the requests that overlap a window favours long ones (a long request overlaps
    # more windows), so only a baseline selected the same way tells what the reload added.
    run_end = max((r.start + r.ms / 1000 for r in busy), default=0.0)
    nexts = [*(s for s, _, _ in windows[1:]), run_end]
    halfway = [(end + nxt) / 2 for (_, end), nxt in zip(working, nexts, strict=True)]
    quiet_windows = [(mid, mid + end - began)
                     for (began, end), mid in zip(working, halfway, strict=True)]
    between = [r for r in busy if overlaps(r, quiet_windows)]
    print(f"## {args.projects:,} projects, 100 requests/s on schedule (h2load), {args.seconds} s "
          f"each, {args.format}")
    print(f"no edit:                          {summary(quiet)}")
    print(f"{len(windows)} edits, in flight in a reload: {summary(during)}")
    print(f"  of which while it was worked on: {summary(reading)}")
    print(f"  baseline, as long, between them: {summary(between)}")
    print(f"{len(windows)} edits, the other requests:    {summary(others)}")
    for (start, end, what), (began, _) in zip(windows, working, strict=True):
        print(f"an edit in force {end - start:.2f} s after it was written, "
              f"{end - began:.2f} s after it was noticed ({what})")
    # where the slowest of the others fell: right after a reload (work it left behind) or
    # away from any (something else on the machine)
    for r in sorted(others, key=lambda r: -r.ms)[:3]:
        since = [r.start - end for _, end, _ in windows if r.start >= end]
        until = [start - r.start for start, _, _ in windows if start >= r.start]
        print(f"a slowest other request, {r.ms:.1f} ms: "
              + (f"{min(since):.2f} s after a reload ended" if since else "before any reload")
              + (f", {min(until):.2f} s before the next edit" if until else ""))
    if len(windows) < len(edited):
        print(f"{len(edited) - len(windows)} edits never reported in force")


if __name__ == "__main__":
    main()
