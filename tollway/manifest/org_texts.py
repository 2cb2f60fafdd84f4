"""Each organization's own text in a manifest's YAML, for a reload to read only what changed.

Reading a 10,000-project manifest's YAML is 0.2-0.4 s of a core, most of it libyaml's events,
and a reload read all of it to find the one organization an edit touched. On 2 cores that is
CPU the requests in flight wait for. Here the text is cut at the `organizations:` sequence's
entries, and a reload parses only the entries whose text it has not parsed before (and the
rest of the document, a few KB).

A cut entry, read alone, must read as it does in its document. That holds when no construct
spans two entries and each entry is found by its indentation alone, so the text is cut only
where every line of the section is self-contained: no quote, bracket or brace open at its
end, no block scalar (`|`, `>`), anchor, alias, tag or complex key (`&`, `*`, `!`, `?`) and
no tab; no directive or document marker anywhere; every entry starts at one indentation
(`- ` at column n) and every other line is deeper, a comment or blank. Anything else is read
whole, as before; so is any entry that does not read alone as exactly one mapping.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import NamedTuple

# A cut is on every reload's path (in the reader's child and in `render --watch`), on cores
# the requests in flight share, so each scan of the text is as cheap as it can be. A fixed
# string is found by str.find, at memory speed where its characters are rare (0.05 ms a MB
# for one); a pattern finds a line by the newline before it (the text is searched with one
# put in front; anchored with ^ in MULTILINE mode it tried every position, 5-8 ms over
# 1 MB). Cutting 10,000 projects (1 MB) took 9.5 ms, 4.6 of them searching for a character
# class with a pattern, and takes 4.1 now.
_KEY = re.compile(r"\norganizations:[ ]*(?:#[^\n]*)?(?=\n|$)")
_MARKERS = ("%", "---", "...")  # at a line's start: a directive, a document's start or end
_FIRST = re.compile(r"\n( *)[^ #\n]")  # the first line with content: its indentation
# a character that may open, refer or swallow something: its line is checked
_SPECIAL = "\"'[]{}#&*!|>?%@`"
_INDICATORS = frozenset("&*!|>?%@`")


class Cut(NamedTuple):
    rest: str  # the document with the section's entries removed (`organizations:` is null)
    entries: list[str]  # each entry's text, from its `- ` line to the next entry's
    start: int  # where the first entry begins in the text
    digests: list[str]  # each entry's digest()


def cut(text: str) -> Cut | None:
    """The manifest's text cut at its organizations, or None where that is not safe."""
    if "\t" in text or "\r" in text:
        return None
    body = "\n" + text  # offsets in body are one more than in text
    keys = [k for at in _found(body, "\norganizations:") if (k := _KEY.match(body, at))]
    # each marker found by its rarer part: "\n---" alone would stop at every "-" of a list
    markers = sorted(at - 1 for marker in _MARKERS for at in _found(body, marker)
                     if body[at - 1] == "\n")
    if len(keys) != 1 or markers not in ([], [0]) or (markers and not text.startswith("---\n")):
        return None
    first = _FIRST.search(body, keys[0].end())
    if first is None or body[first.end() - 1] != "-":
        return None
    n, begin = len(first.group(1)), first.start()  # begin: the newline before the first entry
    # the section ends at the first line with content left of its entries: at column 0 when
    # they are, a line that is not an entry. With entries indented, the first line left of
    # them or at their indentation that is not an entry: content indented less than the
    # entries yet not at column 0, or at theirs and no entry, and the text is not cut
    found = _ends(n).search(body, begin)
    if found is not None and found.group(0)[1] == " ":
        return None
    end = found.start() if found else len(body)  # the newline before the line after it
    entries = _entries(body[begin:end], n)
    if entries is None:
        return None
    entries[-1] += "\n"  # the section's last line's newline is the next line's, in body
    # the comments and blank lines between the key and the first entry stay in the rest
    return Cut(rest=body[1:begin + 1] + body[end + 1:], entries=entries, start=begin,
               digests=[digest(e) for e in entries])


def _ends(n: int) -> re.Pattern[str]:
    """The first line of a section with entries at column n that is not in it: content
    left of the entries (at column 0 when they are), or at theirs and no entry."""
    return re.compile(r"\n(?!-(?:[ \n]|$))[^ #\n]" if n == 0 else
                      rf"\n(?: {{0,{n - 1}}}[^ #\n]| {{{n}}}(?!-(?:[ \n]|$))[^ #\n])")


def _entries(section: str, n: int) -> list[str] | None:
    """The entries of `section` (from the newline before its first line), each from its
    `- ` line at column n to the next one's; None where a line is not self-contained or
    the first line is not an entry."""
    for line_start in _lines_with(section, _SPECIAL):
        line_end = section.find("\n", line_start)
        content = section[line_start:line_end if line_end >= 0 else None].lstrip(" ")
        if not content.startswith("#") and not _self_contained(content):
            return None
    dash = "\n" + " " * n + "-"
    starts = [at + 1 for at in _found(section, dash)
              if section[at + len(dash):at + len(dash) + 1] in (" ", "\n", "")]
    if not starts or starts[0] != 1:
        return None  # the first line is not an entry (`-1`, `-x`: a scalar)
    return [section[a:b] for a, b in zip(starts, [*starts[1:], len(section)], strict=True)]


class Cutter:
    """cut() for the successive texts of one manifest, each compared with the one before.

    A full cut scans the whole text (4-7 ms for 10,000 projects: str.find with a needle of
    a few characters moves a few characters a step), on each reload's path. An edit usually
    changes one organization: the text before the section, the text after it and the
    unchanged entries are found in the new text at memory speed (startswith, a memcmp), and
    only what lies between them is scanned as cut() scans a section and hashed. The checks
    of a section are each about one line (a line's indentation, its self-containment), so
    lines unchanged in place pass them again; the rest of the text is unchanged. Anything
    else (the rest edited, a changed part that is not whole entries at the entries'
    indentation) is cut afresh. Either way the cut is cut()'s, as the tests hold it to be."""

    def __init__(self) -> None:
        self._last: tuple[str, Cut] | None = None

    def cut(self, text: str) -> Cut | None:
        parts = _cut_again(text, *self._last) if self._last is not None else None
        if parts is None:
            parts = cut(text)
        self._last = (text, parts) if parts is not None else None
        return parts


def _cut_again(text: str, before: str, was: Cut) -> Cut | None:
    """`text` cut by comparing it with `before` and its cut; None where only cut() can."""
    # in text, the section is [was.start, section_end): its last entry has the newline of
    # the line after it (or one added, at the text's end)
    section_end = was.start + sum(map(len, was.entries)) - 1
    tail = before[section_end:]
    end = len(text) - len(tail)
    if end < was.start or not text.startswith(before[:was.start]) or not text.endswith(tail):
        return None
    section = text[was.start:end] + "\n"
    old = was.entries
    i, front = 0, 0  # old[:i]: the unchanged entries before the changed part, up to front
    while i < len(old) and section.startswith(old[i], front):
        front += len(old[i])
        i += 1
    j, back = len(old), len(section)  # old[j:]: the unchanged entries after it, from back
    while j > i and back - len(old[j - 1]) >= front \
            and section.startswith(old[j - 1], back - len(old[j - 1])):
        back -= len(old[j - 1])
        j -= 1
    changed = section[front:back]
    if not changed:
        entries, digests = [], []
    else:
        n = len(old[0]) - len(old[0].lstrip(" "))
        body = "\n" + changed
        if not changed.endswith("\n") or "\t" in changed or "\r" in changed \
                or _ends(n).search(body) is not None:
            return None
        found = _entries(body, n)
        if found is None:
            return None
        entries, digests = found, [digest(e) for e in found]
    # never no entry: the section, never empty, is old[:i] + entries + old[j:]
    return Cut(rest=was.rest, entries=[*old[:i], *entries, *old[j:]], start=was.start,
               digests=[*was.digests[:i], *digests, *was.digests[j:]])


def _found(text: str, needle: str) -> Iterator[int]:
    """Every offset of `needle` in `text`."""
    at = text.find(needle)
    while at >= 0:
        yield at
        at = text.find(needle, at + 1)


def _lines_with(text: str, chars: str) -> list[int]:
    """Where each line holding one of `chars` starts, in order, each line once."""
    starts: set[int] = set()
    for c in chars:
        at = text.find(c)
        while at >= 0:
            line_start = text.rfind("\n", 0, at) + 1
            starts.add(line_start)
            line_end = text.find("\n", at)
            at = text.find(c, line_end) if line_end >= 0 else -1
    return sorted(starts)


def digest(entry: str) -> str:
    return hashlib.sha256(entry.encode()).hexdigest()


def _self_contained(content: str) -> bool:
    """Whether a line (without its indentation) opens nothing that the next line closes,
    and uses no construct that can refer across entries or swallow the lines after it.
    An indicator counts where a node may start: the line's start, after `- `, `: `, `? `
    and, to be safe, after `[`, `{` and `,`; inside a plain scalar (`R&D > ops`) it is text."""
    quote, depth, node_start, before = "", 0, True, " "
    i = 0
    while i < len(content):
        c = content[i]
        if quote:
            if quote == '"' and c == "\\":
                i += 2
                continue
            if c == quote:
                if quote == "'" and content[i + 1:i + 2] == "'":
                    i += 2  # '' is a quote inside a single-quoted scalar
                    continue
                quote = ""
        elif c == "#" and before == " ":
            break  # a comment runs to the end of the line
        elif c == " ":
            node_start = node_start or before in "-:?,[{"
        elif node_start and c in _INDICATORS:
            return False
        elif node_start and c in "\"'":
            quote, node_start = c, False
        else:
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            node_start = c in "[{,"
        before = c
        i += 1
    return not quote and depth == 0
