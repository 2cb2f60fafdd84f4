"""`costsink`: what it costs. Envoy's gRPC access-log sink, pricing every request."""

from __future__ import annotations

import asyncio

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from tollway.manifest import Manifest
from tollway.reload import Compiled
from tollway.serve import ServiceContext

from .ledger import Ledger, open_ledger
from .service import AccessLogSink


class CostSink:
    grpc_names = (als_pb2.DESCRIPTOR.services_by_name["AccessLogService"].full_name,)

    def __init__(self, ctx: ServiceContext, manifest: Compiled[Manifest], ledger: Ledger) -> None:
        self.ctx = ctx
        self.ledger = ledger
        self.sink = AccessLogSink(manifest, ledger)

    def register(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.sink, server)

    async def start(self) -> None:
        await self.ledger.open()
        self.ctx.tasks.append(asyncio.create_task(self.sink.write_forever(), name="ledger"))

    async def stop(self) -> None:
        await self.sink.close()
        await self.ledger.close()


async def build(ctx: ServiceContext) -> CostSink:
    manifest = ctx.watcher.subscribe(Compiled(lambda m: m, ctx.manifest))
    return CostSink(ctx, manifest, open_ledger(ctx.manifest.storage.ledger))
