"""A serving process's reload reads the manifest in a child process.

Reading 10,000 projects of YAML is 0.3-0.4 s of a core. On a thread of the serving process it
shared the GIL with the requests in flight: the event loop waited 0.66 ms at the median for
each turn while a reload was read (measured on its own, a loop ticking every millisecond), and
the requests in flight during a reload took 1 ms more at the median (`bench/reload.py`). A
child process has a GIL of its own: the loop waits 0.08 ms, and those requests took what the
others did. The child sends back only what the serving process lacks: the document without its
organizations, each organization the manifest in force holds as its fingerprint (`Known`),
and the others whole (`Fresh`): an edit of one rpm sends one of 101.

    python -m tollway.manifest.beside MANIFEST < fingerprints.json   (the child's side)
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .loader import Fresh, Known, ManifestError, _read, document, fingerprint, parse
from .model import Manifest, Organization

TIMEOUT = 120  # seconds: a child that takes longer is stuck, and the reload is refused


def load_beside(path: str | Path, reuse: Mapping[str, Organization]) -> Manifest:
    """load() for a serving process (run on a thread: it waits for the child). `reuse`: the
    organizations of the manifest in force, by fingerprint (see parse)."""
    p = Path(path)
    out = subprocess.run([sys.executable, "-m", "tollway.manifest.beside", str(p)],
                         input=json.dumps(list(reuse)), capture_output=True, text=True,
                         timeout=TIMEOUT)
    if out.returncode != 0:
        raise ManifestError(str(p), [f"(file): the parser failed: {out.stderr[-500:]}"])
    result = json.loads(out.stdout)
    if "problems" in result:
        raise ManifestError(str(p), result["problems"])
    doc = result["doc"]
    if "organizations" in result:
        doc["organizations"] = [Known(o["known"]) if "known" in o
                                else Fresh(o["fingerprint"], o["document"])
                                for o in result["organizations"]]
    return parse(doc, str(p), reuse=reuse)


def read(path: str, known: set[str]) -> dict[str, Any]:
    """The child's answer: the document (or its problems), its organizations apart."""
    try:
        doc = document(_read(Path(path)), path)
    except ManifestError as e:
        return {"problems": e.problems}
    orgs = doc.get("organizations") if isinstance(doc, dict) else None
    if not isinstance(orgs, list):
        return {"doc": doc}  # parse says what is wrong with it
    items = []
    for org in orgs:
        digest = fingerprint(org)  # of the document as read, before JSON writes dates as text
        items.append({"known": digest} if digest in known
                     else {"fingerprint": digest, "document": org})
    return {"doc": {k: v for k, v in doc.items() if k != "organizations"},
            "organizations": items}


def main() -> None:
    answer = read(sys.argv[1], set(json.load(sys.stdin)))
    json.dump(answer, sys.stdout, default=str)  # YAML timestamps as ISO 8601 text


if __name__ == "__main__":
    main()
