"""The part of a manifest that `tollway keys`, `admin-tokens` and `audit` read: the storage
section, and where each of the manifest's key ids sits.

These commands work on the key store. Compiling the whole manifest for them cost 0.2-0.5 s of
a 10,000-project manifest on every call, and refused them whenever any part of it was wrong:
an operator could not suspend a leaked key while a colleague's edit of an unrelated project
failed `tollway check`. They need neither. What they do is safe against a manifest that is
wrong elsewhere: a serving gateway keeps the last manifest that compiled, and a key the store
holds authenticates only where that manifest (or the key's own runtime spec) places it.

Nor do they need the organizations that write no key, which are most of a large manifest
(keys belong in the store): where the text can be cut at its organizations
(tollway.manifest.org_texts, as a reload cuts it), an entry that cannot hold a mapping key
`keys` is not parsed. A `tollway keys` command on 100,000 projects took 2.6-3.4 s reading them
all.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import org_texts
from .loader import storage_section
from .model import KeyStatus, Storage
from .node import Node
from .reading import (
    ManifestError,
    cut_or_none,
    document,
    entry_alone,
    read_text,
    rest_alone,
)


@dataclass(frozen=True)
class KeyPlace:
    """Where a key id is written: its org, project and client, and the worst status written
    at those levels and its own (a status the manifest misspells is left out here; `tollway
    check` names it)."""

    org: str
    project: str
    client: str
    status: KeyStatus


@dataclass(frozen=True)
class KeysPart:
    source: str
    storage: Storage
    places: Mapping[str, KeyPlace]  # key id -> its place; the first, if one is written twice


def load_keys_part(path: str | Path) -> KeysPart:
    """The storage section (ManifestError if it, or the document as YAML, is wrong) and the
    places of the key ids, read without compiling anything else."""
    source = str(path)
    text = read_text(Path(path))
    parts = cut_or_none(text)
    keyed = _keyed_organizations(parts, source) if parts is not None else None
    doc = keyed if keyed is not None else document(text, source)
    if not isinstance(doc, dict):
        raise ManifestError(source, ["(document): must be a mapping"])
    errors: list[str] = []
    storage = storage_section(Node(doc, "", errors))
    if errors:
        raise ManifestError(source, errors)
    return KeysPart(source=source, storage=storage, places=places_in(doc))


def _keyed_organizations(parts: org_texts.Cut, source: str) -> dict[str, Any] | None:
    """The document with only the organizations whose text may hold a mapping key `keys`, or
    None where a part does not read alone as it must (then the text is read whole).

    An entry without the characters `keys` holds no such key unless it spells it with an
    escape, which only a double-quoted scalar can (`"k\\x65ys"`), with a backslash; the cut
    leaves no alias, tag or complex key to bring one in from elsewhere."""
    rest = rest_alone(parts, source)
    if rest is None:
        return None
    organizations = []
    for entry in parts.entries:
        if "keys" not in entry and "\\" not in entry:
            continue
        org = entry_alone(entry, source)
        if org is None:
            return None
        organizations.append(org)
    return {**rest, "organizations": organizations}


def places_in(doc: dict[str, Any]) -> Mapping[str, KeyPlace]:
    """Where each key id of the document is written (the first place of one written
    twice)."""
    places: dict[str, KeyPlace] = {}
    for org, project, client, key in _levels(doc):
        key_id = key.get("id")
        if isinstance(key_id, str) and key_id not in places:
            statuses = [_status(level) for level in (org, project, client, key)]
            places[key_id] = KeyPlace(org=str(org.get("id")), project=str(project.get("id")),
                                      client=str(client.get("id")),
                                      status=KeyStatus.worst(KeyStatus.ACTIVE,
                                                            *(s for s in statuses if s)))
    return MappingProxyType(places)


def _levels(doc: dict[str, Any]) -> Iterator[tuple[dict[str, Any], ...]]:
    """Each key's mapping with its org's, project's and client's: whatever is not a mapping
    or a list where one belongs is passed over, as the full compile would refuse it."""
    for org in _mappings(doc, "organizations"):
        for project in _mappings(org, "projects"):
            for client in _mappings(project, "clients"):
                for key in _mappings(client, "keys"):
                    yield org, project, client, key


def _mappings(parent: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    items = parent.get(name)
    if isinstance(items, list):
        yield from (item for item in items if isinstance(item, dict))


def _status(level: dict[str, Any]) -> KeyStatus | None:
    try:
        return KeyStatus(level.get("status", "active"))
    except ValueError:
        return None
