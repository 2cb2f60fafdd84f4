"""The rate-limit service over real gRPC: ShouldRateLimit answers, and Settle corrects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from ratelimit.backend import MemoryBackend
from ratelimit.service import RateLimitService, TokenSettlementService
from tollway._proto import settle_pb2, settle_pb2_grpc
from tollway.keys.mirror import KeyMirror
from tollway.keys.sqlite import SqliteKeyStore
from tollway.manifest import load
from tollway.reload import Live

TEAM_AI = Path(__file__).parent.parent / "examples" / "team-ai.yaml"


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    m = Live(lambda x: x, load(TEAM_AI))
    backend = MemoryBackend()
    store = SqliteKeyStore(tmp_path / "keys.db")  # no runtime keys: the manifest's only
    await store.open()
    keys = KeyMirror(store)
    server = grpc.aio.server()
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(RateLimitService(m, backend, keys),
                                                        server)
    settle_pb2_grpc.add_TokenSettlementServicer_to_server(
        TokenSettlementService(m, backend, keys), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)
    await store.close()


def should(model: str, reserve: int, rate_limited_by: str = "") -> rls_pb2.RateLimitRequest:
    """`rate_limited_by`: the descriptor a route rendered by this version adds ("filter"
    unless the Check charged the request); empty: a route rendered before it."""
    entries = {"org": "acme", "project": "team-ai", "key_id": "da-sk-acme-team",
               "model": model, "route": "route0", "dialect": "openai",
               "reserve_tokens": str(reserve)}
    if rate_limited_by:
        entries["rate_limited_by"] = rate_limited_by
    d = ratelimit_pb2.RateLimitDescriptor(entries=[
        ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()])
    return rls_pb2.RateLimitRequest(domain="tollway", descriptors=[d])


def headers(resp: rls_pb2.RateLimitResponse) -> dict[str, str]:
    return {h.key: h.value for h in resp.response_headers_to_add}


async def test_settle_returns_unused_reservation_to_tpm(channel: grpc.aio.Channel) -> None:
    rls = rls_pb2_grpc.RateLimitServiceStub(channel)
    settle = settle_pb2_grpc.TokenSettlementStub(channel)
    first = await rls.ShouldRateLimit(should("gpt-5.4", 50_000))
    assert first.overall_code == rls_pb2.RateLimitResponse.OK
    assert headers(first)["x-ratelimit-remaining-tokens"] == "10000"
    md = first.dynamic_metadata
    refused = await rls.ShouldRateLimit(should("gpt-5.4", 20_000))
    assert refused.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert b'"code":"rate_limit_exceeded"' in refused.raw_body
    out = await settle.Settle(settle_pb2.SettleRequest(
        key_id="da-sk-acme-team", model="gpt-5.4", reserved_tokens=int(md["reserved_tokens"]),
        actual_tokens=1_200, charged_at_ms=int(md["charged_at_ms"])))
    assert out.delta == -48_800 and out.counters == 1
    again = await rls.ShouldRateLimit(should("gpt-5.4", 20_000))
    assert again.overall_code == rls_pb2.RateLimitResponse.OK
    assert headers(again)["x-ratelimit-remaining-tokens"] == str(60_000 - 1_200 - 20_000)


async def test_settle_for_an_unknown_key_is_not_found(channel: grpc.aio.Channel) -> None:
    settle = settle_pb2_grpc.TokenSettlementStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await settle.Settle(settle_pb2.SettleRequest(key_id="nobody", model="gpt-5.4"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_with_the_rate_limit_in_the_check_the_filter_is_answered_without_a_charge(
        tmp_path: Path) -> None:
    """Envoy still asks while its listener has the filter after a reload to `check`; extauthz
    charged the request already, so a second charge would count it twice."""
    import dataclasses

    m = load(TEAM_AI)
    m = dataclasses.replace(m, services=dataclasses.replace(m.services, rate_limit="check"))
    backend = MemoryBackend()
    store = SqliteKeyStore(tmp_path / "keys.db")
    await store.open()
    rls = RateLimitService(Live(lambda x: x, m), backend, KeyMirror(store))
    try:
        for _ in range(50):  # gpt-5.4 allows 40 a minute
            answer = await rls.ShouldRateLimit(should("gpt-5.4", 10), None)
            assert answer.overall_code == rls_pb2.RateLimitResponse.OK
        assert not any(backend._counters.values())  # nothing counted
    finally:
        await store.close()


@pytest.mark.parametrize("manifest_says", ["filter", "check"])
async def test_the_request_not_the_manifest_says_whether_the_check_charged(
        tmp_path: Path, manifest_says: str) -> None:
    """Whatever this process's manifest says during a reload, the filter's call charges
    exactly the requests whose Check did not: their descriptor says which."""
    import dataclasses

    m = load(TEAM_AI)
    m = dataclasses.replace(m, services=dataclasses.replace(m.services, rate_limit=manifest_says))
    backend = MemoryBackend()
    store = SqliteKeyStore(tmp_path / "keys.db")
    await store.open()
    rls = RateLimitService(Live(lambda x: x, m), backend, KeyMirror(store))
    try:
        for _ in range(5):
            charged = await rls.ShouldRateLimit(should("gpt-5.4", 10, "check"), None)
            assert charged.overall_code == rls_pb2.RateLimitResponse.OK
        assert not any(backend._counters.values())  # the Check counted these
        answer = await rls.ShouldRateLimit(should("gpt-5.4", 10, "filter"), None)
        assert headers(answer)["x-ratelimit-remaining-requests"] == "39"  # of 40 a minute
    finally:
        await store.close()


class Late:
    """A context whose deadline has passed: Envoy has stopped waiting for the answer."""

    def time_remaining(self) -> float:
        return 0.0


async def test_a_charge_envoy_stopped_waiting_for_is_taken_back(tmp_path: Path) -> None:
    backend = MemoryBackend()
    store = SqliteKeyStore(tmp_path / "keys.db")
    await store.open()
    rls = RateLimitService(Live(lambda x: x, load(TEAM_AI)), backend, KeyMirror(store))
    try:
        await rls.ShouldRateLimit(should("gpt-5.4", 500), Late())
        assert not any(n for buckets in backend._counters.values() for n in buckets.values())
        answer = await rls.ShouldRateLimit(should("gpt-5.4", 500), None)
        assert headers(answer)["x-ratelimit-remaining-requests"] == "39"  # of 40 a minute
    finally:
        await store.close()
