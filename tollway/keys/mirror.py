"""An in-memory mirror of the key store, so a Check never waits on the database.

It holds the key records (up to `capacity` of them, the most recently used) and every runtime
client, and answers `binding(manifest, key_id)`: the manifest's binding, else a runtime key's
(tollway/keys/runtime.py), built once per change and kept for the keys used last. Every service
that needs a key's binding (extauthz, ratelimit, costsink) shares the one mirror of its process.
What it holds per key is invisible to Python's garbage collector (see _Held): a collection's
pause must not grow with the number of keys.

A store that fits (`complete`) is loaded whole: a key the mirror lacks does not exist, and a
Check never touches the database. A bigger store (a million runtime keys) is mirrored in part:
the keys written last at start, then each key the first time it is presented (`fetch`, one
query), evicting the least recently used, so memory is bounded by `capacity`, not by the store.
Either way the mirror follows the store's change sequence: PostgreSQL wakes it with NOTIFY
within milliseconds; SQLite is polled every 200 ms; a revocation reaches every replica well
within a second. If the store stops answering, the mirror keeps its last state and reports how
stale it is, and `extauthz` stops trusting it after `max_staleness`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import datetime
from typing import Final, NamedTuple

from prometheus_client import Gauge

from tollway.manifest import KeyBinding, Manifest
from tollway.manifest.model import DEFAULT_KEY_CACHE

from . import runtime
from .store import STATUSES, KeyRecord, KeyStore, StoredObject, StoreUnavailable

log = logging.getLogger("tollway.keys.mirror")

STORE_UP = Gauge("tollway_keystore_up", "1 when the key store answered the last refresh")
KEYS = Gauge("tollway_keystore_keys", "Keys held in the in-memory mirror")
COMPLETE = Gauge("tollway_keystore_mirror_complete",
                 "1 when the mirror holds every key of the store (0: the most used ones)")

FETCH_AGAIN = 1.0  # seconds before an id that the store did not have is asked for again
# runtime keys whose binding stays built; another key's is rebuilt from its spec (17-26 us)
# at its Check, then served from here to its rate limit and its cost. A binding is five objects
# the collector walks, about 1 us each while serving: 100,000 of them made each full
# collection 0.36 s, 4,096 of them 29 ms, 1,024 a few ms.
BINDINGS_HELD = 1024

# A record as the mirror holds it: a plain tuple of strings, bytes, numbers and datetimes, the
# status by its value. CPython's collector stops tracking such a tuple the first time it looks
# at it, so the mirror's records cost a full collection nothing; a KeyRecord (a tuple subclass,
# holding an enum) stays tracked for life and would be walked by every one of them.
_Held = tuple[str, bytes, str, datetime | None, bytes | None, datetime | None, datetime,
              datetime, int, str | None]
_SEQ: Final = 8
_SPEC: Final = 9


def _held(r: KeyRecord) -> _Held:
    return (r.key_id, r.secret_hash, r.status.value, r.expires_at, r.previous_hash,
            r.previous_valid_until, r.created_at, r.updated_at, r.seq, r.spec)


def _record(h: _Held) -> KeyRecord:
    return KeyRecord(h[0], h[1], STATUSES[h[2]], *h[3:])


class _Built(NamedTuple):
    manifest: Manifest
    key_seq: int
    client_id: str
    client_seq: int
    binding: KeyBinding | None


class KeyMirror:
    def __init__(self, store: KeyStore, *, poll_timeout: float = 5.0,
                 max_staleness: float = 30.0, capacity: int = DEFAULT_KEY_CACHE) -> None:
        self.store = store
        self.poll_timeout = poll_timeout
        self.max_staleness = max_staleness
        self.capacity = capacity
        self.complete = True  # until the store holds more keys than the mirror may
        self._keys: OrderedDict[str, _Held] = OrderedDict()  # least recently used first
        self._seq = 0
        self._loaded = False
        self._objects: dict[tuple[str, str], StoredObject] = {}
        self._object_seq = 0
        self._fresh_at: float | None = None  # monotonic time of the last successful refresh
        # ids the store had nothing new for: the ids are public, and a caller presenting
        # unknown ids or wrong secrets must not turn Checks into queries
        self._missed: dict[str, tuple[float, bool]] = {}  # id → (when, the store had none)
        # the runtime keys' bindings last used, rebuilt when the manifest, the key or its
        # client changes; least recently used first
        self._bindings: OrderedDict[str, _Built] = OrderedDict()

    def get(self, key_id: str) -> KeyRecord | None:
        held = self._keys.get(key_id)
        if held is None:
            return None
        if not self.complete:
            self._keys.move_to_end(key_id)  # recently used: evicted last
        return _record(held)

    def _put(self, record: KeyRecord) -> None:
        known = self._keys.get(record.key_id)
        if known is not None and known[_SEQ] >= record.seq:
            return
        self._keys[record.key_id] = _held(record)
        self._keys.move_to_end(record.key_id)
        self._missed.pop(record.key_id, None)  # it exists now, whatever the store said before
        while len(self._keys) > self.capacity:
            evicted, _ = self._keys.popitem(last=False)
            self._bindings.pop(evicted, None)
            self.complete = False

    def object(self, kind: str, obj_id: str) -> StoredObject | None:
        return self._objects.get((kind, obj_id))

    def objects(self, kind: str) -> list[StoredObject]:
        return [o for (k, _), o in self._objects.items() if k == kind]

    def binding(self, m: Manifest, key_id: str) -> KeyBinding | None:
        """The manifest's binding of `key_id`, else its runtime binding, else None."""
        found = m.bindings.get(key_id)
        if found is not None:
            return found
        held = self._keys.get(key_id)
        if held is None or held[_SPEC] is None:
            return None
        spec, seq = held[_SPEC], held[_SEQ]
        cached = self._bindings.get(key_id)
        fresh_key = cached is not None and cached.manifest is m and cached.key_seq == seq
        # the spec is JSON: read its client id once per key version, not once per Check
        client_id = cached.client_id if cached and fresh_key else runtime.client_of(spec)
        client = self._objects.get((runtime.CLIENT, client_id))
        client_seq = client.seq if client else 0
        if cached and fresh_key and cached.client_seq == client_seq:
            self._bindings.move_to_end(key_id)
            return cached.binding
        built = runtime.binding(m, client.doc if client else None, spec)
        self._bindings[key_id] = _Built(m, seq, client_id, client_seq, built)
        self._bindings.move_to_end(key_id)
        if len(self._bindings) > BINDINGS_HELD:
            self._bindings.popitem(last=False)
        return built

    async def refetch(self, key_id: str) -> bool:
        """`fetch`, and whether the mirror's record of the key changed meanwhile, by this
        fetch or by the follower: what was decided on the record before is decided again."""
        before = self._keys.get(key_id)  # the held version itself: get() builds a new record
        await self.fetch(key_id)
        return self._keys.get(key_id) is not before

    async def fetch(self, key_id: str) -> bool:
        """Read one key now: a key issued or rotated a moment ago works at once instead of
        after the next poll, and a key a partial mirror does not hold is brought in. True when
        it brought a newer record. An id the store had nothing new for is not asked for again
        within FETCH_AGAIN seconds."""
        now = time.monotonic()
        asked, absent = self._missed.get(key_id, (-FETCH_AGAIN, False))
        # not again so soon if the store had no such key, or if the mirror still holds what
        # the store had (a partial mirror may have evicted it since: then it is fetched)
        if now - asked < FETCH_AGAIN and (absent or key_id in self._keys):
            return False
        try:
            record = await self.store.get(key_id)
            known = self._keys.get(key_id)
            if record is None or (known is not None and known[_SEQ] >= record.seq):
                self._miss(key_id, now, absent=record is None)
                return False
            if record.spec is not None:  # a runtime key needs its client to have a binding
                client = await self.store.get_object(runtime.CLIENT,
                                                     runtime.client_of(record.spec))
                if client is not None:  # an unchanged one stays as it was (frozen at start)
                    known_client = self._objects.get((client.kind, client.id))
                    if known_client is None or known_client.seq < client.seq:
                        self._objects[(client.kind, client.id)] = client
        except StoreUnavailable:
            return False
        self._put(record)
        return True

    async def hold(self, key_ids: Iterable[str]) -> None:
        """Make sure the mirror holds these keys (a partial mirror fetches those it lacks):
        for code that reads bindings after the Check, such as costsink's batches."""
        if not self.complete:
            for key_id in set(key_ids):
                if key_id and key_id not in self._keys:
                    await self.fetch(key_id)

    def _miss(self, key_id: str, now: float, *, absent: bool) -> None:
        if len(self._missed) >= 10_000:  # forget what is past its wait, bounded under a flood
            self._missed = {k: v for k, v in self._missed.items() if now - v[0] < FETCH_AGAIN}
            if len(self._missed) >= 10_000:
                self._missed.clear()
        self._missed[key_id] = (now, absent)

    @property
    def usable(self) -> bool:
        """False before the first load and once the store has been silent for too long."""
        return (self._fresh_at is not None
                and time.monotonic() - self._fresh_at <= self.max_staleness)

    async def refresh(self) -> None:
        try:
            if self._loaded:
                for record in await self.store.changes_since(self._seq):
                    self._put(record)
                    self._seq = max(self._seq, record.seq)
            else:
                await self._load()
            for obj in await self.store.objects_since(self._object_seq):
                self._objects[(obj.kind, obj.id)] = obj
                self._object_seq = max(self._object_seq, obj.seq)
        except StoreUnavailable as e:
            STORE_UP.set(0)
            log.warning("key store unreachable, serving the mirror as of %.1fs ago: %s",
                        time.monotonic() - (self._fresh_at or time.monotonic()), e)
            raise
        self._fresh_at = time.monotonic()
        STORE_UP.set(1)
        KEYS.set(len(self._keys))
        COMPLETE.set(1 if self.complete else 0)

    async def _load(self) -> None:
        """The keys written last, up to capacity; the follower goes on from the sequence read
        before them. One more than capacity tells whether the store fits."""
        seq, records = await self.store.latest(self.capacity + 1)
        for record in reversed(records[:self.capacity]):  # the newest ends most recently used
            self._put(record)
        self.complete = len(records) <= self.capacity
        self._seq, self._loaded = seq, True
        if not self.complete:
            log.info("the key store holds more than %d keys (storage.key_cache): mirroring "
                     "the most used, fetching the others when presented", self.capacity)

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
