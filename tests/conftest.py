"""Shared fixtures: the real PostgreSQL on 127.0.0.1 (started by .ci/run).

On a laptop without PostgreSQL, the tests that need it are skipped with a reason; under CI
(`CI=true`) an unreachable PostgreSQL fails them instead, so CI can never pass by skipping.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import pytest

PG_DSN = os.environ.get("TOLLWAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parent.parent


@cache
def _pg_error() -> str | None:
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
        await conn.close()
    try:
        # its own thread: the first caller may be an async fixture, inside a running loop
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(asyncio.run, probe()).result()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def unavailable(message: str, hint: str = "") -> None:
    """What a test does without a service or program it needs: skipped locally (with
    `hint`), failed under CI, so CI can never pass by skipping."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message + hint)


def require_postgres() -> None:
    error = _pg_error()
    if error is not None:
        unavailable(f"PostgreSQL not reachable at {PG_DSN} ({error})",
                    "; install it (apt-get install postgresql) to run these tests")


REDIS_URL = os.environ.get("TOLLWAY_TEST_REDIS", "redis://127.0.0.1:6379/0")


async def require_redis(client: Any) -> None:
    """Skip (locally) or fail (under CI) when the real Redis does not answer."""
    try:
        await client.ping()
    except Exception as e:
        await client.aclose()
        unavailable(f"Redis not reachable at {REDIS_URL}: {e}")


@pytest.fixture
def drop_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema per test, dropped afterwards."""
    require_postgres()
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()
    asyncio.run(drop())


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis Cluster of three masters on loopback, for the session: redis+cluster:// URL.
    Skipped (locally) or failed (under CI) without redis-server and redis-cli."""
    import shutil
    import subprocess
    import time

    from tests.e2e.harness import free_port

    if not (shutil.which("redis-server") and shutil.which("redis-cli")):
        unavailable("redis-server and redis-cli are needed for the Redis Cluster tests")
    base = tmp_path_factory.mktemp("cluster")
    ports = [free_port() for _ in range(3)]
    procs = []
    for port in ports:
        d = base / str(port)
        d.mkdir()
        # the cluster bus port too is chosen free: by default it is the port + 10000, which
        # can land among the ports the kernel hands out for outgoing connections
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--cluster-port", str(free_port()),
             "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-config-file",
             str(d / "nodes.conf"), "--save", "", "--appendonly", "no", "--dir", str(d)],
            stdout=subprocess.DEVNULL))
    try:
        deadline = time.monotonic() + 10
        while any(subprocess.run(["redis-cli", "-p", str(p), "ping"], capture_output=True)
                  .returncode for p in ports):
            assert time.monotonic() < deadline, "cluster nodes did not start"
            time.sleep(0.05)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        while b"cluster_state:ok" not in subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"],
                capture_output=True).stdout:
            assert time.monotonic() < deadline + 20, "the cluster never became ok"
            time.sleep(0.05)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for p in procs:
            p.kill()
            p.wait()
