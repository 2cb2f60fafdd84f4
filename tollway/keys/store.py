"""The key store interface and the records it holds.

A store keeps only what the manifest must not: secret hashes, the lifecycle state that the CLI
and the admin API change at runtime, the clients and keys created at runtime (their documents
are the manifest's own schema, validated by the manifest's parser), admin tokens, and an audit
trail of every change. Every write bumps a global change sequence so that a
replica can mirror the table (or its most used part: tollway/keys/mirror.py) and catch up with
`changes_since(seq)`; PostgreSQL also pushes a NOTIFY so the catch-up happens within
milliseconds instead of a poll interval. Writers take sequence numbers in commit order, or a
follower could read seq 8 committed before seq 7 and never see 7.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from tollway.manifest.model import KeyStatus


class KeyExists(Exception):
    pass


class KeyNotFound(Exception):
    pass


class StoreUnavailable(Exception):
    """The backing database could not be reached or answered with an error."""


# a stored status → its KeyStatus, looked up: the enum's own call costs 0.7 us a record
STATUSES = {s.value: s for s in KeyStatus}


class KeyRecord(NamedTuple):
    """A tuple: a start reads storage.key_cache of them at once (100,000 took a second as a
    frozen dataclass on a slow machine). The mirror keeps each as a plain tuple instead
    (tollway/keys/mirror.py: the garbage collector walks a KeyRecord, not a plain tuple)."""

    key_id: str
    secret_hash: bytes
    status: KeyStatus
    expires_at: datetime | None
    previous_hash: bytes | None  # the rotated-out secret, valid until previous_valid_until
    previous_valid_until: datetime | None
    created_at: datetime
    updated_at: datetime
    seq: int
    # a runtime key's binding and attributes as JSON (org, project, client, and the manifest's
    # key fields); None for a key the manifest declares
    spec: str | None = None


@dataclass(frozen=True)
class KeyEvent:
    """One audit record: who did what to which object, when, from where, before → after.
    Never holds a secret (documents and specs only; hashes are not audited)."""

    key_id: str  # the object's id (a key, a client, an admin token)
    action: str  # issue, rotate, suspend, resume, revoke, expire, create, update, ...
    at: datetime
    actor: str
    detail: str
    kind: str = "key"  # key, client, admin_token
    before: str = ""  # JSON of the object before the change ("" for a creation)
    after: str = ""
    source: str = ""  # the caller's address, or "cli"


@dataclass(frozen=True)
class StoredObject:
    """A runtime client or an admin token: a JSON document under (kind, id)."""

    kind: str
    id: str
    doc: str  # JSON
    created_at: datetime
    updated_at: datetime
    seq: int


@dataclass(frozen=True)
class AuditQuery:
    kind: str | None = None
    target: str | None = None
    actor: str | None = None
    action: str | None = None
    since: datetime | None = None
    limit: int = 100


class KeyStore(abc.ABC):
    """One interface, two backends (SQLite, PostgreSQL), one shared test suite."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema if it is missing."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def insert(self, record: KeyRecord, event: KeyEvent) -> KeyRecord:
        """Store a new key; raise KeyExists if the id is taken (revoked ids are never reused)."""

    @abc.abstractmethod
    async def update(self, key_id: str, event: KeyEvent, *, status: KeyStatus | None = None,
                     secret_hash: bytes | None = None, previous_hash: bytes | None = None,
                     previous_valid_until: datetime | None = None,
                     expires_at: datetime | None = None,
                     clear_expiry: bool = False, spec: str | None = None) -> KeyRecord:
        """Change a key and record why, atomically; raise KeyNotFound."""

    @abc.abstractmethod
    async def get(self, key_id: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    async def changes_since(self, seq: int) -> list[KeyRecord]:
        """Every key written after `seq` (all keys for seq 0), in sequence order."""

    @abc.abstractmethod
    async def latest(self, limit: int) -> tuple[int, list[KeyRecord]]:
        """The change sequence as of now, then the `limit` keys written last (newest first):
        a mirror that loads these and follows `changes_since` from that sequence misses
        nothing, since every row read already shows every change up to it."""

    @abc.abstractmethod
    async def page(self, after: str, limit: int) -> list[KeyRecord]:
        """At most `limit` keys whose ids sort after `after`, in order of their bytes (as
        Python orders str): `tollway keys list` walks a million keys a page at a time, on an
        index, instead of holding them all."""

    @abc.abstractmethod
    async def client_keys(self, client_id: str) -> list[KeyRecord]:
        """The runtime keys of one runtime client (indexed: a store may hold millions)."""

    @abc.abstractmethod
    async def events(self, key_id: str) -> list[KeyEvent]: ...

    @abc.abstractmethod
    async def wait_for_change(self, timeout: float) -> None:
        """Return when a change may have happened, or after `timeout` seconds."""

    @abc.abstractmethod
    async def put_object(self, kind: str, obj_id: str, doc: str, event: KeyEvent, *,
                         create: bool) -> StoredObject:
        """Create (KeyExists if taken) or replace (KeyNotFound if missing) a document, and
        record the event, atomically; bumps the change sequence like a key write."""

    @abc.abstractmethod
    async def get_object(self, kind: str, obj_id: str) -> StoredObject | None: ...

    @abc.abstractmethod
    async def objects_since(self, seq: int) -> list[StoredObject]:
        """Every document written after `seq`, in sequence order."""

    @abc.abstractmethod
    async def audit(self, query: AuditQuery) -> list[KeyEvent]:
        """Audit records matching `query`, newest first."""
