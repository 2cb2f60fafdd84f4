"""Names that go at a time, found when due without looking at the others.

The memory stores of a single node (spend counters, rate-limit counters) hold an entry for
every key that has been used within a period, up to months: a million keys on a busy node.
Finding the expired ones by a scan of them all paused the node for tens of milliseconds each
time; here the names are grouped by the minute of their time, and each operation of the store
takes at most SWEEP_BATCH of those due. The entries are plain dicts of strings and integers,
which Python's garbage collector does not track.
"""

from __future__ import annotations

MINUTE_MS = 60_000
SWEEP_BATCH = 64  # expired entries dropped per operation at most: a pause never grows


class Expiring:
    """Names with a time (ms) after which they go, grouped by minute so that those due are
    found without looking at the others. `due(now)` gives up to SWEEP_BATCH of the names whose
    minute has passed (so a name goes up to a minute after its time) and forgets them."""

    def __init__(self) -> None:
        self._at: dict[str, int] = {}
        self._minutes: dict[int, dict[str, None]] = {}  # minute → the names due in it
        self._next = 1 << 62  # no name is due in an earlier minute

    def __len__(self) -> int:
        return len(self._at)

    def get(self, name: str) -> int | None:
        return self._at.get(name)

    def set(self, name: str, at: int) -> None:
        minute, old = at // MINUTE_MS, self._at.get(name)
        self._at[name] = at
        if old is not None:
            if old // MINUTE_MS == minute:
                return
            self._forget(name, old // MINUTE_MS)
        self._minutes.setdefault(minute, {})[name] = None
        self._next = min(self._next, minute)

    def discard(self, name: str) -> None:
        old = self._at.pop(name, None)
        if old is not None:
            self._forget(name, old // MINUTE_MS)

    def _forget(self, name: str, minute: int) -> None:
        names = self._minutes[minute]
        del names[name]
        if not names:
            del self._minutes[minute]

    def due(self, now_ms: int) -> list[str]:
        out: list[str] = []
        while self._minutes and len(out) < SWEEP_BATCH:
            if self._next not in self._minutes:  # its names went: once per minute emptied
                self._next = min(self._minutes)
            if self._next >= now_ms // MINUTE_MS:
                break
            names = self._minutes[self._next]
            while names and len(out) < SWEEP_BATCH:
                name, _ = names.popitem()  # the last: taking the first walks past the taken
                del self._at[name]
                out.append(name)
            if not names:
                del self._minutes[self._next]
        return out
