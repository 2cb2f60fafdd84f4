"""An in-memory mirror of the key store, so a Check never waits on the database.

It holds every key record and every runtime client, and answers `binding(manifest, key_id)`:
the manifest's binding, else a runtime key's (tollway/keys/runtime.py), built once per change
and cached. Every service that needs a key's binding (extauthz, ratelimit, costsink) shares the
one mirror of its process.

The mirror loads every key once, then follows the store's change sequence: PostgreSQL wakes it
with NOTIFY within milliseconds; SQLite is polled every 200 ms. Either way a revocation reaches
every replica well within a second. If the store stops answering, the mirror keeps its last
state and reports how stale it is, and `extauthz` stops trusting it after `max_staleness`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import NamedTuple

from prometheus_client import Gauge

from tollway.manifest import KeyBinding, Manifest

from . import runtime
from .store import KeyRecord, KeyStore, StoredObject, StoreUnavailable

log = logging.getLogger("tollway.keys.mirror")

STORE_UP = Gauge("tollway_keystore_up", "1 when the key store answered the last refresh")
KEYS = Gauge("tollway_keystore_keys", "Keys held in the in-memory mirror")


class _Built(NamedTuple):
    manifest: Manifest
    key_seq: int
    client_id: str
    client_seq: int
    binding: KeyBinding | None


class KeyMirror:
    def __init__(self, store: KeyStore, *, poll_timeout: float = 5.0,
                 max_staleness: float = 30.0) -> None:
        self.store = store
        self.poll_timeout = poll_timeout
        self.max_staleness = max_staleness
        self._keys: dict[str, KeyRecord] = {}
        self._seq = 0
        self._objects: dict[tuple[str, str], StoredObject] = {}
        self._object_seq = 0
        self._fresh_at: float | None = None  # monotonic time of the last successful refresh
        self._fetched_at: dict[str, float] = {}
        # a runtime key's binding, rebuilt when the manifest, the key or its client changes
        self._bindings: dict[str, _Built] = {}

    def get(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

    def object(self, kind: str, obj_id: str) -> StoredObject | None:
        return self._objects.get((kind, obj_id))

    def objects(self, kind: str) -> list[StoredObject]:
        return [o for (k, _), o in self._objects.items() if k == kind]

    def runtime_keys(self) -> list[KeyRecord]:
        return [r for r in self._keys.values() if r.spec is not None]

    def binding(self, m: Manifest, key_id: str) -> KeyBinding | None:
        """The manifest's binding of `key_id`, else its runtime binding, else None."""
        found = m.bindings.get(key_id)
        if found is not None:
            return found
        record = self._keys.get(key_id)
        if record is None or record.spec is None:
            return None
        cached = self._bindings.get(key_id)
        fresh_key = cached is not None and cached.manifest is m and cached.key_seq == record.seq
        # the spec is JSON: read its client id once per key version, not once per Check
        client_id = cached.client_id if cached and fresh_key else runtime.client_of(record.spec)
        client = self._objects.get((runtime.CLIENT, client_id))
        client_seq = client.seq if client else 0
        if cached and fresh_key and cached.client_seq == client_seq:
            return cached.binding
        built = runtime.binding(m, client.doc if client else None, record.spec)
        self._bindings[key_id] = _Built(m, record.seq, client_id, client_seq, built)
        return built

    async def fetch(self, key_id: str) -> bool:
        """Re-read one key now, so a key issued or rotated a moment ago works at once instead
        of after the next poll. At most once a second per key id: the ids are public, and a
        caller presenting a wrong secret must not be able to turn Checks into queries."""
        now = time.monotonic()
        if now - self._fetched_at.get(key_id, -1.0) < 1.0:
            return False
        self._fetched_at[key_id] = now
        try:
            record = await self.store.get(key_id)
        except StoreUnavailable:
            return False
        known = self._keys.get(key_id)
        if record is None or (known is not None and known.seq >= record.seq):
            return False
        if record.spec is not None:  # a runtime key needs its client to have a binding
            client_id = runtime.client_of(record.spec)
            try:
                client = await self.store.get_object(runtime.CLIENT, client_id)
            except StoreUnavailable:
                return False
            if client is not None:
                self._objects[(client.kind, client.id)] = client
        self._keys[key_id] = record
        return True

    @property
    def usable(self) -> bool:
        """False before the first load and once the store has been silent for too long."""
        return (self._fresh_at is not None
                and time.monotonic() - self._fresh_at <= self.max_staleness)

    async def refresh(self) -> None:
        try:
            changes = await self.store.changes_since(self._seq)
        except StoreUnavailable as e:
            STORE_UP.set(0)
            log.warning("key store unreachable, serving the mirror as of %.1fs ago: %s",
                        time.monotonic() - (self._fresh_at or time.monotonic()), e)
            raise
        for record in changes:
            self._keys[record.key_id] = record
            self._seq = max(self._seq, record.seq)
        for obj in await self.store.objects_since(self._object_seq):
            self._objects[(obj.kind, obj.id)] = obj
            self._object_seq = max(self._object_seq, obj.seq)
        self._fresh_at = time.monotonic()
        STORE_UP.set(1)
        KEYS.set(len(self._keys))

    async def follow(self) -> None:
        """Run forever: wait for a change signal (or the poll timeout), then catch up."""
        while True:
            try:
                await self.store.wait_for_change(self.poll_timeout)
                await self.refresh()
            except StoreUnavailable:
                await asyncio.sleep(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the follower die silently
                log.exception("key mirror refresh failed")
                await asyncio.sleep(1.0)
