"""Spend counters converge on the ledger through Redis trouble, on a Redis of this test's own
(so it can be stalled and killed): commands held past the client's timeout (Redis runs them
later, the sink retries them: applied once, not twice), and a restart that lost every counter
(rebuilt from the ledger)."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest

from .harness import Gateway, PrivateRedis, run_gateway, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    r = PrivateRedis(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    if r.proc and r.proc.poll() is None:
        r.kill()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory,
       private_redis: PrivateRedis) -> Iterator[Gateway]:
    def mutate(doc: dict[str, Any]) -> None:
        doc["storage"]["counters"] = private_redis.url
        for route in doc["routes"]:
            route["fail_closed"] = False  # keep serving while Redis is away
        doc["organizations"][0]["projects"][0]["quotas"] = [
            {"name": "monthly", "spend_per_month": "1000"}]
    with run_gateway(tmp_path_factory.mktemp("recovery"), mutate=mutate) as g:
        g.issue("k-main")
        yield g


def ledger_spend(gw: Gateway) -> tuple[Decimal, int]:
    db = sqlite3.connect(gw.manifest_path.parent / "state" / "ledger.db")
    try:
        rows = db.execute("SELECT cost FROM tollway_ledger WHERE key_id = 'k-main' "
                          "AND cost IS NOT NULL").fetchall()
    finally:
        db.close()
    return sum((Decimal(c) for (c,) in rows), Decimal(0)), len(rows)


def counted_spend(gw: Gateway) -> Decimal | None:
    """What the counters say (None while Redis cannot answer)."""
    out = gw.run_cli("usage", "--", "--key", "k-main", "--format", "json")
    return Decimal(json.loads(out.stdout)["spent_this_month"]) if out.returncode == 0 else None


def send(gw: Gateway, n: int) -> int:
    c = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued["k-main"], max_retries=0,
                      timeout=10)
    ok = 0
    for i in range(n):
        c.chat.completions.create(model="gpt-5.4", max_tokens=5 + i % 7,
                                  messages=[{"role": "user", "content": "word " * (i + 1)}])
        ok += 1
    return ok


def converges(gw: Gateway, served: int, what: str) -> Decimal:
    """Poll until every served request is in the ledger and the counters equal it."""
    deadline = time.monotonic() + 20
    while True:
        spent, rows = ledger_spend(gw)
        counted = counted_spend(gw) if rows >= served else None
        if counted == spent:
            return spent
        assert time.monotonic() < deadline, f"{what}: ledger {spent} ({rows} rows), " \
                                            f"counters {counted}"
        time.sleep(0.1)


def stalled(r: PrivateRedis) -> bool:
    """Redis does not answer a PING within 50 ms (a raw socket: redis-py would retry)."""
    with socket.create_connection(("127.0.0.1", r.port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        sock.settimeout(0.05)
        try:
            sock.recv(16)
        except TimeoutError:
            return True
    return False


def test_spend_converges_on_the_ledger_through_redis_trouble(
        gw: Gateway, private_redis: PrivateRedis) -> None:
    served = send(gw, 20)
    assert converges(gw, served, "steady") > 0

    # Redis stalls for 1 s (as under a long script or a fork), past the 0.25 s timeout: the
    # sink's batches time out, yet Redis runs them once it wakes; the retries must not add
    # them again
    # them again. Requests are sent while Redis sleeps (their Checks go on without holds
    # after the timeout), so their commits meet the stall; should none have (the sleep ended
    # first on a slow machine), stall again, at most five times
    log = gw.manifest_path.parent / "logs" / "services.log"
    for _ in range(5):
        stall = threading.Thread(target=lambda: private_redis.client().execute_command(
            "DEBUG", "SLEEP", "1"))
        stall.start()
        wait_until(lambda: stalled(private_redis), "Redis asleep")
        served += send(gw, 8)
        stall.join()
        if "could not add" in log.read_text():
            break
    else:
        raise AssertionError("no stall made a spend commit fail: not tested")
    before_restart = converges(gw, served, "after a stall")

    # a restart without persistence: every counter is gone, and rebuilt from the ledger
    private_redis.kill()
    private_redis.start()
    assert counted_spend(gw) in (None, Decimal(0), before_restart)  # until the rebuild runs
    served += send(gw, 10)
    assert converges(gw, served, "after a restart") > before_restart
    assert "spend rebuilt from the ledger" in \
        log.read_text()


def test_an_operator_can_rebuild_spend_from_the_ledger(
        gw: Gateway, private_redis: PrivateRedis) -> None:
    served = send(gw, 5)
    spent = converges(gw, served, "before")
    r = private_redis.client()
    for key in r.scan_iter("tollway:{acme}:sp:*"):
        if not key.endswith(b":exp"):
            r.hset(key, "spent", 123)  # counters gone wrong, Redis itself fine
    assert counted_spend(gw) != spent
    out = gw.cli("spend", "--", "--rebuild")
    assert "spend rebuilt from the ledger" in out
    assert counted_spend(gw) == spent
