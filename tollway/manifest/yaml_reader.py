"""Reading a manifest's YAML fast enough for 10,000 projects.

libyaml (in PyYAML's wheels) parses; PyYAML's Python layers above it (a node object per value,
a resolver trying regular expressions on each scalar, a constructor of generators) took 90% of
loading a 10,000-project manifest. Here the document is built straight from libyaml's events,
a plain scalar's type resolved once per distinct text (a manifest repeats `name`, `rpm` and
`quotas` thousands of times) and non-strings made by PyYAML's own scalar constructors. Anything
else (merge keys `<<`, explicit tags, complex keys, a second document, an unknown alias) goes
to PyYAML's loader for the whole document, so the result is always what `yaml.safe_load` gives,
errors included.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
)
from yaml.nodes import ScalarNode

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

STR = "tag:yaml.org,2002:str"
MAP = "tag:yaml.org,2002:map"
SEQ = "tag:yaml.org,2002:seq"
# the safe schema's implicit scalar types other than str
_PLAIN_TYPES = frozenset(f"tag:yaml.org,2002:{t}"
                         for t in ("int", "float", "bool", "null", "timestamp"))

_RESOLVED: dict[str, str] = {}  # plain scalar text → its implicit tag (the safe schema's)
_RESOLVED_MAX = 200_000


class Unusual(Exception):
    """A document `_from_events` does not read: PyYAML's loader does."""


class ManifestLoader(_Base):  # type: ignore[misc]
    """The safe loader, resolving a plain scalar's type once per distinct text."""

    def resolve(self, kind: type, value: Any, implicit: tuple[bool, bool]) -> str:
        if kind is ScalarNode and implicit[0]:  # plain: the tag depends on the text alone
            tag = _RESOLVED.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(_RESOLVED) >= _RESOLVED_MAX:
                    _RESOLVED.clear()
                _RESOLVED[value] = tag
            return tag
        result: str = super().resolve(kind, value, implicit)
        return result


_NO_KEY = object()


def _from_events(text: str) -> Any:
    """The document built straight from libyaml's events: maps, lists, scalars, anchors and
    aliases. Anything else raises Unusual (and PyYAML's loader reads the document)."""
    loader = ManifestLoader("")  # for its resolver and its scalar constructors
    anchors: dict[str, Any] = {}
    stack: list[list[Any]] = []  # [container, pending key] of each open map or list
    root: Any = _NO_KEY
    documents = 0
    made: dict[tuple[str, str], Any] = {}  # a non-string scalar's (tag, text) → its value

    def add(value: Any) -> None:
        nonlocal root
        if not stack:
            root = value
            return
        top = stack[-1]
        if isinstance(top[0], list):
            top[0].append(value)
        elif top[1] is _NO_KEY:
            if isinstance(value, (dict, list)):
                raise Unusual  # a complex key: PyYAML says what it makes of it
            top[1] = value
        else:
            top[0][top[1]] = value
            top[1] = _NO_KEY

    # the parser's own get_event, not yaml.parse: its generator cost a third of the loop
    parser = _Base(text)
    event: Any  # the event classes' attributes are untyped
    try:
        for event in iter(parser.get_event, None):  # None after the stream's end
            kind = type(event)
            if kind is ScalarEvent:
                tag = event.tag
                if tag is None or tag == "!":
                    tag = loader.resolve(ScalarNode, event.value, event.implicit)
                if tag == STR:
                    value: Any = event.value
                elif tag in _PLAIN_TYPES:  # a number, a flag, null, a time: immutable
                    # by tag too: `!!float 1` and a plain `1` are 1.0 and 1
                    value = made.get((tag, event.value), _NO_KEY)
                    if value is _NO_KEY:
                        value = made[tag, event.value] = loader.construct_object(
                            ScalarNode(tag, event.value))
                else:
                    raise Unusual  # a merge key, an explicit tag
                if event.anchor:
                    anchors[event.anchor] = value
                add(value)
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                if event.tag not in (None, "!", MAP if kind is MappingStartEvent else SEQ):
                    raise Unusual
                container: Any = {} if kind is MappingStartEvent else []
                if event.anchor:
                    anchors[event.anchor] = container
                add(container)
                stack.append([container, _NO_KEY])
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                stack.pop()
            elif kind is AliasEvent:
                if event.anchor not in anchors:
                    raise Unusual
                add(anchors[event.anchor])
            elif kind is DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise Unusual  # PyYAML refuses a second document
    finally:
        parser.dispose()
    return None if root is _NO_KEY else root


def safe_load(text: str) -> Any:
    """`yaml.safe_load(text)`, faster on large documents. A document in JSON (which YAML
    contains; what a program generating 10,000 projects may as well write) is read as JSON.
    Otherwise the document is built from libyaml's events: making PyYAML's node objects
    took 0.7 s of a 10,000-project manifest, the events 0.1 s."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            pass  # YAML's flow style, or not valid at all: libyaml says where
    try:
        return _from_events(text)
    except Unusual:
        return yaml.load(text, Loader=ManifestLoader)
