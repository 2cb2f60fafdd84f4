"""A manifest's text to its document: whole, or cut at its organizations for a reload.

This is what a serving process's reload runs in a child process (forked by `python -m
tollway.manifest.reading --serve`, see serve() and tollway.manifest.beside), so it imports
nothing of the manifest's model or its compiler: the reader's Python start and imports are CPU
that the requests in flight share on a small node, and the model's classes alone took 13 ms
of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from . import org_texts
from .yaml_reader import safe_load


class ManifestError(Exception):
    """A manifest that does not validate; `problems` lists every `path: rule` found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        head = f"{source}: {len(problems)} problem(s)" if source else f"{len(problems)} problem(s)"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in problems))


def read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(str(p), [f"(file): cannot read: {e}"]) from None


def document(text: str, source: str = "") -> Any:
    """The YAML document, or ManifestError saying where it is not YAML."""
    try:
        return safe_load(text)
    except RecursionError:
        raise ManifestError(source, ["(document): nested too deeply"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ManifestError(source, [f"(document): {where}not valid YAML: "
                                     f"{getattr(e, 'problem', e)}"]) from None


def fingerprint(org_document: Any) -> str:
    """What tells an organization's document from any other: the SHA-256 of its repr(),
    which tells apart what == does not (2, 2.0 and true; a date and its text)."""
    return hashlib.sha256(repr(org_document).encode()).hexdigest()


def read(path: str, known: set[str], texts: Mapping[str, str] | None = None
         ) -> dict[str, Any]:
    """The child's answer: the document (or its problems), its organizations apart; each
    with the digest of its text where the text could be cut at them (org_texts)."""
    try:
        text = read_text(Path(path))
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


def serve() -> None:
    """`--serve`: read for one serving process, one request a line on stdin ({"id", "path",
    "known", "texts"}), each answered by one line on stdout, from a child forked from this
    process. This one stays small and warm: a reload pays a fork (about a millisecond of CPU)
    instead of a Python start and its imports (60-90 ms, on the cores the requests in flight
    need), and what a read allocates leaves with its child. It ends with its stdin, not on
    a terminal's Ctrl-C (sent to the whole process group): its parent closes it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: this process has one thread, so a fork is safe
            try:
                answer = {"id": request["id"], **read(request["path"], set(request["known"]),
                                                      request["texts"])}
            except BaseException as e:  # the parent must hear of anything
                answer = {"id": request["id"], "failed": f"{type(e).__name__}: {e}"}
            # YAML timestamps as ISO 8601 text; one write (json.dump writes each token apart)
            sys.stdout.write(json.dumps(answer, default=str) + "\n")
            sys.stdout.flush()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status != 0:  # killed before it answered (the parent skips a late answer by id)
            sys.stdout.write(json.dumps({"id": request["id"],
                                         "failed": f"the reader ended with {status}"}) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python -m tollway.manifest.reading --serve")
    serve()
