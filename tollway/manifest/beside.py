"""A serving process's reload reads the manifest in a process of its own: a warm reader.

Reading 10,000 projects of YAML is 0.3-0.4 s of a core. On a thread of the serving process it
shared the GIL with the requests in flight: the event loop waited 0.66 ms at the median for
each turn while a reload was read (measured on its own, a loop ticking every millisecond), and
the requests in flight during a reload took 1 ms more at the median (`bench/reload.py`). A
process apart has a GIL of its own: the loop waits 0.08 ms, and those requests took what the
others did. The reader sends back only what the serving process lacks: the document without
its organizations, each organization the manifest in force holds as its fingerprint (`Known`),
and the others compiled (tollway.manifest.shipped_orgs): an edit of one rpm sends one of 101.

Where the YAML can be cut at its organizations (tollway.manifest.org_texts), the reader parses
only the organizations whose text the manifest in force does not hold, and the rest of the
document: an edit of one rpm is then one organization's text read, not 10,000 projects'. The
reader's side is tollway.manifest.reading: it parses a small read itself and forks a child for
a large one (see serve() there); kept running (`_Reader`), it spares each reload a Python start.
It reads at SCHED_IDLE, on cores the requests leave idle, with a bound (`_Reader`).
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .loader import parse
from .model import Manifest, Organization
from .org_texts import Cutter
from .orgs import Fresh, Known
from .reading import ManifestError, read
from .shipped_orgs import received

TIMEOUT = 120  # seconds: a child that takes longer is stuck, and the reload is refused
# seconds: a read the idle reader has not answered by then is read again at normal priority
# (see _Reader); 10,000 projects read whole take 0.05-0.1 s on a gateway at 100 rps
ESCALATE = 1.0


class _Reader:
    """The process's warm reader (`python -m tollway.manifest.reading --serve`): started
    once, at the first reload or by prepare(), and again if it ended. A reload used to start
    a child of its own, and that Python start and its imports were most of the reload's CPU
    (60-90 ms) on the cores the requests in flight need.

    It reads at SCHED_IDLE, on cores the requests leave idle, which a gateway leaves even at
    full load (a reload took 0.01-0.16 s there). Where busy work in its cgroup holds every
    core, it could wait for seconds: a read it has not answered within `escalate` seconds
    is read again by a reader at normal priority, which then ends (the next read is the idle
    reader's again)."""

    def __init__(self, escalate: float = ESCALATE) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one read at a time: answers come back in order
        self._ids = itertools.count()
        self._pending = b""
        self.escalate = escalate
        self._ending: list[subprocess.Popen[bytes]] = []  # killed, not reaped yet

    def prepare(self) -> None:
        with self._lock:
            self._running()

    def _running(self, idle: bool = True) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tollway.manifest.reading", "--serve",
                 *(() if idle else ("--normal-priority",))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # its stderr is ours
            self._pending = b""
        return self._proc

    def _stop(self, wait: bool = True) -> None:
        """`wait`: until it has ended; else it is reaped at a later read (a process at
        SCHED_IDLE needs an idle core even to end, which a starved one has none of)."""
        if self._proc is not None:
            self._proc.kill()
            if wait:
                self._proc.wait()
            else:
                self._ending.append(self._proc)
            self._proc = None
        self._ending = [p for p in self._ending if p.poll() is None]

    def read(self, path: str, held: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            # a reader that had ended, or starved of CPU: the read again, at normal priority
            answer = self._ask(path, held, idle=True, within=self.escalate)
            if answer is None:
                self._stop(wait=False)
                answer = self._ask(path, held, idle=False, within=TIMEOUT)
                self._stop()
            if answer is None:
                raise ManifestError(path, ["(file): the reader did not answer"])
            return answer

    def _ask(self, path: str, held: dict[str, Any], idle: bool, within: float
             ) -> dict[str, Any] | None:
        proc, request_id = self._running(idle), next(self._ids)
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps({"id": request_id, "path": path, **held})
                             .encode() + b"\n")
            proc.stdin.flush()
        except OSError:  # it had ended
            return None
        return self._answer(proc, request_id, within)

    def _answer(self, proc: subprocess.Popen[bytes], request_id: int, within: float
                ) -> dict[str, Any] | None:
        """The answer to `request_id` (an earlier one's, late, is skipped), or None if the
        reader ends or takes longer than `within` seconds."""
        assert proc.stdout is not None
        deadline = time.monotonic() + within
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                line, newline, rest = self._pending.partition(b"\n")
                if newline:
                    self._pending = rest
                    answer: dict[str, Any] = json.loads(line)
                    if answer.pop("id") == request_id:
                        return answer
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    return None
                chunk = os.read(proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    return None
                self._pending += chunk


_READER = _Reader()


def prepare_reader() -> None:
    """Start the warm reader now (run on a thread): the first reload then pays no Python
    start either."""
    _READER.prepare()


def load_beside(path: str | Path, reuse: Mapping[str, Organization],
                texts: Mapping[str, str] | None = None) -> Manifest:
    """load() for a serving process (run on a thread: it waits for the reader). `reuse`: the
    organizations of the manifest in force, by fingerprint (see parse); `texts`: its
    `org_texts`, each organization's fingerprint by the digest of its text."""
    p = Path(path)
    # only the texts of what the reader may answer as known: less to send
    answer = _READER.read(str(p), {"known": list(reuse), "texts": {
        d: fp for d, fp in (texts or {}).items() if fp in reuse}})
    if "failed" in answer:
        raise ManifestError(str(p), [f"(file): the parser failed: {answer['failed']}"])
    return _manifest(answer, p, reuse)


def load_here(path: str | Path, reuse: Mapping[str, Organization] = MappingProxyType({}),
              texts: Mapping[str, str] | None = None, cutter: Cutter | None = None
              ) -> Manifest:
    """load_beside()'s reading in this process, where no request waits for the GIL: a
    serving process's start (nothing serves yet), and `tollway render --watch`, which serves
    nothing and for which a child's Python start would be most of a reload's CPU. Either
    way the manifest records its organizations' texts, so that the next reload, the first
    after a start included, reads only the ones an edit changed (read whole at the start,
    the first reload of 10,000 projects read them all again). `cutter`: one that cut this
    manifest's text before (see Cutter)."""
    p = Path(path)
    return _manifest(read(str(p), set(reuse), texts, cutter), p, reuse)


def _manifest(answer: dict[str, Any], p: Path, reuse: Mapping[str, Organization]
              ) -> Manifest:
    """The manifest from a reading's answer (read(), or the reader's), its unchanged
    organizations taken from `reuse` and those the reader compiled from its answer."""
    if "problems" in answer:
        raise ManifestError(str(p), answer["problems"])
    doc = answer["doc"]
    items = answer.get("organizations")
    if items is not None:
        shipped = {o["fingerprint"]: received(o) for o in items if "compiled" in o}
        if shipped:  # taken as the manifest in force's are (a copy in C: 20 us for 1,001)
            reuse = {**reuse, **shipped}
        doc["organizations"] = [
            Known(o["known"]) if "known" in o else Known(o["fingerprint"]) if "compiled" in o
            else Fresh(o["fingerprint"], o["document"]) for o in items]
    manifest = parse(doc, str(p), reuse=reuse)
    if items is not None and all("text" in o for o in items):
        object.__setattr__(manifest, "org_texts", MappingProxyType(
            {o["text"]: o.get("known") or o["fingerprint"] for o in items}))
    return manifest
