"""An in-memory mirror of the key table, so a Check never waits on the database.

The mirror loads every key once, then follows the store's change sequence: PostgreSQL wakes it
with NOTIFY within milliseconds; SQLite is polled every 200 ms. Either way a revocation reaches
every replica well within a second. If the store stops answering, the mirror keeps its last
state and reports how stale it is, and `extauthz` stops trusting it after `max_staleness`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import Gauge

from tollway.keys import KeyRecord, KeyStore, StoreUnavailable

log = logging.getLogger("tollway.extauthz.keys")

STORE_UP = Gauge("tollway_keystore_up", "1 when the key store answered the last refresh")
KEYS = Gauge("tollway_keystore_keys", "Keys held in the in-memory mirror")


class KeyMirror:
    def __init__(self, store: KeyStore, *, poll_timeout: float = 5.0,
                 max_staleness: float = 30.0) -> None:
        self.store = store
        self.poll_timeout = poll_timeout
        self.max_staleness = max_staleness
        self._keys: dict[str, KeyRecord] = {}
        self._seq = 0
        self._fresh_at: float | None = None  # monotonic time of the last successful refresh
        self._fetched_at: dict[str, float] = {}

    def get(self, key_id: str) -> KeyRecord | None:
        return self._keys.get(key_id)

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
