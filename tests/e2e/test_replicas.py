"""Two replicas, one set of limits: two complete gateways (each its own Envoy and `tollway
serve`) sharing one PostgreSQL database (keys and ledger) and one Redis (counters and spend),
as two pods behind one Service would. The rate limit counts across both, a budget holds across
both under concurrent load, a revocation reaches both within a second, and both Envoys' access
logs reach the one ledger."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from decimal import Decimal
from typing import Any

import asyncpg
import openai
import pytest

from tests.conftest import PG_DSN, require_postgres

from .harness import Gateway, PrivateRedis, run_gateway

pytestmark = pytest.mark.e2e

BUDGET = Decimal("0.005")


def _admin(sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(run())


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory,
             monkeypatch_module: pytest.MonkeyPatch) -> Iterator[list[Gateway]]:
    require_postgres()
    database = f"replicas_{uuid.uuid4().hex[:10]}"
    _admin(f'CREATE DATABASE "{database}"')
    dsn = PG_DSN.rsplit("/", 1)[0] + f"/{database}"
    redis = PrivateRedis(tmp_path_factory.mktemp("redis"))
    redis.start()
    # one pepper for both, as one Secret mounted in every pod
    monkeypatch_module.setenv("TOLLWAY_TEST_PEPPER", "replicas-" + uuid.uuid4().hex)

    def mutate(doc: dict[str, Any], rate_limit: str) -> None:
        doc["storage"].update(keys=dsn, ledger=dsn, pepper="env:TOLLWAY_TEST_PEPPER",
                              counters=redis.url)
        # the second replica answers the rate limit in its Check (one call to Redis holds a
        # budget and charges the rate limit), the first through Envoy's rate-limit filter
        doc["services"]["rate_limit"] = rate_limit
        doc["organizations"][0]["projects"] += [
            {"id": "shared", "quotas": [{"name": "gpt54", "models": ["gpt-5.4"], "rpm": 40}],
             "clients": [{"id": "c", "keys": [{"id": "k-shared"}, {"id": "k-gone"}]}]},
            {"id": "capped", "quotas": [{"name": "cap", "spend_per_day": str(BUDGET)}],
             "clients": [{"id": "d", "keys": [{"id": "k-budget"}]}]},
            {"id": "metered", "quotas": [{"name": "cap", "spend_per_day": str(BUDGET)},
                                         {"name": "burst", "rpm": 100_000}],
             "clients": [{"id": "e", "keys": [{"id": "k-metered"}]}]}]
    try:
        with ExitStack() as stack:
            gws = [stack.enter_context(run_gateway(
                tmp_path_factory.mktemp(f"replica{i}"), keys_dsn=dsn,
                mutate=lambda doc, mode=mode: mutate(doc, mode)))
                for i, mode in enumerate(("filter", "check"))]
            for key_id in ("k-shared", "k-gone", "k-budget", "k-metered"):
                gws[0].issue(key_id)  # issued once, in the shared store
                gws[1].issued[key_id] = gws[0].issued[key_id]
            yield gws
    finally:
        redis.kill()
        _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def client(gw: Gateway, key_id: str, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.issued[key_id],
                         max_retries=retries, timeout=15)


def ask(c: openai.OpenAI, model: str = "gpt-5.4") -> Any:
    return c.chat.completions.with_raw_response.create(
        model=model, max_tokens=5, messages=[{"role": "user", "content": "hi"}])


def ledger(dsn_gw: Gateway) -> dict[str, dict[str, Any]]:
    import yaml

    dsn = yaml.safe_load(dsn_gw.manifest_path.read_text())["storage"]["ledger"]

    async def rows() -> dict[str, dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            return {r["request_id"]: dict(r) for r in
                    await conn.fetch("SELECT * FROM tollway_ledger")}
        finally:
            await conn.close()
    return asyncio.run(rows())


def test_one_rate_limit_across_both(replicas: list[Gateway]) -> None:
    a, b = (client(gw, "k-shared") for gw in replicas)
    ids = [ask(a if i % 2 else b).headers["x-request-id"] for i in range(40)]
    for c in (a, b):  # the 41st is refused whichever replica it reaches
        with pytest.raises(openai.RateLimitError) as e:
            ask(c)
        assert e.value.code == "rate_limit_exceeded"
    assert ask(a, "gpt-5.4-mini").http_response.status_code == 200  # another model's quota
    # and both Envoys' access logs reach the one ledger
    deadline = time.monotonic() + 15
    while not set(ids) <= set(rows := ledger(replicas[0])):
        assert time.monotonic() < deadline, f"{len(set(ids) - set(rows))} not in the ledger"
        time.sleep(0.1)


def test_a_revocation_reaches_both_within_a_second(replicas: list[Gateway]) -> None:
    clients = [client(gw, "k-gone") for gw in replicas]
    for c in clients:
        ask(c, "gpt-5.4-mini")
    replicas[0].cli("keys", "revoke", "--", "k-gone")
    revoked_at = time.monotonic()
    pending = set(range(2))
    while pending:
        for i in sorted(pending):
            try:
                ask(clients[i], "gpt-5.4-mini")
            except openai.PermissionDeniedError as e:
                assert e.code == "key_revoked"
                pending.discard(i)
        assert time.monotonic() - revoked_at < 1.0, f"replicas {pending} still accept it"
        time.sleep(0.02)


def test_concurrent_clients_on_both_never_overrun_a_budget(replicas: list[Gateway]) -> None:
    admitted, _ = overrun_attempt(replicas, "k-budget")
    spent = priced(replicas[0], admitted)
    assert Decimal(0) < spent <= BUDGET, f"spent {spent} of {BUDGET} across both replicas"


def test_a_request_refused_by_its_budget_is_charged_to_no_rate_limit(
        replicas: list[Gateway]) -> None:
    """A budget beside an rpm it never reaches: on the replica that answers the rate limit in
    its Check (hold and charge in one call to Redis) as on the one that asks the rate-limit
    filter, a request the budget refuses (402, or 429 while other requests' holds settle)
    is not charged to the rpm, and one it admits is charged once: the rpm counts exactly the
    admitted requests."""
    admitted, refused = overrun_attempt(replicas, "k-metered")
    spent = priced(replicas[0], admitted)
    assert Decimal(0) < spent <= BUDGET, f"spent {spent} of {BUDGET} across both replicas"
    usage = json.loads(replicas[1].cli("usage", "--", "--key", "k-metered", "--format",
                                       "json"))
    rpm = next(x for x in usage["limits"] if x["name"] == "rpm")
    assert int(rpm["used"]) == len(admitted), (rpm, len(admitted), len(refused))


def overrun_attempt(replicas: list[Gateway], key_id: str) -> tuple[list[str], list[int]]:
    """64 clients, alternately on each replica, each asking until its budget refuses: the
    request ids admitted and the statuses refused."""
    admitted: list[str] = []
    refused: list[int] = []

    def run(n: int) -> None:
        c = client(replicas[n % 2], key_id, retries=2)
        for _ in range(30):
            try:
                admitted.append(ask(c, "gpt-5.4-mini").headers["x-request-id"])
            except openai.APIStatusError as e:
                refused.append(e.status_code)
                if e.status_code == 402:
                    return
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(run, range(64)))
    assert 402 in refused and set(refused) <= {402, 429}, set(refused)
    return admitted, refused


def priced(gw: Gateway, admitted: list[str]) -> Decimal:
    """What the admitted requests cost, once every one is in the ledger."""
    deadline = time.monotonic() + 15
    while not set(admitted) <= set(rows := ledger(gw)):
        assert time.monotonic() < deadline, "admitted requests missing from the ledger"
        time.sleep(0.1)
    return sum((rows[rid]["cost"] for rid in admitted), Decimal(0))
