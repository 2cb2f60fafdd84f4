"""PostgreSQL stopped and restarted in the middle of a run: traffic keeps flowing, the sink
spools to disk, and afterwards every request is in the ledger exactly once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest

from tests.conftest import PG_DSN

from .harness import Gateway, run_gateway

pytestmark = pytest.mark.e2e


def pg_ctl(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
                   check=True, capture_output=True, timeout=60)


def pg_query(sql: str, schema: str) -> list[Any]:
    async def q() -> list[Any]:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
        try:
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET search_path TO "{schema}"')
            return list(await conn.fetch(sql))
        finally:
            await conn.close()
    return asyncio.run(q())


def spooled(gw: Gateway) -> int:
    spool = gw.manifest_path.parent / "state" / "spool"
    return sum(len(p.read_text().splitlines()) for p in spool.glob("*.jsonl"))


def ask(c: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    if stream:
        for _ in c.chat.completions.create(model="gpt-5.4-mini", messages=messages,  # type: ignore[call-overload]
                                           stream=True):
            pass
    else:
        c.chat.completions.create(model="gpt-5.4-mini", messages=messages)


def wait(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/etc/postgresql").is_dir(), reason="needs a local PostgreSQL "
                    "cluster this test may stop and start (pg_ctlcluster)")
def test_postgres_outage_loses_nothing_and_records_nothing_twice(tmp_path: Path,
                                                                 drop_schema: str) -> None:
    pg_query("SELECT 1", drop_schema)  # the schema the gateway's ledger lives in

    def mutate(doc: dict[str, Any]) -> None:
        doc["storage"]["ledger"] = f"{PG_DSN}?search_path={drop_schema}"

    with run_gateway(tmp_path, mutate=mutate) as gw:
        c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issue("k-main"), max_retries=0)
        for i in range(30):
            ask(c, stream=i % 2 == 1)
        try:
            pg_ctl("stop")
            for i in range(60):  # the ledger is not on the request path: all succeed
                ask(c, stream=i % 2 == 1)
            wait(lambda: spooled(gw) > 0, "nothing was spooled while PostgreSQL was down")
        finally:
            pg_ctl("start")
        for i in range(30):
            ask(c, stream=i % 2 == 1)

        sent = [s["request_id"] for s in gw.seen()]
        assert len(sent) == 120 and len(set(sent)) == 120

        def all_recorded() -> bool:
            try:
                rows = pg_query("SELECT count(*) AS n FROM tollway_ledger", drop_schema)
            except (OSError, asyncpg.PostgresError):
                return False
            return bool(rows[0]["n"] >= 120)
        wait(all_recorded, "the spool was not replayed into the ledger")
        wait(lambda: spooled(gw) == 0, "spool files left behind")

    rows = pg_query("SELECT request_id, status, input_tokens, output_tokens, cost "
                    "FROM tollway_ledger", drop_schema)
    assert sorted(r["request_id"] for r in rows) == sorted(sent)  # each once, none missing
    assert all(r["status"] == 200 and r["output_tokens"] > 0 and r["cost"] > 0 for r in rows)
