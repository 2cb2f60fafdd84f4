"""PostgreSQL key store (asyncpg) for production: many replicas, one database.

Writers NOTIFY `tollway_keys` in the same transaction, so every replica that LISTENs learns of
a revocation as soon as it commits; the sequence poll behind it covers a dropped listener.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime
from typing import Any

import asyncpg

from tollway.manifest.model import KeyStatus

from .store import (
    STATUSES,
    AuditQuery,
    KeyEvent,
    KeyExists,
    KeyNotFound,
    KeyRecord,
    KeyStore,
    StoredObject,
    StoreUnavailable,
)

CHANNEL = "tollway_keys"
SCHEMA_LOCK = 7146025
# held by every writer from its nextval to its commit: sequence numbers become visible in
# order, so a follower that has read seq N has read everything below it
WRITE_LOCK = 7146026

SCHEMA = """
CREATE SEQUENCE IF NOT EXISTS tollway_key_seq;
CREATE TABLE IF NOT EXISTS tollway_keys (
    key_id TEXT PRIMARY KEY,
    secret_hash BYTEA NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'revoked')),
    expires_at TIMESTAMPTZ,
    previous_hash BYTEA,
    previous_valid_until TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    seq BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS tollway_keys_seq ON tollway_keys (seq);
CREATE TABLE IF NOT EXISTS tollway_key_events (
    id BIGSERIAL PRIMARY KEY,
    key_id TEXT NOT NULL,
    action TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL
);
ALTER TABLE tollway_keys ADD COLUMN IF NOT EXISTS spec TEXT;
ALTER TABLE tollway_key_events ADD COLUMN IF NOT EXISTS kind TEXT NOT NULL DEFAULT 'key';
ALTER TABLE tollway_key_events ADD COLUMN IF NOT EXISTS before TEXT NOT NULL DEFAULT '';
ALTER TABLE tollway_key_events ADD COLUMN IF NOT EXISTS after TEXT NOT NULL DEFAULT '';
ALTER TABLE tollway_key_events ADD COLUMN IF NOT EXISTS source TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS tollway_key_events_target ON tollway_key_events (kind, key_id);
CREATE INDEX IF NOT EXISTS tollway_keys_client ON tollway_keys ((spec::jsonb ->> 'client'));
-- the keys in byte order whatever the database's collation, for KeyStore.page
CREATE INDEX IF NOT EXISTS tollway_keys_bytes ON tollway_keys (key_id COLLATE "C");
CREATE TABLE IF NOT EXISTS tollway_objects (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    doc TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX IF NOT EXISTS tollway_objects_seq ON tollway_objects (seq);
"""

COLUMNS = ("key_id, secret_hash, status, expires_at, previous_hash, previous_valid_until, "
           "created_at, updated_at, seq, spec")
EVENT_COLUMNS = "key_id, action, at, actor, detail, kind, before, after, source"
OBJECT_COLUMNS = "kind, id, doc, created_at, updated_at, seq"

CONNECT_ERRORS = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                  asyncio.TimeoutError)


def _record(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(key_id=row["key_id"], secret_hash=bytes(row["secret_hash"]),
                     status=STATUSES[row["status"]], expires_at=row["expires_at"],
                     previous_hash=bytes(row["previous_hash"])
                     if row["previous_hash"] is not None else None,
                     previous_valid_until=row["previous_valid_until"],
                     created_at=row["created_at"], updated_at=row["updated_at"], seq=row["seq"],
                     spec=row["spec"])


def _event(r: asyncpg.Record) -> KeyEvent:
    return KeyEvent(r["key_id"], r["action"], r["at"], r["actor"], r["detail"], r["kind"],
                    r["before"], r["after"], r["source"])


def _object(r: asyncpg.Record) -> StoredObject:
    return StoredObject(r["kind"], r["id"], r["doc"], r["created_at"], r["updated_at"],
                        r["seq"])


class PostgresKeyStore(KeyStore):
    def __init__(self, dsn: str, *, schema: str | None = None, timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.schema = schema  # tests isolate themselves in a schema of their own
        self.timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._changed = asyncio.Event()

    async def _setup(self, conn: asyncpg.Connection) -> None:
        if self.schema:
            await conn.execute(f'SET search_path TO "{self.schema}"')

    async def open(self) -> None:
        try:
            if self.schema:
                conn = await asyncpg.connect(self.dsn, timeout=self.timeout)
                try:
                    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                finally:
                    await conn.close()
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4,
                                                   timeout=self.timeout, setup=self._setup,
                                                   command_timeout=self.timeout)
            # concurrent first starts of several replicas must not race on CREATE
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
                await conn.execute(SCHEMA)
        except CONNECT_ERRORS as e:
            raise StoreUnavailable(f"postgresql: {e}") from e

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(*CONNECT_ERRORS):
                await self._listener.close(timeout=2)
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _tx(self, fn: Any) -> Any:
        assert self._pool is not None, "store is not open"
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                return await fn(conn)
        except CONNECT_ERRORS as e:
            raise StoreUnavailable(f"postgresql: {e}") from e

    async def _write(self, fn: Any) -> Any:
        async def locked(conn: asyncpg.Connection) -> Any:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITE_LOCK)
            return await fn(conn)
        return await self._tx(locked)

    @staticmethod
    async def _log(conn: asyncpg.Connection, e: KeyEvent) -> None:
        await conn.execute(f"INSERT INTO tollway_key_events ({EVENT_COLUMNS}) "
                           "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)", e.key_id, e.action,
                           e.at, e.actor, e.detail, e.kind, e.before, e.after, e.source)
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, e.key_id)

    async def insert(self, record: KeyRecord, event: KeyEvent) -> KeyRecord:
        async def tx(conn: asyncpg.Connection) -> KeyRecord:
            try:
                row = await conn.fetchrow(
                    f"INSERT INTO tollway_keys ({COLUMNS}) VALUES "
                    "($1, $2, $3, $4, $5, $6, $7, $8, nextval('tollway_key_seq'), $9) "
                    f"RETURNING {COLUMNS}",
                    record.key_id, record.secret_hash, record.status.value, record.expires_at,
                    record.previous_hash, record.previous_valid_until, record.created_at,
                    record.updated_at, record.spec)
            except asyncpg.UniqueViolationError:
                raise KeyExists(record.key_id) from None
            await self._log(conn, event)
            return _record(row)
        result: KeyRecord = await self._write(tx)
        return result

    async def update(self, key_id: str, event: KeyEvent, *, status: KeyStatus | None = None,
                     secret_hash: bytes | None = None, previous_hash: bytes | None = None,
                     previous_valid_until: datetime | None = None,
                     expires_at: datetime | None = None,
                     clear_expiry: bool = False, spec: str | None = None) -> KeyRecord:
        sets: list[str] = []
        args: list[Any] = []

        def arg(v: Any) -> str:
            args.append(v)
            return f"${len(args)}"
        if status is not None:
            sets.append(f"status = {arg(status.value)}")
        if secret_hash is not None:
            sets += [f"secret_hash = {arg(secret_hash)}", f"previous_hash = {arg(previous_hash)}",
                     f"previous_valid_until = {arg(previous_valid_until)}"]
        if expires_at is not None or clear_expiry:
            sets.append(f"expires_at = {arg(expires_at)}")
        if spec is not None:
            sets.append(f"spec = {arg(spec)}")
        sets += [f"updated_at = {arg(event.at)}", "seq = nextval('tollway_key_seq')"]
        where = arg(key_id)

        async def tx(conn: asyncpg.Connection) -> KeyRecord:
            row = await conn.fetchrow(f"UPDATE tollway_keys SET {', '.join(sets)} "
                                      f"WHERE key_id = {where} RETURNING {COLUMNS}", *args)
            if row is None:
                raise KeyNotFound(key_id)
            await self._log(conn, event)
            return _record(row)
        result: KeyRecord = await self._write(tx)
        return result

    async def get(self, key_id: str) -> KeyRecord | None:
        async def q(conn: asyncpg.Connection) -> KeyRecord | None:
            row = await conn.fetchrow(f"SELECT {COLUMNS} FROM tollway_keys WHERE key_id = $1",
                                      key_id)
            return _record(row) if row else None
        result: KeyRecord | None = await self._tx(q)
        return result

    async def changes_since(self, seq: int) -> list[KeyRecord]:
        async def q(conn: asyncpg.Connection) -> list[KeyRecord]:
            rows = await conn.fetch(f"SELECT {COLUMNS} FROM tollway_keys WHERE seq > $1 "
                                    "ORDER BY seq", seq)
            return [_record(r) for r in rows]
        result: list[KeyRecord] = await self._tx(q)
        return result

    async def latest(self, limit: int) -> tuple[int, list[KeyRecord]]:
        async def q(conn: asyncpg.Connection) -> tuple[int, list[KeyRecord]]:
            seq = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM tollway_keys")
            rows = await conn.fetch(f"SELECT {COLUMNS} FROM tollway_keys "
                                    "ORDER BY seq DESC LIMIT $1", limit)
            return int(seq), [_record(r) for r in rows]
        result: tuple[int, list[KeyRecord]] = await self._tx(q)
        return result

    async def page(self, after: str, limit: int) -> list[KeyRecord]:
        async def q(conn: asyncpg.Connection) -> list[KeyRecord]:
            rows = await conn.fetch(f"SELECT {COLUMNS} FROM tollway_keys "
                                    'WHERE key_id COLLATE "C" > $1 '
                                    'ORDER BY key_id COLLATE "C" LIMIT $2', after, limit)
            return [_record(r) for r in rows]
        result: list[KeyRecord] = await self._tx(q)
        return result

    async def client_keys(self, client_id: str) -> list[KeyRecord]:
        async def q(conn: asyncpg.Connection) -> list[KeyRecord]:
            rows = await conn.fetch(f"SELECT {COLUMNS} FROM tollway_keys "
                                    "WHERE (spec::jsonb ->> 'client') = $1 ORDER BY key_id",
                                    client_id)
            return [_record(r) for r in rows]
        result: list[KeyRecord] = await self._tx(q)
        return result

    async def events(self, key_id: str) -> list[KeyEvent]:
        async def q(conn: asyncpg.Connection) -> list[KeyEvent]:
            rows = await conn.fetch(f"SELECT {EVENT_COLUMNS} FROM tollway_key_events "
                                    "WHERE key_id = $1 AND kind = 'key' ORDER BY id", key_id)
            return [_event(r) for r in rows]
        result: list[KeyEvent] = await self._tx(q)
        return result

    async def audit(self, query: AuditQuery) -> list[KeyEvent]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("kind", query.kind), ("key_id", query.target),
                              ("actor", query.actor), ("action", query.action),
                              ("at >=", query.since)):
            if value is not None:
                args.append(value)
                where.append(f"{column} {'' if ' ' in column else '='} ${len(args)}")
        args.append(query.limit)

        async def q(conn: asyncpg.Connection) -> list[KeyEvent]:
            rows = await conn.fetch(
                f"SELECT {EVENT_COLUMNS} FROM tollway_key_events "
                f"{'WHERE ' + ' AND '.join(where) if where else ''} "
                f"ORDER BY id DESC LIMIT ${len(args)}", *args)
            return [_event(r) for r in rows]
        result: list[KeyEvent] = await self._tx(q)
        return result

    async def put_object(self, kind: str, obj_id: str, doc: str, event: KeyEvent, *,
                         create: bool) -> StoredObject:
        async def tx(conn: asyncpg.Connection) -> StoredObject:
            if create:
                try:
                    row = await conn.fetchrow(
                        f"INSERT INTO tollway_objects ({OBJECT_COLUMNS}) VALUES "
                        "($1, $2, $3, $4, $4, nextval('tollway_key_seq')) "
                        f"RETURNING {OBJECT_COLUMNS}", kind, obj_id, doc, event.at)
                except asyncpg.UniqueViolationError:
                    raise KeyExists(obj_id) from None
            else:
                row = await conn.fetchrow(
                    "UPDATE tollway_objects SET doc = $3, updated_at = $4, "
                    "seq = nextval('tollway_key_seq') WHERE kind = $1 AND id = $2 "
                    f"RETURNING {OBJECT_COLUMNS}", kind, obj_id, doc, event.at)
                if row is None:
                    raise KeyNotFound(obj_id)
            await self._log(conn, event)
            return _object(row)
        result: StoredObject = await self._write(tx)
        return result

    async def get_object(self, kind: str, obj_id: str) -> StoredObject | None:
        async def q(conn: asyncpg.Connection) -> StoredObject | None:
            row = await conn.fetchrow(f"SELECT {OBJECT_COLUMNS} FROM tollway_objects "
                                      "WHERE kind = $1 AND id = $2", kind, obj_id)
            return _object(row) if row else None
        result: StoredObject | None = await self._tx(q)
        return result

    async def objects_since(self, seq: int) -> list[StoredObject]:
        async def q(conn: asyncpg.Connection) -> list[StoredObject]:
            rows = await conn.fetch(f"SELECT {OBJECT_COLUMNS} FROM tollway_objects "
                                    "WHERE seq > $1 ORDER BY seq", seq)
            return [_object(r) for r in rows]
        result: list[StoredObject] = await self._tx(q)
        return result

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        conn = await asyncpg.connect(self.dsn, timeout=self.timeout)
        await conn.add_listener(CHANNEL, lambda *_: self._changed.set())
        self._listener = conn

    async def wait_for_change(self, timeout: float) -> None:
        try:
            await self._ensure_listener()
        except CONNECT_ERRORS:
            self._listener = None
            await asyncio.sleep(min(timeout, 1.0))  # the caller's poll still catches up
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel (3.11)
                await self._changed.wait()
        self._changed.clear()
