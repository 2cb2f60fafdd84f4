"""The serving process and Python's cyclic garbage collector.

A full collection walks every tracked object not frozen, holding the GIL: no request is
answered meanwhile. A manifest of 10,000 projects is a million objects, and a node that has
seen a million keys holds something for each. So what lives long is either frozen once built
(the manifest, the key mirror's first load) or kept in forms the collector does not track
(plain tuples and dicts of strings and numbers: the key mirror's records, the memory stores'
counters), and the pauses are measured where an operator can see them.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import Histogram

PAUSES = Histogram("tollway_gc_pause_seconds",
                   "Python garbage collections of this process and how long each held it",
                   ["generation"],
                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))


def settle_heap() -> None:
    """Keep the cyclic garbage collector off what a manifest built. 10,000 projects are a
    million objects: building them set off full collections, each a pause of every request
    of up to 200 ms while the GIL was held (a reload had a p99 of 90 ms). So collection is
    off while a manifest is parsed and compiled, and what survives is frozen (moved where
    collections do not look: reference counting still frees it when it is replaced)."""
    gc.freeze()


@contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic garbage collection while a large, long-lived structure is built (a
    manifest, the key mirror's first load), which settle_heap then freezes: each full
    collection on the way would walk all of it again."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def measure_pauses() -> None:
    """Observe every collection into tollway_gc_pause_seconds (a few microseconds each)."""
    if _observe not in gc.callbacks:
        gc.callbacks.append(_observe)


_by_generation = [PAUSES.labels(str(g)) for g in range(3)]
_started = [0.0]


def _observe(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
    else:
        _by_generation[info["generation"]].observe(time.perf_counter() - _started[0])
