"""The key store interface and the records it holds.

A store keeps only what the manifest must not: secret hashes, the lifecycle state that the CLI
changes at runtime, and an audit trail. Every write bumps a global change sequence so that a
replica can mirror the whole table and catch up with `changes_since(seq)`; PostgreSQL also
pushes a NOTIFY so the catch-up happens within milliseconds instead of a poll interval.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime

from tollway.manifest.model import KeyStatus


class KeyExists(Exception):
    pass


class KeyNotFound(Exception):
    pass


class StoreUnavailable(Exception):
    """The backing database could not be reached or answered with an error."""


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    secret_hash: bytes
    status: KeyStatus
    expires_at: datetime | None
    previous_hash: bytes | None  # the rotated-out secret, valid until previous_valid_until
    previous_valid_until: datetime | None
    created_at: datetime
    updated_at: datetime
    seq: int


@dataclass(frozen=True)
class KeyEvent:
    key_id: str
    action: str  # issue, rotate, suspend, resume, revoke, expire
    at: datetime
    actor: str
    detail: str


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
                     clear_expiry: bool = False) -> KeyRecord:
        """Change a key and record why, atomically; raise KeyNotFound."""

    @abc.abstractmethod
    async def get(self, key_id: str) -> KeyRecord | None: ...

    @abc.abstractmethod
    async def changes_since(self, seq: int) -> list[KeyRecord]:
        """Every key written after `seq` (all keys for seq 0), in sequence order."""

    @abc.abstractmethod
    async def events(self, key_id: str) -> list[KeyEvent]: ...

    @abc.abstractmethod
    async def wait_for_change(self, timeout: float) -> None:
        """Return when a change may have happened, or after `timeout` seconds."""
