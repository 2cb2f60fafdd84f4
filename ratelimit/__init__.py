"""`ratelimit`: how fast. Envoy's global rate-limit service over Tollway's quotas."""

from __future__ import annotations

import grpc
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tollway._proto import settle_pb2, settle_pb2_grpc, usage_pb2, usage_pb2_grpc
from tollway.manifest import Manifest
from tollway.redis_client import counter_store_url
from tollway.reload import Live
from tollway.serve import ServiceContext
from tollway.spend import SpendStore

from .backend import CounterBackend, MemoryBackend
from .service import RateLimitService, TokenSettlementService
from .usage import UsageService


def open_backend(spec: str) -> CounterBackend:
    url = counter_store_url(spec)
    if url is None:
        return MemoryBackend()
    from .redis_backend import RedisBackend

    return RedisBackend(url)


class RateLimit:
    grpc_names = (rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name,
                  settle_pb2.DESCRIPTOR.services_by_name["TokenSettlement"].full_name,
                  usage_pb2.DESCRIPTOR.services_by_name["Usage"].full_name)

    def __init__(self, ctx: ServiceContext, manifest: Live[Manifest],
                 backend: CounterBackend, spend: SpendStore) -> None:
        self.ctx = ctx
        keys = ctx.key_mirror()
        self.servicer = RateLimitService(manifest, backend, keys)
        self.settlement = TokenSettlementService(manifest, backend, keys)
        self.usage = UsageService(manifest, backend, spend, keys)

    def register(self, server: grpc.aio.Server) -> None:
        rls_pb2_grpc.add_RateLimitServiceServicer_to_server(self.servicer, server)
        settle_pb2_grpc.add_TokenSettlementServicer_to_server(self.settlement, server)
        usage_pb2_grpc.add_UsageServicer_to_server(self.usage, server)

    async def start(self) -> None:
        await self.ctx.start_key_mirror(required=False)

    async def stop(self) -> None:
        return None  # the process's counter backend is closed by serve, its owner


async def build(ctx: ServiceContext) -> RateLimit:
    # counters live as long as the process: a reload swaps the manifest, not the backend, so
    # counters of unchanged quotas (same scope, name and limit) carry on
    manifest = ctx.watcher.subscribe(Live(lambda m: m, ctx.manifest))
    return RateLimit(ctx, manifest, ctx.counter_backend(), ctx.spend_store())
