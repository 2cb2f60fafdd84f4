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
document: an edit of one rpm is then one organization's text read, not 10,000 projects'.

    python -m tollway.manifest.beside MANIFEST < held.json   (the child's side; held.json:
    {"known": [fingerprint, ...], "texts": {text digest: fingerprint}})
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import org_texts
from .loader import Fresh, Known, ManifestError, _read, document, fingerprint, parse
from .model import Manifest, Organization

TIMEOUT = 120  # seconds: a child that takes longer is stuck, and the reload is refused


def load_beside(path: str | Path, reuse: Mapping[str, Organization],
                texts: Mapping[str, str] | None = None) -> Manifest:
    """load() for a serving process (run on a thread: it waits for the child). `reuse`: the
    organizations of the manifest in force, by fingerprint (see parse); `texts`: its
    `org_texts`, each organization's fingerprint by the digest of its text."""
    p = Path(path)
    held = {d: fp for d, fp in (texts or {}).items() if fp in reuse}
    out = subprocess.run([sys.executable, "-m", "tollway.manifest.beside", str(p)],
                         input=json.dumps({"known": list(reuse), "texts": held}),
                         capture_output=True, text=True, timeout=TIMEOUT)
    if out.returncode != 0:
        raise ManifestError(str(p), [f"(file): the parser failed: {out.stderr[-500:]}"])
    return _manifest(json.loads(out.stdout), p, reuse)


def load_first(path: str | Path) -> Manifest:
    """load() for a serving process's start: the reload's reading, in this process (nothing
    serves yet), so that the manifest records its organizations' texts and the first reload
    reads only the ones an edit changed, as every later one does (read whole at the start,
    the first reload of 10,000 projects read them all again)."""
    p = Path(path)
    return _manifest(read(str(p), set()), p, {})


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


def read(path: str, known: set[str], texts: Mapping[str, str] | None = None
         ) -> dict[str, Any]:
    """The child's answer: the document (or its problems), its organizations apart; each
    with the digest of its text where the text could be cut at them (org_texts)."""
    try:
        text = _read(Path(path))
        answer = _read_cut(text, path, known, texts or {})
        if answer is not None:
            return answer
        doc = document(text, path)
    except ManifestError as e:
        return {"problems": e.problems}
    orgs = doc.get("organizations") if isinstance(doc, dict) else None
    if not isinstance(orgs, list):
        return {"doc": doc}  # parse says what is wrong with it
    return _answer(doc, [_item(org, known) for org in orgs])


def _item(org: Any, known: set[str]) -> dict[str, Any]:
    """An organization as the child sends it: its fingerprint if the manifest in force holds
    it, else its document with its fingerprint."""
    digest = fingerprint(org)  # of the document as read, before JSON writes dates as text
    return {"known": digest} if digest in known else {"fingerprint": digest, "document": org}


def _answer(doc: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"doc": {k: v for k, v in doc.items() if k != "organizations"},
            "organizations": items}


def _read_cut(text: str, path: str, known: set[str], texts: Mapping[str, str]
              ) -> dict[str, Any] | None:
    """The answer read from the text cut at its organizations (tollway.manifest.org_texts),
    parsing only the entries whose text the manifest in force does not hold; None where
    the text cannot be cut, or a part does not read alone as it must: then it is read
    whole, which also gives a problem its line in the file."""
    parts = org_texts.cut(text)
    if parts is None:
        return None
    try:
        rest = document(parts.rest, path)
    except ManifestError:
        return None
    if not isinstance(rest, dict) or "organizations" not in rest \
            or rest["organizations"] is not None:
        return None
    items: list[dict[str, Any]] = []
    for entry in parts.entries:
        digest = org_texts.digest(entry)
        held = texts.get(digest)
        if held is not None and held in known:
            items.append({"known": held, "text": digest})
            continue
        try:
            read_alone = document(entry, path)
        except ManifestError:
            return None
        if not (isinstance(read_alone, list) and len(read_alone) == 1
                and isinstance(read_alone[0], dict)):
            return None
        items.append({**_item(read_alone[0], known), "text": digest})
    return _answer(rest, items)


def main() -> None:
    held = json.load(sys.stdin)
    answer = read(sys.argv[1], set(held["known"]), held["texts"])
    json.dump(answer, sys.stdout, default=str)  # YAML timestamps as ISO 8601 text


if __name__ == "__main__":
    main()
