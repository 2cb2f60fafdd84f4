"""Shared fixtures: real PostgreSQL and Redis on 127.0.0.1 (started by .ci/run)."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

PG_DSN = os.environ.get("TOLLWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pg_schema() -> str:
    """A fresh schema per test, so tests never see each other's rows."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def drop_schema(pg_schema: str) -> AsyncIterator[str]:
    yield pg_schema
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{pg_schema}" CASCADE')
    finally:
        await conn.close()
