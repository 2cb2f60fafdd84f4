"""SQLite for asyncio services: one connection, owned by one dedicated thread.

sqlite3 blocks, so every call runs on that thread and is awaited from the event loop; a single
thread also serialises writers without a lock of ours. Shared by the key store and the ledger.

Opening sets up the file (WAL, the schema, columns added since the first release) under an
exclusive lock on `<db>.lock`: several processes open one database at once (extauthz and
costsink both open the key store), and SQLite answers a concurrent journal-mode switch with
"database is locked" instead of waiting, and two ALTERs of the same column with an error.
"""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from tollway.refs import private_file

T = TypeVar("T")


# (table, column, declaration): a column a later release added, added to an older database
Migration = tuple[str, str, str]


class SqliteWorker:
    def __init__(self, path: str | Path, schema: str, name: str,
                 migrations: Sequence[Migration] = (), indexes: str = "",
                 upgrade: Callable[[sqlite3.Connection], None] | None = None) -> None:
        self.path = Path(path)
        self.schema = schema
        self.migrations = migrations
        self.indexes = indexes  # a script run after the migrations: it may name their columns
        self.upgrade = upgrade  # last, under the same lock: a change no script can say
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{name}")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        def connect() -> None:
            if self._db is not None:
                # opened by a call before this one that its caller stopped waiting for (a
                # ledger rekeyed at its first open can take longer than the write timeout)
                return
            private_file(self.path)  # SQLite gives its -wal and -shm files the same mode
            lock = self.path.with_name(self.path.name + ".lock")
            private_file(lock)
            with lock.open("r+") as held:
                fcntl.flock(held, fcntl.LOCK_EX)  # released when the file closes
                db = sqlite3.connect(self.path, isolation_level=None,
                                     check_same_thread=False, timeout=5)
                db.execute("PRAGMA busy_timeout=5000")
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(self.schema)
                for table, column, declaration in self.migrations:
                    have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                db.executescript(self.indexes)
                if self.upgrade is not None:
                    self.upgrade(db)
            self._db = db
        await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None, "database is not open"
            return fn(self._db)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._pool, db.close)
        self._pool.shutdown(wait=False)
