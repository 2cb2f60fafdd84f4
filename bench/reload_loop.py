"""What a hot reload of 10,000 projects costs a serving process's event loop, on its own.

    python bench/reload_loop.py [--projects 10000] [--reloads 3]
    PYTHONPATH=/tmp/base python bench/reload_loop.py    (another checkout's tollway)

One process, as `tollway serve` runs: a manifest watcher reloading on a thread while the event
loop ticks every millisecond (asyncio.sleep(0.001)), nothing else running. Each reload edits one
project's rpm and waits until the watcher has it in force. Printed per reload: how long it took
and how late the loop's ticks were meanwhile (p50/p99/max): every millisecond the loop waits
is a millisecond added to the requests it serves. No gateway and no load, so the figure is the
reload's own, not the machine's: bench/reload.py measures requests through the whole gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from pathlib import Path

import yaml
from common import pct
from scale import big_manifest

from tests.e2e.harness import offline_manifest
from tollway.manifest import load
from tollway.reload import ManifestWatcher
from tollway.render import SAFE_DUMPER


async def reloads(path: Path, edits: list[str]) -> None:
    try:  # a serving process loads its manifest ready for reloads (since reloads reuse)
        manifest = load(path, reuse={})
    except TypeError:
        manifest = load(path)
    gc.freeze()  # as tollway serve does once the manifest is compiled
    watcher = ManifestWatcher(path, manifest)
    ticks: list[tuple[float, float]] = []  # (when, how late)
    stop = False

    async def tick() -> None:
        while not stop:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            ticks.append((t, time.perf_counter() - t - 0.001))
    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.5)
    for i, text in enumerate(edits):
        await asyncio.to_thread(path.write_text, text)
        started = time.perf_counter()
        assert await asyncio.to_thread(watcher.check), "the edit was not applied"
        ended = time.perf_counter()
        late = sorted(ms for t, ms in ticks if started <= t <= ended)
        print(f"reload {i + 1}: {ended - started:.2f} s; the loop's {len(late)} ticks late by "
              f"p50 {1e3 * pct(late, 50):.2f} ms, p99 {1e3 * pct(late, 99):.2f} ms, "
              f"max {1e3 * late[-1]:.2f} ms")
        await asyncio.sleep(0.5)
    stop = True
    await ticker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--projects", type=int, default=10_000)
    ap.add_argument("--reloads", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TOLLWAY_STATE_DIR"] = tmp
        for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MOCK_PROVIDER_KEY"):
            os.environ.setdefault(name, "unused")
        doc = big_manifest(offline_manifest(), args.projects)
        path = Path(tmp) / "manifest.yaml"
        path.write_text(yaml.dump(doc, Dumper=SAFE_DUMPER))
        edits = []  # made before the loop runs: PyYAML's dumper takes seconds
        for i in range(args.reloads):
            doc["organizations"][5]["projects"][0]["quotas"][0]["rpm"] = 400 + i
            edits.append(yaml.dump(doc, Dumper=SAFE_DUMPER))
        print(f"## {args.projects:,} projects (YAML), one rpm edited per reload")
        asyncio.run(reloads(path, edits))


if __name__ == "__main__":
    main()
