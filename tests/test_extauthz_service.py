"""The extauthz servicer without Envoy: a Check that Envoy has stopped waiting for, or
cancelled, leaves no budget hold behind; one waiting for other requests' holds answers before
Envoy's deadline; a key loaded while a Check fetches it is accepted."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2

from extauthz.decision import compile_runtime
from extauthz.limits import Limits
from extauthz.service import AuthorizationService
from ratelimit.backend import BackendUnavailable, CounterBackend, MemoryBackend
from ratelimit.redis_backend import RedisBackend
from tests.conftest import REDIS_URL, require_redis
from tests.e2e.harness import offline_manifest
from tollway.budgets import SpendCounter, period_labels
from tollway.keys import KeyRecord, hash_secret
from tollway.keys.mirror import KeyMirror
from tollway.manifest import KeyStatus, parse
from tollway.metadata import REQUEST
from tollway.reload import Live
from tollway.spend import SpendStore
from tollway.spend.memory import MemorySpendStore
from tollway.spend.redis_store import RedisSpendStore

PEPPER = b"p" * 32


class Context:
    """What the servicer asks of grpc.aio's context."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def service(store: SpendStore, budget: str = "10") -> AuthorizationService:
    os.environ.setdefault("MOCK_PROVIDER_KEY", "x")
    os.environ["TOLLWAY_TEST_PEPPER"] = PEPPER.decode()
    doc = offline_manifest()
    doc["storage"]["pepper"] = "env:TOLLWAY_TEST_PEPPER"
    doc["organizations"][0]["projects"][0]["quotas"] = [{"name": "cap",
                                                         "spend_per_day": budget}]
    m = parse(doc)
    mirror = KeyMirror(None)  # type: ignore[arg-type]  # filled by hand below
    now = datetime.now(UTC)
    mirror._put(KeyRecord("k-main", hash_secret(PEPPER, "s"), KeyStatus.ACTIVE,
                          None, None, None, now, now, 1))
    mirror._fresh_at = time.monotonic() + 3600
    return AuthorizationService(Live(compile_runtime, m), mirror, store)


def check(rid: str) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    attrs.context_extensions["route"] = "route0"
    attrs.request.http.headers.update({"authorization": "Bearer k-main.s",
                                       "content-length": "100", "x-request-id": rid})
    body = struct_pb2.Struct()
    body.update({"model": "gpt-5.4-mini", "max_tokens": 10})
    attrs.metadata_context.filter_metadata[REQUEST].CopyFrom(body)
    return req


async def held(store: SpendStore) -> int:
    """What the project's daily budget holds for requests in flight."""
    day = period_labels(datetime.now(UTC), "UTC")["day"]
    [(_, holding)] = await store.read("acme", [SpendCounter("project:team-ai", "day", day)])
    return holding


async def test_an_allowed_check_holds_its_maximum_cost() -> None:
    store = MemorySpendStore()
    r = await service(store).Check(check("r1"), Context(0.4))
    assert r.status.code == 0
    assert await held(store) > 0
    assert r.dynamic_metadata["budget_hold"] == str(await held(store))


async def test_a_check_past_envoys_deadline_releases_its_hold() -> None:
    store = MemorySpendStore()
    r = await service(store).Check(check("r1"), Context(0.0))
    assert r.denied_response.status.code == 503
    assert await held(store) == 0


@pytest.mark.parametrize("remaining", [0.05, 0.25])
async def test_a_check_waiting_for_holds_answers_429_before_envoys_deadline(
        remaining: float) -> None:
    """Room for one request (at most 0.00012 USD) and one in flight: the second Check waits
    for that hold to settle, but only as long as Envoy still waits for its answer."""
    svc = service(MemorySpendStore(), budget="0.0002")
    assert (await svc.Check(check("r1"), Context(0.4))).status.code == 0
    started = time.monotonic()
    r = await svc.Check(check("r2"), Context(remaining))
    assert time.monotonic() - started < remaining
    assert r.denied_response.status.code == 429, r.denied_response.body
    assert "budget_in_flight" in r.denied_response.body


async def test_a_cancelled_check_releases_its_hold() -> None:
    store = MemorySpendStore()
    svc = service(store)
    original = store.hold

    async def slow_hold(*args: Any, **kwargs: Any) -> Any:
        outcome = await original(*args, **kwargs)  # placed, then Envoy gives up
        await asyncio.sleep(10)
        return outcome
    store.hold = slow_hold  # type: ignore[method-assign]
    task = asyncio.create_task(svc.Check(check("r1"), Context(0.4)))
    deadline = time.monotonic() + 5
    while await held(store) == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await held(store) == 0


async def test_a_key_the_follower_brings_during_the_fetch_is_accepted() -> None:
    """The mirror's follower can load a newly issued key while a Check fetches it: the
    fetch then finds nothing newer, and the Check must still see the key."""
    svc = service(MemorySpendStore())
    record = svc.mirror.get("k-main")
    assert record is not None
    del svc.mirror._keys["k-main"]

    class Store:
        async def get(self, key_id: str) -> KeyRecord:
            svc.mirror._put(record)  # the follower's refresh, mid-fetch
            return record
    svc.mirror.store = Store()  # type: ignore[assignment]
    r = await svc.Check(check("r1"), Context(0.4))
    assert r.status.code == 0, r.denied_response.body


def wrong_secret(rid: str) -> external_auth_pb2.CheckRequest:
    req = check(rid)
    req.attributes.request.http.headers["authorization"] = "Bearer k-main.t"
    return req


@pytest.mark.parametrize("rotated", [False, True])
async def test_a_wrong_secret_is_decided_again_only_if_the_fetch_changed_the_key(
        rotated: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong secret for a key the mirror holds fetches the key once: unchanged in the
    store, the refusal stands as decided; rotated there (the client may hold the new secret),
    the Check decides again, on the new record."""
    from extauthz import service as module

    svc = service(MemorySpendStore())
    record = svc.mirror.get("k-main")
    assert record is not None
    stored = record._replace(secret_hash=hash_secret(PEPPER, "t"), seq=2) if rotated \
        else record

    class Store:
        async def get(self, key_id: str) -> KeyRecord:
            return stored
    svc.mirror.store = Store()  # type: ignore[assignment]
    decided: list[object] = []
    decide = module.decide

    def counting(*args: Any) -> Any:
        decided.append(args)
        return decide(*args)
    monkeypatch.setattr(module, "decide", counting)
    r = await svc.Check(wrong_secret("r1"), Context(0.4))
    assert (r.status.code == 0) is rotated
    assert len(decided) == (2 if rotated else 1)


class DownCounters(MemoryBackend):
    async def charge(self, org: str, rules: Any, costs: Any, now_ms: int | None = None) -> Any:
        raise BackendUnavailable("counters down")


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def stores(request: pytest.FixtureRequest
                 ) -> AsyncIterator[tuple[SpendStore, CounterBackend]]:
    """Spend and rate-limit counters as `tollway serve` opens them from one storage.counters:
    in memory, or in one Redis (a Check then holds and charges in one call), or one Redis
    Cluster; under the test's own prefix, its keys removed afterwards."""
    if request.param == "memory":
        yield MemorySpendStore(), MemoryBackend()
        return
    url = request.getfixturevalue("redis_cluster") if request.param == "redis-cluster" \
        else REDIS_URL
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    spend = RedisSpendStore(url, prefix=prefix, timeout=5.0)
    counters = RedisBackend(url, prefix=prefix, timeout=5.0)
    await require_redis(spend.client)
    try:
        yield spend, counters
    finally:
        await spend.close()  # its indexing tasks done first
        for key in [k async for k in counters.client.scan_iter(f"{prefix}:*")]:
            await counters.client.delete(key)  # one by one: in a cluster, different slots
        await counters.close()


def answering_rate_limits(store: SpendStore, counters: CounterBackend | None, rpm: int = 2,
                          mode: str = "check", budget: str = "10",
                          fail_closed: bool = True) -> AuthorizationService:
    """services.rate_limit: check (or `mode`), with an rpm beside the daily budget."""
    svc = service(store)
    doc = offline_manifest()
    doc["storage"]["pepper"] = "env:TOLLWAY_TEST_PEPPER"
    doc["services"]["rate_limit"] = mode
    doc["routes"][0]["fail_closed"] = fail_closed
    doc["organizations"][0]["projects"][0]["quotas"] = [
        {"name": "cap", "spend_per_day": budget}, {"name": "burst", "rpm": rpm}]
    svc.runtime = Live(compile_runtime, parse(doc))
    svc.limits = Limits(store, counters)
    return svc


def response_headers(r: external_auth_pb2.CheckResponse) -> dict[str, str]:
    return {h.header.key: h.header.value for h in r.ok_response.response_headers_to_add}


async def index_of(store: SpendStore, rid: str) -> bytes | None:
    """The hold index's entry of a request id (a Redis store's), once written."""
    assert isinstance(store, RedisSpendStore)
    await asyncio.gather(*store._indexing)  # a Cluster's, written after the hold
    found: bytes | None = await store.client.get(store._index_key(rid))
    return found


async def test_a_check_answering_rate_limits_charges_and_refuses_like_the_filter(
        stores: tuple[SpendStore, CounterBackend]) -> None:
    store, counters = stores
    svc = answering_rate_limits(store, counters)
    first = await svc.Check(check("r1"), Context(0.4))
    assert first.status.code == 0
    assert response_headers(first)["x-ratelimit-remaining-requests"] == "1"
    assert response_headers(first)["x-ratelimit-limit-requests"] == "2"
    # what costsink needs to settle the reservation with the real usage
    assert first.dynamic_metadata["charged_at_ms"] > 0
    assert first.dynamic_metadata["reserve_tokens"] != ""
    second = await svc.Check(check("r2"), Context(0.4))
    assert response_headers(second)["x-ratelimit-remaining-requests"] == "0"
    holding = await held(store)
    assert holding == 2 * int(first.dynamic_metadata["budget_hold"])

    third = await svc.Check(check("r3"), Context(0.4))
    assert third.denied_response.status.code == 429
    headers = {h.header.key: h.header.value for h in third.denied_response.headers}
    assert headers["x-tollway-error"] == "rate_limit_exceeded"
    assert 0 < int(headers["retry-after"]) <= 61  # a bucket of 1 s beyond the minute
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "quota 'burst' allows 2 requests per 1m0s" in third.denied_response.body
    assert third.dynamic_metadata["deny_reason"] == "rate_limit_exceeded"
    assert await held(store) == holding  # the refused request holds no budget
    if isinstance(store, RedisSpendStore):  # and is not indexed as holding one
        assert await index_of(store, "r2") is not None
        assert await index_of(store, "r3") is None


async def test_a_check_refused_by_its_budget_is_charged_to_no_rate_limit(
        stores: tuple[SpendStore, CounterBackend]) -> None:
    """A budget with room for one request (at most 0.00012 USD): the second is refused,
    first waiting for the first's hold (429 budget_in_flight), then over the budget (402);
    neither counts against the rpm of 2, which the third, once the first settled, shows."""
    store, counters = stores
    svc = answering_rate_limits(store, counters, budget="0.0002")
    first = await svc.Check(check("r1"), Context(0.4))
    assert response_headers(first)["x-ratelimit-remaining-requests"] == "1"
    in_flight = await svc.Check(check("r2"), Context(0.15))
    assert in_flight.denied_response.status.code == 429, in_flight.denied_response.body
    assert "budget_in_flight" in in_flight.denied_response.body
    day = period_labels(datetime.now(UTC), "UTC")["day"]
    counter = SpendCounter("project:team-ai", "day", day)
    cost = int(first.dynamic_metadata["budget_hold"])  # the most a request can cost
    await store.commit("acme", "r1", [counter], cost)
    over = await svc.Check(check("r3"), Context(0.4))
    assert over.denied_response.status.code == 402, over.denied_response.body

    await store.commit("acme", "", [counter], -cost)  # room again (as after a new day)
    third = await svc.Check(check("r4"), Context(0.4))
    assert response_headers(third)["x-ratelimit-remaining-requests"] == "0"


async def test_a_check_on_one_redis_holds_and_charges_in_one_call() -> None:
    """Spend and counters in one Redis: a Check's hold and charge are one script call (each
    call costs the services' loop about 0.2 ms of CPU), and the hold is indexed in it."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    store = RedisSpendStore(REDIS_URL, prefix=prefix, timeout=5.0)
    counters = RedisBackend(REDIS_URL, prefix=prefix, timeout=5.0)
    await require_redis(store.client)
    calls: list[str] = []  # commands sent, by the client's own way or by a lane
    for client, lane in ((store.client, store.lane), (counters.client, counters.lane)):
        def counting(*args: Any, _send: Any = client.execute_command, **kwargs: Any) -> Any:
            calls.append(str(args[0]))
            return _send(*args, **kwargs)
        client.execute_command = counting

        def sending(conn: Any, command: list[bytes], _send: Any = lane._call) -> Any:
            calls.append(b"".join(command).split(b"\r\n")[2].decode())
            return _send(conn, command)
        lane._call = sending  # type: ignore[method-assign]
    try:
        svc = answering_rate_limits(store, counters)
        await svc.Check(check("r0"), Context(0.4))  # loads the script (EVALSHA, SCRIPT LOAD)
        calls.clear()
        r = await svc.Check(check("r1"), Context(0.4))
        assert r.status.code == 0
        assert response_headers(r)["x-ratelimit-remaining-requests"] == "0"
        assert calls == ["EVALSHA"]
        assert await held(store) == 2 * int(r.dynamic_metadata["budget_hold"])
        assert await index_of(store, "r1") is not None
    finally:
        await store.close()
        for key in [k async for k in counters.client.scan_iter(f"{prefix}:*")]:
            await counters.client.delete(key)
        await counters.close()


@pytest.mark.parametrize("fail_closed", [True, False])
async def test_a_check_with_its_counters_down_answers_as_its_route_says(
        fail_closed: bool) -> None:
    """Counters down alone (memory spend), or spend and counters in one Redis down."""
    down = "redis://127.0.0.1:1/0"
    for store, counters in ((MemorySpendStore(), DownCounters()),
                            (RedisSpendStore(down), RedisBackend(down))):
        svc = answering_rate_limits(store, counters, fail_closed=fail_closed)
        r = await svc.Check(check("r1"), Context(0.4))
        if fail_closed:
            assert r.denied_response.status.code == 503
            assert "gateway_unavailable" in r.denied_response.body
        else:
            assert r.status.code == 0
            assert r.dynamic_metadata["rate_limited_by"] == "check"  # not charged again
            # the budget held where the store is up, else let through unheld
            assert ("budget_hold" in r.dynamic_metadata) == isinstance(store, MemorySpendStore)
        if isinstance(store, MemorySpendStore):
            assert await held(store) == (0 if fail_closed else
                                         int(r.dynamic_metadata["budget_hold"]))
        await store.close()
        await counters.close()


async def test_in_filter_mode_the_check_charges_no_rate_limit() -> None:
    svc = answering_rate_limits(MemorySpendStore(), MemoryBackend(), rpm=1, mode="filter")
    for rid in ("r1", "r2"):  # Envoy's rate-limit filter asks ratelimit for these
        r = await svc.Check(check(rid), Context(0.4))
        assert r.status.code == 0 and not r.ok_response.response_headers_to_add


def rendered_for(mode: str, rid: str) -> external_auth_pb2.CheckRequest:
    """A Check from a route rendered for services.rate_limit `mode`."""
    req = check(rid)
    req.attributes.context_extensions["rate_limited_by"] = mode
    return req


async def test_the_listener_not_the_manifest_decides_whether_the_check_charges() -> None:
    """During a reload Envoy's listener and the services' manifest may disagree; the route
    says what the listener has, so a request is charged once: by the Check when the listener
    has no rate-limit filter, else by the filter's call."""
    svc = answering_rate_limits(MemorySpendStore(), MemoryBackend(), rpm=1, mode="filter")
    first = await svc.Check(rendered_for("check", "r1"), Context(0.4))
    assert first.status.code == 0
    assert first.dynamic_metadata["rate_limited_by"] == "check"  # the filter must not charge
    assert response_headers(first)["x-ratelimit-remaining-requests"] == "0"
    assert (await svc.Check(rendered_for("check", "r2"), Context(0.4))).denied_response \
        .status.code == 429

    svc = answering_rate_limits(MemorySpendStore(), MemoryBackend(), rpm=1, mode="check")
    for rid in ("r1", "r2"):  # the listener still has the filter: it charges these
        r = await svc.Check(rendered_for("filter", rid), Context(0.4))
        assert r.status.code == 0 and not r.ok_response.response_headers_to_add
        assert "rate_limited_by" not in r.dynamic_metadata


async def test_a_check_asked_for_the_rate_limit_without_the_counters_refuses() -> None:
    """Memory counters live in the ratelimit process; an extauthz apart from it has none to
    charge, and must not count on a private set."""
    store = MemorySpendStore()
    svc = answering_rate_limits(store, None)
    r = await svc.Check(rendered_for("check", "r1"), Context(0.4))
    assert r.denied_response.status.code == 503
    assert await held(store) == 0


async def test_a_check_past_envoys_deadline_takes_back_its_rate_limit_charge(
        stores: tuple[SpendStore, CounterBackend]) -> None:
    store, counters = stores
    svc = answering_rate_limits(store, counters, rpm=1)
    late = await svc.Check(check("r1"), Context(0.0))
    assert late.denied_response.status.code == 503
    assert await held(store) == 0
    # the one request a minute is still there for a request Envoy waits for
    ok = await svc.Check(check("r2"), Context(0.4))
    assert response_headers(ok)["x-ratelimit-remaining-requests"] == "0"
