"""The append-only ledger: one row per request, keyed by the request's start time and id.

Two backends behind one interface: SQLite (single node, on its own thread) and PostgreSQL
(asyncpg, a batch copied in). Rows are only ever inserted; a replayed entry of a request the
ledger has is ignored, so a retried batch is never counted twice.

Why the start time leads the key: Envoy's request ids are random, and a key of the id alone
put each new row on a random page of its index, so a batch wrote as many index pages as it had
rows, more of them the bigger the ledger (a SQLite batch of 500 rows 7x slower at 3 million
rows). Rows come in the order their requests started, so a key led by the time puts a batch on
the last few pages. Every copy of an entry (the gRPC stream's, the access-log file's, a
replay's) carries the same start time, to the microsecond, so the key still holds each request
once.
"""

from __future__ import annotations

import abc
import logging
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg

from tollway.refs import resolve_dsn
from tollway.sqlite_worker import SqliteWorker

log = logging.getLogger("tollway.costsink.ledger")


class LedgerRow(NamedTuple):
    """One request as the ledger keeps it, its values in the table's column order. A tuple,
    not a frozen dataclass: costsink makes one per access-log entry, and a frozen dataclass
    sets each of these 24 fields through object.__setattr__ (4.7 µs a row against 1.2)."""

    request_id: str
    at: datetime
    org: str | None
    project: str | None
    client: str | None
    key_id: str | None
    provider: str | None
    model: str | None
    route: str | None
    status: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cache_creation_tokens: int
    cost: Decimal | None  # None: the model is not on the rate card (counted, never dropped)
    currency: str | None
    rate_card_version: str | None
    latency_ms: int
    stream: bool
    client_disconnected: bool
    deny_reason: str | None
    reasoning_tokens: int = 0  # part of output_tokens, shown apart
    cache_creation_1h_tokens: int = 0  # part of cache_creation_tokens, priced apart
    # the provider's usage was not seen (the client hung up, the stream broke, the body could
    # not be read): the tokens are Tollway's estimate (docs/architecture.md#estimates)
    estimated: bool = False


COLUMNS = list(LedgerRow._fields)

SpendTotal = tuple[str, str, str, str | None, Decimal]  # org, project, key_id, model, cost


class Ledger(abc.ABC):
    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def append(self, rows: list[LedgerRow]) -> set[str]:
        """Insert the rows of requests the ledger lacks (by start time and request id); return
        their request ids."""

    async def rows(self, since: datetime | None = None,
                   until: datetime | None = None) -> list[LedgerRow]:
        """Rows with since <= at < until (either bound optional), oldest first."""
        return [row async for batch in self.batches(since, until) for row in batch]

    async def batches(self, since: datetime | None = None, until: datetime | None = None,
                      size: int = 20_000) -> AsyncIterator[list[LedgerRow]]:
        """The rows in time order, `size` at a time (a month of a busy gateway does not fit
        in memory as one list)."""
        after: tuple[str, str] | None = None
        while True:
            batch = await self._page(since, until, after, size)
            if not batch:
                return
            yield batch
            last = batch[-1]
            after = (last.at.astimezone(UTC).isoformat(), last.request_id)

    @abc.abstractmethod
    async def _page(self, since: datetime | None, until: datetime | None,
                    after: tuple[str, str] | None, size: int) -> list[LedgerRow]:
        """Up to `size` rows in the bounds after (at, request_id) `after`, in that order."""

    @abc.abstractmethod
    async def spend_totals(self, since: datetime) -> list[SpendTotal]:
        """Priced spend since `since` by org, project, key and model."""


def _table(name: str) -> str:
    return f"""CREATE TABLE IF NOT EXISTS {name} (
    request_id TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL,
    org TEXT, project TEXT, client TEXT, key_id TEXT, provider TEXT, model TEXT, route TEXT,
    status INTEGER NOT NULL,
    input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL,
    cached_input_tokens BIGINT NOT NULL, cache_creation_tokens BIGINT NOT NULL,
    cost NUMERIC(20, 10), currency TEXT, rate_card_version TEXT,
    latency_ms INTEGER NOT NULL, stream BOOLEAN NOT NULL, client_disconnected BOOLEAN NOT NULL,
    deny_reason TEXT,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    cache_creation_1h_tokens BIGINT NOT NULL DEFAULT 0,
    estimated BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (at, request_id)
)"""


# the key serves the time range queries too: no index of its own on `at` (a ledger created
# before the key led with the time has one, and a key of the request id alone)
PG_SCHEMA = _table("tollway_ledger") + ";"
PG_REKEY = ("ALTER TABLE tollway_ledger DROP CONSTRAINT tollway_ledger_pkey, "
            "ADD PRIMARY KEY (at, request_id); DROP INDEX IF EXISTS tollway_ledger_at;")
# columns added since the first release: a ledger created before them gains them at open
ADDED_COLUMNS = [("reasoning_tokens", "BIGINT NOT NULL DEFAULT 0"),
                 ("cache_creation_1h_tokens", "BIGINT NOT NULL DEFAULT 0"),
                 ("estimated", "BOOLEAN NOT NULL DEFAULT FALSE")]


def _sqlite_type(sql: str) -> str:
    return sql.replace("TIMESTAMPTZ", "TEXT").replace("NUMERIC(20, 10)", "TEXT") \
        .replace("BIGINT", "INTEGER").replace("BOOLEAN", "INTEGER").replace("FALSE", "0")


def _sqlite_table(name: str) -> str:
    """WITHOUT ROWID: the table is its key's B-tree, so a row is written once, not into a
    rowid table and again into the key's index."""
    return _sqlite_type(_table(name)) + " WITHOUT ROWID"


SQLITE_SCHEMA = _sqlite_table("tollway_ledger") + ";"


def _rekey(db: sqlite3.Connection) -> None:
    """A ledger made before the key led with the start time is copied into one that does, once,
    in one transaction: killed midway, it is the old ledger still, and done at the next open."""
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'tollway_ledger'").fetchone()
    if "WITHOUT ROWID" in sql:
        return
    (n,) = db.execute("SELECT count(*) FROM tollway_ledger").fetchone()
    log.warning("ledger %s: keying its %d rows by start time and request id (once)",
                db.execute("PRAGMA database_list").fetchone()[2], n)
    cols = ", ".join(COLUMNS)
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("DROP TABLE IF EXISTS tollway_ledger_rekeyed")
        db.execute(_sqlite_table("tollway_ledger_rekeyed"))
        db.execute(f"INSERT INTO tollway_ledger_rekeyed ({cols}) SELECT {cols} "
                   "FROM tollway_ledger ORDER BY at, request_id")
        db.execute("DROP TABLE tollway_ledger")  # its indexes with it
        db.execute("ALTER TABLE tollway_ledger_rekeyed RENAME TO tollway_ledger")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


class SqliteLedger(Ledger):
    def __init__(self, path: str | Path) -> None:
        self._worker = SqliteWorker(
            path, SQLITE_SCHEMA, "ledger",
            [("tollway_ledger", name, _sqlite_type(sql)) for name, sql in ADDED_COLUMNS],
            upgrade=_rekey)

    async def open(self) -> None:
        await self._worker.open()

    async def close(self) -> None:
        await self._worker.close()

    async def append(self, rows: list[LedgerRow]) -> set[str]:
        sql = (f"INSERT OR IGNORE INTO tollway_ledger ({', '.join(COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(COLUMNS))})")

        def tx(db: sqlite3.Connection) -> set[str]:
            new: set[str] = set()
            db.execute("BEGIN IMMEDIATE")
            try:
                for r in rows:
                    if db.execute(sql, _sqlite_params(r)).rowcount:
                        new.add(r.request_id)
                db.execute("COMMIT")
                return new
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return await self._worker.run(tx)

    async def _page(self, since: datetime | None, until: datetime | None,
                    after: tuple[str, str] | None, size: int) -> list[LedgerRow]:
        # ISO 8601 text in UTC sorts as time does, so the bounds compare as text
        lo = since.astimezone(UTC).isoformat() if since else ""
        hi = until.astimezone(UTC).isoformat() if until else "9999"
        at, rid = after or ("", "")

        def q(db: sqlite3.Connection) -> list[LedgerRow]:
            return [_sqlite_row(r) for r in db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM tollway_ledger WHERE at >= ? AND at < ? "
                "AND (at, request_id) > (?, ?) ORDER BY at, request_id LIMIT ?",
                (lo, hi, at, rid, size))]
        return await self._worker.run(q)

    async def spend_totals(self, since: datetime) -> list[SpendTotal]:
        lo = since.astimezone(UTC).isoformat()

        def q(db: sqlite3.Connection) -> list[SpendTotal]:
            totals: dict[tuple[str, str, str, str | None], Decimal] = {}
            # costs are exact decimal text here: sum them in Python, not as SQLite floats
            for org, project, key_id, model, cost in db.execute(
                    "SELECT org, project, key_id, model, cost FROM tollway_ledger WHERE at >= ? "
                    "AND cost IS NOT NULL AND key_id IS NOT NULL AND org IS NOT NULL "
                    "AND project IS NOT NULL", (lo,)):
                k = (org, project, key_id, model)
                totals[k] = totals.get(k, Decimal(0)) + Decimal(cost)
            return [(*k, v) for k, v in totals.items()]
        return await self._worker.run(q)


def _sqlite_row(r: tuple[Any, ...]) -> LedgerRow:
    v = dict(zip(COLUMNS, r, strict=True))
    v["at"] = datetime.fromisoformat(v["at"])
    v["cost"] = Decimal(v["cost"]) if v["cost"] is not None else None
    for flag in ("stream", "client_disconnected", "estimated"):
        v[flag] = bool(v[flag])
    return LedgerRow(**v)


_AT, _COST = COLUMNS.index("at"), COLUMNS.index("cost")


def _sqlite_params(r: LedgerRow) -> list[object]:
    """A row's values as SQLite keeps them: the time as ISO 8601 text in UTC, the cost as exact
    decimal text. By column, not a test of every value: this runs for every row on the writer
    thread, holding the GIL the services' event loop needs."""
    values: list[object] = list(r)
    values[_AT] = r.at.astimezone(UTC).isoformat()
    if r.cost is not None:
        values[_COST] = str(r.cost)
    return values


class PostgresLedger(Ledger):
    def __init__(self, dsn: str, *, schema: str | None = None) -> None:
        self.dsn = dsn
        self.schema = schema
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        async def setup(conn: asyncpg.Connection) -> None:
            if self.schema:
                await conn.execute(f'SET search_path TO "{self.schema}"')
        if self.schema:
            conn = await asyncpg.connect(self.dsn)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.close()
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4, setup=setup,
                                               command_timeout=10)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7146026)")
            await conn.execute(PG_SCHEMA)
            for name, sql in ADDED_COLUMNS:
                await conn.execute(f"ALTER TABLE tollway_ledger ADD COLUMN IF NOT EXISTS "
                                   f"{name} {sql}")
            key = await conn.fetchval(
                "SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index i "
                "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
                "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
                "WHERE i.indrelid = 'tollway_ledger'::regclass AND i.indisprimary")
        if key == ["request_id"]:
            # not rekeyed here: the ALTER locks the table while it builds the key (minutes for
            # a big ledger), which the operator schedules
            log.warning("ledger: keyed by the request id alone (made by an earlier release); "
                        "its writes slow as it grows. Rekey it when writes may wait: %s",
                        PG_REKEY)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def append(self, rows: list[LedgerRow]) -> set[str]:
        """A batch is copied in (COPY): asyncpg encodes each value with its column's codec,
        at half the CPU of the INSERT from column arrays, whose encoder tests each element of
        each array for being an array itself. COPY knows no ON CONFLICT: a batch holding a
        request the ledger has (a replay, or twins from the gRPC stream and the file) fails
        whole, and is inserted again skipping the known ones. ON CONFLICT names no key: a ledger
        made before the key led with the start time has the request id's alone."""
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.copy_records_to_table("tollway_ledger", records=rows,
                                                     columns=COLUMNS)
                return {r.request_id for r in rows}
            except asyncpg.UniqueViolationError:
                pass
            arrays = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_PG_TYPES))
            async with conn.transaction():
                inserted = await conn.fetch(
                    f"INSERT INTO tollway_ledger ({', '.join(COLUMNS)}) "
                    f"SELECT * FROM unnest({arrays}) "
                    "ON CONFLICT DO NOTHING RETURNING request_id",
                    *[list(col) for col in zip(*rows, strict=True)])
        return {r["request_id"] for r in inserted}

    async def _page(self, since: datetime | None, until: datetime | None,
                    after: tuple[str, str] | None, size: int) -> list[LedgerRow]:
        assert self._pool is not None
        at = datetime.fromisoformat(after[0]) if after else None
        async with self._pool.acquire() as conn:
            records = await conn.fetch(
                f"SELECT {', '.join(COLUMNS)} FROM tollway_ledger "
                "WHERE ($1::timestamptz IS NULL OR at >= $1) AND "
                "($2::timestamptz IS NULL OR at < $2) AND "
                "($3::timestamptz IS NULL OR (at, request_id) > ($3, $4)) "
                "ORDER BY at, request_id LIMIT $5", since, until, at,
                after[1] if after else "", size)
        return [LedgerRow(**dict(r)) for r in records]


    async def spend_totals(self, since: datetime) -> list[SpendTotal]:
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            records = await conn.fetch(
                "SELECT org, project, key_id, model, SUM(cost) AS cost FROM tollway_ledger "
                "WHERE at >= $1 AND cost IS NOT NULL AND key_id IS NOT NULL AND org IS NOT NULL"
                " AND project IS NOT NULL GROUP BY org, project, key_id, model", since)
        return [(r["org"], r["project"], r["key_id"], r["model"], r["cost"]) for r in records]


_PG_TYPES = ["text", "timestamptz", "text", "text", "text", "text", "text", "text", "text",
             "int", "bigint", "bigint", "bigint", "bigint", "numeric", "text", "text", "int",
             "bool", "bool", "text", "bigint", "bigint", "bool"]


def open_ledger(spec: str) -> Ledger:
    dsn = resolve_dsn(spec)
    if dsn.startswith("sqlite:///"):
        return SqliteLedger(dsn[len("sqlite:///"):])
    if dsn.startswith(("postgresql://", "postgres://")):
        return PostgresLedger(dsn)
    raise ValueError(f"unsupported ledger {spec!r}: use sqlite:///PATH or postgresql://")
