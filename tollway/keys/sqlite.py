"""SQLite key store for the single-node default (on a `SqliteWorker` thread)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from tollway.manifest.model import KeyStatus
from tollway.sqlite_worker import SqliteWorker

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

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tollway_keys (
    key_id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    status TEXT NOT NULL,
    expires_at TEXT,
    previous_hash BLOB,
    previous_valid_until TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS tollway_keys_seq ON tollway_keys (seq);
CREATE TABLE IF NOT EXISTS tollway_key_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL,
    action TEXT NOT NULL,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tollway_key_seq (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER);
INSERT OR IGNORE INTO tollway_key_seq (id, seq) VALUES (1, 0);
CREATE TABLE IF NOT EXISTS tollway_objects (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    doc TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX IF NOT EXISTS tollway_objects_seq ON tollway_objects (seq);
"""
# columns added after the first release: (table, column, declaration)
MIGRATIONS = [("tollway_keys", "spec", "TEXT"),
              ("tollway_key_events", "kind", "TEXT NOT NULL DEFAULT 'key'"),
              ("tollway_key_events", "before", "TEXT NOT NULL DEFAULT ''"),
              ("tollway_key_events", "after", "TEXT NOT NULL DEFAULT ''"),
              ("tollway_key_events", "source", "TEXT NOT NULL DEFAULT ''")]

INDEXES = """
CREATE INDEX IF NOT EXISTS tollway_keys_client ON tollway_keys (json_extract(spec, '$.client'));
"""

COLUMNS = ("key_id, secret_hash, status, expires_at, previous_hash, previous_valid_until, "
           "created_at, updated_at, seq, spec")
EVENT_COLUMNS = "key_id, action, at, actor, detail, kind, before, after, source"
OBJECT_COLUMNS = "kind, id, doc, created_at, updated_at, seq"


def _ts(v: str | None) -> datetime | None:
    return datetime.fromisoformat(v) if v else None


def _record(row: tuple[Any, ...]) -> KeyRecord:
    created, updated = _ts(row[6]), _ts(row[7])
    assert created is not None and updated is not None
    return KeyRecord(key_id=row[0], secret_hash=bytes(row[1]), status=STATUSES[row[2]],
                     expires_at=_ts(row[3]),
                     previous_hash=bytes(row[4]) if row[4] is not None else None,
                     previous_valid_until=_ts(row[5]), created_at=created, updated_at=updated,
                     seq=row[8], spec=row[9])


def _event(r: tuple[Any, ...]) -> KeyEvent:
    return KeyEvent(r[0], r[1], datetime.fromisoformat(r[2]), r[3], r[4], r[5], r[6], r[7], r[8])


def _object(r: tuple[Any, ...]) -> StoredObject:
    return StoredObject(r[0], r[1], r[2], datetime.fromisoformat(r[3]),
                        datetime.fromisoformat(r[4]), r[5])


class SqliteKeyStore(KeyStore):
    def __init__(self, path: str | Path, *, poll_interval: float = 0.2) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._worker = SqliteWorker(self.path, SCHEMA, "keys", MIGRATIONS, INDEXES)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return await self._worker.run(fn)
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e

    async def open(self) -> None:
        try:
            await self._worker.open()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite {self.path}: {e}") from e

    async def close(self) -> None:
        await self._worker.close()

    @staticmethod
    def _next_seq(db: sqlite3.Connection) -> int:
        row = db.execute("UPDATE tollway_key_seq SET seq = seq + 1 WHERE id = 1 RETURNING seq")
        return int(row.fetchone()[0])

    @staticmethod
    def _log(db: sqlite3.Connection, e: KeyEvent) -> None:
        db.execute(f"INSERT INTO tollway_key_events ({EVENT_COLUMNS}) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (e.key_id, e.action, e.at.isoformat(), e.actor, e.detail, e.kind, e.before,
                    e.after, e.source))

    async def insert(self, record: KeyRecord, event: KeyEvent) -> KeyRecord:
        def tx(db: sqlite3.Connection) -> KeyRecord:
            db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq(db)
                db.execute(
                    f"INSERT INTO tollway_keys ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (record.key_id, record.secret_hash, record.status.value,
                     record.expires_at.isoformat() if record.expires_at else None,
                     record.previous_hash,
                     record.previous_valid_until.isoformat()
                     if record.previous_valid_until else None,
                     record.created_at.isoformat(), record.updated_at.isoformat(), seq,
                     record.spec))
                self._log(db, event)
                row = db.execute(f"SELECT {COLUMNS} FROM tollway_keys WHERE key_id = ?",
                                 (record.key_id,)).fetchone()
                db.execute("COMMIT")
                return _record(row)
            except sqlite3.IntegrityError:
                db.execute("ROLLBACK")
                raise KeyExists(record.key_id) from None
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return await self._run(tx)

    async def update(self, key_id: str, event: KeyEvent, *, status: KeyStatus | None = None,
                     secret_hash: bytes | None = None, previous_hash: bytes | None = None,
                     previous_valid_until: datetime | None = None,
                     expires_at: datetime | None = None,
                     clear_expiry: bool = False, spec: str | None = None) -> KeyRecord:
        sets: list[str] = []
        args: list[Any] = []
        if status is not None:
            sets.append("status = ?")
            args.append(status.value)
        if secret_hash is not None:
            sets += ["secret_hash = ?", "previous_hash = ?", "previous_valid_until = ?"]
            args += [secret_hash, previous_hash,
                     previous_valid_until.isoformat() if previous_valid_until else None]
        if expires_at is not None or clear_expiry:
            sets.append("expires_at = ?")
            args.append(expires_at.isoformat() if expires_at else None)
        if spec is not None:
            sets.append("spec = ?")
            args.append(spec)

        def tx(db: sqlite3.Connection) -> KeyRecord:
            db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq(db)
                cur = db.execute(
                    f"UPDATE tollway_keys SET {', '.join([*sets, 'updated_at = ?', 'seq = ?'])} "
                    "WHERE key_id = ?", (*args, event.at.isoformat(), seq, key_id))
                if cur.rowcount == 0:
                    raise KeyNotFound(key_id)
                self._log(db, event)
                row = db.execute(f"SELECT {COLUMNS} FROM tollway_keys WHERE key_id = ?",
                                 (key_id,)).fetchone()
                db.execute("COMMIT")
                return _record(row)
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return await self._run(tx)

    async def get(self, key_id: str) -> KeyRecord | None:
        def q(db: sqlite3.Connection) -> KeyRecord | None:
            row = db.execute(f"SELECT {COLUMNS} FROM tollway_keys WHERE key_id = ?",
                             (key_id,)).fetchone()
            return _record(row) if row else None
        return await self._run(q)

    async def changes_since(self, seq: int) -> list[KeyRecord]:
        def q(db: sqlite3.Connection) -> list[KeyRecord]:
            rows = db.execute(f"SELECT {COLUMNS} FROM tollway_keys WHERE seq > ? ORDER BY seq",
                              (seq,)).fetchall()
            return [_record(r) for r in rows]
        return await self._run(q)

    async def latest(self, limit: int) -> tuple[int, list[KeyRecord]]:
        def q(db: sqlite3.Connection) -> tuple[int, list[KeyRecord]]:
            db.execute("BEGIN")  # one snapshot for both reads
            try:
                seq = db.execute("SELECT coalesce(max(seq), 0) FROM tollway_keys").fetchone()[0]
                rows = db.execute(f"SELECT {COLUMNS} FROM tollway_keys ORDER BY seq DESC "
                                  "LIMIT ?", (limit,)).fetchall()
            finally:
                db.execute("COMMIT")
            return int(seq), [_record(r) for r in rows]
        return await self._run(q)

    async def page(self, after: str, limit: int) -> list[KeyRecord]:
        def q(db: sqlite3.Connection) -> list[KeyRecord]:
            rows = db.execute(f"SELECT {COLUMNS} FROM tollway_keys WHERE key_id > ? "
                              "ORDER BY key_id LIMIT ?", (after, limit)).fetchall()
            return [_record(r) for r in rows]
        return await self._run(q)

    async def client_keys(self, client_id: str) -> list[KeyRecord]:
        def q(db: sqlite3.Connection) -> list[KeyRecord]:
            rows = db.execute(f"SELECT {COLUMNS} FROM tollway_keys WHERE "
                              "json_extract(spec, '$.client') = ? ORDER BY key_id",
                              (client_id,)).fetchall()
            return [_record(r) for r in rows]
        return await self._run(q)

    async def events(self, key_id: str) -> list[KeyEvent]:
        def q(db: sqlite3.Connection) -> list[KeyEvent]:
            rows = db.execute(f"SELECT {EVENT_COLUMNS} FROM tollway_key_events "
                              "WHERE key_id = ? AND kind = 'key' ORDER BY id",
                              (key_id,)).fetchall()
            return [_event(r) for r in rows]
        return await self._run(q)

    async def audit(self, query: AuditQuery) -> list[KeyEvent]:
        where, args = [], []
        for column, value in (("kind", query.kind), ("key_id", query.target),
                              ("actor", query.actor), ("action", query.action)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.since is not None:
            where.append("at >= ?")
            args.append(query.since.isoformat())

        def q(db: sqlite3.Connection) -> list[KeyEvent]:
            rows = db.execute(
                f"SELECT {EVENT_COLUMNS} FROM tollway_key_events "
                f"{'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id DESC LIMIT ?",
                (*args, query.limit)).fetchall()
            return [_event(r) for r in rows]
        return await self._run(q)

    async def put_object(self, kind: str, obj_id: str, doc: str, event: KeyEvent, *,
                         create: bool) -> StoredObject:
        now = event.at.isoformat()

        def tx(db: sqlite3.Connection) -> StoredObject:
            db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq(db)
                if create:
                    try:
                        db.execute(f"INSERT INTO tollway_objects ({OBJECT_COLUMNS}) "
                                   "VALUES (?, ?, ?, ?, ?, ?)", (kind, obj_id, doc, now, now, seq))
                    except sqlite3.IntegrityError:
                        raise KeyExists(obj_id) from None
                elif db.execute("UPDATE tollway_objects SET doc = ?, updated_at = ?, seq = ? "
                                "WHERE kind = ? AND id = ?",
                                (doc, now, seq, kind, obj_id)).rowcount == 0:
                    raise KeyNotFound(obj_id)
                self._log(db, event)
                row = db.execute(f"SELECT {OBJECT_COLUMNS} FROM tollway_objects "
                                 "WHERE kind = ? AND id = ?", (kind, obj_id)).fetchone()
                db.execute("COMMIT")
                return _object(row)
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return await self._run(tx)

    async def get_object(self, kind: str, obj_id: str) -> StoredObject | None:
        def q(db: sqlite3.Connection) -> StoredObject | None:
            row = db.execute(f"SELECT {OBJECT_COLUMNS} FROM tollway_objects "
                             "WHERE kind = ? AND id = ?", (kind, obj_id)).fetchone()
            return _object(row) if row else None
        return await self._run(q)

    async def objects_since(self, seq: int) -> list[StoredObject]:
        def q(db: sqlite3.Connection) -> list[StoredObject]:
            rows = db.execute(f"SELECT {OBJECT_COLUMNS} FROM tollway_objects WHERE seq > ? "
                              "ORDER BY seq", (seq,)).fetchall()
            return [_object(r) for r in rows]
        return await self._run(q)

    async def wait_for_change(self, timeout: float) -> None:
        # another process writes the file; polling the sequence is the only signal SQLite has
        await asyncio.sleep(min(timeout, self.poll_interval))
