"""A manifest's text to its document: whole, or cut at its organizations for a reload.

This is what a serving process's reload runs in a process apart (`python -m
tollway.manifest.reading --serve`, see serve() and tollway.manifest.beside). The module itself
imports nothing of the manifest's model or its compiler (13 ms of imports); the warm reader
imports them once, when it starts, to compile what it reads (tollway.manifest.shipped_orgs).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from ..background import yield_to_requests
from . import org_texts
from .yaml_reader import safe_load


class ManifestError(Exception):
    """A manifest that does not validate; `problems` lists every `path: rule` found."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        head = f"{source}: {len(problems)} problem(s)" if source else f"{len(problems)} problem(s)"
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in problems))


GZIP_MAGIC = b"\x1f\x8b"  # never the start of a YAML text: YAML allows no control character
# a gzip manifest that inflates beyond this is refused, not read into memory whole: 100 times
# the 10,000 projects of bench/scale.py
MAX_INFLATED = 128 << 20


def read_text(p: Path) -> str:
    """The manifest's text, from a file of YAML or of gzip-compressed YAML, told apart by the
    gzip header: a ConfigMap holds at most 1 MiB, and a manifest of 10,000 projects is about
    that much YAML but a tenth or less of it compressed (docs/kubernetes.md)."""
    try:
        data = p.read_bytes()
        if data.startswith(GZIP_MAGIC):
            data = inflate(data)
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ManifestError(str(p), [f"(file): cannot read: {e}"]) from None


def inflate(data: bytes, limit: int = MAX_INFLATED) -> bytes:
    """The gzip file's content, every member of it (as gunzip writes them one after the
    other); ValueError where it is not whole gzip or would inflate beyond `limit` bytes."""
    out: list[bytes] = []
    size = 0
    while data:
        member = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer
        try:
            chunk = member.decompress(data, limit - size + 1)
        except zlib.error as e:
            raise ValueError(f"not valid gzip: {e}") from None
        size += len(chunk)
        if size > limit:
            raise ValueError(f"gzip content over {limit >> 20} MiB")
        if not member.eof:
            raise ValueError("gzip content cut short")
        out.append(chunk)
        data = member.unused_data
    return b"".join(out)


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


def read(path: str, known: set[str], texts: Mapping[str, str] | None = None,
         cutter: org_texts.Cutter | None = None) -> dict[str, Any]:
    """The child's answer: the document (or its problems), its organizations apart; each
    with the digest of its text where the text could be cut at them (org_texts), by
    `cutter` where it holds the manifest's text before."""
    try:
        text = read_text(Path(path))
    except ManifestError as e:
        return {"problems": e.problems}
    return read_text_cut(text, cut_or_none(text, cutter), path, known, texts or {})


def cut_or_none(text: str, cutter: org_texts.Cutter | None = None) -> org_texts.Cut | None:
    """The text cut at its organizations (by `cutter` where given), or None to be read
    whole, which is never wrong: also where the cut itself fails, a fault of its own."""
    try:
        return cutter.cut(text) if cutter else org_texts.cut(text)
    except Exception as e:  # stderr: the reader has no logging of its own
        print(f"tollway: the manifest is read whole, its cut failed: {e!r}", file=sys.stderr)
        return None


def read_text_cut(text: str, parts: org_texts.Cut | None, path: str, known: set[str],
                  texts: Mapping[str, str]) -> dict[str, Any]:
    """read()'s answer for the text read and cut (or not: None)."""
    try:
        answer = _read_cut(parts, path, known, texts) if parts is not None else None
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


def _read_cut(parts: org_texts.Cut, path: str, known: set[str], texts: Mapping[str, str]
              ) -> dict[str, Any] | None:
    """The answer read from the text cut at its organizations (tollway.manifest.org_texts),
    parsing only the entries whose text the manifest in force does not hold; None where
    a part does not read alone as it must: then the text is read whole, which also gives a
    problem its line in the file."""
    rest = rest_alone(parts, path)
    if rest is None:
        return None
    items: list[dict[str, Any]] = []
    for entry, digest in zip(parts.entries, parts.digests, strict=True):
        held = texts.get(digest)
        if held is not None and held in known:
            items.append({"known": held, "text": digest})
            continue
        org = entry_alone(entry, path)
        if org is None:
            return None
        items.append({**_item(org, known), "text": digest})
    return _answer(rest, items)


def rest_alone(parts: org_texts.Cut, path: str) -> dict[str, Any] | None:
    """The document around the cut's entries, or None where it does not read as the cut
    leaves it: a mapping whose `organizations` is null."""
    try:
        rest = document(parts.rest, path)
    except ManifestError:
        return None
    if not isinstance(rest, dict) or "organizations" not in rest \
            or rest["organizations"] is not None:
        return None
    return rest


def entry_alone(entry: str, path: str) -> dict[str, Any] | None:
    """One of the cut's entries read alone: its organization's mapping, or None where it
    does not read as exactly one."""
    try:
        read_alone = document(entry, path)
    except ManifestError:
        return None
    if not (isinstance(read_alone, list) and len(read_alone) == 1
            and isinstance(read_alone[0], dict)):
        return None
    return read_alone[0]


# characters of YAML a read parses in the reader itself (an edit's organizations: 10 KB for
# 100 projects); a larger read, the whole text included, is a child's
READ_HERE = 256 * 1024


def serve(idle: bool = True) -> None:
    """`--serve`: read for one serving process, one request a line on stdin ({"id", "path",
    "known", "texts"}), each answered by one line on stdout. This process stays warm: a
    reload pays no Python start and imports (60-90 ms, on the cores the requests in flight
    need). It reads and cuts the text itself: its Cutter keeps the text before, for the next
    cut to compare with (a tenth of a full cut's CPU for an edit of one organization).

    What is left to parse is parsed here where it is small (READ_HERE), else in a child
    forked for it, which takes what the read allocated with it (the whole text of 10,000
    projects is hundreds of MB of objects). A child costs more than its fork: each page it
    writes that it shares with this process is copied, a fault each (700 for an edit of
    one organization), so a small read in a child took 13 ms of CPU and takes 6 ms here,
    where the memory it takes is used again by the next.

    `idle`: it runs at SCHED_IDLE, only where the serving process's requests leave a core
    idle (tollway.background), and so do its children; `--normal-priority` is the reader
    beside.py starts for a read the idle one was starved of CPU for.

    It ends with its stdin, not on a terminal's Ctrl-C (sent to the whole process group):
    its parent closes it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if idle:  # the serving process's requests first (tollway.background); see also beside
        yield_to_requests()
    # it compiles what it reads: the model and its compiler, imported once, while warm
    from .shipped_orgs import ship

    cutter = org_texts.Cutter()
    for line in sys.stdin:
        request = json.loads(line)
        text, parts = "", None
        try:
            answer, text, parts = _read_here(request, cutter)
            answer = ship(answer) if answer is not None else None
        except Exception as e:  # the parent must hear of anything
            answer = {"failed": f"{type(e).__name__}: {e}"}
        if answer is None:
            answer = _read_in_child(request, text, parts, ship)
        if answer is not None:
            _say({"id": request["id"], **answer})


def _read_here(request: dict[str, Any], cutter: org_texts.Cutter
               ) -> tuple[dict[str, Any] | None, str, org_texts.Cut | None]:
    """The answer where it is read here, else None and the text and its cut (None: to be
    read whole) for a child to read."""
    path, known, texts = request["path"], set(request["known"]), dict(request["texts"])
    try:
        text = read_text(Path(path))
    except ManifestError as e:
        return {"problems": e.problems}, "", None
    parts = cut_or_none(text, cutter)
    if parts is None or _to_parse(parts, known, texts) > READ_HERE:
        return None, text, parts
    answer = _read_cut(parts, path, known, texts)
    return answer, text, None  # None: a part does not read alone, the text is read whole


def _read_in_child(request: dict[str, Any], text: str, parts: org_texts.Cut | None,
                   ship: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
    """Read in a child, which answers (what it read compiled by `ship`); None once it has,
    else what to answer."""
    pid = os.fork()
    if pid == 0:  # the child: this process has one thread, so a fork is safe
        try:
            answer = {"id": request["id"], **ship(read_text_cut(
                text, parts, request["path"], set(request["known"]), request["texts"]))}
        except BaseException as e:  # the parent must hear of anything
            answer = {"id": request["id"], "failed": f"{type(e).__name__}: {e}"}
        try:
            _say(answer)
        finally:  # never back into serve()'s loop, not even if the reader was killed
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:  # killed before it answered (the parent skips a late answer by id)
        return {"failed": f"the reader ended with {status}"}
    return None


def _to_parse(parts: org_texts.Cut, known: set[str], texts: Mapping[str, str]) -> int:
    """How much of the text _read_cut parses: the rest and the entries not held."""
    return len(parts.rest) + sum(len(entry) for entry, digest in zip(parts.entries,
                                                                     parts.digests, strict=True)
                                 if (held := texts.get(digest)) is None or held not in known)


def _say(answer: dict[str, Any]) -> None:
    # YAML timestamps as ISO 8601 text; one write (json.dump writes each token apart)
    sys.stdout.write(json.dumps(answer, default=str) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] not in (["--serve"], ["--serve", "--normal-priority"]):
        sys.exit("usage: python -m tollway.manifest.reading --serve [--normal-priority]")
    serve(idle="--normal-priority" not in sys.argv)
