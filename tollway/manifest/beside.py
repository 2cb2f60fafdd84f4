"""A serving process's reload reads the manifest in a child process.

Reading 10,000 projects of YAML is 0.3-0.4 s of a core. On a thread of the serving process it
shared the GIL with the requests in flight: the event loop waited 0.66 ms at the median for
each turn while a reload was read (measured on its own, a loop ticking every millisecond), and
the requests in flight during a reload took 1 ms more at the median (`bench/reload.py`). A
child process has a GIL of its own: the loop waits 0.08 ms, and those requests took what the
others did. The child sends back only what the serving process lacks: the document without its
organizations, each organization the manifest in force holds as its fingerprint (`Known`),
and the others whole (`Fresh`): an edit of one rpm sends one of 101.

Where the YAML can be cut at its organizations (tollway.manifest.org_texts), the child reads
only the organizations whose text the manifest in force does not hold, and the rest of the
document: an edit of one rpm is then one organization's text read, not 10,000 projects'. The
child's side is tollway.manifest.reading.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .loader import Fresh, Known, parse
from .model import Manifest, Organization
from .reading import ManifestError, read

TIMEOUT = 120  # seconds: a child that takes longer is stuck, and the reload is refused


def load_beside(path: str | Path, reuse: Mapping[str, Organization],
                texts: Mapping[str, str] | None = None) -> Manifest:
    """load() for a serving process (run on a thread: it waits for the child). `reuse`: the
    organizations of the manifest in force, by fingerprint (see parse); `texts`: its
    `org_texts`, each organization's fingerprint by the digest of its text."""
    p = Path(path)
    out = subprocess.run([sys.executable, "-m", "tollway.manifest.reading", str(p)],
                         # only the texts of what the child may answer as known: less to send
                         input=json.dumps({"known": list(reuse), "texts": {
                             d: fp for d, fp in (texts or {}).items() if fp in reuse}}),
                         capture_output=True, text=True, timeout=TIMEOUT)
    if out.returncode != 0:
        raise ManifestError(str(p), [f"(file): the parser failed: {out.stderr[-500:]}"])
    return _manifest(json.loads(out.stdout), p, reuse)


def load_here(path: str | Path, reuse: Mapping[str, Organization] = MappingProxyType({}),
              texts: Mapping[str, str] | None = None) -> Manifest:
    """load_beside()'s reading in this process, where no request waits for the GIL: a
    serving process's start (nothing serves yet), and `tollway render --watch`, which serves
    nothing and for which a child's Python start would be most of a reload's CPU. Either
    way the manifest records its organizations' texts, so that the next reload, the first
    after a start included, reads only the ones an edit changed (read whole at the start,
    the first reload of 10,000 projects read them all again)."""
    p = Path(path)
    return _manifest(read(str(p), set(reuse), texts), p, reuse)


def _manifest(answer: dict[str, Any], p: Path, reuse: Mapping[str, Organization]
              ) -> Manifest:
    """The manifest from a reading's answer (read()), its unchanged organizations taken
    from `reuse`."""
    if "problems" in answer:
        raise ManifestError(str(p), answer["problems"])
    doc = answer["doc"]
    items = answer.get("organizations")
    if items is not None:
        doc["organizations"] = [Known(o["known"]) if "known" in o
                                else Fresh(o["fingerprint"], o["document"]) for o in items]
    manifest = parse(doc, str(p), reuse=reuse)
    if items is not None and all("text" in o for o in items):
        object.__setattr__(manifest, "org_texts", MappingProxyType(
            {o["text"]: o.get("known") or o["fingerprint"] for o in items}))
    return manifest
