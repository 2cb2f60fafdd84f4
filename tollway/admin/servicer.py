"""The admin service's wiring into `tollway serve`: its manifest view, the key mirror and the
pepper, registered on the process's gRPC server."""

from __future__ import annotations

import grpc

from tollway._proto import admin_pb2_grpc
from tollway.refs import pepper
from tollway.reload import Live
from tollway.serve import ServiceContext

from . import SERVICE
from .service import AdminService


class Admin:
    grpc_names = (SERVICE,)

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        manifest = ctx.watcher.subscribe(Live(lambda m: m, ctx.manifest))
        secret = ctx.watcher.subscribe(
            Live(lambda m: pepper(m.storage.pepper, create=True), ctx.manifest))
        self.servicer = AdminService(manifest, ctx.key_mirror(), secret)

    def register(self, server: grpc.aio.Server) -> None:
        admin_pb2_grpc.add_AdminServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        await self.ctx.start_key_mirror(required=True)

    async def stop(self) -> None:
        return None
