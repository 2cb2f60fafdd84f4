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

# Every pattern finds a line by the newline before it (the text is searched with one put in
# front): a search anchored with ^ in MULTILINE mode tries every position, 5-8 ms each over
# 1 MB, where a leading \n lets the engine skip to the newlines.
_KEY = re.compile(r"\norganizations:[ ]*(?:#[^\n]*)?(?=\n|$)")
_MARKER = re.compile(r"\n(?:%|---|\.\.\.)")
_FIRST = re.compile(r"\n( *)[^ #\n]")  # the first line with content: its indentation
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
    body = "\n" + text  # offsets in body are one more than in text
    keys = list(_KEY.finditer(body))
    markers = [m.start() for m in _MARKER.finditer(body)]
    if len(keys) != 1 or markers not in ([], [0]) or (markers and not text.startswith("---\n")):
        return None
    first = _FIRST.search(body, keys[0].end())
    if first is None or body[first.end() - 1] != "-":
        return None
    n, begin = len(first.group(1)), first.start()  # begin: the newline before the first entry
    entry = rf"\n {{{n}}}-(?=[ \n]|$)"
    # the section ends at the first line with content left of its entries (at column 0 when
    # they are: one that is not an entry)
    ends = re.compile(r"\n(?!-(?:[ \n]|$))[^ #\n]" if n == 0 else rf"\n {{0,{n - 1}}}[^ #\n]")
    found = ends.search(body, begin)
    if found is not None and found.group(0)[1] == " ":
        return None  # content indented less than the entries, yet not at column 0
    end = found.start() if found else len(body)  # the newline before the line after it
    section = body[begin:end]
    if re.search(rf"\n {{{n}}}(?!-(?:[ \n]|$))[^ #\n]", section):
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
    starts = [m.start() + 1 for m in re.finditer(entry, section)]
    if not starts or starts[0] != 1:
        return None  # the first line is not an entry (`-1`, `-x`: a scalar)
    entries = [section[a:b] for a, b in zip(starts, [*starts[1:], len(section)], strict=True)]
    entries[-1] += "\n"  # the section's last line's newline is the next line's, in body
    # the comments and blank lines between the key and the first entry stay in the rest
    return Cut(rest=body[1:begin + 1] + body[end + 1:], entries=entries)


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
