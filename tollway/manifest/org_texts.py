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
from typing import NamedTuple

_KEY = re.compile(r"^organizations:[ ]*(#.*)?$", re.M)
_MARKER = re.compile(r"^(%|---|\.\.\.)", re.M)
_FIRST = re.compile(r"^( *)[^ #\n]", re.M)  # the first line with content: its indentation
# a character that may open, refer or swallow something: its line is checked
_SPECIAL = re.compile(r"[\"'\[\]{}#&*!|>?%@`]")
_INDICATORS = frozenset("&*!|>?%@`")


class Cut(NamedTuple):
    rest: str  # the document with the section's entries removed (`organizations:` is null)
    entries: list[str]  # each entry's text, from its `- ` line to the next entry's


def cut(text: str) -> Cut | None:
    """The manifest's text cut at its organizations, or None where that is not safe."""
    if "\t" in text or "\r" in text:
        return None
    keys = list(_KEY.finditer(text))
    markers = [m.start() for m in _MARKER.finditer(text)]
    if len(keys) != 1 or markers not in ([], [0]) or (markers and text[:4] != "---\n"):
        return None
    start = keys[0].end() + 1  # the section begins on the line after the key
    first = _FIRST.search(text, start)
    if first is None or not text.startswith("-", first.end() - 1):
        return None
    n = len(first.group(1))
    # the section ends at the first line with content left of its entries (at column 0 when
    # they are: one that is not an entry)
    ends = re.compile(r"^(?!-( |$))[^ #\n]" if n == 0 else rf"^ {{0,{n - 1}}}[^ #\n]", re.M)
    found = ends.search(text, first.start())
    if found is not None and found.group(0)[0] == " ":
        return None  # content indented less than the entries, yet not at column 0
    end = found.start() if found else len(text)
    section = text[first.start():end]
    if re.search(rf"^ {{{n}}}(?!-( |$))[^ #\n]", section, re.M):
        return None  # content at the entries' indentation that is not an entry
    checked = -1
    for special in _SPECIAL.finditer(section):
        line_start = section.rfind("\n", 0, special.start()) + 1
        if line_start == checked:
            continue
        checked = line_start
        line_end = section.find("\n", line_start)
        content = section[line_start:line_end if line_end >= 0 else None].lstrip(" ")
        if not content.startswith("#") and not _self_contained(content):
            return None
    starts = [m.start() for m in re.finditer(rf"^ {{{n}}}-( |$)", section, re.M)]
    if not starts or starts[0] != 0:
        return None  # the first line is not an entry (`-1`, `-x`: a scalar)
    entries = [section[a:b] for a, b in zip(starts, [*starts[1:], len(section)], strict=True)]
    if not entries[-1].endswith("\n"):
        entries[-1] += "\n"
    # the comments and blank lines between the key and the first entry read as nothing
    return Cut(rest=text[:start] + text[end:], entries=entries)


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
