"""One suite, two ledgers: SQLite (embedded) and the real PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from costsink.ledger import PG_REKEY, Ledger, LedgerRow, PostgresLedger, SqliteLedger
from tests.conftest import PG_DSN

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def row(rid: str, cost: Decimal | None = Decimal("0.0000123456"), at: int = 0) -> LedgerRow:
    return LedgerRow(rid, T0 + timedelta(seconds=at), "acme", "team-ai", "app", "k1", "openai",
                     "gpt-5.4", "route0", 200, 1500, 12, 1024, 0, cost, "USD", "v1", 42, True,
                     False, None)


@pytest.fixture(params=["sqlite", "postgres"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    lg: Ledger = (SqliteLedger(tmp_path / "ledger.db") if request.param == "sqlite"
                  else PostgresLedger(PG_DSN, schema=request.getfixturevalue("drop_schema")))
    await lg.open()
    yield lg
    await lg.close()


async def test_rows_round_trip_exactly(ledger: Ledger) -> None:
    rows = [row("a", at=0), row("b", cost=None, at=1), row("c", cost=Decimal("12.5"), at=2)]
    assert await ledger.append(rows) == {"a", "b", "c"}
    assert await ledger.rows() == rows  # decimals, times, flags all exactly as written


async def test_estimated_rows_and_their_token_columns_round_trip(ledger: Ledger) -> None:
    rows = [row("e")._replace(reasoning_tokens=7, cache_creation_1h_tokens=5, estimated=True)]
    await ledger.append(rows)
    assert await ledger.rows() == rows


async def test_a_ledger_from_before_the_estimate_columns_and_the_time_led_key_gains_them(
        tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.executescript("""CREATE TABLE tollway_ledger (request_id TEXT PRIMARY KEY, at TEXT NOT NULL,
        org TEXT, project TEXT, client TEXT, key_id TEXT, provider TEXT, model TEXT, route TEXT,
        status INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL, cost TEXT,
        currency TEXT, rate_card_version TEXT, latency_ms INTEGER NOT NULL,
        stream INTEGER NOT NULL, client_disconnected INTEGER NOT NULL, deny_reason TEXT);
        INSERT INTO tollway_ledger VALUES ('old', '2026-11-01T00:00:00+00:00', 'acme', 'p', 'c',
        'k', 'openai', 'gpt-5.4', 'route0', 200, 10, 2, 0, 0, '0.001', 'USD', 'v1', 5, 0, 0,
        NULL);""")
    db.close()
    lg = SqliteLedger(old)
    await lg.open()
    try:
        await lg.append([row("new")])
        got = {r.request_id: r for r in await lg.rows()}
        assert not got["old"].estimated and got["old"].reasoning_tokens == 0
        assert got["new"] == row("new")
        # and it is keyed by start time and request id now: a twin of the old row is ignored
        old_twin = got["old"]._replace(cost=Decimal("9"))
        assert await lg.append([old_twin, row("newer", at=1)]) == {"newer"}
        assert len(await lg.rows()) == 3
        # a caller that stopped waiting for a slow first open opens again: the same connection
        first = lg._worker._db
        await lg.open()
        assert lg._worker._db is first
    finally:
        await lg.close()
    db = sqlite3.connect(old)
    (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'tollway_ledger'").fetchone()
    tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert "PRIMARY KEY (at, request_id)" in sql and sql.endswith("WITHOUT ROWID")
    assert tables == {"tollway_ledger"}  # the old table's key index and time index gone with it


OLD_PG_LEDGER = """CREATE TABLE tollway_ledger (request_id TEXT PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL, org TEXT, project TEXT, client TEXT, key_id TEXT, provider TEXT,
    model TEXT, route TEXT, status INTEGER NOT NULL, input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL, cached_input_tokens BIGINT NOT NULL,
    cache_creation_tokens BIGINT NOT NULL, cost NUMERIC(20, 10), currency TEXT,
    rate_card_version TEXT, latency_ms INTEGER NOT NULL, stream BOOLEAN NOT NULL,
    client_disconnected BOOLEAN NOT NULL, deny_reason TEXT);
    CREATE INDEX tollway_ledger_at ON tollway_ledger (at);"""


async def test_a_postgresql_ledger_keyed_by_the_request_id_alone_works_and_says_how_to_rekey(
        drop_schema: str, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL's rekey locks the table while it builds the key: the operator runs it, with
    the statement the warning gives; until then the old key holds each request once."""
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'CREATE SCHEMA "{drop_schema}"; SET search_path TO "{drop_schema}";'
                           + OLD_PG_LEDGER)
        lg = PostgresLedger(PG_DSN, schema=drop_schema)
        await lg.open()
        try:
            assert PG_REKEY in caplog.text
            assert await lg.append([row("a"), row("b", at=1)]) == {"a", "b"}
            assert await lg.append([row("b", at=1), row("c", at=2)]) == {"c"}
            await conn.execute(PG_REKEY)
            assert await lg.append([row("c", at=2), row("d", at=3)]) == {"d"}
            assert [r.request_id for r in await lg.rows()] == ["a", "b", "c", "d"]
        finally:
            await lg.close()
        key = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'tollway_ledger'::regclass AND contype = 'p'")
        assert key == "PRIMARY KEY (at, request_id)"
        caplog.clear()
        lg = PostgresLedger(PG_DSN, schema=drop_schema)
        await lg.open()
        await lg.close()
        assert "Rekey" not in caplog.text
    finally:
        await conn.close()


async def test_append_is_idempotent_on_the_request(ledger: Ledger) -> None:
    assert await ledger.append([row("a"), row("b", at=1)]) == {"a", "b"}
    assert await ledger.append([row("b", at=1), row("c", at=2)]) == {"c"}
    assert [r.request_id for r in await ledger.rows()] == ["a", "b", "c"]
    # twins in one batch (the gRPC stream's and the file's copy): the first is kept, once;
    # and across the chunks of a large batch
    twins = [row("d", Decimal("1")), row("d", Decimal("2"))]
    chunked = [row(f"e{i:04d}") for i in range(600)]
    assert await ledger.append([*twins, *chunked, row("e0000"), row("a")]) \
        == {"d", *(r.request_id for r in chunked)}
    [d] = [r for r in await ledger.rows() if r.request_id == "d"]
    assert d.cost == Decimal("1")


async def test_rows_of_a_period(ledger: Ledger) -> None:
    await ledger.append([row(f"r{i}", at=i * 3600) for i in range(48)])
    day2 = await ledger.rows(T0 + timedelta(hours=24), T0 + timedelta(hours=48))
    assert [r.request_id for r in day2] == [f"r{i}" for i in range(24, 48)]
    assert len(await ledger.rows(since=T0 + timedelta(hours=47))) == 1


async def test_a_large_batch_in_one_call(ledger: Ledger) -> None:
    batch = [row(f"r{i:04d}", at=i) for i in range(1000)]
    assert len(await ledger.append(batch)) == 1000
    assert len(await ledger.rows()) == 1000


async def test_spend_totals_are_exact_sums_since_a_time(ledger: Ledger) -> None:
    await ledger.append([row(f"r{i}", cost=Decimal("0.0000000001") * (i + 1), at=i * 3600)
                         for i in range(5)] + [row("unpriced", cost=None, at=3)])
    totals = await ledger.spend_totals(T0 + timedelta(hours=2))
    assert totals == [("acme", "team-ai", "k1", "gpt-5.4", Decimal("0.0000000012"))]


async def test_spend_is_rebuilt_from_the_ledger(ledger: Ledger) -> None:
    """A restarted in-process store, or a Redis that lost its data, must not hand budgets a
    fresh period: this day's and month's counters are set to what the ledger holds."""
    from costsink.spend import SpendRecorder
    from tollway.budgets import SpendCounter, to_units
    from tollway.manifest import loads
    from tollway.spend.memory import MemorySpendStore

    m = loads("""
providers: [{name: openai, dialect: openai, upstream: {host: x}, credential: env:X,
             models: [{name: gpt-5.4}]}]
routes: [{path: /v1/chat/completions, provider: openai}]
organizations: [{id: acme, projects: [{id: team-ai, clients: [{id: app, keys: [{id: k1}]}]}]}]
""")
    await ledger.append([row("a", at=0), row("b", at=60)])
    store = MemorySpendStore()
    recorder = SpendRecorder(store)
    counters = [SpendCounter("project:team-ai", "day", "2026-11-22"),
                SpendCounter("org:acme", "month", "2026-11"),
                SpendCounter("key:k1", "month", "2026-11")]
    await store.commit("acme", "", counters, 999)  # whatever was there is replaced
    assert await recorder.rebuild(m, ledger, T0 + timedelta(minutes=5)) == 6  # 3 x day, month
    expected = to_units(Decimal("0.0000246912"))
    assert await store.read("acme", counters) == [(expected, 0)] * 3


async def test_batches_walk_every_row_in_time_order(ledger: Ledger) -> None:
    rows = [row(f"r{i}", at=i // 2) for i in range(7)]  # pairs share a second
    await ledger.append(list(reversed(rows)))
    batches = [b async for b in ledger.batches(size=3)]
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [r.request_id for b in batches for r in b] == [r.request_id for r in rows]
    later = [r.request_id for b in [b async for b in ledger.batches(rows[4].at, size=2)]
             for r in b]
    assert later == ["r4", "r5", "r6"]
