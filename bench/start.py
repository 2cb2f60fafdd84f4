"""How long `tollway serve` takes from launch to the first Check that passes, at scale.

    python bench/start.py [--projects 10000] [--keys 1000000] [--rounds 3] [--baseline DIR]

The quick start's manifest grown to --projects projects (as bench/scale.py grows it), with
--keys runtime keys written straight into its SQLite key store. Each round launches the
services (extauthz, ratelimit, costsink: one process) and asks a Check of one runtime key
every 50 ms until it passes. With --baseline (another checkout, e.g. a `git worktree` of an
older commit), each round launches that checkout's services too, alternating, with the same
manifest and store.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, bulk_keys
from scale import big_manifest, passes, place

from tests.e2e.harness import free_port


def first_check(tree: Path, manifest: Path, env: dict[str, str], port: int) -> float:
    """Seconds from launching `tree`'s services to the first Check of a runtime key passing."""
    log = manifest.parent / "serve.log"
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tollway.cli", "serve", "-m", str(manifest), "--services",
             "extauthz,ratelimit,costsink"], env={**env, "PYTHONPATH": str(tree)},
            cwd=tree, stdout=out, stderr=out)  # `-m` puts the working directory first
    try:
        while not passes(port, "bk5.s", "mock-small"):  # the quick start's model
            if proc.poll() is not None:
                raise SystemExit(f"{tree}: the services exited: {log.read_text()}")
            if time.perf_counter() - started > 120:
                raise SystemExit(f"{tree}: no Check passed within 120 s")
            time.sleep(0.05)
        return time.perf_counter() - started
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--projects", type=int, default=10_000)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="another checkout to start alongside")
    args = ap.parse_args()
    trees = ([args.baseline.resolve()] if args.baseline else []) + [ROOT]
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        doc = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
        port = free_port()
        doc["services"].update({"extauthz": f"127.0.0.1:{port}",
                                "ratelimit": f"127.0.0.1:{free_port()}",
                                "costsink": f"127.0.0.1:{free_port()}",
                                "metrics_port": free_port()})
        manifest = tmp / "manifest.yaml"
        manifest.write_text(yaml.safe_dump(big_manifest(doc, args.projects)))
        env = {**os.environ, "TOLLWAY_STATE_DIR": str(tmp / "state"),
               "MOCK_PROVIDER_KEY": "bench"}
        # the key store and its pepper, made as a first `tollway keys issue` makes them
        subprocess.run([sys.executable, "-m", "tollway.cli", "keys", "issue", "demo-alice",
                        "-m", str(manifest)], env=env, check=True, capture_output=True)
        pepper = (tmp / "state" / "pepper").read_text().strip().encode()
        took = time.perf_counter()
        bulk_keys(tmp / "state" / "keys.db", pepper, args.keys, args.projects, place)
        print(f"{args.projects:,} projects, {args.keys:,} runtime keys in SQLite "
              f"(written in {time.perf_counter() - took:.0f} s)")
        times: dict[Path, list[float]] = {tree: [] for tree in trees}
        for _ in range(args.rounds):
            for tree in trees:
                times[tree].append(first_check(tree, manifest, env, port))
                print(f"{tree}: first Check passed {times[tree][-1]:.2f} s after launch",
                      flush=True)
        for tree, seconds in times.items():
            print(f"{tree}: median {statistics.median(seconds):.2f} s "
                  f"({', '.join(f'{s:.2f}' for s in seconds)})")
        if args.baseline:
            ratio = statistics.median(times[ROOT]) / statistics.median(times[trees[0]])
            print(f"this checkout / the baseline: {ratio:.2f}x")


if __name__ == "__main__":
    main()
